"""The playground as a FastAPI router (mounted by `costeer playground`, and by any app that wants it).

    GET  {prefix}/                 the page (plain HTML/CSS/JS from the package: no CDN, no build step)
    GET  {prefix}/static/{name}    its two assets
    GET  {prefix}/api/options      pickers, slider defaults and bounds, the example persona
    GET  {prefix}/api/coefficient  the effective delta coefficient the sliders imply (the engine's own)
    POST {prefix}/api/generate     one answer as server-sent events (play.py)
    POST {prefix}/api/stop         stop an answer: the device stops and the cloud sessions end

The personal context reaches this process only; only the SLM's with-context branch reads it.
POSTs from another origin are refused (a web page elsewhere must not drive the local models).
"""

from __future__ import annotations

import asyncio
import threading
from importlib import resources
from typing import Annotated, AsyncIterator
from urllib.parse import urlsplit

import yaml
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, ConfigDict, Field

from costeer.engine.config import Method
from costeer.engine.methods import METHODS
from costeer.playground.models import Models
from costeer.playground.play import EXTRA_METHODS, Play, PlayRequest, Sliders, new_run_id

ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
MAX_PENDING = 4  # answers running or waiting for the models at once


class StopRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(min_length=1, max_length=64)


class CoefficientQuery(Sliders):
    method: Method = Method.costeer


def _asset(name: str) -> str:
    return resources.files("costeer.playground").joinpath("static", name).read_text(encoding="utf-8")


def example_persona() -> dict:
    """The shipped example persona, as the page's panels read it."""
    from costeer.engine.prompts import render_context

    data = yaml.safe_load(resources.files("costeer").joinpath("examples/persona.yaml").read_text(encoding="utf-8"))
    return {"query": data["query"], "profile": render_context(data["profile"]), "history": "", "preference": ""}


def same_origin(request: Request) -> None:
    """Refuse a browser's cross-site POST (its Origin names another host than the one it reached)."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise HTTPException(403, "cross-origin requests are refused")


def playground_router(models: Models, prefix: str = "/playground") -> APIRouter:
    router = APIRouter(prefix=prefix)
    answer_lock = threading.Lock()  # one answer decodes at a time: the models are shared
    plays: dict[str, Play] = {}

    @router.get("", include_in_schema=False)
    def page_redirect() -> RedirectResponse:
        return RedirectResponse(f"{prefix}/")  # the page's relative URLs need the slash

    @router.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(_asset("index.html"))

    @router.get("/static/{name}")
    def asset(name: str) -> Response:
        if name not in ASSETS:  # a fixed list: no path is ever built from the request
            raise HTTPException(404, "no such asset")
        return Response(_asset(name), media_type=ASSETS[name])

    @router.get("/api/options")
    def options() -> dict:
        settings = models.settings
        return {
            "models": settings.offered(),
            "cloud": settings.cloud,
            "methods": [{"value": s.name, "help": s.help} for s in METHODS if s.steered],
            "extra": [{"value": m.value, "help": m.spec.help} for m in EXTRA_METHODS],
            "fields": _field_bounds(),
            "example": example_persona(),
            # conversations are not in the API yet: the page offers one question at a time
            "chat": False,
        }

    @router.get("/api/coefficient")
    def coefficient(q: Annotated[CoefficientQuery, Query()]) -> dict:
        if not q.method.steered:
            raise HTTPException(422, f"'{q.method.value}' is not steered: it has no delta coefficient")
        return {"method": q.method.value, "coefficient": q.steering().coefficient(q.method)}

    @router.post("/api/generate", response_class=EventSourceResponse, dependencies=[Depends(same_origin)])
    async def generate(req: PlayRequest) -> AsyncIterator[ServerSentEvent]:
        if len(plays) >= MAX_PENDING:
            raise HTTPException(429, "too many answers running: stop one first")
        play = Play(new_run_id(), req, models.pair, answer_lock)
        plays[play.run_id] = play
        try:
            async for kind, data in _in_thread(play):
                yield ServerSentEvent(event=kind, data=data)
        finally:
            plays.pop(play.run_id, None)

    @router.post("/api/stop", dependencies=[Depends(same_origin)])
    def stop(req: StopRequest) -> dict:
        play = plays.get(req.run_id)
        if play is not None:
            play.stop()
        return {"run_id": req.run_id, "stopping": play is not None}

    return router


async def _in_thread(play: Play) -> AsyncIterator[tuple[str, dict]]:
    """Run play.events() in its own thread; relay its events. Leaving early (the page went away)
    stops the answer: the worker ends every stream after its current token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the server's loop is gone
            play.stop()

    def work() -> None:
        try:
            for event in play.events():
                put(event)
        finally:
            put(None)

    threading.Thread(target=work, name=f"playground-{play.run_id}", daemon=True).start()
    try:
        while (event := await queue.get()) is not None:
            yield event
    finally:
        play.stop()


def _field_bounds() -> dict[str, dict]:
    """Each slider's default and bounds, read off PlayRequest (one place for them)."""
    out = {}
    for name in ("T", "alpha", "beta", "lam", "eta", "temperature", "top_k", "max_new_tokens"):
        info = PlayRequest.model_fields[name]
        bounds = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le") if getattr(m, k, None) is not None}
        out[name] = {"default": info.default, **bounds}
    return out
