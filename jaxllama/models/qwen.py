"""Qwen2 / Qwen2.5: q/k/v biases, half-split rotary, output tied or separate.

Everything else is the shared Llama-family block; GGUF names are llama.cpp's.
"""

from __future__ import annotations

from jaxllama.models.config import ROPE_HALF, ModelConfig, ModelType
from jaxllama.models.family import Family, FamilyLoader

MODEL_TYPE = ModelType.Qwen2_5
FAMILY = Family(arch="qwen2", model_type=MODEL_TYPE, rope_style=ROPE_HALF)


class QwenConfig:
    """Published Qwen presets (figures from the official configs)."""

    @staticmethod
    def qwen2_5_0_5b() -> ModelConfig:
        return ModelConfig(
            arch="qwen2", vocab_size=151936, hidden_dim=896, num_layers=24, num_heads=14,
            num_kv_heads=2, head_dim=64, ffn_dim=4864, rms_eps=1e-6, context_length=32768,
            rope_theta=1e6, rope_style=FAMILY.rope_style, qkv_bias=True, tied_output=True,
        )


PRESETS = {"qwen2.5-0.5b": QwenConfig.qwen2_5_0_5b}
QwenWeightLoader = FamilyLoader(MODEL_TYPE, "QwenWeightLoader")
