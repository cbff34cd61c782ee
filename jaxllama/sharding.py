"""Running one model over many devices with JAX's own SPMD machinery.

A `ShardingPlan` is a `jax.sharding.Mesh` with two named axes, `data` (batch rows) and
`model` (tensor parallel), and the rule that maps every weight, the KV cache and the
batch inputs onto it. The jitted prefill/decode steps are the single-device ones: the
arrays carry `NamedSharding`s, XLA's partitioner (GSPMD) splits each matmul and inserts
the collectives, and `forward` pins the cache's layout so each step's output cache has
the sharding of its input (donated in place, no recompilation between steps).

The rule (Megatron-style tensor parallelism on the `model` axis of size m):
- query projection rows / output projection columns split by query heads, when m divides
  the number of query heads (whole heads per device); otherwise replicated;
- key/value projection rows and the KV cache's head axis split by KV heads, when m
  divides the number of KV heads. With fewer KV heads than m (or a count m does not
  divide), the K/V projections and the KV cache are replicated over `model`: every device
  computes and keeps all KV heads, while the query heads, the FFN and the vocabulary stay
  split. Llama-3-70B (8 KV heads) on 8 devices shards them; Qwen2.5-0.5B (2 KV heads)
  on 8 replicates them (they are 1/7 of its attention bytes);
- FFN gate/up rows and down-projection columns split when m divides the FFN width;
- the embedding table and the output projection split by vocabulary rows when m divides
  the vocabulary size; norms are replicated.
Batch rows (tokens, lengths, the cache's batch axis) split over `data` when its size
divides the batch; otherwise they are replicated. Any split that does not divide is
replicated rather than padded, so no shape ever changes and results equal the
single-device path up to float rounding of the split reductions.

Across hosts, call `jax.distributed.initialize()` first on every host; `make_mesh` then
spans all hosts' devices and each host loads only the shards its own devices hold.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllama.errors import InvalidRequestError
from jaxllama.models import params_spec
from jaxllama.models.config import ModelConfig

DATA, MODEL = "data", "model"

# Which axis of each params field the `model` axis splits comes from the field's logical
# axes (`jaxllama.models.params_spec.partition`): the rule above, written once there.


def make_mesh(model: int = 1, data: int | None = None, devices=None) -> Mesh:
    """A (data, model) mesh over `devices` (default: every device of every host).

    `data` defaults to the devices left over after `model`; data * model must equal the
    device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if not isinstance(model, int) or model < 1:
        raise InvalidRequestError(f"model axis size is {model!r}, expected an integer >= 1")
    if data is None:
        if n % model:
            raise InvalidRequestError(f"model axis size {model} does not divide the {n} devices")
        data = n // model
    if data * model != n:
        raise InvalidRequestError(
            f"mesh ({data}, {model}) needs {data * model} devices, but {n} are given"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(data, model), (DATA, MODEL))


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """A mesh plus the placement rule of this module's doc. Hashable: it is a static
    argument of the jitted steps."""

    mesh: Mesh
    config: ModelConfig

    def __post_init__(self):
        missing = {DATA, MODEL} - set(self.mesh.axis_names)
        if missing:
            raise InvalidRequestError(
                f"the mesh has axes {self.mesh.axis_names}; expected axes named "
                f"{DATA!r} and {MODEL!r} (see jaxllama.sharding.make_mesh)"
            )

    @property
    def model_size(self) -> int:
        return self.mesh.shape[MODEL]

    @property
    def data_size(self) -> int:
        return self.mesh.shape[DATA]

    def _splits(self, what: str) -> bool:
        c = self.config
        count = {"heads": c.num_heads, "kv_heads": c.num_kv_heads, "ffn": c.ffn_dim,
                 "vocab": c.vocab_size}[what]
        return count % self.model_size == 0

    def _spec(self, field: str, ndim: int) -> P:
        axis = params_spec.partition(field, self.config, self.model_size)
        if axis is None:
            return P()
        return P(*([None] * axis), MODEL, *([None] * (ndim - axis - 1)))

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def field_sharding(self, field: str, ndim: int) -> NamedSharding:
        """The layout of the params field `field` (any of `params_spec.FIELDS`)."""
        return self.named(self._spec(field, ndim))

    layer_sharding = top_sharding = field_sharding  # the names callers know

    def quantized_sharding(self, field: str, shape: tuple[int, int]) -> NamedSharding:
        """The layout of a quantized (out, in) field; its codes, scales and mins all take
        it. A split of the in axis must give each device whole 32-element blocks, else the
        field is replicated."""
        spec = self._spec(field, 2)
        if spec == P(None, MODEL) and shape[1] % (32 * self.model_size):
            spec = P()
        return self.named(spec)

    def kv_split(self) -> bool:
        return self._splits("kv_heads")

    def _kv_axis(self):
        """The mesh axis of a cache's KV-head dimension: model when it divides them."""
        return MODEL if self.kv_split() else None

    def _batch_axis(self, batch: int):
        return DATA if batch % self.data_size == 0 else None

    def cache_spec(self, batch: int) -> P:
        """(B, K, S, H): batch over data, KV heads over model (see the rule)."""
        return P(self._batch_axis(batch), self._kv_axis(), None, None)

    def pool_sharding(self) -> NamedSharding:
        """A paged pool (K, pages, page size, H) (`jaxllama.engine.paged_cache`): KV heads
        over model as in `cache_spec`; pages are shared by every slot, so never split."""
        return self.named(P(self._kv_axis(), None, None, None))

    def replicated(self) -> NamedSharding:
        """Whole on every device of the mesh."""
        return self.named(P())

    def batch_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        """Arrays whose first axis is the batch: split over `data`, rest replicated."""
        return self.named(P(self._batch_axis(shape[0]), *([None] * (len(shape) - 1))))

    def put_batch(self, x) -> jax.Array:
        x = jnp.asarray(x) if not isinstance(x, np.ndarray) else x
        return jax.device_put(x, self.batch_sharding(x.shape))

    def constrain_cache(self, x: jax.Array) -> jax.Array:
        """Inside jit: keep a (B, K, S, H) cache array on the plan's layout."""
        return jax.lax.with_sharding_constraint(x, self.named(self.cache_spec(x.shape[0])))

    def zeros_cache(self, shape: tuple[int, ...], dtype) -> jax.Array:
        """A zero cache array made directly in its shards (never whole on one device)."""
        sharding = self.named(self.cache_spec(shape[0]))
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()

    def param_shardings(self, params) -> Any:
        """The NamedSharding of every leaf of a `Params` tree, as the same tree."""
        from jaxllama.models.transformer import Params
        from jaxllama.quant import QuantizedWeight

        def one(field, value, layer_field: bool):
            if value is None:
                return None
            if isinstance(value, QuantizedWeight):
                sh = self.quantized_sharding(field, value.shape)
                return value.replace(q=sh, scales=sh, mins=None if value.mins is None else sh)
            return (self.layer_sharding if layer_field else self.top_sharding)(field, value.ndim)

        layers = tuple(
            type(layer)(**{f.name: one(f.name, getattr(layer, f.name), True)
                           for f in dataclasses.fields(layer)})
            for layer in params.layers
        )
        return Params(
            embed=one("embed", params.embed, False), layers=layers,
            final_norm=one("final_norm", params.final_norm, False),
            output=one("output", params.output, False),
        )

    def place(self, params) -> Any:
        """Move an existing params tree onto the mesh (for params made elsewhere)."""
        return jax.device_put(params, self.param_shardings(params))

    def bytes_per_device(self, params) -> int:
        """Bytes the params occupy on the most loaded device."""
        per_device: dict[Any, int] = {}
        for leaf in jax.tree_util.tree_leaves(params):
            for shard in leaf.addressable_shards:
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
        return max(per_device.values()) if per_device else 0

    def describe(self) -> str:
        m = self.model_size
        parts = [f"mesh data={self.data_size} x model={m}"]
        for what, label in (("heads", "query heads"), ("kv_heads", "KV heads"), ("ffn", "FFN"),
                            ("vocab", "vocabulary")):
            parts.append(f"{label} {'split' if self._splits(what) else 'replicated'}")
        return ", ".join(parts)


def to_host(x) -> np.ndarray:
    """A jax.Array's whole value as numpy on this host. Arrays that span other hosts'
    devices (multi-host meshes) are gathered from every process first; every process
    must make the same call."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def memory_plan(config: ModelConfig, *, devices: int, weight_bytes: float, batch: int,
                context: int, cache_bytes: int = 2) -> dict[str, float]:
    """Bytes per device for weights and KV cache under the tensor-parallel rule above.

    `weight_bytes` per parameter (2 for bf16, about 1.06 for int8 with per-32 f16 scales).
    The KV cache is split by KV heads when `devices` divides them, else replicated.
    Returns GiB per device for weights, cache and their sum.
    """
    c = config
    params = params_spec.param_count(c)
    weights = params * weight_bytes / devices
    kv_split = devices if c.num_kv_heads % devices == 0 else 1
    cache = 2 * c.num_layers * batch * context * c.kv_dim * cache_bytes / kv_split
    gib = 2.0**30
    return {"params": float(params), "weights_gib": weights / gib, "cache_gib": cache / gib,
            "total_gib": (weights + cache) / gib}


__all__ = ["DATA", "MODEL", "ShardingPlan", "make_mesh", "memory_plan", "to_host"]
