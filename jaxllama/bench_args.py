"""The options of `jaxllama bench` (and `python -m benchmarks.decode`), with no JAX.

Both `jaxllama.cli` (which builds its parser before anything loads a device) and
`jaxllama.bench` (which runs the benchmark) import these, so neither imports the other.
Presets come from the family registry (`jaxllama.models.families.PRESETS`), storages
from the params spec.
"""

from __future__ import annotations

import argparse

from jaxllama import hub
from jaxllama.models.families import PRESETS as BENCH_PRESETS
from jaxllama.models.params_spec import WEIGHT_OPTIONS as WEIGHT_CHOICES

__all__ = ["BENCH_PRESETS", "WEIGHT_CHOICES", "add_bench_arguments"]


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `jaxllama bench` and `python -m benchmarks.decode`."""
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", "-m", default=None,
                      help=f"packaged model name or GGUF path (default: {hub.DEFAULT_MODEL} "
                           "unless --preset is given)")
    what.add_argument("--preset", choices=sorted(BENCH_PRESETS), default=None,
                      help="a published config at full shape; needs --random-weights")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights made on the device (with --preset, or at the shape of "
                        "--model's file)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default 0)")
    p.add_argument("--dtype", choices=["bf16", "f32", "bfloat16", "float32"], default=None,
                   help="weight and KV-cache dtype (default: f32 on CPU, bf16 on GPU)")
    p.add_argument("--weights", choices=WEIGHT_CHOICES, nargs="+", default=None, metavar="W",
                   help="weight storages to time one after another, e.g. 'bf16 int8 int4' "
                        f"(choices {', '.join(WEIGHT_CHOICES)}; native needs a file, not random "
                        "weights; default: dense at --dtype)")
    p.add_argument("--batch", type=int, nargs="+", default=None, metavar="B",
                   help="batch sizes to time decode at (default: 1 8 32 128 on GPU, 1 4 on CPU)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="prompt tokens per row (default: 512 on GPU, 128 on CPU)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="tokens generated per row in the timed decode (default: 128 on GPU, 32 on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions, median kept (default 3)")
    p.add_argument("--session-lengths", type=int, nargs="*", default=None, metavar="N",
                   help="prompt lengths of the compile-count session (default: 6 lengths from 5 "
                        "up to --prompt-len, geometrically spaced; none: skip the session)")
    p.add_argument("--compare-xla", action="store_true",
                   help='also run attention_impl="xla" beside the default path')
    p.add_argument("--compilation-cache", metavar="DIR", default=None,
                   help="JAX persistent compilation cache directory for this run")
