"""Running `jaxllama.serve` apps inside a test: uvicorn in a thread on a free loopback
port, every wait bounded, stopped by the test itself.

    with running_server(app) as base_url:      # "http://127.0.0.1:PORT"
        ...
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import uvicorn

START_TIMEOUT = 180  # seconds: startup plus the engine's warmup (compilations)
STOP_TIMEOUT = 60


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def wait_healthy(base_url: str, timeout: float = START_TIMEOUT, headers=None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/health", timeout=5, headers=headers)
            if r.status_code == 200:
                return
            last = r.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{base_url}/health not 200 after {timeout} s (last: {last!r})")


@contextlib.contextmanager
def running_server(app, *, timeout: float = START_TIMEOUT, healthy: bool = True):
    """Serve `app`; yield its base URL once uvicorn listens and (with `healthy`) once
    /health is 200."""
    sock = free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name=f"uvicorn-{port}", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("the test server did not start")
            time.sleep(0.05)
        if healthy:
            wait_healthy(base_url, max(1.0, deadline - time.monotonic()))
        yield base_url
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop"
