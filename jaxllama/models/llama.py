"""Llama / Llama 3 / SmolLM2 (GGUF architecture `llama`).

Rotary is interleaved (GGML "NORM") because llama.cpp's converter permutes the rows of
`attn_q`/`attn_k` from Hugging Face's half-split order; we rotate the file's layout
as it is instead of undoing the permutation. Llama 3.1+ frequency scaling comes from the
`rope_freqs` tensor (per-frequency divisors).
"""

from __future__ import annotations

import dataclasses

from jaxllama.models.config import ROPE_INTERLEAVED, ModelConfig, ModelType, llama3_freq_factors
from jaxllama.models.family import Family, FamilyLoader

MODEL_TYPE = ModelType.Llama3
FAMILY = Family(arch="llama", model_type=MODEL_TYPE, rope_style=ROPE_INTERLEAVED)


class Llama3Config:
    """Published Llama 3 presets and SmolLM2 (figures from the official configs)."""

    @staticmethod
    def llama3_8b() -> ModelConfig:
        return ModelConfig(
            arch="llama", vocab_size=128256, hidden_dim=4096, num_layers=32, num_heads=32,
            num_kv_heads=8, head_dim=128, ffn_dim=14336, rms_eps=1e-5, context_length=8192,
            rope_theta=500000.0, rope_style=FAMILY.rope_style,
        )

    @staticmethod
    def llama3_70b() -> ModelConfig:
        """Llama 3 8B's recipe at 70B width and depth."""
        return dataclasses.replace(Llama3Config.llama3_8b(), hidden_dim=8192, num_layers=80,
                                   num_heads=64, ffn_dim=28672)

    @staticmethod
    def llama3_2_1b() -> ModelConfig:
        return ModelConfig(
            arch="llama", vocab_size=128256, hidden_dim=2048, num_layers=16, num_heads=32,
            num_kv_heads=8, head_dim=64, ffn_dim=8192, rms_eps=1e-5, context_length=131072,
            rope_theta=500000.0, rope_style=FAMILY.rope_style, tied_output=True,
            rope_freq_factors=llama3_freq_factors(
                64, 500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_context=8192,
            ),
        )

    @staticmethod
    def smollm2_135m() -> ModelConfig:
        return ModelConfig(
            arch="llama", vocab_size=49152, hidden_dim=576, num_layers=30, num_heads=9,
            num_kv_heads=3, head_dim=64, ffn_dim=1536, rms_eps=1e-5, context_length=8192,
            rope_theta=100000.0, rope_style=FAMILY.rope_style, tied_output=True,
        )


PRESETS = {
    "llama3-8b": Llama3Config.llama3_8b,
    "llama3.2-1b": Llama3Config.llama3_2_1b,
    "smollm2-135m": Llama3Config.smollm2_135m,
}
Llama3WeightLoader = FamilyLoader(MODEL_TYPE, "Llama3WeightLoader")
