"""Running the app under uvicorn: what `jaxllama serve` does after its flags are checked.

SIGTERM (or Ctrl-C): uvicorn stops accepting connections, running requests (streams
included) go on for up to the grace period, those still running then are cancelled
(their engine requests freed), the engine is closed and the process exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import uvicorn

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulServer(uvicorn.Server):
    """uvicorn's Server without its re-raise of the caught signal at the end (which would
    end the process by SIGTERM, not with exit status 0)."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve_mesh(model: int):
    """`--mesh M`: a (data 1, model M) mesh over the first M devices, or None for M == 1
    (one device, no mesh). The engine splits its weights and KV pages over `model`; its
    slots are not split (more traffic: more replicas, see the README)."""
    if model == 1:
        return None
    import jax

    from jaxllama.errors import InvalidRequestError
    from jaxllama.sharding import make_mesh

    devices = jax.devices()
    if model > len(devices):
        raise InvalidRequestError(
            f"--mesh {model} needs {model} devices, but {jax.default_backend()} has "
            f"{len(devices)}; expected at most {len(devices)}")
    return make_mesh(model=model, data=1, devices=devices[:model])


def build_engine(adapter, args):
    from jaxllama.engine.scheduler import Engine

    return Engine.from_adapter(
        adapter, num_slots=args.slots, max_context=args.max_context, page_size=args.page_size,
        num_pages=args.num_pages, prefill_chunk=args.prefill_chunk,
        decode_steps=args.decode_steps, prefix_caching=not args.no_prefix_caching,
        max_waiting=args.max_waiting, top_logprobs=args.max_top_logprobs,
        prefill_budget=args.prefill_budget)


def run(args) -> int:
    """Load the model, build the engine and app, serve until SIGTERM/SIGINT; 0."""
    from sse_starlette.sse import AppStatus

    from jaxllama.models import LlamaInferenceAdapter
    from jaxllama.serve.app import create_app

    adapter = LlamaInferenceAdapter.from_gguf(args.model, dtype=args.dtype,
                                              weights=args.weights, progress=True,
                                              mesh=serve_mesh(args.mesh))
    engine = build_engine(adapter, args)
    app = create_app(adapter, engine, model_name=args.model, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes, warmup=True, close_engine=True)
    # sse-starlette ends every stream as soon as shutdown starts; running streams are
    # to finish within the grace period instead (uvicorn cancels them past it).
    AppStatus.disable_automatic_graceful_drain()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.grace_period, lifespan="on",
                            access_log=args.log_level == "debug")
    server = GracefulServer(config)
    print(f"jaxllama: serving {args.model} on http://{args.host}:{args.port}/v1 "
          f"({args.slots} slots{'' if args.mesh == 1 else f', over {args.mesh} devices'}); "
          "/health turns 200 once warmed", file=sys.stderr, flush=True)
    server.run()
    AppStatus.should_exit = True  # let any SSE generator still alive stop
    return 0
