"""The library's own exception types.

Every error that bad input can cause is one of these, so callers can catch
`JaxLlamaError` and know the library (not a bug) refused the input. The adapter errors
keep the names and messages of the published adapter design.
"""

from __future__ import annotations


class JaxLlamaError(Exception):
    """Base class of every error jaxllama raises on purpose."""


class GGUFError(JaxLlamaError, ValueError):
    """A GGUF file that cannot be read: missing, truncated, malformed or unsupported."""


class UnsupportedTensorTypeError(GGUFError):
    """A tensor stored in a block type jaxllama cannot dequantize."""


class ConfigMismatchError(JaxLlamaError, ValueError):
    """A file (or call) that disagrees with the model config it was checked against."""


class DeviceMemoryError(JaxLlamaError, MemoryError):
    """A model that does not fit in the device's free memory (says needed and free)."""


class HubError(JaxLlamaError):
    """A packaged model that cannot be fetched or fails its checksum."""


class TokenizerError(JaxLlamaError, ValueError):
    """A tokenizer that cannot be built from the GGUF metadata, or text it cannot encode."""


class AdapterError(JaxLlamaError):
    """Base of the adapter errors of the published design."""


class ModelNotLoaded(AdapterError):
    def __init__(self, detail: str = ""):
        super().__init__("Model not loaded" + (f": {detail}" if detail else ""))


class InvalidModelType(AdapterError, ValueError):
    def __init__(self, model_type: object, detail: str = ""):
        self.model_type = model_type
        name = getattr(model_type, "name", model_type)
        super().__init__(f"Invalid model type: {name}" + (f" ({detail})" if detail else ""))


class ForwardPassFailed(AdapterError):
    def __init__(self, detail: str):
        super().__init__(f"Forward pass failed: {detail}")


class UnsupportedOperation(AdapterError):
    def __init__(self, model_type: object, detail: str = ""):
        self.model_type = model_type
        name = getattr(model_type, "name", model_type)
        super().__init__(
            f"Unsupported operation for model type: {name}" + (f" ({detail})" if detail else "")
        )


class InvalidRequestError(AdapterError, ValueError):
    """A call whose arguments are out of range or disagree with its config or state."""


class EngineSpecError(JaxLlamaError, ValueError):
    """An engine description (`jaxllama.engine.spec.EngineSpec`) whose sizes or switches
    cannot work together, or a call that disagrees with it."""


class PagePoolExhausted(JaxLlamaError, RuntimeError):
    """More KV-cache pages asked for than are free or evictable
    (`jaxllama.engine.pages.PageAllocator`)."""


class PageAllocatorError(JaxLlamaError, ValueError):
    """A KV-cache page freed, shared or registered against the allocator's state."""


class EngineClosed(JaxLlamaError, RuntimeError):
    """A request to an engine that is closed, or ended because it closed
    (`jaxllama.engine.Engine`)."""


class QueueFull(JaxLlamaError, RuntimeError):
    """An engine's waiting queue is at its limit (`Engine(max_waiting=...)`): try again
    later."""


class KernelFallbackWarning(RuntimeWarning):
    """A Pallas kernel that does not compile for this device and JAX version: its XLA
    twin runs instead (see `jaxllama.backend`). A warning, not an error: results stay
    correct, only the speed of the kernel is lost."""


def library_errors(fn):
    """`fn` with the TypeErrors, ValueErrors and AttributeErrors of bad arguments (JAX's
    own checks included, and a non-array where an array belongs) raised as InvalidRequestError naming `fn`; the library's errors pass
    unchanged. A jitted `fn` keeps its `lower`, `trace`, `eval_shape` and cache
    methods."""
    import functools

    name = getattr(fn, "__name__", "call")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except JaxLlamaError:
            raise
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise InvalidRequestError(f"{name}: bad arguments: {type(exc).__name__}: {exc}") from exc

    for attr in ("lower", "trace", "eval_shape", "_cache_size", "clear_cache"):
        if hasattr(fn, attr):
            setattr(wrapper, attr, getattr(fn, attr))
    wrapper.__wrapped__ = fn
    return wrapper


class ServeRequestError(InvalidRequestError):
    """A request that `jaxllama serve` refuses, with what OpenAI's error JSON says of it:
    the HTTP status, the field at fault (`param`), the error `type` and `code`
    (`jaxllama.serve.protocol`)."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
        self.type = type
