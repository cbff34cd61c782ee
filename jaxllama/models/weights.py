"""From a GGUF file to a config and a params pytree on the default JAX device.

Which tensor (and which rows of it) each `Params` field is read from is the plan
`jaxllama.models.params_spec.tensor_plan` derives from the file's family page: llama.cpp's
names, Phi-3's fused `attn_qkv` and gate-first `ffn_up` split by rows; q/k/v biases
and a separate output projection where the file holds them. Everything is checked
(presence, shape, block type) before the first byte is dequantized, so a bad file costs
no device memory; if dequantization fails midway, the arrays made so far are deleted
before the error propagates.
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

from jaxllama import hub, quant
from jaxllama.errors import (
    ConfigMismatchError,
    DeviceMemoryError,
    GGUFError,
    InvalidRequestError,
    UnsupportedTensorTypeError,
)
from jaxllama.gguf import dequant
from jaxllama.gguf.reader import GGUFFile, GGUFTensor, read_gguf
from jaxllama.models import params_spec
from jaxllama.models.config import ModelConfig, ModelType, check_config_matches, config_from_gguf
from jaxllama.models.families import family_for
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
DENSE_WEIGHTS = dict(zip(params_spec.DENSE_WEIGHTS, (jnp.float32, jnp.bfloat16, jnp.float16)))
QUANTIZED_WEIGHTS = params_spec.QUANTIZED_WEIGHTS
WEIGHT_OPTIONS = params_spec.WEIGHT_OPTIONS
# The storage when neither `weights=` nor `dtype=` is given, on the CPU; None = dense
# float32, so that the default outputs are the float32 model's: int8 decodes faster and
# holds less memory but prefills slower and can change greedy text (benchmarks/RESULTS.md,
# "CPU decode"; README, "Quantized weights"). "int8" here switches it.
CPU_DEFAULT_WEIGHTS: str | None = None


def default_weights(dtype: Any = None) -> str | None:
    """`LlamaInferenceAdapter.from_gguf`'s storage when `weights=` is not given:
    CPU_DEFAULT_WEIGHTS on the CPU when no `dtype` is asked for either, else dense."""
    if dtype is None and jax.default_backend() == "cpu":
        return CPU_DEFAULT_WEIGHTS
    return None


def _field_mode(field: str, mode: str, qtype) -> str:
    """The conversion mode of one field (`params_spec.field_mode`: under "int4" the
    vocabulary tables stay int8 unless the file holds them in a 4-bit type)."""
    return params_spec.field_mode(field, mode, qtype in quant.EXACT_TYPES["int4"])


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


def tensor_plan(gguf_file: GGUFFile, config: ModelConfig) -> params_spec.TensorPlan:
    """The loading plan of `config` for `gguf_file`'s family (see `params_spec.tensor_plan`)."""
    return params_spec.tensor_plan(family_for(gguf_file.architecture), config)


def check_tensors(gguf_file: GGUFFile, config: ModelConfig) -> params_spec.TensorPlan:
    """Every tensor the model needs is present, of the config's shape and a supported type.
    Returns the loading plan those checks were made against."""
    # block_count is a header number: bound it by the tensor table before planning one
    # entry per layer, so a corrupt count is an error, not billions of dict entries.
    if config.num_layers > len(gguf_file.tensors):
        raise GGUFError(
            f"{gguf_file.path}: block_count is {config.num_layers}, but the file holds only "
            f"{len(gguf_file.tensors)} tensors"
        )
    plan = tensor_plan(gguf_file, config)
    for name, shape in plan.shapes.items():
        tensor = gguf_file.tensor(name)
        if tensor.shape != shape:
            raise ConfigMismatchError(
                f"{gguf_file.path}: tensor {name} has shape {tensor.shape}, expected {shape} "
                f"from the config ({params_spec.shape_hint(plan.field_of[name])})"
            )
        if tensor.qtype not in dequant.SUPPORTED_TYPES:
            raise UnsupportedTensorTypeError(
                f"{gguf_file.path}: tensor {name}: type {tensor.qtype.name} is not supported; "
                "supported: " + ", ".join(t.name for t in dequant.SUPPORTED_TYPES)
            )
    return plan


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
    def q(fields, tree):
        return tree.replace(**{
            f.name: quant.quantize(getattr(tree, f.name), params_spec.field_mode(f.name, kind, False),
                                   name=f.name)
            for f in fields if f.quantizable and getattr(tree, f.name) is not None
        })

    return q(params_spec.TOP_FIELDS, params).replace(
        layers=tuple(q(params_spec.LAYER_FIELDS, layer) for layer in params.layers))


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


def _estimate_bytes(gguf_file: GGUFFile, plan: params_spec.TensorPlan, config: ModelConfig,
                    dtype, mode) -> float:
    """Device bytes the loaded params will take (quantized fields at their kind's size)."""
    total = 0.0
    for sources in (plan.top, *plan.layers):
        for field, source in sources.items():
            spec = params_spec.FIELDS[field]
            qtype = gguf_file.tensors[source.tensor].qtype
            kind = (quant.kind_for(qtype, _field_mode(field, mode, qtype))
                    if mode is not None and spec.quantizable else None)
            size = math.prod(spec.shape(config))
            total += size * (quant.BYTES_PER_WEIGHT[kind] if kind else dtype.itemsize)
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
    progress: bool = False,
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
    only the rows/columns it holds, straight from the file's bytes. `progress=True` shows
    a loading bar on stderr (off by default: a library call is quiet; the CLI turns it on).
    """
    gguf_file = path if isinstance(path, GGUFFile) else read_gguf(hub.resolve(path))
    file_config = config_from_gguf(gguf_file)
    if config is not None:
        check_config_matches(config, file_config, str(gguf_file.path))
    config = file_config
    plan = None if mesh is None else ShardingPlan(mesh, config)
    dtype, mode = resolve_weights(weights, dtype)
    layout = check_tensors(gguf_file, config)
    check_device_memory(int(_estimate_bytes(gguf_file, layout, config, dtype, mode))
                        // (1 if plan is None else plan.model_size), str(gguf_file.path))

    made: list[jax.Array] = []

    def keep(arr):
        made.extend(jax.tree_util.tree_leaves(arr))
        return arr

    def load(name: str) -> jax.Array:
        t = gguf_file.tensors[name]
        return keep(dequant.dequantize(t.data, t.qtype, t.shape, dtype, name=name))

    def place(name: str, rows, sharding: NamedSharding) -> jax.Array:
        return keep(_place_field(gguf_file.tensors[name], rows, dtype, sharding))

    def quantized(field: str, name: str, rows):
        """The field kept quantized, or None where the mode keeps this tensor dense."""
        t = gguf_file.tensors[name]
        if mode is None or not params_spec.FIELDS[field].quantizable:
            return None
        field_mode = _field_mode(field, mode, t.qtype)
        if quant.kind_for(t.qtype, field_mode) is None:
            return None
        if plan is None:
            raw, shape = _row_range(t, rows)
            return keep(quant.from_gguf_blocks(raw, t.qtype, shape, field_mode, name=name))
        sharding = plan.quantized_sharding(field, _field_shape(t, rows))
        return keep(_place_quantized(t, rows, field_mode, sharding))

    def read(sources: dict[str, params_spec.TensorSource]) -> dict[str, Any]:
        """The fields of `sources`, each tensor decoded once (a fused one sliced by rows)."""
        fields, whole = {}, {}
        for field, src in sources.items():
            q = quantized(field, src.tensor, src.rows)
            if q is not None:
                fields[field] = q
            elif plan is not None:
                ndim = len(gguf_file.tensors[src.tensor].shape)
                fields[field] = place(src.tensor, src.rows, plan.field_sharding(field, ndim))
            else:
                if src.tensor not in whole:
                    whole[src.tensor] = load(src.tensor)
                arr = whole[src.tensor]
                fields[field] = arr if src.rows is None else arr[src.rows[0]:src.rows[1]]
        bar.update(len({src.tensor for src in sources.values()}))
        return fields

    try:
        with tqdm(total=len(layout.shapes), desc=f"loading {gguf_file.path.name}", unit="tensor",
                  disable=not progress, leave=False) as bar:
            top = read(layout.top)
            layers = tuple(LayerParams(**read(sources)) for sources in layout.layers)
            params = Params(layers=layers, **top)
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
