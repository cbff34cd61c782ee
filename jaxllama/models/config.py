"""The model config: a frozen, hashable description of one Llama-family network.

Qwen2.5, Phi-3 and Llama 3 (SmolLM2 included) are one architecture with switches; the
config holds the shapes and the switches, nothing that changes per request, so it can be
a static argument of `jax.jit`. `config_from_gguf` reads it from a file's metadata, with
the switches of the file's family (`jaxllama.models.families`); the family modules
(`qwen`, `phi3`, `llama`) hold the published presets. JAX-free.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import numpy as np

from jaxllama.errors import ConfigMismatchError, GGUFError


class ModelType(enum.Enum):
    """The model types of the published adapter design: the adapter's dispatch key (which
    model functions run a model). Each registered `Family` names the one that runs it."""

    Qwen2_5 = "qwen2"
    Phi3 = "phi3"
    Llama3 = "llama"  # every `llama`-architecture file, SmolLM2 included

    @classmethod
    def from_architecture(cls, arch: str) -> "ModelType":
        """The type of GGUF architecture `arch`'s family; InvalidModelType if none."""
        return _family(arch).model_type


def _family(arch: str):
    """The registered family of `arch`. Imported here, not at the top: the registry
    imports the family pages, whose presets are `ModelConfig`s of this module."""
    from jaxllama.models.families import family_for

    return family_for(arch)


ROPE_INTERLEAVED = "interleaved"  # GGML "NORM": rotate pairs (x[2i], x[2i+1])
ROPE_HALF = "half"  # GGML "NEOX" / Hugging Face: rotate pairs (x[i], x[i + d/2])


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of a Llama-family decoder.

    Rotary scaling, when present, is stored as per-frequency divisors of the base
    inverse frequencies (`rope_freq_factors`: Llama 3 and linear scaling) or as Phi-3's
    LongRoPE pair of factor tuples, chosen per row by sequence length.
    """

    arch: str
    vocab_size: int
    hidden_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    rms_eps: float
    context_length: int
    rope_theta: float
    rope_style: str = ROPE_HALF
    qkv_bias: bool = False
    tied_output: bool = False
    rope_freq_factors: tuple[float, ...] | None = None
    rope_short_factors: tuple[float, ...] | None = None
    rope_long_factors: tuple[float, ...] | None = None
    rope_original_context: int = 0
    rope_attn_factor: float = 1.0
    sliding_window: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigMismatchError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigMismatchError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_style not in (ROPE_INTERLEAVED, ROPE_HALF):
            raise ConfigMismatchError(f"rope_style {self.rope_style!r} is not one of interleaved, half")
        for name in ("rope_freq_factors", "rope_short_factors", "rope_long_factors"):
            value = getattr(self, name)
            if value is not None and len(value) != self.head_dim // 2:
                raise ConfigMismatchError(
                    f"{name} has {len(value)} entries, expected head_dim/2 = {self.head_dim // 2}"
                )

    @property
    def model_type(self) -> ModelType:
        return ModelType.from_architecture(self.arch)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def inv_freq(self) -> np.ndarray:
        """Base inverse frequencies (head_dim/2,), float64, with Llama-3/linear factors applied."""
        half = self.head_dim // 2
        inv = self.rope_theta ** (-np.arange(half, dtype=np.float64) * 2.0 / self.head_dim)
        if self.rope_freq_factors is not None:
            inv = inv / np.asarray(self.rope_freq_factors, np.float64)
        return inv

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def llama3_freq_factors(
    head_dim: int, theta: float, factor: float, low_freq_factor: float,
    high_freq_factor: float, original_context: int,
) -> tuple[float, ...]:
    """Per-frequency divisors of Llama 3.1+'s rope scaling, as llama.cpp stores in `rope_freqs`.

    Wavelengths shorter than original_context/high_freq_factor keep their frequency,
    longer than original_context/low_freq_factor are divided by `factor`, and the band
    between is interpolated smoothly (Meta's reference `apply_scaling`).
    """
    half = head_dim // 2
    inv = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim)
    wavelen = 2 * math.pi / inv
    low_wavelen = original_context / low_freq_factor
    high_wavelen = original_context / high_freq_factor
    out = []
    for w in wavelen:
        if w < high_wavelen:
            out.append(1.0)
        elif w > low_wavelen:
            out.append(float(factor))
        else:
            smooth = (original_context / w - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(float(1.0 / ((1 - smooth) / factor + smooth)))
    return tuple(out)


# Fields compared when a file is checked against a config the caller gave. `tied_output`
# is not among them: it says how the file stores the output projection (llama.cpp writes
# a separate `output.weight` for some checkpoints that were tied), and the file decides.
_CHECKED_FIELDS = (
    "arch", "vocab_size", "hidden_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "ffn_dim", "context_length", "qkv_bias", "rope_style", "rope_theta", "rms_eps",
    "rope_freq_factors", "rope_short_factors", "rope_long_factors", "rope_original_context",
    "rope_attn_factor", "sliding_window",
)


def check_config_matches(expected: ModelConfig, actual: ModelConfig, where: str) -> None:
    """Raise ConfigMismatchError naming the first field where `actual` (the file) differs."""
    for name in _CHECKED_FIELDS:
        want, got = getattr(expected, name), getattr(actual, name)
        if not _same(want, got):
            raise ConfigMismatchError(
                f"{where}: {name} is {_short(got)} in the file but {_short(want)} in the config given"
            )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-5)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and np.allclose(a, b, rtol=1e-5)
    return a == b


def _short(v: Any) -> str:
    if isinstance(v, tuple) and len(v) > 4:
        return f"({v[0]:.4g}, {v[1]:.4g}, ..., {v[-1]:.4g}) [{len(v)} values]"
    return repr(v)


def _meta(meta: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...):
    if key not in meta:
        if default is ...:
            raise GGUFError(f"{where}: required metadata key {key} is missing")
        return default
    value = meta[key]
    if isinstance(value, bool) and kind is not bool:
        raise GGUFError(f"{where}: metadata {key} is a boolean, expected {kind}")
    if not isinstance(value, kind):
        raise GGUFError(f"{where}: metadata {key} is {type(value).__name__}, expected {kind}")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise GGUFError(f"{where}: metadata {key} is {value}, expected a non-negative integer")
    return value


def config_from_gguf(gguf_file) -> ModelConfig:
    """Read a ModelConfig from a parsed GGUF file (metadata plus the tensor table)."""
    meta, where = gguf_file.metadata, str(gguf_file.path)
    arch = gguf_file.architecture
    family = _family(arch)  # raises InvalidModelType for an architecture not registered
    p = arch + "."
    num = (int, float)
    hidden = _meta(meta, p + "embedding_length", int, where)
    heads = _meta(meta, p + "attention.head_count", int, where)
    kv_heads = _meta(meta, p + "attention.head_count_kv", int, where, heads)
    if heads <= 0 or kv_heads <= 0 or hidden <= 0:
        raise GGUFError(f"{where}: embedding_length/head_count/head_count_kv must be positive")
    head_dim = _meta(meta, p + "attention.key_length", int, where, hidden // heads)
    rope_dim = _meta(meta, p + "rope.dimension_count", int, where, head_dim)
    if rope_dim != head_dim:
        raise GGUFError(
            f"{where}: partial rotary embeddings (rope.dimension_count {rope_dim} < head dim "
            f"{head_dim}) are not supported"
        )
    tensors = gguf_file.tensors
    embed = family.tensor_name("embed")
    if embed not in tensors:
        raise GGUFError(f"{where}: required tensor {embed} is missing")
    vocab = _meta(meta, p + "vocab_size", int, where, tensors[embed].shape[0])
    ffn = _meta(meta, p + "feed_forward_length", int, where)
    fields: dict[str, Any] = dict(
        arch=arch,
        vocab_size=vocab,
        hidden_dim=hidden,
        num_layers=_meta(meta, p + "block_count", int, where),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_dim=ffn,
        rms_eps=float(_meta(meta, p + "attention.layer_norm_rms_epsilon", num, where)),
        context_length=_meta(meta, p + "context_length", int, where),
        rope_theta=float(_meta(meta, p + "rope.freq_base", num, where, 10000.0)),
        rope_style=family.rope_style,
        # Optional tensors: the file says whether it has biases and an untied output.
        qkv_bias=family.tensor_name("bq").format(i=0) in tensors,
        tied_output=family.tensor_name("output") not in tensors,
    )
    window = meta.get(p + "attention.sliding_window")
    if isinstance(window, int) and window > 0:
        fields["sliding_window"] = window

    if "rope_freqs.weight" in tensors:
        factors = np.asarray(tensors["rope_freqs.weight"].data, np.float64).reshape(-1)
        fields["rope_freq_factors"] = tuple(float(f) for f in factors)
    scaling = meta.get(p + "rope.scaling.type")
    if scaling == "linear" and "rope_freq_factors" not in fields:
        factor = float(_meta(meta, p + "rope.scaling.factor", num, where))
        fields["rope_freq_factors"] = (factor,) * (head_dim // 2)
    elif (scaling is not None and family.rope_scaling_types is not None
          and scaling not in family.rope_scaling_types):
        raise GGUFError(f"{where}: rope scaling type {scaling!r} is not supported")
    if "rope_factors_long.weight" in tensors or "rope_factors_short.weight" in tensors:
        long_f = tensors.get("rope_factors_long.weight")
        short_f = tensors.get("rope_factors_short.weight")
        if long_f is None or short_f is None:
            raise GGUFError(f"{where}: LongRoPE needs both rope_factors_long and rope_factors_short")
        original = _meta(meta, p + "rope.scaling.original_context_length", int, where)
        if original < 2:  # the default attn_factor below divides by log(original)
            raise GGUFError(
                f"{where}: metadata {p}rope.scaling.original_context_length is {original}, "
                "expected at least 2"
            )
        ctx = fields["context_length"]
        default_attn = math.sqrt(1 + math.log(ctx / original) / math.log(original)) if ctx > original else 1.0
        fields.update(
            rope_long_factors=tuple(float(f) for f in np.asarray(long_f.data, np.float64).reshape(-1)),
            rope_short_factors=tuple(float(f) for f in np.asarray(short_f.data, np.float64).reshape(-1)),
            rope_original_context=original,
            rope_attn_factor=float(_meta(meta, p + "rope.scaling.attn_factor", num, where, default_attn)),
        )
    try:
        return ModelConfig(**fields)
    except ConfigMismatchError as exc:
        raise GGUFError(f"{where}: {exc}") from None
