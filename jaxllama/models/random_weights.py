"""Random weights at the full shape of a config, made on the device: benchmarks need the
real shapes (bytes read per step, kernel tiles), not trained values, and a large model's
random float32 copy on the host would cost more time and memory than the run itself.

Every projection has variance 1/fan_in, so each layer keeps its activations near unit
scale and the logits finite; the embedding has standard deviation 0.02 (the usual init,
which keeps tied-output logits small); norms are ones and biases small. Values are uniform
with those variances rather than normal: the inverse-erf of `jax.random.normal` made
generation twice as slow on a 2-core CPU, and a benchmark needs the scale, not the shape of
the distribution. One jitted program draws a whole layer and is called once per layer, so a
model costs three compilations whatever its depth.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxllama.models import params_spec
from jaxllama.models.config import ModelConfig
from jaxllama.models.transformer import LayerParams, Params
from jaxllama.models.weights import LoadedModel, check_device_memory

EMBED_STD = 0.02  # the usual initializer range of the Llama-family configs
BIAS_STD = 0.02


def _uniform(key: jax.Array, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    # U(-a, a) has variance a^2 / 3. Drawn in float32 and cast in one fused kernel, so no
    # float32 copy of the tensor is kept.
    a = std * math.sqrt(3.0)
    return jax.random.uniform(key, shape, jnp.float32, -a, a).astype(dtype)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _random_layer(key: jax.Array, *, config: ModelConfig, dtype: Any) -> LayerParams:
    # One program for all of a layer's tensors, compiled once and called per layer.
    fields = {}
    for i, (name, shape) in enumerate(param_shapes(config).items()):
        fields[name] = _init(params_spec.FIELDS[name].init, jax.random.fold_in(key, i), shape, dtype)
    return LayerParams(**fields)


def _init(init: str, key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """A field's values by its `params_spec.FieldSpec.init` (see the module doc)."""
    if init == "ones":
        return jnp.ones(shape, dtype)
    std = {"bias": BIAS_STD, "embed": EMBED_STD}.get(init) or 1.0 / math.sqrt(shape[1])
    return _uniform(key, shape, std, dtype)


@functools.partial(jax.jit, static_argnames=("shape", "std", "dtype"))
def _random_matrix(key: jax.Array, *, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    return _uniform(key, shape, std, dtype)


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every leaf of one layer (`LayerParams` field names) for `config`."""
    return params_spec.layer_shapes(config)


def weight_bytes(config: ModelConfig, dtype: Any) -> int:
    """Bytes of the params `random_params(config, dtype)` makes (and a GGUF load makes)."""
    return params_spec.weight_bytes(config, jnp.dtype(dtype).itemsize)


def random_params(config: ModelConfig, dtype: Any = jnp.bfloat16, seed: int = 0) -> Params:
    """A `Params` pytree of `config`'s full shapes in `dtype`, on the default device.

    The same tree as `load_gguf` gives for a file of this config: projections (out, in),
    norms (D,) of ones, q/k/v biases only with `config.qkv_bias`, `output` None when tied.
    Deterministic for a seed (tensors draw from keys folded out of `PRNGKey(seed)`).
    """
    dtype = jnp.dtype(dtype)
    key = jax.random.PRNGKey(seed)
    # Keys 0 and 1 for the embedding and the output projection, 2 + i for layer i.
    top_keys = {"embed": 0, "output": 1}
    top = {}
    for name, shape in params_spec.field_shapes(config).items():
        init = params_spec.FIELDS[name].init
        if init == "ones":
            top[name] = jnp.ones(shape, dtype)
        else:
            std = EMBED_STD if init == "embed" else 1.0 / math.sqrt(shape[1])
            top[name] = _random_matrix(jax.random.fold_in(key, top_keys[name]), shape=shape,
                                       std=std, dtype=dtype)
    layers = tuple(_random_layer(jax.random.fold_in(key, 2 + i), config=config, dtype=dtype)
                   for i in range(config.num_layers))
    return Params(layers=layers, **top)


def synthetic_tokenizer_metadata(vocab_size: int) -> dict[str, Any]:
    """GGUF tokenizer keys for a vocabulary of placeholder tokens `<t0>`, `<t1>`, ... with no
    end-of-generation id, so the adapter's token-id APIs run and generation never stops early
    (what a benchmark wants); text in and out is meaningless."""
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [f"<t{i}>" for i in range(vocab_size)],
        "tokenizer.ggml.merges": [],
    }


def random_model(config: ModelConfig, dtype: Any = jnp.bfloat16, seed: int = 0) -> LoadedModel:
    """A `LoadedModel` of random weights for `LlamaInferenceAdapter.from_model`.

    Its metadata holds only a placeholder tokenizer without EOS (see
    `synthetic_tokenizer_metadata`). Refuses (DeviceMemoryError) a config whose weights
    cannot fit the device's free memory, before allocating anything.
    """
    dtype = jnp.dtype(dtype)
    where = f"random {config.arch} weights"
    check_device_memory(weight_bytes(config, dtype), where)
    params = random_params(config, dtype, seed)
    return LoadedModel(config=config, params=params,
                       metadata=synthetic_tokenizer_metadata(config.vocab_size),
                       path=Path(f"<{where}, seed {seed}>"), dtype=dtype)
