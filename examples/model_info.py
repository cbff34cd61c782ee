"""Model information, as in the published design: type, vocabulary, width, depth, memory.

    python examples/model_info.py [--models NAME ...]
"""

import argparse

from jaxllama.models import LlamaInferenceAdapter
from jaxllama.models.phi3 import Phi3Config
from jaxllama.models.qwen import QwenConfig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
    args = parser.parse_args(argv)

    for name in args.models:
        adapter = LlamaInferenceAdapter.from_gguf(name, progress=False)
        print(f"== {name}")
        print(f"Model type: {adapter.model_type().name}")
        print(f"Vocab size: {adapter.vocab_size()}")
        print(f"Hidden dim: {adapter.hidden_dim()}")
        print(f"Layers: {adapter.num_layers()}")
        print(f"VRAM: {adapter.vram_usage() / 2**20:.1f} MB")
        adapter.unload()

    # The presets need no file: the published shapes of Qwen2.5-0.5B and Phi-3-mini.
    for preset in (QwenConfig.qwen2_5_0_5b(), Phi3Config.phi3_mini_4k()):
        print(f"preset {preset.model_type.name}: vocab {preset.vocab_size}, hidden "
              f"{preset.hidden_dim}, layers {preset.num_layers}")


if __name__ == "__main__":
    main()
