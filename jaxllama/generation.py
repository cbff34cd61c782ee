"""Jitted scoring over any model function: per-token log-probabilities of whole
sequences (`score_tokens`, `score_tokens_top`) and packed scoring, many (context,
continuation) requests per fixed-width row (`score_packed`, `pack_requests`).

`model_fn` is a family's `forward` (static). Generation is not here: the adapter
generates through the serving engine's steps (`jaxllama.engine.steps`), the one decode
implementation. Shapes are bucketed by the caller so that varied requests reuse a few
compilations.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


_STATIC = ("model_fn", "config", "spec", "attention_impl")


@functools.partial(jax.jit, static_argnames=("model_fn", "config", "attention_impl"))
def score_tokens(params, tokens, cache, lengths, *, model_fn, config, attention_impl):
    """Log-probability of each next token and whether it is the argmax.

    tokens (B, T) padded, lengths (B,). Returns (B, T-1) float32 log p(tokens[:, i+1] |
    tokens[:, :i+1]) and (B, T-1) bool; entries past a row's length are undefined.
    """
    logits, _ = model_fn(params, tokens, cache, lengths, config=config,
                         attention_impl=attention_impl, all_logits=True)
    logits = logits[:, :-1]
    targets = tokens[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return picked, greedy


@functools.partial(jax.jit, static_argnames=("model_fn", "config", "attention_impl", "top"))
def score_tokens_top(params, tokens, cache, lengths, *, model_fn, config, attention_impl, top):
    """`score_tokens` with, in place of the greedy flag, the `top` most likely next tokens
    at each position: (B, T-1) float32 log-probabilities of the targets, (B, T-1, top)
    int32 ids and (B, T-1, top) float32 log-probabilities, best first (`lax.top_k` order,
    ties by lower id)."""
    logits, _ = model_fn(params, tokens, cache, lengths, config=config,
                         attention_impl=attention_impl, all_logits=True)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    top_logp, top_ids = jax.lax.top_k(logp, top)
    return picked, top_ids.astype(jnp.int32), top_logp


# ----- packed scoring: many (context, continuation) requests per fixed-width row

@functools.partial(jax.jit, static_argnames=("model_fn", "config", "attention_impl"))
def score_packed(params, tokens, cache, rope_positions, segment_ids, branch_ids, pred_index,
                 targets, *, model_fn, config, attention_impl):
    """Score packed rows (see `pack_requests`): tokens, rope_positions, segment_ids and
    branch_ids (R, W) int32; `cache` an empty KV cache of R rows and W slots; pred_index
    and targets (R, P) int32: token index i's next-token distribution scores targets.
    Returns (R, P) float32 log p(target | the tokens its sequence has before it) and
    (R, P) bool (target is the argmax); padding entries are undefined.
    """
    r, w = tokens.shape
    num_new = jnp.full((r,), w, jnp.int32)
    logits, _ = model_fn(params, tokens, cache, num_new, config=config,
                         attention_impl=attention_impl, rope_positions=rope_positions,
                         segment_ids=segment_ids, branch_ids=branch_ids, logits_at=pred_index)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return picked, greedy


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Host arrays for `score_packed` and where each request's scores land.

    tokens, rope_positions, segment_ids, branch_ids: (R, W) int32 (segment 0 is padding);
    pred_index, targets: (R, P) int32. spans[i] = (row, start, end): request i's
    continuation scores are [row, start:end] of score_packed's outputs, for the requests in
    these rows.
    """

    tokens: np.ndarray
    rope_positions: np.ndarray
    segment_ids: np.ndarray
    branch_ids: np.ndarray
    pred_index: np.ndarray
    targets: np.ndarray
    spans: dict[int, tuple[int, int, int]]


def packed_units(requests, width: int, share_context: bool) -> list[tuple[list[int], list[int]]]:
    """Group requests (context ids, continuation ids) into units (context, [request index,
    ...]) of at most `width` input tokens: a unit's context is fed once and each of its
    continuations (all but its last token, which is only predicted) follows as a branch.
    Without `share_context`, every request is its own unit. Each request alone must fit
    (len(context) + len(continuation) - 1 <= width)."""
    groups: dict = {}
    for i, (ctx, _) in enumerate(requests):
        groups.setdefault(tuple(ctx) if share_context else i, []).append(i)
    units = []
    for members in groups.values():
        ctx = list(requests[members[0]][0])
        current, used = [], len(ctx)
        for i in members:
            need = len(requests[i][1]) - 1
            if current and used + need > width:
                units.append((ctx, current))
                current, used = [], len(ctx)
            current.append(i)
            used += need
        units.append((ctx, current))
    return units


def pack_requests(requests, width: int, *, share_context: bool = True) -> list[list]:
    """Rows of units (see `packed_units`), first-fit decreasing by length into rows of
    `width` tokens. Returns the rows, each a list of units."""
    units = packed_units(requests, width, share_context)
    length = lambda u: len(u[0]) + sum(len(requests[i][1]) - 1 for i in u[1])  # noqa: E731
    rows, room = [], []
    for unit in sorted(units, key=length, reverse=True):
        n = length(unit)
        for j, free in enumerate(room):
            if free >= n:
                rows[j].append(unit)
                room[j] -= n
                break
        else:
            rows.append([unit])
            room.append(width - n)
    return rows


def packed_arrays(requests, rows, width: int, num_rows: int, preds: int | None = None) -> PackedRows:
    """The arrays of `rows` (from `pack_requests`), padded to `num_rows` rows; `preds`
    (P) defaults to the most predictions any row needs."""
    need = [sum(len(requests[i][1]) for _, members in row for i in members) for row in rows]
    p = max(need) if preds is None else preds
    tokens = np.zeros((num_rows, width), np.int32)
    rope = np.zeros((num_rows, width), np.int32)
    seg = np.zeros((num_rows, width), np.int32)
    branch = np.zeros((num_rows, width), np.int32)
    pred = np.zeros((num_rows, p), np.int32)
    targets = np.zeros((num_rows, p), np.int32)
    spans = {}
    for r, row in enumerate(rows):
        at, k = 0, 0  # next free slot, next free prediction
        for u, (ctx, members) in enumerate(row, start=1):
            c = len(ctx)
            tokens[r, at:at + c], rope[r, at:at + c], seg[r, at:at + c] = ctx, np.arange(c), u
            last_ctx = at + c - 1
            at += c
            for b, i in enumerate(members, start=1):
                cont = requests[i][1]
                n = len(cont) - 1  # inputs of this branch
                tokens[r, at:at + n] = cont[:-1]
                rope[r, at:at + n] = np.arange(c, c + n)
                seg[r, at:at + n], branch[r, at:at + n] = u, b
                pred[r, k] = last_ctx
                pred[r, k + 1:k + 1 + n] = np.arange(at, at + n)
                targets[r, k:k + n + 1] = cont
                spans[i] = (r, k, k + n + 1)
                at += n
                k += n + 1
    return PackedRows(tokens, rope, seg, branch, pred, targets, spans)
