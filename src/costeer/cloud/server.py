"""The cloud service: FastAPI on uvicorn.

    WS   /v1/stream               the per-token exchange (binary frames, costeer.frames)
    GET  /v1/health               liveness (no key needed, tells nothing)
    GET  /v1/info                 model name, vocabulary size, stop ids, tokenizer fingerprint, limits
    GET  /v1/tokenizer            the LLM's tokenizer files (public), so a device needs no LLM weights
    GET  /v1/sessions             this key's sessions
    GET  /v1/sessions/{id}        one of them (404 for unknown *and* foreign ids)
    DELETE /v1/sessions/{id}      end it (its socket is closed with 4410)

Every route but /v1/health needs `Authorization: Bearer <key>`; no route takes a query string
(one is refused, so a key put there is never used). HTTP errors are a status and a JSON body
{"error": ...}; WebSocket errors are a close code and reason (docs/wire-format.md).

The only inputs are token ids and options: there is no route or message that takes context
text, SLM outputs or deltas. Every forward runs in one scheduler thread (cloud/scheduler.py) that
batches the sessions' steps and takes the keys' prompts in turn, so one slow or broken session
never blocks the others, and a session is only ever freed between forwards; every send and
close on a socket has a timeout, so neither does a peer that stops reading (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from costeer import frames
from costeer.cloud.net import within
from costeer.cloud.sessions import KeyRing, Outbox, ProtocolError, Registry, ServerSettings, Session
from costeer.engine.models import LM

log = logging.getLogger("costeer.cloud")

UNAUTHORIZED = "missing or invalid API key"
QUERY_REFUSED = "query strings are refused: send the key in the Authorization header"


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The tokenizer as saved by save_pretrained, file name -> text."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(d).iterdir()) if p.is_file()}


def tokenizer_answer(tokenizer, fingerprint: str) -> bytes:
    """/v1/tokenizer's JSON body: {"fingerprint", "files": {name: text}}."""
    answer = {"fingerprint": fingerprint, "files": tokenizer_files(tokenizer)}
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()


def create_app(lm: LM, settings: ServerSettings) -> FastAPI:
    registry = Registry(lm, settings)
    keys = KeyRing(settings.api_keys)
    fingerprint = frames.tokenizer_fingerprint(lm.tokenizer)
    # /v1/tokenizer's answer, made once in a worker thread: Gemma-3's is about 40 MB of JSON (~0.2 s to
    # encode), which per request in the event loop stalled every session's frames
    tok_answer: asyncio.Future[bytes] | None = None

    closing: set[asyncio.Task] = set()  # the reaper's closes, referenced until done

    async def reaper():
        """Evicts idle sessions; it never waits on a socket (each close runs in its own task, with
        a timeout), so a peer that stops reading cannot stop eviction for everyone."""
        period = max(0.05, min(1.0, settings.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            for sess in registry.idle():
                ws = sess.websocket
                registry.end(sess, "idle")
                if ws is not None:
                    why = f"idle for more than {settings.idle_timeout_s:g} s; session evicted"
                    task = asyncio.create_task(_close(ws, frames.CLOSE_IDLE, why, settings.send_timeout_s))
                    closing.add(task)
                    task.add_done_callback(closing.discard)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(reaper())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(registry.close)

    app = FastAPI(title="costeer cloud", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry = registry
    app.add_middleware(RefuseQueryStrings)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": "invalid request", "detail": str(exc.errors()[:1])}, status_code=422)

    def require_key(request: Request) -> str:
        owner = keys.authenticate(request.headers.get("authorization"))
        if owner is None:
            raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
        return owner

    @app.get("/v1/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info(owner: str = Depends(require_key)):
        s = settings
        return {
            "model": lm.name,
            "vocab_size": lm.vocab_size,
            "stop_ids": sorted(lm.stop_ids),
            "tokenizer_fingerprint": fingerprint,
            "frame_version": frames.VERSION,
            "lookahead": {"frame_version": frames.LOOKAHEAD_VERSION, "max_depth": s.max_lookahead_depth,
                          "max_nodes": s.max_lookahead_nodes, "streamed": True},  # fmt: skip
            "limits": {
                "max_sessions_per_key": s.max_sessions_per_key,
                "max_prompt_tokens": s.max_prompt_tokens,
                "max_new_tokens": s.max_new_tokens,
                "idle_timeout_s": s.idle_timeout_s,
            },
        }

    @app.get("/v1/tokenizer")
    async def tokenizer(owner: str = Depends(require_key)):
        nonlocal tok_answer
        if tok_answer is None:  # the first request makes it; those that come meanwhile wait for the same
            tok_answer = asyncio.ensure_future(asyncio.to_thread(tokenizer_answer, lm.tokenizer, fingerprint))
        made = tok_answer
        try:
            body = await asyncio.shield(made)  # a client that leaves does not cancel it for the others
        except Exception:
            if tok_answer is made:  # a failure is not kept: the next request tries again
                tok_answer = None
            raise
        return Response(body, media_type="application/json")

    def _lookup(owner: str, sid: str) -> Session:
        try:
            return registry.find(owner, bytes.fromhex(sid))
        except (ValueError, ProtocolError):
            raise HTTPException(404, "unknown session") from None

    @app.get("/v1/sessions")
    async def list_sessions(owner: str = Depends(require_key)):
        return {"sessions": [s.info() for s in registry.sessions.values() if s.owner == owner]}

    @app.get("/v1/sessions/{sid}")
    async def get_session(sid: str, owner: str = Depends(require_key)):
        return _lookup(owner, sid).info()

    @app.delete("/v1/sessions/{sid}")
    async def delete_session(sid: str, owner: str = Depends(require_key)):
        sess = _lookup(owner, sid)
        ws = sess.websocket
        registry.end(sess, "deleted by owner")
        if ws is not None:
            await _close(ws, frames.CLOSE_ENDED, "session ended by its owner", settings.send_timeout_s)
        return {"ended": sid}

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket):
        owner = keys.authenticate(ws.headers.get("authorization"))
        if owner is None:
            await _deny(ws, 401, UNAUTHORIZED, frames.CLOSE_UNAUTHORIZED)
            return
        await ws.accept()
        try:
            await _serve(ws, owner, registry, settings)
        except ProtocolError as e:  # a bad input ends this connection and its session, nothing else
            sess = getattr(ws.state, "session", None)
            if sess is not None and sess.websocket is ws:
                registry.end(sess, f"error {e.code}")
            await _close(ws, e.code, e.reason, settings.send_timeout_s)
        except Exception:  # a bug: this session ends, the server goes on
            log.exception("session failed")
            sess = getattr(ws.state, "session", None)
            if sess is not None and sess.websocket is ws:
                registry.end(sess, "internal error")
            await _close(ws, frames.CLOSE_INTERNAL, "internal error", settings.send_timeout_s)

    return app


class RefuseQueryStrings:
    """No route takes a query string. A request with one is refused before any route runs (a key
    put there is never used), and costeer.cloud.net redacts query strings from the log."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("query_string"):
            await JSONResponse({"error": QUERY_REFUSED}, status_code=400)(scope, receive, send)
        elif scope["type"] == "websocket" and scope.get("query_string"):
            await _deny(WebSocket(scope, receive, send), 400, QUERY_REFUSED, frames.CLOSE_MALFORMED)
        else:
            await self.app(scope, receive, send)


async def _deny(ws: WebSocket, status: int, error: str, close_code: int) -> None:
    """Refuse the handshake with an HTTP status + JSON where the server supports it, else accept
    and close with `close_code`."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse({"error": error}, status_code=status, headers=headers))
    else:
        await ws.accept()
        await _close(ws, close_code, error, timeout=10.0)


async def _close(ws: WebSocket, code: int, reason: str, timeout: float) -> None:
    """Close with a code; a peer that does not take the close frame within `timeout` is left to
    the transport (costeer.cloud.net.Lingering aborts it)."""
    if ws.application_state == WebSocketState.CONNECTED and ws.client_state == WebSocketState.CONNECTED:
        with contextlib.suppress(Exception):
            await within(ws.close(code, reason[:120]), timeout)


async def _receive(ws: WebSocket, timeout: float, why: str) -> bytes | None:
    """The next binary message; None when the peer is gone (its close code in ws.state)."""
    try:
        msg = await within(ws.receive(), timeout=timeout)
    except asyncio.TimeoutError:
        raise ProtocolError(frames.CLOSE_IDLE, why)
    if msg["type"] == "websocket.disconnect":
        ws.state.disconnect_code = msg.get("code", 1005)
        return None
    if msg.get("bytes") is None:
        raise ProtocolError(frames.CLOSE_MALFORMED, "text frames are not part of the protocol: send binary frames")
    return msg["bytes"]


PUMP_STOP_S = 1.0  # how long a closing connection waits for its cancelled pump (a bound: see _serve)


async def _serve(ws: WebSocket, owner: str, registry: Registry, settings: ServerSettings) -> None:
    """One connection: OPEN or ATTACH, then TOKEN after TOKEN. Raises ProtocolError on bad input."""
    try:
        await _exchange(ws, owner, registry, settings)
    finally:
        pump = getattr(ws.state, "pump", None)
        if pump is not None:  # cancelled and waited for: a cancelled task left to itself was destroyed pending
            pump.cancel()
            # bounded: with asyncio.wait_for in its send, a cancel that came as the send finished was
            # dropped and the pump went back to its queue for good (net.within; still so on Python 3.10)
            await asyncio.wait({pump}, timeout=PUMP_STOP_S)


async def _exchange(ws: WebSocket, owner: str, registry: Registry, settings: ServerSettings) -> None:
    """_serve's loop. A streamed session's round frames go out through `_pump`, beside this loop:
    an uplink may come while its round still grows, and stops it (docs/wire-format.md, "Streamed rounds")."""
    sess: Session | None = None
    while True:
        if sess is None:
            data = await _receive(ws, settings.handshake_timeout_s,
                                  f"no OPEN or ATTACH within {settings.handshake_timeout_s:g} s")  # fmt: skip
        else:
            data = await _receive(ws, settings.idle_timeout_s,
                                  f"idle for more than {settings.idle_timeout_s:g} s; session evicted")  # fmt: skip
        if data is None:  # the device went away
            _device_gone(registry, sess, ws, ws.state.disconnect_code)
            return
        if sess is not None and (sess.ended or sess.websocket is not ws):  # evicted, deleted or taken over
            return
        try:
            msg = frames.decode_uplink(data)
        except frames.FrameError as e:
            raise ProtocolError(e.code, e.reason) from None
        if sess is None:
            if isinstance(msg, frames.Open):
                sess = registry.open(owner, msg)
                ws.state.session = sess
                sess.websocket = ws
                if sess.streamed:
                    sess.outbox = Outbox(asyncio.get_running_loop(), sess.lookahead.depth + 1)
                frame = await _start_watched(ws, registry, sess)
                if frame is None:  # the device went away during the prefill or replay
                    return
            elif isinstance(msg, frames.Attach):
                sess = registry.find(owner, msg.session_id)
                # The owner's new connection takes the session over (the device lost the old one,
                # perhaps before the server noticed): a forward under way finishes first, then the
                # old connection is closed with 4409.
                deadline = time.monotonic() + settings.idle_timeout_s
                while sess.busy and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                if sess.ended or sess.busy:
                    raise ProtocolError(frames.CLOSE_UNKNOWN_SESSION, "unknown session")
                # Taken over before anything is awaited: the old connection may be waiting for its
                # round to stop with an uplink in hand, and must not advance the session after that.
                old = sess.websocket
                ws.state.session = sess
                sess.websocket, sess.attached = ws, True
                if sess.streamed:  # the round it was in grows no further: the device starts a fresh one
                    await registry.stop_round(sess)
                    sess.outbox = Outbox(asyncio.get_running_loop(), sess.lookahead.depth + 1)
                if old is not None and old is not ws:
                    await _close(old, frames.CLOSE_ORDER, "taken over by a new connection", settings.send_timeout_s)
                if sess.websocket is not ws:  # a newer ATTACH took it meanwhile (and closes this one)
                    return
                lost = list(msg.tail())  # the device's last uplink, whose answer it never got
                if msg.n_generated == sess.position and sess.streamed:
                    registry.replay(sess)  # the round as computed, from its root
                    frame = b""
                elif msg.n_generated == sess.position:
                    frame = sess.last_frame
                elif lost and msg.n_generated == sess.position + len(lost):
                    frame = await registry.advance(sess, lost, registry.check_tokens(sess, lost))
                else:
                    raise ProtocolError(frames.CLOSE_ORDER, f"out of step: the device has {msg.n_generated} "
                                        f"tokens, the session {sess.position}")  # fmt: skip
            else:
                raise ProtocolError(frames.CLOSE_ORDER, "TOKEN before OPEN: open a session first")
            sess.touch()
            ready = frames.Ready(sess.id, registry.lm.vocab_size, sess.position).encode()
            if not await _send(ws, sess, registry, ready, settings):
                return
            if sess.streamed:
                ws.state.pump = asyncio.ensure_future(_pump(ws, sess, registry, settings, sess.outbox))
            elif not await _send_round(ws, sess, registry, frame, settings):
                return
            continue
        if not isinstance(msg, (frames.Token, frames.Tokens)):
            raise ProtocolError(frames.CLOSE_ORDER, "this connection already has a session; send TOKEN frames")
        tokens = [msg.token_id] if isinstance(msg, frames.Token) else list(msg.token_ids)
        if sess.controller is not None:
            sess.controller.received(len(tokens) - 1)
        await registry.stop_round(sess)  # streamed: the device left the round, which may still be growing
        if sess.outbox is not None and not await sess.outbox.room(settings.send_timeout_s):
            _stopped_reading(registry, sess, ws, settings)  # it sends uplinks but reads none of the rounds
            return
        if sess.ended or sess.websocket is not ws:  # ended or taken over by an ATTACH meanwhile
            return
        frame = await registry.advance(sess, tokens, registry.check_tokens(sess, tokens))
        if sess.ended or sess.websocket is not ws:
            return
        sess.touch()
        if frame and not await _send_round(ws, sess, registry, frame, settings):
            return


async def _send_round(ws: WebSocket, sess: Session, registry: Registry, frame: bytes, settings: ServerSettings) -> bool:
    """A round's frame; a look-ahead session's controller notes when it left (its round trip)."""
    ok = await _send(ws, sess, registry, frame, settings)
    if ok and sess.controller is not None:
        sess.controller.sent(len(frame), sess.round.size if sess.round is not None else 1)
    return ok


async def _pump(ws: WebSocket, sess: Session, registry: Registry, settings: ServerSettings, box: Outbox) -> None:
    """A streamed session's round frames, sent as the scheduler makes them, while `_exchange` waits
    for the device's uplink; a round that failed closes the connection with 1011 and ends the session.
    The scheduler waits for each frame to be handed over (Outbox.drain) before its next forward."""
    box.start()
    try:
        while True:
            item = await box.queue.get()
            if sess.ended or sess.websocket is not ws or box is not sess.outbox:
                return
            if isinstance(item, BaseException):
                log.error("session %s…: a look-ahead level failed: %s", sess.id.hex()[:8], item)
                registry.end(sess, "internal error")
                await _close(ws, frames.CLOSE_INTERNAL, "internal error", settings.send_timeout_s)
                return
            frame, nodes, first = item
            box.sending()
            if not await _send(ws, sess, registry, frame, settings, drain=False):
                return
            box.sent()
            if sess.controller is not None:
                sess.controller.sent(len(frame), nodes, first=first)
    finally:
        box.close()


async def _send(ws: WebSocket, sess: Session, registry: Registry, data: bytes, settings: ServerSettings,
                drain: bool = True) -> bool:  # fmt: skip
    """Send within send_timeout_s. A device that went away meanwhile, or stopped reading, loses
    its connection; the session ends if it had closed with 1000, else waits for ATTACH. drain=False
    (the pump, beside a loop that reads the socket): a failed send leaves the close to that loop."""
    try:
        await within(ws.send_bytes(data), settings.send_timeout_s)
        return True
    except asyncio.TimeoutError:
        _stopped_reading(registry, sess, ws, settings)
    except (WebSocketDisconnect, RuntimeError, OSError):
        if not drain:
            return False
        mine = not sess.ended and sess.websocket is ws  # else the session is gone or taken over already
        _device_gone(registry, sess, ws, await _close_code(ws, settings.send_timeout_s) if mine else None)
    return False


def _stopped_reading(registry: Registry, sess: Session, ws: WebSocket, settings: ServerSettings) -> None:
    log.info("session %s…: the device took no frame for %g s; connection dropped", sess.id.hex()[:8],
             settings.send_timeout_s)  # fmt: skip
    _device_gone(registry, sess, ws, None)


async def _close_code(ws: WebSocket, timeout: float) -> int | None:
    """After a failed send: the close code the device sent, read from what is still queued."""

    async def drain() -> int | None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return msg.get("code")

    try:
        return await within(drain(), timeout)
    except (asyncio.TimeoutError, RuntimeError):
        return None


def _device_gone(registry: Registry, sess: Session | None, ws: WebSocket, code: int | None) -> None:
    """The device's connection is gone: a close with 1000 ends its session at once (even before
    READY), and so does one with a 44xx code (the device refused what the cloud sent and will not
    come back to it); any other drop keeps the session for ATTACH until the idle timeout."""
    if sess is None or sess.ended or sess.websocket is not ws:
        return
    if code == frames.CLOSE_NORMAL or (code is not None and 4400 <= code < 4500):
        registry.end(sess, "closed by the device" if code == frames.CLOSE_NORMAL else f"refused by the device ({code})")
    else:
        sess.attached, sess.websocket = False, None
        sess.touch()


async def _start_watched(ws: WebSocket, registry: Registry, sess: Session) -> bytes | None:
    """Prefill and replay while listening to the socket: a device that goes away meanwhile ends
    the session, which drops its queued work (a long replay must not run for nobody) -> None."""
    work = asyncio.ensure_future(registry.start(sess))
    peer = asyncio.ensure_future(ws.receive())
    await asyncio.wait({work, peer}, return_when=asyncio.FIRST_COMPLETED)
    if not peer.done():
        peer.cancel()
        return work.result()
    msg = peer.result()
    registry.end(sess, "closed during its prefill" if msg["type"] == "websocket.disconnect" else "spoke before READY")
    with contextlib.suppress(ProtocolError):
        await work  # settled by end(): nothing runs for it any more
    if msg["type"] == "websocket.disconnect":
        ws.state.disconnect_code = msg.get("code", 1005)
        return None
    raise ProtocolError(frames.CLOSE_ORDER, "a message before READY: wait for the first distribution")


def serve(
    llm: str,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8765,
    device: str = "auto",
    backend: str = "auto",
    log_level: str = "info",
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> None:
    """Load the LLM and serve until interrupted."""
    import uvicorn

    from costeer.cloud.net import check_tls, fit_file_limit, listen, uvicorn_config
    from costeer.engine.models import load_lm

    check_tls(ssl_certfile, ssl_keyfile)
    fit_file_limit(settings.max_connections)
    sock = listen(host, port)
    lm = load_lm(llm, device, backend)
    cfg = uvicorn_config(create_app(lm, settings), settings, host=host, port=port, log_level=log_level,
                         ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)  # fmt: skip
    scheme = "wss" if ssl_certfile else "ws"
    if not ssl_certfile and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without TLS: API keys and tokens travel in clear unless a reverse proxy "
                    "terminates TLS in front (--ssl-certfile/--ssl-keyfile; docs/security.md)", host)  # fmt: skip
    log.info("serving %s (V=%d) on %s://%s:%d", lm.name, lm.vocab_size, scheme, host, port)
    uvicorn.Server(cfg).run(sockets=[sock])
