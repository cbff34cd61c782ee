"""From a GGUF file to a config and a params pytree on the default JAX device.

The mapping from llama.cpp's tensor names onto `Params` is the same for every family;
what differs is expressed by the tensors a file holds: q/k/v biases (Qwen2), a fused
`attn_qkv` (Phi-3, split here by rows), and a fused gate+up in `ffn_up` with 2*F rows,
gate first (Phi-3). Everything is checked (presence, shape, block type) before the first
byte is dequantized, so a bad file costs no device memory; if dequantization fails
midway, the arrays made so far are deleted before the error propagates.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from gguf import GGML_QUANT_SIZES
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from jaxllama import quant
from jaxllama.errors import (
    ConfigMismatchError,
    DeviceMemoryError,
    GGUFError,
    InvalidModelType,
    InvalidRequestError,
    UnsupportedTensorTypeError,
)
from jaxllama.gguf import dequant
from jaxllama.gguf.reader import GGUFFile, GGUFTensor, read_gguf
from jaxllama.models.config import ModelConfig, ModelType, check_config_matches, config_from_gguf
from jaxllama.models.transformer import LayerParams, Params
from jaxllama.sharding import ShardingPlan


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model on the device: its config, params, and the GGUF metadata (tokenizer, template)."""

    config: ModelConfig
    params: Params
    metadata: dict[str, Any]
    path: Path
    dtype: Any  # the compute dtype (that of the dense weights, norms and KV cache)
    plan: ShardingPlan | None = None  # the mesh and rule the params are placed by
    weights: str = "dense"  # "dense" (at `dtype`) or a quantized mode: int8, int4, native

    @property
    def model_type(self) -> ModelType:
        return self.config.model_type

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self.params))


def default_dtype():
    """bfloat16 on accelerators, float32 on the CPU (where bf16 matmuls are slow)."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


# `weights=` on loading: dense at a float dtype, or kept quantized (jaxllama.quant).
DENSE_WEIGHTS = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
QUANTIZED_WEIGHTS = ("int8", "int4", "native")
# The storage when neither `weights=` nor `dtype=` is given, on the CPU; None = dense
# float32. Measured (benchmarks/RESULTS.md, "CPU decode", loaded 2-core machine): int8
# holds 0.46x float32's peak memory and decoded SmolLM2 1.7x faster (48 against 28
# tokens/s), but Qwen2.5's int8 decode measured 2-3x slower than float32 and that is not
# yet understood; `native` keeps Q4_x as int4, which XLA's CPU backend multiplies slowly.
# So the default stays dense until Qwen's int8 decode is fixed; "int8" here switches it.
CPU_DEFAULT_WEIGHTS: str | None = None


def default_weights(dtype: Any = None) -> str | None:
    """`LlamaInferenceAdapter.from_gguf`'s storage when `weights=` is not given:
    CPU_DEFAULT_WEIGHTS on the CPU when no `dtype` is asked for either, else dense."""
    if dtype is None and jax.default_backend() == "cpu":
        return CPU_DEFAULT_WEIGHTS
    return None


WEIGHT_OPTIONS = (*DENSE_WEIGHTS, *QUANTIZED_WEIGHTS)
# The (out, in) matmul weights a quantized mode keeps quantized (norms and biases never).
_MATMUL_FIELDS = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "embed", "output"})


def _field_mode(field: str, mode: str, qtype) -> str:
    """The conversion mode of one field. Under "int4" the embedding and output projection
    stay int8 unless the file already holds them in a 4-bit type (kept exactly): as in
    llama.cpp's own 4-bit mixes, where they are Q6_K/Q8_0. Requantized to int4, SmolLM2's
    tied table gave top-1 agreement with float32 0.79, against 1.00 kept at int8."""
    if mode == "int4" and field in ("embed", "output") and qtype not in quant.EXACT_TYPES["int4"]:
        return "int8"
    return mode


def resolve_weights(weights: str | None, dtype: Any) -> tuple[Any, str | None]:
    """(compute dtype, quantized mode or None) for a `weights=` / `dtype=` pair.

    weights "f32" | "bf16" | "f16" are dense weights of that dtype (a `dtype` that
    disagrees is an error); "int8" | "int4" | "native" keep the matmul weights quantized
    and compute in `dtype` (default `default_dtype()`); None is dense at `dtype`.
    """
    if weights is None:
        return jnp.dtype(dtype or default_dtype()), None
    if weights not in WEIGHT_OPTIONS:
        raise InvalidRequestError(
            f"weights={weights!r} is not supported; expected one of {', '.join(WEIGHT_OPTIONS)}"
        )
    if weights in DENSE_WEIGHTS:
        want = jnp.dtype(DENSE_WEIGHTS[weights])
        if dtype is not None and jnp.dtype(dtype) != want:
            raise InvalidRequestError(
                f"weights={weights!r} means {want.name} weights, but dtype={jnp.dtype(dtype).name} "
                "was also given; pass one of them"
            )
        return want, None
    return jnp.dtype(dtype or default_dtype()), weights


# (params field, GGUF tensor suffix, row range as (start, end) in units resolved per config)
def _layer_plan(gguf_file: GGUFFile, config: ModelConfig, i: int) -> dict[str, tuple[str, tuple[int, int] | None]]:
    blk = f"blk.{i}."
    q, kv, f = config.q_dim, config.kv_dim, config.ffn_dim
    plan: dict[str, tuple[str, tuple[int, int] | None]] = {
        "attn_norm": (blk + "attn_norm.weight", None),
        "wo": (blk + "attn_output.weight", None),
        "ffn_norm": (blk + "ffn_norm.weight", None),
        "w_down": (blk + "ffn_down.weight", None),
    }
    if blk + "attn_qkv.weight" in gguf_file.tensors:
        name = blk + "attn_qkv.weight"
        plan.update(wq=(name, (0, q)), wk=(name, (q, q + kv)), wv=(name, (q + kv, q + 2 * kv)))
    else:
        plan.update(wq=(blk + "attn_q.weight", None), wk=(blk + "attn_k.weight", None),
                    wv=(blk + "attn_v.weight", None))
    if config.qkv_bias:
        plan.update(bq=(blk + "attn_q.bias", None), bk=(blk + "attn_k.bias", None),
                    bv=(blk + "attn_v.bias", None))
    if blk + "ffn_gate.weight" in gguf_file.tensors:
        plan.update(w_gate=(blk + "ffn_gate.weight", None), w_up=(blk + "ffn_up.weight", None))
    else:
        name = blk + "ffn_up.weight"
        plan.update(w_gate=(name, (0, f)), w_up=(name, (f, 2 * f)))
    return plan


def _expected_shapes(gguf_file: GGUFFile, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, q, kv, f, v = config.hidden_dim, config.q_dim, config.kv_dim, config.ffn_dim, config.vocab_size
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not config.tied_output:
        shapes["output.weight"] = (v, d)
    for i in range(config.num_layers):
        blk = f"blk.{i}."
        shapes.update({
            blk + "attn_norm.weight": (d,), blk + "attn_output.weight": (d, q),
            blk + "ffn_norm.weight": (d,), blk + "ffn_down.weight": (d, f),
        })
        if blk + "attn_qkv.weight" in gguf_file.tensors:
            shapes[blk + "attn_qkv.weight"] = (q + 2 * kv, d)
        else:
            shapes.update({blk + "attn_q.weight": (q, d), blk + "attn_k.weight": (kv, d),
                           blk + "attn_v.weight": (kv, d)})
        if config.qkv_bias:
            shapes.update({blk + "attn_q.bias": (q,), blk + "attn_k.bias": (kv,), blk + "attn_v.bias": (kv,)})
        if blk + "ffn_gate.weight" in gguf_file.tensors:
            shapes.update({blk + "ffn_gate.weight": (f, d), blk + "ffn_up.weight": (f, d)})
        else:
            shapes[blk + "ffn_up.weight"] = (2 * f, d)
    return shapes


def check_tensors(gguf_file: GGUFFile, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs is present, of the config's shape and a supported type."""
    # block_count is a header number: bound it by the tensor table before planning one
    # entry per layer, so a corrupt count is an error, not billions of dict entries.
    if config.num_layers > len(gguf_file.tensors):
        raise GGUFError(
            f"{gguf_file.path}: block_count is {config.num_layers}, but the file holds only "
            f"{len(gguf_file.tensors)} tensors"
        )
    shapes = _expected_shapes(gguf_file, config)
    for name, shape in shapes.items():
        tensor = gguf_file.tensor(name)
        if tensor.shape != shape:
            raise ConfigMismatchError(
                f"{gguf_file.path}: tensor {name} has shape {tensor.shape}, expected {shape} "
                f"from the config ({_shape_hint(name)})"
            )
        if tensor.qtype not in dequant.SUPPORTED_TYPES:
            raise UnsupportedTensorTypeError(
                f"{gguf_file.path}: tensor {name}: type {tensor.qtype.name} is not supported; "
                "supported: " + ", ".join(t.name for t in dequant.SUPPORTED_TYPES)
            )
    return shapes


def _shape_hint(name: str) -> str:
    if "token_embd" in name or name == "output.weight":
        return "vocab_size x hidden_dim"
    if "ffn" in name:
        return "ffn_dim and hidden_dim"
    if "attn" in name:
        return "num_heads/num_kv_heads x head_dim and hidden_dim"
    return "hidden_dim"


def free_device_memory(device: jax.Device | None = None) -> int | None:
    """Bytes free on `device` (default: the first), or None when the backend cannot say.

    Accelerators report `memory_stats()`; for the CPU backend the host's MemAvailable is
    what arrays can take.
    """
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_device_memory(needed: int, where: str) -> None:
    """Refuse a load that cannot fit, before allocating anything."""
    free = free_device_memory()
    if free is not None and needed > free:
        device = jax.devices()[0]
        raise DeviceMemoryError(
            f"{where}: the weights need {needed / 2**20:.0f} MiB on {device.platform}:{device.id} "
            f"but only {free / 2**20:.0f} MiB is free; free other models (adapter.unload()) or "
            "load a smaller model or a narrower dtype"
        )


def quantize_params(params: Params, kind: str) -> Params:
    """`params` with every matmul weight quantized to `kind` ("int8" | "int4"; under int4
    the embedding and output projection go to int8, as `load_gguf` does for float tensors).
    For weights that come without a GGUF file (random benchmark weights)."""
    if kind not in ("int8", "int4"):
        raise InvalidRequestError(f"quantize_params: kind {kind!r}; expected 'int8' or 'int4' "
                                  "('native' needs the GGUF file's block types)")
    def q(field, w):
        return quant.quantize(w, _field_mode(field, kind, None), name=field)

    layers = tuple(layer.replace(**{f: q(f, getattr(layer, f)) for f in _MATMUL_FIELDS
                                    if hasattr(layer, f)})
                   for layer in params.layers)
    return params.replace(embed=q("embed", params.embed), layers=layers,
                          output=None if params.output is None else q("output", params.output))


def _bounds(index: slice, size: int) -> tuple[int, int]:
    start, stop, _ = index.indices(size)
    return start, stop


def _column_blocks(data, t: GGUFTensor, c0: int, c1: int):
    """Columns [c0, c1) of rows `data` of `t`'s stored blocks, or None when the range
    cuts a GGUF block (then the caller converts whole rows and slices)."""
    block = GGML_QUANT_SIZES[t.qtype][0]
    if c0 % block or c1 % block:
        return None
    units = data.shape[1] // (t.shape[-1] // block)  # stored units (bytes/values) per block
    return data[:, c0 // block * units: c1 // block * units]


def _decode_shard(t: GGUFTensor, rows: tuple[int, int] | None, shape: tuple[int, ...],
                  index: tuple[slice, ...], dtype, device) -> jax.Array:
    """The part `index` of the field `shape` (tensor `t`, rows `rows` of it), decoded on
    `device` from just the bytes that part needs."""
    data = t.data if t.data.ndim == 2 else t.data.reshape(1, -1)  # (rows, units per row)
    if len(shape) == 2:
        r0, r1 = _bounds(index[0], shape[0])
        c0, c1 = _bounds(index[1], shape[1])
    else:
        r0, r1 = 0, 1
        c0, c1 = _bounds(index[0], shape[0])
    if rows is not None:
        r0, r1 = r0 + rows[0], r1 + rows[0]
    cols = t.shape[-1]
    part_shape = (r1 - r0, c1 - c0) if len(shape) == 2 else (c1 - c0,)
    part = _column_blocks(data[r0:r1], t, c0, c1)
    if part is not None:  # whole blocks: decode only this slice
        return dequant.dequantize(part, t.qtype, part_shape, dtype, name=t.name, device=device)
    full = dequant.dequantize(data[r0:r1], t.qtype, (r1 - r0, cols), dtype, name=t.name,
                              device=device)
    return full[:, c0:c1].reshape(part_shape)


def _field_shape(t: GGUFTensor, rows: tuple[int, int] | None) -> tuple[int, ...]:
    return ((rows[1] - rows[0],) + t.shape[1:]) if rows is not None else t.shape


def _row_range(t: GGUFTensor, rows: tuple[int, int] | None):
    """(the stored bytes/values of rows `rows` of a 2-D tensor, their logical shape)."""
    shape = _field_shape(t, rows)
    return (t.data if rows is None else t.data[rows[0]:rows[1]]), shape


_FIELD_OF = {"token_embd": "embed", "output": "output"}  # GGUF name part -> field, for _field_mode


def _estimate_bytes(gguf_file: GGUFFile, shapes: dict[str, tuple[int, ...]], dtype, mode) -> float:
    """Device bytes the loaded params will take (quantized tensors at their kind's size)."""
    total = 0.0
    for name, shape in shapes.items():
        t = gguf_file.tensors[name]
        kind = (quant.kind_for(t.qtype, _field_mode(_FIELD_OF.get(name.split(".")[-2], ""), mode, t.qtype))
                if mode is not None and len(shape) == 2 else None)
        total += math.prod(shape) * (quant.BYTES_PER_WEIGHT[kind] if kind else dtype.itemsize)
    return total


def _shards(shape: tuple[int, ...], sharding: NamedSharding, make) -> list:
    """One part per addressable device of `sharding` over a field of `shape`:
    make(bounds, device) for the first device holding each distinct part, a
    device-to-device copy of it for the replicas. `bounds` is ((start, stop), ...) per axis."""
    made: dict[tuple, Any] = {}
    parts = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        bounds = tuple(_bounds(i, n) for i, n in zip(index, shape))
        if bounds in made:
            parts.append(jax.tree_util.tree_map(lambda a: jax.device_put(a, device), made[bounds]))
        else:
            made[bounds] = make(bounds, device)
            parts.append(made[bounds])
    return parts


def _place_quantized(t: GGUFTensor, rows: tuple[int, int] | None, mode: str,
                     sharding: NamedSharding) -> quant.QuantizedWeight:
    """A quantized field on `sharding` (the logical (out, in) layout; its codes, scales and
    mins split the same way), each device converting only its own rows / whole blocks."""
    shape = _field_shape(t, rows)
    offset = rows[0] if rows else 0

    def make(bounds, device):
        (r0, r1), (c0, c1) = bounds
        raw, _ = _row_range(t, (r0 + offset, r1 + offset))
        part = _column_blocks(raw, t, c0, c1)
        if part is not None:  # whole GGUF blocks (or whole rows): convert only these
            return quant.from_gguf_blocks(part, t.qtype, (r1 - r0, c1 - c0), mode, name=t.name,
                                          device=device)
        # a split inside a GGUF block (Q4_K's 256): convert the rows, keep our 32-blocks
        whole = quant.from_gguf_blocks(raw, t.qtype, (r1 - r0, shape[1]), mode, name=t.name,
                                       device=device)
        return whole.slice_columns(c0, c1)

    shards = _shards(shape, sharding, make)
    kind = shards[0].kind
    nb = -(-shape[1] // quant.BLOCK)
    q_cols = nb * quant.BLOCK if kind == "int8" else nb * quant.BLOCK // 2

    def glue(get, cols):
        arrays = [get(p) for p in shards]
        if arrays[0] is None:
            return None
        return jax.make_array_from_single_device_arrays((shape[0], cols), sharding, arrays)

    return quant.QuantizedWeight(q=glue(lambda p: p.q, q_cols), scales=glue(lambda p: p.scales, nb),
                                 mins=glue(lambda p: p.mins, nb), kind=kind, shape=shape)


def _place_field(t: GGUFTensor, rows: tuple[int, int] | None, dtype,
                 sharding: NamedSharding) -> jax.Array:
    """One params field as a global array on `sharding`, built shard by shard: each device
    decodes only its own part, so no device ever holds the whole tensor (unless the rule
    replicates it)."""
    shape = _field_shape(t, rows)

    def make(bounds, device):
        index = tuple(slice(a, b) for a, b in bounds)
        return _decode_shard(t, rows, shape, index, dtype, device)

    return jax.make_array_from_single_device_arrays(shape, sharding, _shards(shape, sharding, make))


def load_gguf(
    path: str | os.PathLike | GGUFFile,
    config: ModelConfig | None = None,
    *,
    dtype: Any = None,
    weights: str | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
) -> LoadedModel:
    """Load a GGUF file onto the default device, or onto `mesh`'s devices.

    With `config`, the file's own config must agree with it field by field (an error
    names the field and both values); without, the config is read from the file.
    `dtype` defaults to `default_dtype()`. `weights` picks the storage of the matmul
    weights (projections, embedding, output): "f32" | "bf16" | "f16" dense, or "int8" |
    "int4" | "native" kept quantized as `jaxllama.quant.QuantizedWeight` (the table in
    `jaxllama.quant.formats` says which GGUF type becomes what, exactly or requantized),
    with norms, biases, activations and the KV cache in `dtype`. With a `mesh` (axes
    "data" and "model", see `jaxllama.sharding`), each tensor is streamed to its shards: every device decodes
    only the rows/columns it holds, straight from the file's bytes.
    """
    gguf_file = path if isinstance(path, GGUFFile) else read_gguf(path)
    file_config = config_from_gguf(gguf_file)
    if config is not None:
        check_config_matches(config, file_config, str(gguf_file.path))
    config = file_config
    plan = None if mesh is None else ShardingPlan(mesh, config)
    dtype, mode = resolve_weights(weights, dtype)
    shapes = check_tensors(gguf_file, config)
    check_device_memory(int(_estimate_bytes(gguf_file, shapes, dtype, mode))
                        // (1 if plan is None else plan.model_size), str(gguf_file.path))

    made: list[jax.Array] = []

    def keep(arr):
        made.extend(jax.tree_util.tree_leaves(arr))
        return arr

    def load(name: str) -> jax.Array:
        t = gguf_file.tensors[name]
        arr = dequant.dequantize(t.data, t.qtype, t.shape, dtype, name=name)
        bar.update(1)
        return keep(arr)

    def place(name: str, rows, sharding: NamedSharding) -> jax.Array:
        return keep(_place_field(gguf_file.tensors[name], rows, dtype, sharding))

    def quantized(field: str, name: str, rows):
        """The field kept quantized, or None where the mode keeps this tensor dense."""
        t = gguf_file.tensors[name]
        if mode is None or field not in _MATMUL_FIELDS:
            return None
        field_mode = _field_mode(field, mode, t.qtype)
        if quant.kind_for(t.qtype, field_mode) is None:
            return None
        if plan is None:
            raw, shape = _row_range(t, rows)
            return keep(quant.from_gguf_blocks(raw, t.qtype, shape, field_mode, name=name))
        sharding = plan.quantized_sharding(field, _field_shape(t, rows))
        return keep(_place_quantized(t, rows, field_mode, sharding))

    try:
        with tqdm(total=len(shapes), desc=f"loading {gguf_file.path.name}", unit="tensor",
                  disable=not progress, leave=False) as bar:
            def top(field, name):
                q = quantized(field, name, None)
                if q is not None:
                    bar.update(1)
                    return q
                if plan is None:
                    return load(name)
                bar.update(1)
                return place(name, None, plan.top_sharding(field, len(gguf_file.tensors[name].shape)))

            embed = top("embed", "token_embd.weight")
            layers = []
            for i in range(config.num_layers):
                fields, cache = {}, {}
                plan_i = _layer_plan(gguf_file, config, i)
                for field, (name, rows) in plan_i.items():
                    q = quantized(field, name, rows)
                    if q is not None:
                        fields[field] = q
                        continue
                    if plan is not None:
                        ndim = len(gguf_file.tensors[name].shape)
                        fields[field] = place(name, rows, plan.layer_sharding(field, ndim))
                        continue
                    if name not in cache:
                        cache[name] = load(name)
                    fields[field] = cache[name] if rows is None else cache[name][rows[0]:rows[1]]
                # Tensors not loaded whole through `load` (which counts its own).
                bar.update(len({name for name, _ in plan_i.values()} - set(cache)))
                layers.append(LayerParams(**fields))
            params = Params(
                embed=embed,
                layers=tuple(layers),
                final_norm=top("final_norm", "output_norm.weight"),
                output=None if config.tied_output else top("output", "output.weight"),
            )
            # Fused tensors were sliced into copies: free the fused originals now.
            kept = {id(x) for x in jax.tree_util.tree_leaves(params)}
            for arr in made:
                if id(arr) not in kept:
                    arr.delete()
    except BaseException:
        for arr in made:
            if not arr.is_deleted():
                arr.delete()
        raise
    return LoadedModel(config=config, params=params, metadata=gguf_file.metadata,
                       path=gguf_file.path, dtype=dtype, plan=plan, weights=mode or "dense")


class FamilyLoader:
    """`XWeightLoader.load_to_vram(path, config)` of the published design, for one family.

    The file must be of this loader's family: a Phi-3 file given to the Qwen loader is an
    `InvalidModelType` naming the file's family.
    """

    def __init__(self, model_type: ModelType, name: str):
        self.model_type = model_type
        self.__name__ = self.__qualname__ = name

    def load_to_vram(self, path: str | os.PathLike, config: ModelConfig | None = None, *,
                     dtype: Any = None, weights: str | None = None, progress: bool = True,
                     mesh: Mesh | None = None) -> LoadedModel:
        if config is not None and config.model_type != self.model_type:
            raise InvalidModelType(
                config.model_type, f"{self.__name__} loads {self.model_type.name} models"
            )
        gguf_file = read_gguf(path)
        file_type = ModelType.from_architecture(gguf_file.architecture)
        if file_type != self.model_type:
            raise InvalidModelType(
                file_type, f"{gguf_file.path} holds a {file_type.name} model; "
                f"{self.__name__} loads {self.model_type.name} models"
            )
        return load_gguf(gguf_file, config, dtype=dtype, weights=weights, progress=progress, mesh=mesh)

    def __repr__(self) -> str:
        return self.__name__
