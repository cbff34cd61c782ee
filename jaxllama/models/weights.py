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

from jaxllama.errors import (
    ConfigMismatchError,
    DeviceMemoryError,
    GGUFError,
    InvalidModelType,
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
    dtype: Any
    plan: ShardingPlan | None = None  # the mesh and rule the params are placed by

    @property
    def model_type(self) -> ModelType:
        return self.config.model_type

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self.params))


def default_dtype():
    """bfloat16 on accelerators, float32 on the CPU (where bf16 matmuls are slow)."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


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


def _bounds(index: slice, size: int) -> tuple[int, int]:
    start, stop, _ = index.indices(size)
    return start, stop


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
    block = GGML_QUANT_SIZES[t.qtype][0]
    units_per_block = data.shape[1] // (cols // block)
    part_shape = (r1 - r0, c1 - c0) if len(shape) == 2 else (c1 - c0,)
    if c0 % block == 0 and c1 % block == 0:  # whole blocks: decode only this slice
        part = data[r0:r1, c0 // block * units_per_block: c1 // block * units_per_block]
        return dequant.dequantize(part, t.qtype, part_shape, dtype, name=t.name, device=device)
    full = dequant.dequantize(data[r0:r1], t.qtype, (r1 - r0, cols), dtype, name=t.name,
                              device=device)
    return full[:, c0:c1].reshape(part_shape)


def _place_field(t: GGUFTensor, rows: tuple[int, int] | None, dtype,
                 sharding: NamedSharding) -> jax.Array:
    """One params field as a global array on `sharding`, built shard by shard: each device
    decodes only its own part, so no device ever holds the whole tensor (unless the rule
    replicates it)."""
    shape = ((rows[1] - rows[0],) + t.shape[1:]) if rows is not None else t.shape
    decoded: dict[tuple, jax.Array] = {}
    shards = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple(_bounds(i, n) for i, n in zip(index, shape))
        if key in decoded:  # a replica of a part already decoded: copy it over
            shards.append(jax.device_put(decoded[key], device))
        else:
            decoded[key] = _decode_shard(t, rows, shape, index, dtype, device)
            shards.append(decoded[key])
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def load_gguf(
    path: str | os.PathLike | GGUFFile,
    config: ModelConfig | None = None,
    *,
    dtype: Any = None,
    progress: bool = True,
    mesh: Mesh | None = None,
) -> LoadedModel:
    """Load a GGUF file onto the default device, or onto `mesh`'s devices.

    With `config`, the file's own config must agree with it field by field (an error
    names the field and both values); without, the config is read from the file.
    `dtype` defaults to `default_dtype()`. With a `mesh` (axes "data" and "model", see
    `jaxllama.sharding`), each tensor is streamed to its shards: every device decodes
    only the rows/columns it holds, straight from the file's bytes.
    """
    gguf_file = path if isinstance(path, GGUFFile) else read_gguf(path)
    file_config = config_from_gguf(gguf_file)
    if config is not None:
        check_config_matches(config, file_config, str(gguf_file.path))
    config = file_config
    plan = None if mesh is None else ShardingPlan(mesh, config)
    dtype = jnp.dtype(dtype or default_dtype())
    shapes = check_tensors(gguf_file, config)
    check_device_memory(sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
                        // (1 if plan is None else plan.model_size), str(gguf_file.path))

    made: list[jax.Array] = []

    def load(name: str) -> jax.Array:
        t = gguf_file.tensors[name]
        arr = dequant.dequantize(t.data, t.qtype, t.shape, dtype, name=name)
        made.append(arr)
        bar.update(1)
        return arr

    def place(name: str, rows, sharding: NamedSharding) -> jax.Array:
        arr = _place_field(gguf_file.tensors[name], rows, dtype, sharding)
        made.append(arr)
        return arr

    try:
        with tqdm(total=len(shapes), desc=f"loading {gguf_file.path.name}", unit="tensor",
                  disable=not progress, leave=False) as bar:
            if plan is None:
                top = lambda field, name: load(name)  # noqa: E731
            else:
                def top(field, name):
                    bar.update(1)
                    return place(name, None, plan.top_sharding(field, len(gguf_file.tensors[name].shape)))
            embed = top("embed", "token_embd.weight")
            layers = []
            for i in range(config.num_layers):
                fields, cache = {}, {}
                plan_i = _layer_plan(gguf_file, config, i)
                for field, (name, rows) in plan_i.items():
                    if plan is not None:
                        ndim = len(gguf_file.tensors[name].shape)
                        fields[field] = place(name, rows, plan.layer_sharding(field, ndim))
                        continue
                    if name not in cache:
                        cache[name] = load(name)
                    fields[field] = cache[name] if rows is None else cache[name][rows[0]:rows[1]]
                if plan is not None:
                    bar.update(len({name for name, _ in plan_i.values()}))
                layers.append(LayerParams(**fields))
            params = Params(
                embed=embed,
                layers=tuple(layers),
                final_norm=top("final_norm", "output_norm.weight"),
                output=None if config.tied_output else top("output", "output.weight"),
            )
            # Fused tensors were sliced into copies: free the fused originals now.
            keep = {id(x) for x in jax.tree_util.tree_leaves(params)}
            for arr in made:
                if id(arr) not in keep:
                    arr.delete()
    except BaseException:
        for arr in made:
            if not arr.is_deleted():
                arr.delete()
        raise
    return LoadedModel(config=config, params=params, metadata=gguf_file.metadata,
                       path=gguf_file.path, dtype=dtype, plan=plan)


class FamilyLoader:
    """`XWeightLoader.load_to_vram(path, config)` of the published design, for one family.

    The file must be of this loader's family: a Phi-3 file given to the Qwen loader is an
    `InvalidModelType` naming the file's family.
    """

    def __init__(self, model_type: ModelType, name: str):
        self.model_type = model_type
        self.__name__ = self.__qualname__ = name

    def load_to_vram(self, path: str | os.PathLike, config: ModelConfig | None = None, *,
                     dtype: Any = None, progress: bool = True, mesh: Mesh | None = None) -> LoadedModel:
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
        return load_gguf(gguf_file, config, dtype=dtype, progress=progress, mesh=mesh)

    def __repr__(self) -> str:
        return self.__name__
