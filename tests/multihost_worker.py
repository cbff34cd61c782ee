"""One process of tests/test_sharding.py's two-process run (jax.distributed on the CPU).

Usage: python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT GGUF_PATH
Each process has 2 virtual CPU devices; the mesh (data=2, model=2) spans both processes.
Prints one JSON line: the largest logit difference from this process's own single-device
run, whether greedy tokens match, and the shards this process decoded while loading.
"""

import json
import os
import sys

pid, count, port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=count, process_id=pid)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxllama.gguf import dequant  # noqa: E402
from jaxllama.models import LlamaInferenceAdapter  # noqa: E402
from jaxllama.sharding import make_mesh  # noqa: E402

decoded = []
real = dequant.dequantize


def spy(raw, qtype, shape, dtype=jnp.float32, **kwargs):
    if kwargs.get("name") == "blk.0.ffn_down.weight":
        device = kwargs.get("device")
        decoded.append([list(shape), device is not None and device.process_index == pid])
    return real(raw, qtype, shape, dtype, **kwargs)


dequant.dequantize = spy
mesh = make_mesh(model=2, data=2)
sharded = LlamaInferenceAdapter.from_gguf(path, dtype=jnp.float32, progress=False, mesh=mesh)
dequant.dequantize = real
single = LlamaInferenceAdapter.from_gguf(path, dtype=jnp.float32, progress=False)

rows = [[5, 9, 33, 7, 100], [11, 12, 13, 14, 15, 16, 17]]
err = max(float(np.max(np.abs(a - b))) for a, b in zip(sharded.score(rows), single.score(rows)))
same = sharded.generate(rows, 8) == single.generate(rows, 8)
print(json.dumps({"process": pid, "devices": len(jax.devices()), "local": len(jax.local_devices()),
                  "max_logprob_diff": err, "tokens_equal": same, "decoded": decoded}), flush=True)
jax.distributed.shutdown()
