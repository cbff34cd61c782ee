"""jaxllama: Llama-family inference in JAX from GGUF files."""
__version__ = "0.1.0"
