"""Phi-3: fused `attn_qkv` and gate+up (`ffn_up`, gate first), split at load; half-split
rotary; head_dim 96; LongRoPE short/long factors for the 128k variants.
"""

from __future__ import annotations

from jaxllama.models.config import ROPE_HALF, ModelConfig, ModelType
from jaxllama.models.transformer import decode_step, forward, prefill  # noqa: F401  (this family's model functions)
from jaxllama.models.weights import FamilyLoader

MODEL_TYPE = ModelType.Phi3


class Phi3Config:
    """Published Phi-3 presets (figures from the official configs)."""

    @staticmethod
    def phi3_mini_4k() -> ModelConfig:
        return ModelConfig(
            arch="phi3", vocab_size=32064, hidden_dim=3072, num_layers=32, num_heads=32,
            num_kv_heads=32, head_dim=96, ffn_dim=8192, rms_eps=1e-5, context_length=4096,
            rope_theta=10000.0, rope_style=ROPE_HALF, sliding_window=2047,
        )


Phi3WeightLoader = FamilyLoader(MODEL_TYPE, "Phi3WeightLoader")
