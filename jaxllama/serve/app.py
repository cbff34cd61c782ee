"""The OpenAI-compatible HTTP app over one adapter and its engine.

    app = create_app(adapter, engine, model_name="smollm2-135m-instruct", api_key=None)

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health
(503 until the engine is warmed, then 200), GET /metrics (Prometheus text), POST
/tokenize, POST /detokenize, GET /tokenizer_info (vLLM's shapes; lm-evaluation-harness's
remote tokenizer reads them).

The app only translates: a body is checked by `jaxllama.serve.protocol`, each choice is
one `engine.submit`, and engine tokens become JSON or server-sent events. Rules where
OpenAI's API leaves a choice to the server:

- n > 1 (and a list of prompts) are that many engine requests; choice i (prompt-major:
  i = prompt_index * n + j) samples with seed `seed + i` (mod 2**32), so a seeded
  request is reproducible choice by choice; with no seed, a random one is drawn.
- A stop string ends its choice (finish_reason "stop") and cancels its engine request;
  the text before it is returned, the stop string never (streamed text is held back
  while it could still be the start of one). completion_tokens counts the tokens
  generated up to and including the one that completed the stop string.
- The EOS token is counted in completion_tokens (as adapter.generate returns it) and
  left out of the text.
- usage.prompt_tokens counts each prompt once (not once per choice);
  prompt_tokens_details.cached_tokens sums, per prompt, the prompt tokens its first
  choice took from the prefix cache.
- echo (completions) returns the prompt's text and, with logprobs, its tokens'
  log-probabilities (the first null), computed by `adapter.score_top`; max_tokens 0 is
  allowed with echo (scoring only).
- A request cancelled by the server's shutdown ends with finish_reason "abort" (vLLM's).
- Token strings in logprobs are each token decoded alone (a token holding part of a
  UTF-8 character reads as U+FFFD); `bytes` are that string's UTF-8 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import secrets
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxllama.errors import EngineClosed, JaxLlamaError, QueueFull, ServeRequestError
from jaxllama.serve import protocol
from jaxllama.serve.metrics import ServerMetrics
from jaxllama.serve.stops import StopMatcher

DEFAULT_MAX_BODY_BYTES = 2 * 2**20
_DRAIN_LIMIT = 64 * 2**20  # an oversized body is read and dropped up to this, then cut
RETRY_AFTER_SECONDS = 1
_DISCONNECT_POLL_SECONDS = 0.1


def _error(status: int, message: str, *, type: str = "invalid_request_error",
           param: str | None = None, code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, type=type, param=param, code=code),
                        status_code=status, headers=headers)


class _ApiKey:
    """ASGI middleware: every path but /health needs `Authorization: Bearer KEY`."""

    def __init__(self, app, key: str):
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                what = "no API key given" if not given else "the API key is wrong"
                response = _error(401, f"{what}: send the header `Authorization: Bearer KEY` "
                                       "with this server's --api-key",
                                  code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclasses.dataclass
class _Piece:
    """Part of one choice's output: new text, the tokens it covers, their logprob
    entries (id, logprob, [(id, logprob)...]) and text offsets; `finish` on the last."""

    index: int
    text: str
    tokens: list[int]
    logprobs: list[tuple]
    offsets: list[int]
    finish: str | None = None


class _Choice:
    """One engine request and the text it becomes."""

    def __init__(self, server: "_Server", index: int, handle, stops: list[str],
                 logprobs: bool, arrival: float, text_start: int):
        self.server = server
        self.index = index
        self.handle = handle
        self.stops = stops
        self.want_logprobs = logprobs
        self.arrival = arrival
        self.text_start = text_start  # text_offset of the first generated token (echo)
        self.count = 0  # tokens consumed
        self.finish: str | None = None

    async def run(self):
        """Yield _Piece objects until the choice ends (its last has `finish`)."""
        handle, server = self.handle, self.server
        decoder = server.tokenizer.stream_decoder(skip_special_tokens=True)
        matcher = StopMatcher(self.stops)
        decoded = self.text_start
        times: list[float] = []
        hit = None
        try:
            async for token in handle:
                i = self.count
                self.count += 1
                times.append(time.monotonic())
                piece = decoder.push(token)
                text, hit = matcher.push(piece)
                entry = []
                if self.want_logprobs:
                    entry = [(token, handle.logprobs[i], handle.top_logprobs[i])]
                yield _Piece(self.index, text, [token], entry, [decoded])
                decoded += len(piece)
                if hit is not None:
                    handle.cancel()
                    break
            if hit is None:
                text, hit = matcher.push(decoder.flush())
                if hit is None:
                    text += matcher.flush()
            else:
                text = ""
            if hit is not None:
                self.finish = "stop"
            else:
                self.finish = {"stop": "stop", "length": "length"}.get(handle.finish_reason,
                                                                       "abort")
            yield _Piece(self.index, text, [], [], [], finish=self.finish)
        finally:
            if self.finish is None:
                handle.cancel()
            else:
                server.metrics.observe_choice(self.arrival, times, time.monotonic(), self.finish)


def _max_context(spec) -> int:
    """The most prompt + output tokens one engine request may hold."""
    return min(spec.max_tokens_per_slot, spec.num_pages * spec.page_size,
               spec.config.context_length)


class _Server:
    """State shared by the routes of one app."""

    def __init__(self, adapter, engine, *, model_name: str, max_n: int, max_choices: int,
                 max_body_bytes: int):
        self.adapter = adapter
        self.engine = engine
        self.tokenizer = adapter.tokenizer
        self.limits = protocol.Limits(
            model_name=model_name, max_context=_max_context(engine.spec),
            vocab_size=adapter.config.vocab_size, max_top_logprobs=engine.spec.top_logprobs,
            max_n=max_n, max_choices=max_choices)
        self.max_body_bytes = max_body_bytes
        self.metrics = ServerMetrics(engine)
        self.ready = threading.Event()
        self.created = int(time.time())
        self.score_lock = asyncio.Lock()

    @functools.lru_cache(maxsize=65536)
    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    # -- bodies -------------------------------------------------------------------

    async def json_body(self, request: Request):
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > limit
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                too_big = True
            if too_big:
                if size > _DRAIN_LIMIT:
                    break
                continue  # read and dropped, so the client gets to read the 413
            chunks.append(chunk)
        if too_big:
            raise ServeRequestError(
                f"the request body ({declared or f'over {size}'} bytes) is over this server's "
                f"limit of {limit} bytes", status=413, code="request_too_large")
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ServeRequestError(f"the request body is not valid JSON: {exc}",
                                    code="invalid_json") from exc

    # -- generation -----------------------------------------------------------------

    def prompt_ids(self, req: protocol.GenerationRequest) -> list[list[int]]:
        out = []
        for prompt in req.prompts:
            if isinstance(prompt, str):
                ids = self.adapter.encode(prompt)
            elif req.chat:
                try:
                    ids = self.adapter.prompt_ids(prompt)
                except JaxLlamaError as exc:
                    raise ServeRequestError(f"messages: {exc}", param="messages") from exc
            else:
                ids = prompt
            if not ids:
                raise ServeRequestError("prompt: the prompt has no tokens", param="prompt")
            out.append(ids)
        return out

    def submit(self, req: protocol.GenerationRequest, ids: list[list[int]], arrival: float,
               text_starts: list[int]) -> list[_Choice]:
        s = req.sampling
        seed = s.seed if s.seed is not None else secrets.randbelow(protocol.SEED_LIMIT)
        engine_k = 0 if req.logprobs is None else max(req.logprobs, 1)
        choices: list[_Choice] = []
        try:
            for p, prompt in enumerate(ids):
                max_tokens = protocol.check_room(len(prompt), req.max_tokens, self.limits,
                                                 chat=req.chat, field=req.max_tokens_field)
                for j in range(req.n):
                    index = p * req.n + j
                    handle = None
                    if max_tokens > 0:
                        handle = self.engine.submit(
                            prompt, max_tokens, temperature=s.temperature, top_k=s.top_k,
                            top_p=s.top_p, min_p=s.min_p,
                            repetition_penalty=s.repetition_penalty,
                            seed=(seed + index) % protocol.SEED_LIMIT, logprobs=engine_k,
                            stop_ids=() if req.ignore_eos else None)
                    choices.append(_Choice(self, index, handle, req.stop, engine_k > 0,
                                           arrival, text_starts[p]))
        except BaseException:
            for c in choices:
                if c.handle is not None:
                    c.handle.cancel()
            raise
        return choices

    async def prompt_logprobs(self, ids: list[int], k: int) -> list:
        """The echo's logprob entries of the prompt: the first token's None."""
        entries: list = [(ids[0], None, None)]
        if len(ids) < 2:
            return entries
        async with self.score_lock:  # one scoring at a time beside the engine
            (lp, top_ids, top_lp), = await asyncio.to_thread(self.adapter.score_top, [ids], k,
                                                             batch_size=1)
        for t, token in enumerate(ids[1:]):
            entries.append((token, float(lp[t]),
                            list(zip(top_ids[t].tolist(), top_lp[t].tolist()))))
        return entries

    def echo_text(self, ids: list[int]) -> tuple[str, list[int]]:
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        offsets, text = [], ""
        for token in ids:
            offsets.append(len(text))
            text += decoder.push(token)
        return text + decoder.flush(), offsets

    # -- response pieces ------------------------------------------------------------

    def legacy_logprobs(self, entries: list[tuple], offsets: list[int], k: int) -> dict:
        tokens, token_lps, tops = [], [], []
        for token, lp, top in entries:
            name = self.token_text(token)
            tokens.append(name)
            token_lps.append(lp)
            if lp is None:
                tops.append(None)
                continue
            best = {self.token_text(t): v for t, v in top[:k]}
            best.setdefault(name, lp)  # the sampled token is always listed (as vLLM)
            tops.append(best)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": list(offsets)}

    def chat_logprobs(self, entries: list[tuple], k: int) -> list[dict]:
        def item(token, lp):
            name = self.token_text(token)
            return {"token": name, "logprob": lp, "bytes": list(name.encode("utf-8"))}

        return [item(token, lp) | {"top_logprobs": [item(t, v) for t, v in top[:k]]}
                for token, lp, top in entries]

    def usage(self, ids: list[list[int]], choices: list[_Choice], n: int) -> dict:
        prompt = sum(len(p) for p in ids)
        completion = sum(c.count for c in choices)
        cached = sum(choices[p * n].handle.cached_tokens for p in range(len(ids))
                     if choices[p * n].handle is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


async def _consume(choice: _Choice) -> list[_Piece]:
    if choice.handle is None:  # echo with max_tokens 0
        choice.finish = "length"
        return [_Piece(choice.index, "", [], [], [], finish="length")]
    return [piece async for piece in choice.run()]


async def _pump(choice: _Choice, queue: asyncio.Queue) -> None:
    try:
        if choice.handle is None:
            choice.finish = "length"
            await queue.put(_Piece(choice.index, "", [], [], [], finish="length"))
            return
        async for piece in choice.run():
            await queue.put(piece)
    except Exception as exc:  # noqa: BLE001 - handed to the stream, which reports it
        await queue.put(exc)


async def _until_done(request: Request, aw, choices: list[_Choice]):
    """Await `aw`; cancel every choice's engine request if the client goes away."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                for c in choices:
                    if c.handle is not None:
                        c.handle.cancel()
                task.cancel()
                return None
    finally:
        if not task.done():
            task.cancel()
            for c in choices:
                if c.handle is not None:
                    c.handle.cancel()


def create_app(adapter, engine, *, model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_n: int = 16,
               max_choices: int = 64, warmup: bool = True, close_engine: bool = True) -> FastAPI:
    """The FastAPI app (see the module doc). At startup it starts the engine and, with
    `warmup`, warms it in a thread (/health 503 until done); at shutdown, with
    `close_engine`, it closes the engine."""
    server = _Server(adapter, engine, model_name=model_name, max_n=max_n,
                     max_choices=max_choices, max_body_bytes=max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()

        def warm():
            if warmup:
                engine.warmup()
            server.ready.set()

        warmer = threading.Thread(target=warm, name="jaxllama-warmup", daemon=True)
        warmer.start()
        try:
            yield
        finally:
            if close_engine:
                await asyncio.to_thread(engine.close)

    app = FastAPI(title="jaxllama", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    if api_key:
        app.add_middleware(_ApiKey, key=api_key)

    @app.exception_handler(ServeRequestError)
    async def _refused(request, exc: ServeRequestError):
        return _error(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(QueueFull)
    async def _full(request, exc: QueueFull):
        return _error(429, f"the server is busy: {exc}; retry after {RETRY_AFTER_SECONDS} s",
                      type="rate_limit_error", code="queue_full",
                      headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(EngineClosed)
    async def _closed(request, exc: EngineClosed):
        return _error(503, f"the engine is not serving: {exc}", type="server_error",
                      code="engine_closed")

    @app.exception_handler(JaxLlamaError)
    async def _library(request, exc: JaxLlamaError):  # the engine's own checks (400)
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errors = exc.errors()
        loc = errors[0].get("loc", ()) if errors else ()
        param = ".".join(str(x) for x in loc if x != "body") or None
        return _error(400, "; ".join(e.get("msg", "") for e in errors) or "invalid request",
                      param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail),
                      code="not_found" if exc.status_code == 404 else None)

    @app.get("/health")
    async def health():
        if not server.ready.is_set():
            return _error(503, "the model is loading or warming up", type="server_error",
                          code="not_ready")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics():
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": server.created,
            "owned_by": "jaxllama", "max_model_len": server.limits.max_context}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = server.tokenizer

        def name(i):
            return None if i is None else tok.id_to_token(i)

        return {"tokenizer_class": "jaxllama", "eos_token": name(tok.eos_id),
                "bos_token": name(tok.bos_id), "pad_token": name(tok.pad_id),
                "add_bos_token": bool(tok.add_bos), "chat_template": tok.chat_template,
                "model_max_length": server.limits.max_context}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = protocol.parse_tokenize(await server.json_body(request), server.limits)
        try:
            if "messages" in body:
                text = adapter.apply_chat_template(
                    body["messages"], add_generation_prompt=body["add_generation_prompt"])
                ids = adapter.encode(text, add_special_tokens=False)
            else:
                ids = adapter.encode(body["prompt"], add_special_tokens=body["add_special_tokens"])
        except JaxLlamaError as exc:
            raise ServeRequestError(str(exc)) from exc
        return {"count": len(ids), "max_model_len": server.limits.max_context, "tokens": ids,
                "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        ids = protocol.parse_detokenize(await server.json_body(request), server.limits)
        return {"prompt": server.tokenizer.decode(ids, skip_special_tokens=False)}

    async def generate(request: Request, chat: bool):
        arrival = time.monotonic()
        req = protocol.parse_generation(await server.json_body(request), server.limits,
                                        chat=chat)
        ids = server.prompt_ids(req)
        k = req.logprobs
        echoes = [server.echo_text(p) if req.echo else ("", []) for p in ids]
        prompt_entries = [None] * len(ids)
        if req.echo and k is not None:
            for i, p in enumerate(ids):
                protocol.check_room(len(p), req.max_tokens, server.limits, chat=chat,
                                    field=req.max_tokens_field)
                prompt_entries[i] = await server.prompt_logprobs(p, max(k, 1))
        choices = server.submit(req, ids, arrival, [len(e[0]) for e in echoes])
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}
        if req.stream:
            return EventSourceResponse(
                _stream(server, req, ids, choices, head, echoes, prompt_entries),
                sep="\n", ping=15)
        results = await _until_done(request, asyncio.gather(*(_consume(c) for c in choices)),
                                    choices)
        if results is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        out = []
        for c, pieces in zip(choices, results):
            p = c.index // req.n
            text = "".join(x.text for x in pieces)
            entries = [e for x in pieces for e in x.logprobs]
            offsets = [o for x in pieces for o in x.offsets]
            if chat:
                item = {"index": c.index, "message": {"role": "assistant", "content": text},
                        "logprobs": None if k is None else
                        {"content": server.chat_logprobs(entries, k)},
                        "finish_reason": c.finish}
            else:
                logprobs = None
                if req.echo:
                    text = echoes[p][0] + text
                    if k is not None:
                        entries = prompt_entries[p] + entries
                        offsets = echoes[p][1] + offsets
                if k is not None:
                    logprobs = server.legacy_logprobs(entries, offsets, k)
                item = {"index": c.index, "text": text, "logprobs": logprobs,
                        "finish_reason": c.finish}
            out.append(item)
        return head | {"choices": out, "usage": server.usage(ids, choices, req.n),
                       "system_fingerprint": None}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    return app


async def _stream(server: _Server, req, ids, choices: list[_Choice], head: dict, echoes,
                  prompt_entries):
    """The server-sent events of a streamed request, `data: [DONE]` last."""
    chat = req.chat
    k = req.logprobs
    head = head | {"object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if req.include_usage else {}

    def chunk(items):
        return {"data": json.dumps(head | {"choices": items} | extra, ensure_ascii=False)}

    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(c, queue)) for c in choices]
    try:
        for c in choices:
            p = c.index // req.n
            if chat:
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            elif req.echo:
                logprobs = None
                if k is not None:
                    logprobs = server.legacy_logprobs(prompt_entries[p], echoes[p][1], k)
                yield chunk([{"index": c.index, "text": echoes[p][0], "logprobs": logprobs,
                              "finish_reason": None}])
        left = len(choices)
        while left:
            piece = await queue.get()
            if isinstance(piece, BaseException):
                raise piece
            if not (piece.text or piece.logprobs or piece.finish):
                continue
            if chat:
                item = {"index": piece.index,
                        "delta": {"content": piece.text} if piece.text else {},
                        "logprobs": None if k is None or not piece.logprobs else
                        {"content": server.chat_logprobs(piece.logprobs, k)},
                        "finish_reason": piece.finish}
            else:
                item = {"index": piece.index, "text": piece.text,
                        "logprobs": None if k is None or not piece.logprobs else
                        server.legacy_logprobs(piece.logprobs, piece.offsets, k),
                        "finish_reason": piece.finish}
            yield chunk([item])
            if piece.finish:
                left -= 1
        if req.include_usage:
            yield {"data": json.dumps(head | {"choices": [],
                                              "usage": server.usage(ids, choices, req.n)})}
        yield {"data": "[DONE]"}
    except (EngineClosed, JaxLlamaError) as exc:
        yield {"data": json.dumps(protocol.error_body(str(exc), type="server_error"))}
    finally:
        for t in tasks:
            t.cancel()
        for c in choices:
            if c.handle is not None:
                c.handle.cancel()
