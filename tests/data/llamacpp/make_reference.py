"""Write llama.cpp's teacher-forced predictions for text.txt, one JSON file per real model.

What it does
------------
For each of the two packaged real GGUF files (SmolLM2-135M-Instruct Q4_1 and
Qwen2.5-Coder-0.5B-Instruct), it

1. tokenizes `text.txt` (next to this script) with llama.cpp's own tokenizer, the way the
   model expects: `add_special=True`, so llama.cpp adds BOS only when the file asks for it
   (`tokenizer.ggml.add_bos_token`; both files here say false, so no BOS), and with special
   tokens *not* parsed (the text is plain prose and code);
2. keeps at most MAX_TOKENS ids (the whole text fits in both vocabularies);
3. runs ONE teacher-forced evaluation of those ids (`Llama.eval` with `logits_all=True`),
   so the logits at position i are llama.cpp's prediction for token i + 1 given tokens 0..i;
4. writes `<model-key>.json` next to this script with, per position, the top-1 id and the
   top-5 ids with their log-probabilities (log-softmax of the logits in float64, rounded
   to 4 decimals), plus the log-probability it gives the actual next token.

tests/test_llamacpp_reference.py compares jaxllama against these files; CI never builds
llama.cpp. Only `llama_cpp` (llama-cpp-python) and numpy are needed here, in their own
virtual environment: the project does not depend on llama-cpp-python.

How to rerun it (from the repository root; the build takes ~20 minutes on 2 cores)
-----------------------------------------------------------------------------------
    python3.11 -m venv /opt/lcp
    /opt/lcp/bin/pip install numpy
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL=2 /opt/lcp/bin/pip install llama-cpp-python==0.3.36
    python -c "from jaxllama import hub; [hub.pull(n) for n in hub.list_models()]"  # fetch the GGUFs
    /opt/lcp/bin/python tests/data/llamacpp/make_reference.py

The models are read from `$JAXLLAMA_CACHE/<model-key>/<file>` (default cache
`~/.cache/jaxllama`), where `jaxllama.hub.pull` puts them; `--cache-dir DIR` overrides it.
`--models KEY ...` regenerates only some files. The committed files were made with
llama-cpp-python 0.3.36 (sdist, vendoring llama.cpp commit 0c1e570), built with
GGML_NATIVE=OFF, on a 2-core x86-64 CPU. Another build or CPU may change the last
decimals of the log-probabilities (llama.cpp's CPU kernels quantize activations and sum
in a build-dependent order); the token ids must not change.

Data format (`<model-key>.json`, UTF-8 JSON, one object)
--------------------------------------------------------
    format                      1
    generator                   "tests/data/llamacpp/make_reference.py"
    llama_cpp_python_version    e.g. "0.3.36"
    llama_cpp_system_info       llama.cpp's `llama_print_system_info()` (CPU features used)
    model_key                   "smollm2-135m-instruct" | "qwen2.5-coder-0.5b-instruct"
    model_file                  GGUF file name
    model_bytes, model_sha256   size and sha256 of that file
    text_file, text_sha256      "text.txt" and the sha256 of its bytes
    add_bos                     the file's tokenizer.ggml.add_bos_token (what llama.cpp used)
    settings                    the Llama(...) arguments used (n_ctx, n_batch, n_threads, ...)
    max_tokens                  the cap on the number of ids
    n_tokens                    N, the number of ids evaluated
    token_ids                   [N] the ids llama.cpp's tokenizer gave (capped at max_tokens)
    top1                        [N] argmax of the logits at each position
    top5_ids                    [N][5] the five most likely ids, most likely first
    top5_logprobs               [N][5] their log-probabilities (natural log), 4 decimals
    next_logprob                [N-1] log-probability of token_ids[i + 1] at position i
Position i is the prediction after reading token_ids[0..i]; the last position predicts past
the end of the text and has no next_logprob.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import llama_cpp
from llama_cpp import Llama

HERE = Path(__file__).resolve().parent
TEXT_FILE = "text.txt"
MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-coder-0.5b-instruct": "Qwen2.5-Coder-0.5B-Instruct.gguf",
}
MAX_TOKENS = 384
TOP_K = 5
SETTINGS = dict(n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2, n_threads_batch=2,
                logits_all=True, seed=0, verbose=False)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def metadata_bool(metadata: dict, key: str) -> bool | None:
    value = metadata.get(key)
    return None if value is None else str(value).lower() == "true"


def reference(key: str, model_path: Path, text: str) -> dict:
    llm = Llama(model_path=str(model_path), **SETTINGS)
    add_bos = metadata_bool(llm.metadata, "tokenizer.ggml.add_bos_token")
    # add_bos=True here is llama.cpp's `add_special`: it adds BOS only if the vocab says so.
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)[:MAX_TOKENS]
    if add_bos is False and ids and ids[0] == llm.token_bos():
        raise SystemExit(f"{key}: file says add_bos_token=false but llama.cpp added BOS")

    start = time.perf_counter()
    llm.reset()
    llm.eval(ids)
    seconds = time.perf_counter() - start
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    if logits.shape != (len(ids), llm.n_vocab()) or not np.isfinite(logits).all():
        raise SystemExit(f"{key}: bad logits, shape {logits.shape}")
    logp = log_softmax(logits)

    # Most likely first; among equal logits the smaller id first (a stable order).
    order = np.argsort(-logp, axis=-1, kind="stable")[:, :TOP_K]
    top_lp = np.take_along_axis(logp, order, axis=-1)
    next_lp = logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]
    print(f"{key}: {len(ids)} tokens, eval {seconds:.1f} s, "
          f"mean next-token NLL {-next_lp.mean():.4f}", file=sys.stderr)
    return {
        "format": 1,
        "generator": "tests/data/llamacpp/make_reference.py",
        "llama_cpp_python_version": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "model_key": key,
        "model_file": model_path.name,
        "model_bytes": model_path.stat().st_size,
        "model_sha256": sha256(model_path),
        "text_file": TEXT_FILE,
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "add_bos": bool(add_bos),
        "settings": {k: v for k, v in SETTINGS.items() if k != "verbose"},
        "max_tokens": MAX_TOKENS,
        "n_tokens": len(ids),
        "token_ids": [int(t) for t in ids],
        "top1": [int(t) for t in order[:, 0]],
        "top5_ids": order.astype(int).tolist(),
        "top5_logprobs": [[round(float(v), 4) for v in row] for row in top_lp],
        "next_logprob": [round(float(v), 4) for v in next_lp],
    }


def dump(obj: dict) -> str:
    """JSON with one top-level key per line and one position per line (small, diffable)."""
    lines = []
    for k, v in obj.items():
        if isinstance(v, list) and v and isinstance(v[0], list):
            inner = ",\n  ".join(json.dumps(row, separators=(",", ":")) for row in v)
            text = f"[\n  {inner}\n ]"
        else:
            text = json.dumps(v, separators=(",", ":"))
        lines.append(f" {json.dumps(k)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    default_cache = os.environ.get("JAXLLAMA_CACHE") or Path.home() / ".cache" / "jaxllama"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path(default_cache))
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    args = parser.parse_args()

    # Read as bytes and decode, so no newline translation happens on any platform.
    text = (HERE / TEXT_FILE).read_bytes().decode("utf-8")
    for key in args.models:
        path = args.cache_dir / key / MODELS[key]
        if not path.is_file():
            raise SystemExit(f"{path} is missing: fetch it with jaxllama.hub.pull({key!r})")
        out = HERE / f"{key}.json"
        out.write_text(dump(reference(key, path, text)), encoding="utf-8")
        print(f"wrote {out} ({out.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
