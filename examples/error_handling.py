"""Error handling: every refusal is a typed error that says what was wrong, and the
adapter keeps working afterwards.

    python examples/error_handling.py
"""

from jaxllama.errors import GGUFError, JaxLlamaError
from jaxllama.models import (
    AdapterError,
    AdapterForwardConfig,
    InvalidModelType,
    LlamaInferenceAdapter,
    ModelNotLoaded,
)


def show(label, fn):
    try:
        fn()
    except JaxLlamaError as exc:
        print(f"{label:28s} -> {type(exc).__name__}: {exc}")
    else:
        raise SystemExit(f"{label}: expected an error")


def main(argv=None):
    adapter = LlamaInferenceAdapter.from_gguf("smollm2-135m-instruct", progress=False)
    before = adapter.generate([1, 2, 3], 4)

    show("missing file", lambda: LlamaInferenceAdapter.from_gguf("/no/such/model.gguf"))
    show("wrong family", lambda: LlamaInferenceAdapter.new_phi3(adapter.model))
    show("token id out of range", lambda: adapter.generate([1, 10**9], 4))
    show("empty prompt", lambda: adapter.generate([], 4))
    show("max_tokens <= 0", lambda: adapter.generate([1, 2], 0))
    show("beyond the context", lambda: adapter.generate([1, 2], 10**6))
    show("negative temperature", lambda: adapter.generate([1, 2], 4, AdapterForwardConfig(temperature=-1)))
    show("top_p outside (0, 1]", lambda: adapter.generate([1, 2], 4, AdapterForwardConfig(top_p=1.5)))
    show("batch_size disagrees", lambda: adapter.generate([1, 2], 4, AdapterForwardConfig(batch_size=2)))
    show("non-UTF-8 text", lambda: adapter.generate_text(b"\xff\xfe", 4))

    # The library's errors share one base; adapter errors also share AdapterError.
    assert issubclass(InvalidModelType, AdapterError) and issubclass(GGUFError, JaxLlamaError)
    assert adapter.generate([1, 2, 3], 4) == before, "the adapter still works the same"
    print("after all that, the adapter still gives", before)

    unloaded = adapter.unload()
    try:
        unloaded.generate([1, 2, 3], 4)
    except ModelNotLoaded as exc:
        print("after unload ->", exc)


if __name__ == "__main__":
    main()
