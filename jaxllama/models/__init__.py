"""Llama-family models: configs, the one transformer, family loaders and the adapter.

The names below load on first use (PEP 562), so `import jaxllama.models.config` (and the
family pages, presets and params spec) needs neither JAX nor the adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

_ADAPTER = ("AdapterError", "AdapterForwardConfig", "DecodeState", "ForwardPassFailed",
            "InvalidModelType", "LlamaInferenceAdapter", "ModelNotLoaded", "ModelRegistry",
            "UnsupportedOperation")
_CONFIG = ("ModelConfig", "ModelType")
_WEIGHTS = ("LoadedModel", "load_gguf")

__all__ = sorted(_ADAPTER + _CONFIG + _WEIGHTS)

if TYPE_CHECKING:
    from jaxllama.models.adapter import (  # noqa: F401
        AdapterError,
        AdapterForwardConfig,
        DecodeState,
        ForwardPassFailed,
        InvalidModelType,
        LlamaInferenceAdapter,
        ModelNotLoaded,
        ModelRegistry,
        UnsupportedOperation,
    )
    from jaxllama.models.config import ModelConfig, ModelType  # noqa: F401
    from jaxllama.models.weights import LoadedModel, load_gguf  # noqa: F401


def __getattr__(name: str):
    if name in _ADAPTER:
        from jaxllama.models import adapter as module
    elif name in _CONFIG:
        from jaxllama.models import config as module
    elif name in _WEIGHTS:
        from jaxllama.models import weights as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
