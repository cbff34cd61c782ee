"""The one description of the params pytree, and how a family's GGUF file maps onto it.

Every leaf of `Params` / `LayerParams` (jaxllama.models.transformer) is a `FieldSpec`
here: its logical axes (from which its shape follows, given a config), whether a
quantized weight mode may keep it quantized, how random weights initialize it, when it
is present, and its llama.cpp tensor name. A `Family` (one page of data per family, in
`qwen.py`, `phi3.py`, `llama.py`) renames tensors and says which fields its files store
fused in one tensor, in row order. From these two, and nothing else, come:

- `field_shapes` / `layer_shapes`: the shape of every field for a config;
- `tensor_plan`: for a family and a config, every GGUF tensor the model needs with its
  expected shape, and for every field the tensor and row range it is read from (the
  loader's plan and its shape checks, `jaxllama.models.weights`);
- `param_count` and `weight_bytes`: parameter counts and the byte estimates of random
  weights, of a load (`weights._estimate_bytes`) and of the memory plan
  (`jaxllama.sharding.memory_plan`);
- `field_mode`: the quantized mode one field takes (the int4 table rule);
- `partition`: the field's split over the sharding rule's `model` axis.

Nothing here imports JAX: the CLI's parser, the presets and the planning all run
before (or without) a device.

Logical axes: "vocab" (vocab_size rows), "embed" (hidden_dim), "heads" (num_heads x
head_dim), "kv_heads" (num_kv_heads x head_dim), "ffn" (ffn_dim). Matrices are (out, in),
as GGUF and PyTorch store them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Literal, Mapping

from jaxllama.errors import InvalidRequestError

if TYPE_CHECKING:  # annotations only: this module stays importable without JAX
    from jaxllama.models.config import ModelConfig

Init = Literal["ones", "bias", "fan_in", "embed"]

# Each logical axis: (the config attribute giving its size, the config attribute giving
# the count the sharding rule must divide to split it; None: never split).
AXES: dict[str, tuple[str, str | None]] = {
    "vocab": ("vocab_size", "vocab_size"),
    "embed": ("hidden_dim", None),
    "heads": ("q_dim", "num_heads"),
    "kv_heads": ("kv_dim", "num_kv_heads"),
    "ffn": ("ffn_dim", "ffn_dim"),
}
AXIS_HINTS = {"vocab": "vocab_size", "embed": "hidden_dim", "heads": "num_heads x head_dim",
              "kv_heads": "num_kv_heads x head_dim", "ffn": "ffn_dim"}

# `weights=` storage names (`jaxllama.models.weights.resolve_weights` gives them dtypes).
DENSE_WEIGHTS: tuple[str, ...] = ("f32", "bf16", "f16")
QUANTIZED_WEIGHTS: tuple[str, ...] = ("int8", "int4", "native")
WEIGHT_OPTIONS: tuple[str, ...] = (*DENSE_WEIGHTS, *QUANTIZED_WEIGHTS)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One leaf of the params pytree.

    `gguf` is llama.cpp's tensor name; `{i}` stands for the layer index. `when` names the
    config switch the field exists under: "qkv_bias" (q/k/v biases), "untied" (a
    separate output projection), or None (always). `table` marks the vocabulary tables
    (embedding, output projection), which the int4 mode keeps at int8 (`field_mode`).
    """

    name: str
    axes: tuple[str, ...]
    gguf: str
    init: Init
    layer: bool = True
    when: Literal["qkv_bias", "untied"] | None = None
    table: bool = False

    @property
    def quantizable(self) -> bool:
        """Whether a quantized weight mode may keep it quantized (the matmul weights)."""
        return len(self.axes) == 2

    def present(self, config: ModelConfig) -> bool:
        if self.when == "qkv_bias":
            return config.qkv_bias
        if self.when == "untied":
            return not config.tied_output
        return True

    def shape(self, config: ModelConfig) -> tuple[int, ...]:
        return tuple(getattr(config, AXES[a][0]) for a in self.axes)


def _layer(name, axes, gguf, init, when=None) -> FieldSpec:
    return FieldSpec(name, axes, "blk.{i}." + gguf, init, when=when)


# In `LayerParams` order (random weights draw in this order, one key per field).
LAYER_FIELDS: tuple[FieldSpec, ...] = (
    _layer("attn_norm", ("embed",), "attn_norm.weight", "ones"),
    _layer("wq", ("heads", "embed"), "attn_q.weight", "fan_in"),
    _layer("wk", ("kv_heads", "embed"), "attn_k.weight", "fan_in"),
    _layer("wv", ("kv_heads", "embed"), "attn_v.weight", "fan_in"),
    _layer("wo", ("embed", "heads"), "attn_output.weight", "fan_in"),
    _layer("ffn_norm", ("embed",), "ffn_norm.weight", "ones"),
    _layer("w_gate", ("ffn", "embed"), "ffn_gate.weight", "fan_in"),
    _layer("w_up", ("ffn", "embed"), "ffn_up.weight", "fan_in"),
    _layer("w_down", ("embed", "ffn"), "ffn_down.weight", "fan_in"),
    _layer("bq", ("heads",), "attn_q.bias", "bias", when="qkv_bias"),
    _layer("bk", ("kv_heads",), "attn_k.bias", "bias", when="qkv_bias"),
    _layer("bv", ("kv_heads",), "attn_v.bias", "bias", when="qkv_bias"),
)
TOP_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("embed", ("vocab", "embed"), "token_embd.weight", "embed", layer=False, table=True),
    FieldSpec("final_norm", ("embed",), "output_norm.weight", "ones", layer=False),
    FieldSpec("output", ("vocab", "embed"), "output.weight", "fan_in", layer=False,
              when="untied", table=True),
)
FIELDS: dict[str, FieldSpec] = {f.name: f for f in TOP_FIELDS + LAYER_FIELDS}


def field_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every top-level field present for `config` (embed, final_norm, output)."""
    return {f.name: f.shape(config) for f in TOP_FIELDS if f.present(config)}


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every field of one layer present for `config`, in `LayerParams` order."""
    return {f.name: f.shape(config) for f in LAYER_FIELDS if f.present(config)}


def param_count(config: ModelConfig) -> int:
    """Parameters of the whole model (the output projection counted once when tied)."""
    per_layer = sum(math.prod(s) for s in layer_shapes(config).values())
    top = sum(math.prod(s) for s in field_shapes(config).values())
    return top + config.num_layers * per_layer


def weight_bytes(config: ModelConfig, itemsize: int) -> int:
    """Bytes of every field of `config` stored dense at `itemsize` bytes per value."""
    return param_count(config) * itemsize


def decode_fields(config: ModelConfig) -> tuple[str, ...]:
    """Top-level fields one decode step reads whole: the final norm and the output
    projection (the embedding when tied). An untied embedding table is only gathered."""
    return ("final_norm", "embed" if config.tied_output else "output")


def field_mode(field: str, mode: str, exact_int4: bool) -> str:
    """The quantized mode of one field under `mode` ("int8" | "int4" | "native").

    Under "int4" the vocabulary tables (embedding, output projection) stay int8 unless
    the file already holds them in a 4-bit type (`exact_int4`, kept exactly): as in
    llama.cpp's own 4-bit mixes, where they are Q6_K/Q8_0 (the agreement measured for
    each choice is in benchmarks/RESULTS.md, "Agreement of quantized weights")."""
    if mode == "int4" and FIELDS[field].table and not exact_int4:
        return "int8"
    return mode


def partition(field: str, config: ModelConfig, model_size: int) -> int | None:
    """The axis of `field` the `model` mesh axis splits, or None (replicated).

    The rule (Megatron-style, see `jaxllama.sharding`): a field's one non-"embed" logical
    axis is split when `model_size` divides its count (whole heads, whole FFN columns,
    whole vocabulary rows per device); "embed" is never split."""
    for axis, name in enumerate(FIELDS[field].axes):
        count = AXES[name][1]
        if count is not None:
            return axis if getattr(config, count) % model_size == 0 else None
    return None


def shape_hint(field: str) -> str:
    """Which config fields a field's shape comes from, for error messages."""
    return " and ".join(AXIS_HINTS[a] for a in FIELDS[field].axes)


# ------------------------------------------------------------------ families
@dataclasses.dataclass(frozen=True)
class TensorSource:
    """Where one field is read from: rows [start, stop) of `tensor` (None: all of it)."""

    tensor: str
    rows: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """For one family and config: every GGUF tensor the model needs with its expected
    shape, where each field comes from (top-level and per layer), and the field of every
    tensor (the first, for a fused one) for error messages."""

    shapes: dict[str, tuple[int, ...]]
    top: dict[str, TensorSource]
    layers: tuple[dict[str, TensorSource], ...]
    field_of: dict[str, str]


def tensor_plan(family, config: ModelConfig) -> TensorPlan:
    """The loading plan of `config` for a file of `family` (a `jaxllama.models.family.Family`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    field_of: dict[str, str] = {}

    def sources(fields: tuple[FieldSpec, ...], i: int | None) -> dict[str, TensorSource]:
        out: dict[str, TensorSource] = {}
        present = {f.name: f for f in fields if f.present(config)}
        for tensor, parts in family.fused.items():
            if not all(p in present for p in parts):
                continue
            name = tensor.format(i=i)
            start = 0
            for p in parts:
                rows = present[p].shape(config)
                out[p] = TensorSource(name, (start, start + rows[0]))
                start += rows[0]
            shapes[name] = (start,) + present[parts[0]].shape(config)[1:]
            field_of[name] = parts[0]
        for f in present.values():
            if f.name not in out:
                name = family.tensor_name(f.name).format(i=i)
                out[f.name] = TensorSource(name)
                shapes[name] = f.shape(config)
                field_of[name] = f.name
        return {f.name: out[f.name] for f in fields if f.name in out}

    top = sources(TOP_FIELDS, None)
    layers = tuple(sources(LAYER_FIELDS, i) for i in range(config.num_layers))
    return TensorPlan(shapes=shapes, top=top, layers=layers, field_of=field_of)


def check_family_names(names: Mapping[str, str], fused: Mapping[str, tuple[str, ...]], where: str) -> None:
    """A family's renames and fused groups name real fields; a fused group's parts share
    their in axis (they are stacked by rows)."""
    for field in list(names) + [p for parts in fused.values() for p in parts]:
        if field not in FIELDS:
            raise InvalidRequestError(f"{where}: {field!r} is not a params field; fields: {', '.join(FIELDS)}")
    for tensor, parts in fused.items():
        ins = {FIELDS[p].axes[1:] for p in parts}
        if len(ins) != 1 or not parts:
            raise InvalidRequestError(f"{where}: fused tensor {tensor} stacks fields of different in axes")
