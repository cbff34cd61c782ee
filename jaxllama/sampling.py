"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p and a
repetition penalty, as pure jittable functions.

Which filters are on is static (`SamplerSpec`, part of the jit key); their values are
arrays (`SamplingParams`), so changing a temperature or a k never recompiles. The order
follows transformers: repetition penalty, temperature, top-k, top-p, min-p.

Randomness: each step's key is `fold_in(PRNGKey(seed), step)` and every row draws with
that same key on its own logits, so a prompt's tokens depend on its seed and step only,
never on its row index or on what else is in the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxllama.errors import InvalidRequestError

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Which parts of the sampler are compiled in (static)."""

    greedy: bool = True
    top_k: bool = False
    top_p: bool = False
    min_p: bool = False
    repetition_penalty: bool = False


@struct.dataclass
class SamplingParams:
    temperature: jax.Array  # () float32
    top_k: jax.Array  # () int32, 0 = off
    top_p: jax.Array  # () float32, 1 = off
    min_p: jax.Array  # () float32, 0 = off
    repetition_penalty: jax.Array  # () float32, 1 = off

    @classmethod
    def create(cls, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
        """The values as () arrays. Each may be a number or a () array (traced or not);
        anything else is an InvalidRequestError."""
        for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                            ("min_p", min_p), ("repetition_penalty", repetition_penalty)):
            _check_number(name, value, allow_arrays=True)
        try:
            return cls(
                temperature=jnp.float32(temperature), top_k=jnp.int32(top_k), top_p=jnp.float32(top_p),
                min_p=jnp.float32(min_p), repetition_penalty=jnp.float32(repetition_penalty),
            )
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. a top_k of NaN or 2**40
            raise InvalidRequestError(
                f"sampling: a value does not fit its type (float32 values, int32 top_k): {exc}"
            ) from exc


def _check_number(name: str, value, *, allow_arrays: bool = False) -> None:
    if isinstance(value, (int, float, np.integer, np.floating)):
        return
    if allow_arrays and hasattr(value, "dtype") and jnp.ndim(value) == 0 and (
            jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating)):
        return
    raise InvalidRequestError(f"sampling: {name} is {value!r}; expected a number")


def spec_for(temperature: float, top_k: int, top_p: float, min_p: float,
             repetition_penalty: float) -> SamplerSpec:
    """Which filters the values turn on (Python numbers; they pick the compilation)."""
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                        ("min_p", min_p), ("repetition_penalty", repetition_penalty)):
        _check_number(name, value)
    return SamplerSpec(
        greedy=temperature == 0,
        top_k=top_k > 0,
        top_p=top_p < 1.0,
        min_p=min_p > 0.0,
        repetition_penalty=repetition_penalty != 1.0,
    )


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """transformers' rule: a seen token's logit is divided by `penalty` if positive, else multiplied."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def filter_logits(logits: jax.Array, params: SamplingParams, spec: SamplerSpec) -> jax.Array:
    """Temperature then the top-k/top-p/min-p masks; removed tokens get -inf. logits (B, V)."""
    logits = logits.astype(jnp.float32) / params.temperature
    if spec.top_k or spec.top_p:
        sorted_desc = -jnp.sort(-logits, axis=-1)
    if spec.top_k:
        k = jnp.clip(params.top_k, 1, logits.shape[-1])
        kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], axis=-1)
        logits = jnp.where(logits < kth, NEG_INF, logits)
        # Mask by value, not by position: tokens tied with the k-th survive top-k (as in
        # transformers), so top-p below must weigh them too.
        sorted_desc = jnp.where(sorted_desc < kth, NEG_INF, sorted_desc)
    if spec.top_p:
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each sorted token
        keep = before < params.top_p
        keep = keep.at[..., 0].set(True)
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    if spec.min_p:
        probs = jax.nn.softmax(logits, axis=-1)
        limit = params.min_p * jnp.max(probs, axis=-1, keepdims=True)
        logits = jnp.where(probs < limit, NEG_INF, logits)
    return logits


def sample(
    logits: jax.Array, key: jax.Array, params: SamplingParams, spec: SamplerSpec,
    seen: jax.Array | None = None,
) -> jax.Array:
    """Next token per row, (B,) int32, from logits (B, V)."""
    logits = logits.astype(jnp.float32)
    if spec.repetition_penalty:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if spec.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits, params, spec)
    draw = jax.vmap(lambda row: jax.random.categorical(key, row))
    return draw(logits).astype(jnp.int32)


def step_key(base_key: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(base_key, step)
