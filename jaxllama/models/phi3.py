"""Phi-3: fused `attn_qkv` and gate+up (`ffn_up`, gate first), split at load; half-split
rotary; head_dim 96; LongRoPE short/long factors for the 128k variants.
"""

from __future__ import annotations

from jaxllama.models.config import ROPE_HALF, ModelConfig, ModelType
from jaxllama.models.family import Family, FamilyLoader

MODEL_TYPE = ModelType.Phi3
FAMILY = Family(
    arch="phi3", model_type=MODEL_TYPE, rope_style=ROPE_HALF,
    # llama.cpp's converter keeps Hugging Face's fused qkv_proj and gate_up_proj.
    fused={"blk.{i}.attn_qkv.weight": ("wq", "wk", "wv"),
           "blk.{i}.ffn_up.weight": ("w_gate", "w_up")},
    # The 128k variants name their scaling "longrope" or "su" (older converters): the
    # rope_factors_long/short tensors decide, whatever the name.
    rope_scaling_types=None,
)


class Phi3Config:
    """Published Phi-3 presets (figures from the official configs)."""

    @staticmethod
    def phi3_mini_4k() -> ModelConfig:
        return ModelConfig(
            arch="phi3", vocab_size=32064, hidden_dim=3072, num_layers=32, num_heads=32,
            num_kv_heads=32, head_dim=96, ffn_dim=8192, rms_eps=1e-5, context_length=4096,
            rope_theta=10000.0, rope_style=FAMILY.rope_style, sliding_window=2047,
        )


PRESETS = {"phi3-mini-4k": Phi3Config.phi3_mini_4k}
Phi3WeightLoader = FamilyLoader(MODEL_TYPE, "Phi3WeightLoader")
