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
        if name.endswith("norm"):
            fields[name] = jnp.ones(shape, dtype)
        elif name.startswith("b"):
            fields[name] = _uniform(jax.random.fold_in(key, i), shape, BIAS_STD, dtype)
        else:
            fields[name] = _uniform(jax.random.fold_in(key, i), shape, 1.0 / math.sqrt(shape[1]), dtype)
    return LayerParams(**fields)


@functools.partial(jax.jit, static_argnames=("shape", "std", "dtype"))
def _random_matrix(key: jax.Array, *, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    return _uniform(key, shape, std, dtype)


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every leaf of one layer (`LayerParams` field names) for `config`."""
    d, q, kv, f = config.hidden_dim, config.q_dim, config.kv_dim, config.ffn_dim
    shapes = {
        "attn_norm": (d,), "wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q),
        "ffn_norm": (d,), "w_gate": (f, d), "w_up": (f, d), "w_down": (d, f),
    }
    if config.qkv_bias:
        shapes.update(bq=(q,), bk=(kv,), bv=(kv,))
    return shapes


def weight_bytes(config: ModelConfig, dtype: Any) -> int:
    """Bytes of the params `random_params(config, dtype)` makes (and a GGUF load makes)."""
    per_layer = sum(math.prod(s) for s in param_shapes(config).values())
    embed = config.vocab_size * config.hidden_dim
    total = embed + config.num_layers * per_layer + config.hidden_dim
    if not config.tied_output:
        total += embed
    return total * jnp.dtype(dtype).itemsize


def random_params(config: ModelConfig, dtype: Any = jnp.bfloat16, seed: int = 0) -> Params:
    """A `Params` pytree of `config`'s full shapes in `dtype`, on the default device.

    The same tree as `load_gguf` gives for a file of this config: projections (out, in),
    norms (D,) of ones, q/k/v biases only with `config.qkv_bias`, `output` None when tied.
    Deterministic for a seed (tensors draw from keys folded out of `PRNGKey(seed)`).
    """
    dtype = jnp.dtype(dtype)
    key = jax.random.PRNGKey(seed)
    vd = (config.vocab_size, config.hidden_dim)
    embed = _random_matrix(jax.random.fold_in(key, 0), shape=vd, std=EMBED_STD, dtype=dtype)
    output = None
    if not config.tied_output:
        output = _random_matrix(jax.random.fold_in(key, 1), shape=vd,
                                std=1.0 / math.sqrt(config.hidden_dim), dtype=dtype)
    layers = tuple(_random_layer(jax.random.fold_in(key, 2 + i), config=config, dtype=dtype)
                   for i in range(config.num_layers))
    return Params(embed=embed, layers=layers, final_norm=jnp.ones((config.hidden_dim,), dtype),
                  output=output)


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
