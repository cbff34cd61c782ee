"""The XLA attention: the model's attention and the twin the Pallas kernels are held to.

One mask rule, written once (`attention_mask`): query t of row b, at absolute cache slot
``q_positions[b, t]``, sees slot s iff ``s <= q_positions[b, t]`` and ``s < kv_lengths[b]``
(and, with a sliding window W, ``s > q_positions[b, t] - W``). A query that sees no slot
gives 0. A packed row (many sequences side by side in one row, for scoring) adds per-slot
segment ids: the query at slot q sees slot s only if ``segment_ids[b, s] ==
segment_ids[b, q]``; with branch ids too (sequences that share a context: the context
is branch 0, each continuation its own branch > 0), also only if ``branch_ids[b, s]``
is 0 or equals ``branch_ids[b, q]``. `jaxllama.models.transformer` runs `xla_attention`; the kernels' references
(`flash_attention_reference`, `decode_attention_reference`) are it with their own
argument layouts, and the kernels' docstrings promise the same rule.

Einsum letters: B batch, T query length, S cache slots, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def attention_mask(q_positions: Array, kv_lengths: Array, num_slots: int,
                   sliding_window: int | None = None, segment_ids: Array | None = None,
                   branch_ids: Array | None = None) -> Array:
    """(B, T, S) bool: which of `num_slots` cache slots each query may attend.

    q_positions (B, T) int: the absolute slot of each query; kv_lengths (B,) int: the
    valid slots of each row. segment_ids / branch_ids (B, S) int, optional: the packed
    rows' per-slot ids (module doc); a query's own ids are those of its slot, which must
    be below `num_slots`.
    """
    slots = jnp.arange(num_slots)[None, None, :]
    qpos = q_positions[:, :, None]
    mask = (slots <= qpos) & (slots < kv_lengths[:, None, None])
    if sliding_window is not None:
        mask &= slots > qpos - sliding_window
    if segment_ids is not None:
        own = jnp.take_along_axis(segment_ids, q_positions, axis=1)  # (B, T)
        mask &= segment_ids[:, None, :] == own[:, :, None]
    if branch_ids is not None:
        own = jnp.take_along_axis(branch_ids, q_positions, axis=1)
        mask &= (branch_ids[:, None, :] == 0) | (branch_ids[:, None, :] == own[:, :, None])
    return mask


def xla_attention(
    q: Array, k: Array, v: Array, q_positions: Array, kv_lengths: Array, *, sm_scale: float,
    sliding_window: int | None = None, finite_values: bool = False,
    segment_ids: Array | None = None, branch_ids: Array | None = None,
) -> Array:
    """Plain-XLA attention. q (B, T, N, H), k/v (B, K, S, H) -> (B, T, N, H) in q.dtype.

    The mask is `attention_mask` (segment_ids / branch_ids (B, S) for packed rows).
    Logits are accumulated in float32 and softmaxed in
    float32; the weights are rounded to v's dtype for the weighted sum (float32
    accumulation), as the kernels do. Slots a query may not see never reach its output,
    whatever they hold (NaN included), unless `finite_values` says that v's slots past
    each row's length hold finite numbers: then the pass that zeroes them is skipped
    (the model's caches hold zeros or padding tokens' values there, and XLA:CPU does not
    fuse that pass into the dot; figures in benchmarks/RESULTS.md).
    """
    b, t, n, h = q.shape
    kh = k.shape[1]
    g = n // kh
    s = k.shape[2]
    mask = attention_mask(q_positions, kv_lengths, s, sliding_window, segment_ids, branch_ids)
    if t > 1:
        # A kv head's G query heads and T queries as one (G * T)-row operand: two plain
        # batched matmuls over (B, K), which XLA:CPU runs ~1.4x faster than the (G, T)
        # form at 256 queries over 2,048 keys (slower for one query: kept below).
        qg = jnp.transpose(q.reshape(b, t, kh, g, h), (0, 2, 3, 1, 4)).reshape(b, kh, g * t, h)
        mask = jnp.broadcast_to(mask[:, None, None], (b, kh, g, t, s)).reshape(b, kh, g * t, s)
        scores = jnp.einsum("BKQH,BKSH->BKQS", qg, k, preferred_element_type=jnp.float32)
    else:
        mask = mask[:, None, None]
        qg = q.reshape(b, t, kh, g, h)
        scores = jnp.einsum("BTKGH,BKSH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * sm_scale, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask, probs, 0.0)  # a query that sees nothing: 0, not NaN
    if not finite_values:  # a weight of 0 on a NaN is still NaN
        key_ok = jnp.arange(v.shape[2])[None, :] < kv_lengths[:, None]  # (B, S)
        v = jnp.where(key_ok[:, None, :, None], v, jnp.zeros((), v.dtype))
    # Both forms write (B, K, rows, H) and transpose after: XLA:CPU (jax 0.10) cannot run
    # the bf16 x bf16 -> f32 dot with a transposed BTKGH output once B > 1 ("Unsupported
    # element type for DotThunk::Execute").
    out = jnp.einsum("BKQS,BKSH->BKQH", probs.reshape(b, kh, g * t, s).astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = out.reshape(b, kh, g, t, h)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h).astype(q.dtype)


def prefill_positions(q_offset: Array, seq_q: int) -> Array:
    """(B, T) slots of a chunk of `seq_q` queries starting at slot q_offset (B,)."""
    return q_offset[:, None] + jnp.arange(seq_q, dtype=q_offset.dtype)[None, :]
