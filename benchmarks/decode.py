"""Decode at the memory roofline: `jaxllama bench` as a script (same options).

    python -m benchmarks.decode --preset qwen2.5-0.5b --random-weights --compare-xla
    python -m benchmarks.decode --preset smollm2-135m --random-weights --batch 1 2 \
        --prompt-len 32 --decode-tokens 8                       # a quick CPU run
    python -m benchmarks.decode --model smollm2-135m-instruct    # a real file

See `jaxllama.bench` for what is measured and how.
"""

from __future__ import annotations

import sys

from jaxllama.bench import main

if __name__ == "__main__":
    sys.exit(main())
