"""The device's one HTTP server: the OpenAI chat API over CoSteer, and what else is mounted beside it.

    POST /v1/chat/completions   a public conversation -> the next assistant turn (JSON, or SSE)
    GET  /v1/models             the methods served, as model names
    GET  /v1/models/{name}      one of them (404 otherwise)
    GET  /health                liveness (no key needed, tells nothing)

`create_app(cs, settings, routers)` builds it; `routers` are served beside the API (`costeer gateway`
mounts the browser playground at /playground). Without a model pair (`cs=None`) there is no /v1 API:
`costeer playground` is this app with only the playground's router, at /. Every generation, of either,
runs in the one worker that owns the models.

The private context is read from the gateway's own `--context-file`, never from a request, and
no answer field carries it: only the generated text may reflect it. The log, at its default
level, holds request lines and errors, never message or context text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from urllib.parse import urlsplit

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from costeer.api import CoSteer, PromptTooLong
from costeer.chat import Reply, reply
from costeer.cloud.net import guard_logs, guarded_http, listen, within
from costeer.cloud.sessions import KeyRing
from costeer.device import CloudError
from costeer.device.transport import is_loopback
from costeer.engine.config import Method
from costeer.engine.llamacpp import LlamaCppError
from costeer.gateway import schema
from costeer.gateway.config import DEFAULT_HOST, DEFAULT_PORT, GatewaySettings, WatchedFile
from costeer.gateway.schema import ApiError, ChatRequest
from costeer.gateway.worker import Busy, Job, Worker

log = logging.getLogger("costeer.gateway")

# A cloud that closes a session with these codes refused the request itself (too long, bad
# value, busy); anything else from the cloud means it is unreachable for now (503).
_CLOUD_REFUSALS = {4413: 400, 4422: 400, 4429: 429}


def served_methods(cs: CoSteer, has_context: bool) -> list[str]:
    """The methods the loaded models can run; those that read the private context only when the
    gateway has one; never a privacy-violating one (`llm_context`), which would hand the context to the LLM."""
    out = []
    for m in Method:
        if m.privacy_violating or (m.uses_llm and cs.llm is None) or (m.uses_slm and cs.slm is None):
            continue
        if m.needs_context and not has_context:
            continue
        out.append(m.value)
    return out


class Gateway:
    """The service behind the routes: the model pair (None: no /v1 API), the private files and the
    worker that runs every generation, the mounted routers' too."""

    def __init__(self, cs: CoSteer | None, settings: GatewaySettings):
        self.cs, self.settings = cs, settings
        self.context = WatchedFile(settings.context_file) if settings.context_file else None
        self.reference = WatchedFile(settings.reference_file) if settings.reference_file else None
        self.models = served_methods(cs, self.context is not None) if cs is not None else []
        self.worker = Worker(settings.max_waiting)
        self.keys = KeyRing(settings.api_keys)
        self.created = int(time.time())

    def require_key(self, request: Request) -> None:
        """FastAPI dependency: with keys configured, every /v1 route needs one of them."""
        if self.settings.api_keys and self.keys.authenticate(request.headers.get("authorization")) is None:
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key")

    def require_local_host(self, request: Request) -> None:
        """FastAPI dependency: without keys the gateway is bound to loopback (check_bind), and only
        this machine's names and pages may reach it. Another Host: a web page whose name is made to
        resolve to 127.0.0.1 (DNS rebinding) is same-origin with it, so the browser lets it read the
        private-context models' answers. Another Origin: any page may have the browser POST here
        (text/plain needs no preflight) and run generations. With keys, the key protects it (and a
        proxy in front may use any name)."""
        if self.settings.api_keys:
            return
        origin = request.headers.get("origin")
        hosts = [urlsplit("//" + request.headers.get("host", "")).hostname]
        hosts += [urlsplit(origin).hostname] if origin is not None else []
        if not all(is_loopback(h) for h in hosts):
            raise ApiError(403, "without API keys this gateway answers only to localhost names and pages",
                           "host_not_allowed")  # fmt: skip

    def method(self, name: str) -> Method:
        if name not in self.models:
            raise ApiError(404, f"the model '{name}' does not exist; GET /v1/models lists the served ones "
                           f"({', '.join(self.models)})", "model_not_found", "model")  # fmt: skip
        return Method(name)

    def start(self, req: ChatRequest) -> Job:
        """Check what can be checked here, then run the reply in the worker (ApiError, or 429)."""
        method = self.method(req.model)
        sampling = self.cs.config.sampling
        overrides = {"max_new_tokens": req.new_tokens(sampling.max_new_tokens, self.settings.max_tokens_limit)}
        given = {k: getattr(req, k) for k in ("temperature", "top_p", "top_k", "seed")}
        overrides.update({k: v for k, v in given.items() if v is not None})
        messages = [m.model_dump() for m in req.messages]

        def run() -> Reply:
            context = self._private(self.context) if method.needs_context else None
            reference = self._private(self.reference) if method.matched and self.reference else None
            r = reply(self.cs, messages, method, context, reference, req.stop, **overrides)
            if r.prompt_tokens > self.settings.max_prompt_tokens:
                raise ApiError(400, f"the conversation is {r.prompt_tokens} tokens, over the limit of "
                               f"{self.settings.max_prompt_tokens}", "context_length_exceeded", "messages")  # fmt: skip
            return r

        try:
            return self.worker.submit(run)
        except Busy:
            raise ApiError(429, "the gateway is busy with other requests; retry shortly", "busy") from None

    @staticmethod
    def _private(f: WatchedFile) -> str:
        try:
            return f.text()
        except (OSError, ValueError) as e:
            # the path and the error's kind only: a parser's message may quote the file
            log.warning("cannot read %s (%s)", f.path, type(e).__name__)
            raise ApiError(503, "the gateway cannot read its private profile file", "context_unavailable") from None


def as_api_error(exc: BaseException) -> ApiError:
    """What a failed generation answers. User errors keep their one line; a bug says nothing more."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PromptTooLong):
        # which prompt overflowed, and its length, would tell the private one's (the context's) length
        return ApiError(400, "the conversation plus max_tokens does not fit the model's context window: shorten "
                        "the conversation or ask for fewer tokens", "context_length_exceeded", "messages")  # fmt: skip
    if isinstance(exc, CloudError):
        status = _CLOUD_REFUSALS.get(exc.code or 0, 503)
        return ApiError(status, f"the cloud LLM: {exc}", "cloud_refused" if status != 503 else "cloud_unavailable")
    if isinstance(exc, (ValueError, LlamaCppError)):
        return ApiError(400, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, "invalid_request")
    log.error("generation failed (%s)", type(exc).__name__)
    log.debug("generation failed", exc_info=exc)
    return ApiError(500, "internal error", "internal_error")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 past `limit` bytes (whether announced or not) and with 408 when
    it takes longer than `timeout_s` to arrive."""
    too_large = ApiError(413, f"the request body is over {limit} bytes", "request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large

    async def read() -> bytes:
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large
        return bytes(body)

    try:
        return await within(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", "timeout") from None
    except ClientDisconnect:  # nobody reads the answer; an ApiError ends the request without a traceback
        raise ApiError(400, "the client closed the connection before its body arrived", "client_disconnected") from None


def openai_router(gw: Gateway) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(gw.require_key)])

    @router.get("/models")
    async def list_models():
        return schema.models(gw.models, gw.created)

    @router.get("/models/{name}")
    async def get_model(name: str):
        gw.method(name)
        return schema.models([name], gw.created)["data"][0]

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.monotonic()
        req = schema.parse_request(await read_body(request, gw.settings.max_body_bytes, gw.settings.body_timeout_s))
        job = gw.start(req)
        first = await job.next()
        if first.kind == "error":
            raise as_api_error(first.value)
        if req.stream:
            return StreamingResponse(_sse(job, first, req, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        watch = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            text, last = await _collect(job, first)
        finally:
            watch.cancel()
            job.cancel()
        if last.kind == "error":
            raise as_api_error(last.value)
        r: Reply = last.value
        _log_done(req, r, t0)
        return schema.completion(schema.completion_id(), req.model, text, r.finish_reason,
                                 schema.usage(r.prompt_tokens, r.completion_tokens))  # fmt: skip

    return router


async def _cancel_on_disconnect(request: Request, job: Job, period_s: float = 0.5) -> None:
    """A client that went away while waiting for a whole answer stops its generation."""
    while not await request.is_disconnected():
        await asyncio.sleep(period_s)
    job.cancel()


async def _collect(job: Job, event) -> tuple[str, object]:
    """Text pieces up to the job's last event ("end" or "error")."""
    pieces = []
    while event.kind == "piece":
        pieces.append(event.value)
        event = await job.next()
    return "".join(pieces), event


async def _sse(job: Job, event, req: ChatRequest, t0: float) -> AsyncIterator[bytes]:
    """The answer as chat.completion.chunk events, then [DONE]; a failure mid-stream ends the
    stream with an error event instead (the server keeps serving)."""
    cid, created = schema.completion_id(), int(time.time())
    try:
        yield schema.sse(schema.chunk(cid, created, req.model, {"role": "assistant", "content": ""}))
        while event.kind == "piece":
            yield schema.sse(schema.chunk(cid, created, req.model, {"content": event.value}))
            event = await job.next()
        if event.kind == "error":
            err = as_api_error(event.value)
            log.warning("stream ended by an error: %d %s", err.status, err.code)
            yield schema.sse(err.body())
            return
        r: Reply = event.value
        yield schema.sse(schema.chunk(cid, created, req.model, {}, r.finish_reason))
        if req.stream_options is not None and req.stream_options.include_usage:
            counts = schema.usage(r.prompt_tokens, r.completion_tokens)
            yield schema.sse(schema.chunk(cid, created, req.model, {}, usage_=counts))
        yield schema.sse("[DONE]")
        _log_done(req, r, t0)
    finally:
        job.cancel()  # a client that went away stops the generation at its next token


def _log_done(req: ChatRequest, r: Reply, t0: float) -> None:
    log.info("chat.completions model=%s stream=%s tokens=%d finish=%s %.2fs", req.model, req.stream,
             r.completion_tokens, r.finish_reason, time.monotonic() - t0)  # fmt: skip


def create_app(cs: CoSteer | None, settings: GatewaySettings | None = None,
               routers: Sequence[APIRouter] = ()) -> FastAPI:  # fmt: skip
    """The device's server as a FastAPI app: the OpenAI routes over `cs` (none when `cs` is None) and
    `routers` beside them (e.g. the browser playground); those find the service as
    `request.app.state.gateway` (a Gateway: its `worker` runs their generations too) and may protect
    themselves with `Depends(gateway.require_key)`. The /v1 routes answer errors in OpenAI's shape,
    the others in FastAPI's."""
    gw = Gateway(cs, settings or GatewaySettings())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        gw.worker.shutdown()

    app = FastAPI(title="costeer gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        if exc.status >= 400:
            log.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.code)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if not _openai_path(request):
            return await http_exception_handler(request, exc)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), code).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        if not _openai_path(request):  # e.g. the playground, whose page shows what was wrong
            return await request_validation_exception_handler(request, exc)
        return JSONResponse(ApiError(400, "invalid request", "invalid_value").body(), status_code=400)

    app.add_middleware(LastResort)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    local = [Depends(gw.require_local_host)]
    if cs is not None:
        app.include_router(openai_router(gw), dependencies=local)
    for r in routers:
        app.include_router(r, dependencies=local)
    return app


class LastResort:
    """An exception no handler took answers 500 in OpenAI's shape, its kind logged (as_api_error).
    Not an `exception_handler(Exception)`: Starlette answers with that and then re-raises, so that
    the server prints the whole traceback. Past the response's start it can only end the response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001 - the last resort: answered here, logged by as_api_error
            if scope["type"] != "http":
                raise
            err = as_api_error(exc)
            if not started:
                await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)


def _openai_path(request: Request) -> bool:
    return request.url.path == "/v1" or request.url.path.startswith("/v1/")


def uvicorn_config(app: FastAPI, log_level: str = "info") -> uvicorn.Config:
    """The gateway's uvicorn configuration: the cloud's guarded HTTP protocol (a connection cap, a
    request timeout, a send timeout; uvicorn alone has none of them) with the gateway's limits."""
    cfg = uvicorn.Config(app, log_level=log_level, http=guarded_http(app.state.gateway.settings))
    guard_logs()  # after Config, which (re)configures uvicorn's loggers: a flood logs a few lines
    return cfg


def serve(app: FastAPI, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info",
          announce: Callable[[str], None] | None = None, sock: socket.socket | None = None) -> None:  # fmt: skip
    """Run `app` until interrupted. The socket is bound first (or given: `cloud.net.listen(host, port)`,
    bound before the models load), so that port 0 names its port: `announce` gets http://HOST:PORT
    before the server starts. The bind rule (check_bind) is the caller's, checked before it loads the
    models."""
    sock = sock if sock is not None else listen(host, port)
    sock.listen()  # connections wait in the backlog from the announcement on, until uvicorn takes them
    if announce is not None:
        announce(f"http://{host}:{sock.getsockname()[1]}")
    uvicorn.Server(uvicorn_config(app, log_level)).run(sockets=[sock])
