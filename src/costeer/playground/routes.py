"""The playground as a FastAPI router, served by the gateway's app (gateway.create_app(routers=[...])):
`costeer gateway` mounts it at /playground, `costeer playground` is the same server with it at /.

    GET  {prefix}/                 the page (plain HTML/CSS/JS from the package: no CDN, no build step)
    GET  {prefix}/static/{name}    its two assets
    GET  {prefix}/api/options      pickers, slider defaults and bounds, the example persona
    GET  {prefix}/api/methods      the methods a column may show, from the method table
    GET  {prefix}/api/coefficient  the effective delta coefficient the sliders imply (the engine's own)
    POST {prefix}/api/generate     one answer (or chat turn) as server-sent events (play.py)
    POST {prefix}/api/stop         stop an answer: the device stops and the cloud sessions end

The personal context reaches this process only; only the SLM's with-context branch reads it. An
answer runs in the server's one worker (`request.app.state.gateway.worker`), the thread that owns
the models, queued behind the gateway's own requests. POSTs from another origin are refused (a web
page elsewhere must not drive the local models).
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Annotated, AsyncIterator
from urllib.parse import urlsplit

import yaml
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, ConfigDict, Field

from costeer.engine.config import Method
from costeer.gateway.worker import Busy, Job
from costeer.playground.models import Models
from costeer.playground.play import BASELINE, MAX_TURNS, Play, PlayRequest, Sliders, new_run_id, offered_methods

log = logging.getLogger("costeer.playground")

ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


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

    def read(name: str) -> dict:
        return yaml.safe_load(resources.files("costeer").joinpath("examples", name).read_text(encoding="utf-8"))

    data, ref = read("persona.yaml"), read("reference_persona.yaml")
    return {"query": data["query"], "profile": render_context(data["profile"]), "history": "", "preference": "",
            "reference": render_context(ref["profile"])}  # fmt: skip


def same_origin(request: Request) -> None:
    """Refuse a browser's cross-site POST (its Origin names another host than the one it reached)."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise HTTPException(403, "cross-origin requests are refused")


def playground_router(models: Models, prefix: str = "/playground") -> APIRouter:
    """The page and its API under `prefix` ("" puts the page at /)."""
    router = APIRouter(prefix=prefix)
    plays: dict[str, Play] = {}

    if prefix:

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
            "fields": _field_bounds(),
            "example": example_persona(),
            "chat": {"max_turns": MAX_TURNS},
        }

    @router.get("/api/methods")
    def methods() -> dict:
        return {"methods": offered_methods(), "default": Method.costeer.value, "always": BASELINE.value}

    @router.get("/api/coefficient")
    def coefficient(q: Annotated[CoefficientQuery, Query()]) -> dict:
        if not q.method.steered:
            raise HTTPException(422, f"'{q.method.value}' is not steered: it has no delta coefficient")
        return {"method": q.method.value, "coefficient": q.steering().coefficient(q.method)}

    async def admit(req: PlayRequest, request: Request) -> AsyncIterator[tuple[Play, Job]]:
        """The answer queued in the server's worker, before the response starts (so that a full queue
        is a plain 429); stopped when the response ends, however it ends (a page that went away too)."""
        play = Play(new_run_id(), req, models.pair)
        try:
            job = request.app.state.gateway.worker.submit(play.events)
        except Busy:
            raise HTTPException(429, "the models are busy with other answers: stop one, or retry shortly") from None
        plays[play.run_id] = play
        try:
            yield play, job
        finally:
            play.stop()  # the worker ends every stream after its current token
            job.cancel()
            plays.pop(play.run_id, None)

    @router.post("/api/generate", response_class=EventSourceResponse, dependencies=[Depends(same_origin)])
    async def generate(admitted: tuple = Depends(admit)) -> AsyncIterator[ServerSentEvent]:  # noqa: B008 (admit: a closure)
        play, job = admitted
        # first, so that the page can stop the answer while it waits for the models or loads them
        yield ServerSentEvent(event="run", data={"run_id": play.run_id})
        while (event := await job.next()).kind == "piece":
            kind, data = event.value
            yield ServerSentEvent(event=kind, data=data)
        if event.kind == "error":  # Play turns every error into events: this one escaped it
            log.error("playground answer %s failed", play.run_id, exc_info=event.value)
            yield ServerSentEvent(event="error", data={"message": "internal error (see the server log)"})
            yield ServerSentEvent(event="end", data={"stopped": False})

    @router.post("/api/stop", dependencies=[Depends(same_origin)])
    def stop(req: StopRequest) -> dict:
        play = plays.get(req.run_id)
        if play is not None:
            play.stop()
        return {"run_id": req.run_id, "stopping": play is not None}

    return router


def _field_bounds() -> dict[str, dict]:
    """Each slider's default and bounds, read off PlayRequest (one place for them)."""
    out = {}
    for name in ("T", "alpha", "beta", "lam", "eta", "temperature", "top_k", "max_new_tokens"):
        info = PlayRequest.model_fields[name]
        bounds = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le") if getattr(m, k, None) is not None}
        out[name] = {"default": info.default, **bounds}
    return out
