"""What the compiled decode step does with its buffers, read from XLA's optimized HLO
(issue: no hidden copies in the step).

- The KV cache is donated: every layer's K and V input is aliased to an output of the
  compiled step (`input_output_alias`), so the update is in place, not a new cache a step.
- Layer weights are read where they lie: no copy, transpose or slice of a weight
  parameter in the entry computation of decode_step or of the on-device generate loop
  (scanning stacked layer weights is what produced such slices; layers are unrolled).
- Quantized weights stay quantized on the CPU: no computation outside a fusion (the
  entry, the loop bodies) makes a float array with as many elements as a quantized
  weight, in decode_step or in the generate loop, at batch 1 and 3 (issue 20: XLA
  hoisted the loop-invariant dequantize out of the loop and kept every weight dense).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import pytest

from jaxllama.engine import steps
from jaxllama.engine.spec import EngineSpec, EngineState
from jaxllama.models.llama import Llama3Config
from jaxllama.models.random_weights import random_model
from jaxllama.models.transformer import KVCache, decode_step
from jaxllama.models.weights import quantize_params
from jaxllama.quant import QuantizedWeight
from jaxllama.pallas.quant_matmul import quant_matmul_reference

LAYERS = 3


@pytest.fixture(scope="module")
def model():
    cfg = dataclasses.replace(Llama3Config.smollm2_135m(), num_layers=LAYERS)
    return random_model(cfg, jnp.float32, 0)


def _entry(hlo: str) -> list[str]:
    """The instructions of the ENTRY computation."""
    lines = hlo.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    body = []
    for line in lines[start + 1:]:
        if line.startswith("}"):
            break
        body.append(line.strip())
    return body


def _aliased_params(hlo: str) -> set[int]:
    header = next(line for line in hlo.splitlines() if line.startswith("HloModule"))
    if "input_output_alias=" not in header:
        return set()
    aliases = header.split("input_output_alias=", 1)[1].split("entry_computation_layout", 1)[0]
    # entries look like "{1}: (30, {}, may-alias)": output index -> (parameter, ...)
    return {int(p) for p in re.findall(r"\{[\d,\s]*\}: \((\d+),", aliases)}


def _param_shapes(entry: list[str]) -> dict[str, tuple[int, str]]:
    """name -> (parameter number, shape text) for the entry's parameters."""
    out = {}
    for line in entry:
        m = re.match(r"(?:ROOT )?%?([\w.\-]+) = (\S+) parameter\((\d+)\)", line)
        if m:
            out[m.group(1)] = (int(m.group(3)), m.group(2))
    return out


def _weight_ops(entry: list[str], weight_params: set[str]) -> list[str]:
    bad = []
    for line in entry:
        m = re.match(r"(?:ROOT )?%?[\w.\-]+ = \S+ (copy|transpose|slice|dynamic-slice)\((.*?)\)", line)
        if m and any(re.fullmatch(rf"%?{re.escape(p)}", a.strip()) for a in m.group(2).split(",")
                     for p in weight_params):
            bad.append(line[:160])
    return bad


def _weight_sized_buffers(hlo: str, params_tree) -> list[str]:
    """Instructions anywhere in the module that make a weight-matrix-shaped array by copy,
    slice, transpose or a fusion: a second copy of a weight in memory. (A lax.scan over
    stacked layer weights shows up here as a dynamic-slice fusion of each layer's slice.)"""
    shapes = {f"f32[{','.join(map(str, x.shape))}]" for x in jax.tree_util.tree_leaves(params_tree)
              if x.ndim == 2}
    pat = re.compile(r"= (f32\[[\d,]+\])\{[\d,]*\} (copy|dynamic-slice|slice|transpose|fusion)\(")
    return [line.strip()[:160] for line in hlo.splitlines()
            if (m := pat.search(line)) and m.group(1) in shapes]


def _weight_param_names(params_tree, entry: list[str], first: int) -> set[str]:
    """Entry parameters that are weight matrices (parameter numbers first.. over the
    flattened params tree, 2-D leaves only)."""
    leaves = jax.tree_util.tree_leaves(params_tree)
    matrices = {first + i for i, x in enumerate(leaves) if x.ndim == 2}
    return {name for name, (num, _) in _param_shapes(entry).items() if num in matrices}


def test_decode_step_updates_the_cache_in_place_and_reads_weights_where_they_lie(model):
    cfg = model.config
    cache = KVCache.for_params(model.params, cfg, 2, 64)
    compiled = decode_step.lower(model.params, jnp.zeros((2,), jnp.int32), cache, config=cfg).compile()
    hlo = compiled.as_text()
    n_params = len(jax.tree_util.tree_leaves(model.params))
    # decode_step(params, token, cache): cache leaves k..., v..., lengths follow params and token.
    cache_params = set(range(n_params + 1, n_params + 1 + 2 * LAYERS))
    assert cache_params <= _aliased_params(hlo), "a K/V cache input is not aliased to an output"
    entry = _entry(hlo)
    weights = _weight_param_names(model.params, entry, 0)
    assert len(weights) == 7 * LAYERS + 1  # 7 matmuls a layer + the tied embedding
    assert _weight_ops(entry, weights) == []
    assert _weight_sized_buffers(hlo, model.params) == []


def test_the_check_sees_a_scan_over_stacked_weights():
    """The detector is not blind: a lax.scan over stacked (576, 1536) weights is caught."""
    stacked = jnp.ones((3, 576, 1536))

    def scanned(ws, x):
        return jax.lax.scan(lambda h, w: ((h @ w)[:, :576], None), x, ws)[0]

    hlo = jax.jit(scanned).lower(stacked, jnp.ones((2, 576))).compile().as_text()
    assert _weight_sized_buffers(hlo, {"w": stacked[0]}) != []


def _engine(params, cfg, slots: int):
    """An engine description and empty state of `slots` decode slots, 4 pages each."""
    spec = EngineSpec(config=cfg, num_slots=slots, page_size=16, num_pages=4 * slots,
                      max_pages_per_slot=4, decode_steps=4)
    return spec, EngineState.create(spec, jnp.float32)


def test_engine_decode_keeps_weights_in_place(model):
    """The engine's decode (what the adapter's generate and the server run) takes the
    weights as loop-invariant operands of its N-step loop: no copy or slice of any
    weight parameter in its entry computation, and the page pools passed in (the
    donated state) are aliased to its output."""
    spec, state = _engine(model.params, model.config, 2)
    hlo = steps.decode.lower(model.params, state, spec).compile().as_text()
    entry = _entry(hlo)
    assert any(" while(" in line for line in entry), "the steps are not an XLA while loop"
    weights = _weight_param_names(model.params, entry, 0)
    assert len(weights) == 7 * LAYERS + 1
    assert _weight_ops(entry, weights) == []
    assert _weight_sized_buffers(hlo, model.params) == []
    n_params = len(jax.tree_util.tree_leaves(model.params))
    # decode(params, state): the state's leaves follow the params, its pools (k..., v...) first.
    pools = set(range(n_params, n_params + 2 * LAYERS))
    assert pools <= _aliased_params(hlo), "a page pool input is not aliased to an output"


# ----------------------------------------------------------------- quantized weights


def _quantized_leaves(tree) -> list[QuantizedWeight]:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    return [w for w in leaves if isinstance(w, QuantizedWeight)]


def _dense_weight_buffers(hlo: str, weights: list[QuantizedWeight]) -> list[str]:
    """Instructions outside fused computations (so: buffers XLA allocates) that make a
    float array of 2+ dims with as many elements as a quantized weight and its out or
    in dim first: the weight dense, as (out, in), (in, out) or (out, blocks, 32)."""
    sizes = set()
    for w in weights:
        for n in (w.shape[0] * w.shape[1], w.shape[0] * w.in_padded):
            sizes |= {(n, w.shape[0]), (n, w.shape[1]), (n, w.in_padded)}
    bad, in_fusion = [], False
    for line in hlo.splitlines():
        if line.startswith(("%", "ENTRY")) and line.rstrip().endswith("{"):
            in_fusion = line.startswith("%fused") or "fused_computation" in line.split("(")[0]
            continue
        m = re.search(r"= (f32|bf16|f16|f64)\[(\d+(?:,\d+)+)\]", line)
        if m and not in_fusion:
            dims = [int(d) for d in m.group(2).split(",")]
            if (math.prod(dims), dims[0]) in sizes:
                bad.append(line.strip()[:160])
    return bad


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, model):
    return quantize_params(model.params, request.param)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_keeps_quantized_weights_quantized(quantized, model, batch):
    cfg = model.config
    cache = KVCache.for_params(quantized, cfg, batch, 64)
    hlo = decode_step.lower(quantized, jnp.zeros((batch,), jnp.int32), cache, config=cfg).compile().as_text()
    weights = _quantized_leaves(quantized)
    assert len(weights) == 7 * LAYERS + 1
    assert _dense_weight_buffers(hlo, weights) == []


@pytest.mark.parametrize("slots", [1, 3])
def test_engine_decode_keeps_quantized_weights_quantized(quantized, model, slots):
    spec, state = _engine(quantized, model.config, slots)
    hlo = steps.decode.lower(quantized, state, spec).compile().as_text()
    assert any(" while(" in line for line in _entry(hlo))
    assert _dense_weight_buffers(hlo, _quantized_leaves(quantized)) == []


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_the_check_sees_a_hoisted_dequantize(kind):
    """The detector is not blind: the dequantize-then-dot twin inside a loop is hoisted
    by XLA and kept dense, and is caught."""
    from jaxllama.quant import quantize

    w = quantize(jnp.ones((256, 96)), kind)

    def loop(w, x):
        return jax.lax.fori_loop(0, 4, lambda i, h: jnp.tanh(quant_matmul_reference(h, w)[:, :96]), x)

    hlo = jax.jit(loop).lower(w, jnp.ones((2, 96))).compile().as_text()
    assert _dense_weight_buffers(hlo, [w]) != []


# Qwen2.5-0.5B's shapes that SmolLM2 lacks: a q/k/v projection with a bias, and an FFN
# down projection whose row (4864) is longer than XLA's CPU fuses into a matvec (a
# 16 KiB vector). Both were made dense on every step (RESULTS.md, "Qwen int8").
_QWEN_SHAPES = [((128, 896), True), ((896, 4864), False), ((896, 4864), True)]


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize(("shape", "bias"), _QWEN_SHAPES)
def test_a_biased_or_long_row_int8_matvec_stays_quantized(shape, bias, rows):
    from jaxllama.models.transformer import linear
    from jaxllama.quant import quantize

    w = quantize(jax.random.normal(jax.random.PRNGKey(0), shape), "int8")
    b = jnp.ones((shape[0],)) if bias else None
    # the residual add after it, as in the layer (another consumer XLA may fuse into the dot)
    step = jax.jit(lambda x, w, b: x[:, :1] + linear(jnp.tanh(x), w, b))
    hlo = step.lower(jnp.ones((rows, shape[1])), w, b).compile().as_text()
    assert _dense_weight_buffers(hlo, [w]) == []


def test_the_check_sees_a_long_row_matvec_made_dense():
    """The detector is not blind at the long-row shape: one plain ``x @ dequant(w).T``
    over a 4864-wide row is written dense by XLA's CPU, and is caught."""
    from jaxllama.quant import quantize

    w = quantize(jnp.ones((896, 4864)), "int8")
    keep_x = lambda x, w: x @ (w.q.astype(jnp.float32).reshape(896, -1, 32)  # noqa: E731
                               * w.scales.astype(jnp.float32)[..., None]).reshape(896, 4864).T
    hlo = jax.jit(keep_x).lower(jnp.ones((1, 4864)), w).compile().as_text()
    assert _dense_weight_buffers(hlo, [w]) != []
