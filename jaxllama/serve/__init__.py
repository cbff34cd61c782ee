"""`jaxllama serve`: an OpenAI-compatible HTTP server over the engine.

    from jaxllama.serve import create_app        # needs the [serve] extra
    app = create_app(adapter, engine, model_name="smollm2-135m-instruct")

The package imports FastAPI, uvicorn, sse-starlette and prometheus-client only inside
it; the rest of jaxllama stays importable without them (`pip install 'jaxllama[serve]'`).
"""

from __future__ import annotations

SERVE_EXTRA_HINT = "pip install 'jaxllama[serve]'"
REQUIRED_MODULES = ("fastapi", "uvicorn", "sse_starlette", "prometheus_client")


def missing_modules() -> list[str]:
    """The [serve] extra's modules that are not installed (checked without importing)."""
    import importlib.util

    return [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]


def create_app(*args, **kwargs):
    from jaxllama.serve.app import create_app as make

    return make(*args, **kwargs)


__all__ = ["create_app", "missing_modules", "SERVE_EXTRA_HINT"]
