"""Llama-family models: configs, the one transformer, family loaders and the adapter."""

from jaxllama.models.adapter import (
    AdapterError,
    AdapterForwardConfig,
    DecodeState,
    ForwardPassFailed,
    InvalidModelType,
    LlamaInferenceAdapter,
    ModelNotLoaded,
    ModelRegistry,
    ModelType,
    UnsupportedOperation,
)
from jaxllama.models.config import ModelConfig
from jaxllama.models.weights import LoadedModel, load_gguf

__all__ = [
    "AdapterError", "AdapterForwardConfig", "DecodeState", "ForwardPassFailed", "InvalidModelType",
    "LlamaInferenceAdapter", "LoadedModel", "ModelConfig", "ModelNotLoaded", "ModelRegistry",
    "ModelType", "UnsupportedOperation", "load_gguf",
]
