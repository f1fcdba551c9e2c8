"""The playground over real sockets: a stop mid-answer, and a remote cloud (wire panel, sessions ended)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.cloud.server_util import KEY_A, ThreadServer
from tests.playground.conftest import request_body, slow, sse_events

MAX_NEW = 200  # with SlowLM, seconds of decoding: a stop lands long before the end


def stream_until(url: str, body: dict, on_event) -> list[tuple[str, dict]]:
    """POST the answer, call on_event(kind, data) as events arrive; -> all events."""
    events = []
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
        with http.stream("POST", "/api/generate", json=body) as r:
            assert r.status_code == 200
            pending = []
            for line in r.iter_lines():
                pending.append(line)
                if line == "":
                    for ev in sse_events(pending):
                        events.append(ev)
                        on_event(http, *ev)
                    pending = []
    return events


def stop_after_first_token(stream: str):
    def on_event(http, kind, data):
        if kind == "run":
            on_event.run_id = data["run_id"]
        if kind == "token" and data["stream"] == stream and not on_event.sent:
            on_event.sent = True
            assert http.post("/api/stop", json={"run_id": on_event.run_id}).json()["stopping"]

    on_event.sent = False
    return on_event


def test_stop_ends_the_answer_mid_stream(live):
    srv = live()
    events = stream_until(srv.url, request_body(llm="slow-llm", max_new_tokens=MAX_NEW), stop_after_first_token("llm"))
    assert events[-1] == ("end", {"stopped": True})
    tokens = [d for k, d in events if k == "token"]
    assert 1 <= len(tokens) < 20  # stopped within a token or two of the request, not at 2 x 200
    assert not [d for k, d in events if k == "done"]  # no column ran to its end


def test_the_page_going_away_stops_the_answer(live, lms):
    srv = live()
    with httpx.Client(base_url=srv.url, timeout=60, trust_env=False) as http:
        with http.stream("POST", "/api/generate", json=request_body(llm="slow-llm", max_new_tokens=MAX_NEW)) as r:
            for line in r.iter_lines():
                if line.startswith("event: token"):
                    break  # drop the connection mid-answer
        # the next answer waits for the models, i.e. for the first answer to end
        before = lms["slow-llm"].advances
        events = sse_events(http.post("/api/generate", json=request_body(max_new_tokens=4)).text.splitlines())
        assert events[-1] == ("end", {"stopped": False})
        assert lms["slow-llm"].advances - before < 20  # not the 2 x 199 forwards of a full answer


@pytest.fixture
def slow_cloud(tiny_llm):
    srv = ThreadServer(slow(tiny_llm), max_sessions=4, max_sessions_per_key=4, max_new_tokens=MAX_NEW)
    yield srv
    srv.stop()


def test_remote_cloud_wire_panel_shows_the_bytes_and_the_token_ids(live, slow_cloud):
    srv = live(cloud=slow_cloud.url, api_key=KEY_A)
    events = stream_until(srv.url, request_body(llm=slow_cloud.url, max_new_tokens=6), lambda *a: None)
    assert [k for k, _ in events][-1] == "end" and not [d for k, d in events if k == "error"]
    start = next(d for k, d in events if k == "start")
    assert start["remote"] and start["cloud"].startswith("ws://")
    wire = {d["stream"]: d for k, d in events if k == "wire"}
    assert set(wire) == {"llm", "costeer"}
    for name, w in wire.items():
        ids = [d["id"] for k, d in events if k == "token" and d["stream"] == name]
        assert w["remote"] and w["bytes_up"] > 0 and w["bytes_down"] > w["bytes_up"]
        # what went up: the answer but its last round (one token; with look-ahead, the tree's last path)
        assert w["token_ids"] == ids[: len(w["token_ids"])] and w["token_ids"]
        assert w["prompt_ids"] == [w["llm_prompt_ids"]]  # one OPEN, with the public query's prompt
        assert w["audit"] == {"clean": True, "leaks": [], "prompt_is_public": True}
        assert w["session_closed"]
    assert not slow_cloud.registry.sessions


def test_stop_ends_the_cloud_sessions(live, slow_cloud):
    srv = live(cloud=slow_cloud.url, api_key=KEY_A)
    events = stream_until(srv.url, request_body(llm=slow_cloud.url, max_new_tokens=MAX_NEW),
                          stop_after_first_token("costeer"))  # fmt: skip
    assert events[-1] == ("end", {"stopped": True})
    assert all(d["session_closed"] for k, d in events if k == "wire")
    deadline = time.monotonic() + 5
    while slow_cloud.registry.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not slow_cloud.registry.sessions  # the cloud freed both sessions at once (close 1000)


def test_an_unreachable_cloud_is_an_error_on_the_page(live):
    url = "ws://127.0.0.1:9"  # the discard port: nothing listens
    srv = live(cloud=url, api_key=KEY_A)
    events = stream_until(srv.url, request_body(llm=url), lambda *a: None)
    errors = [d["message"] for k, d in events if k == "error"]
    assert len(errors) == 1 and "cannot reach the cloud" in errors[0]
    assert events[-1][0] == "end"


def test_chat_mode_over_the_cloud_sends_the_public_conversation_only(live, slow_cloud):
    srv = live(cloud=slow_cloud.url, api_key=KEY_A)
    first = stream_until(srv.url, request_body(llm=slow_cloud.url, max_new_tokens=4), lambda *a: None)
    said = next(d["text"] for k, d in first if k == "done" and d["stream"] == "costeer")
    turns = [{"role": "user", "content": request_body()["query"]}, {"role": "assistant", "content": said}]
    second = stream_until(srv.url, request_body(llm=slow_cloud.url, query="and for dessert", turns=turns,
                                                max_new_tokens=4), lambda *a: None)  # fmt: skip
    wire = {d["stream"]: d for k, d in second if k == "wire"}
    first_prompt = next(d for k, d in first if k == "wire")["llm_prompt_ids"]
    for w in wire.values():
        # one OPEN: exactly the public conversation's prompt, which holds the first turn, and no context
        assert w["prompt_ids"] == [w["llm_prompt_ids"]] and len(w["llm_prompt_ids"]) > len(first_prompt)
        assert w["audit"] == {"clean": True, "leaks": [], "prompt_is_public": True}


def test_a_remote_llm_without_a_wire_log_says_so(slow_cloud, tiny_slm):
    from costeer import CoSteer
    from costeer.device import connect_cloud
    from costeer.playground import Models, PlaygroundSettings
    from tests.playground.conftest import playground_app
    from tests.servers import UvicornThread

    cs = CoSteer(connect_cloud(slow_cloud.url, KEY_A), tiny_slm)  # as `costeer gateway --cloud` holds it: no log
    settings = PlaygroundSettings(llm="tiny-llm", slm="tiny-slm", cloud=slow_cloud.url)
    srv = UvicornThread(playground_app(Models.serving(cs, settings)))
    try:
        events = stream_until(srv.url, request_body(llm=slow_cloud.url, max_new_tokens=4), lambda *a: None)
    finally:
        srv.stop()
    assert next(d for k, d in events if k == "start")["remote"]
    wire = [d for k, d in events if k == "wire"]
    assert wire and all(w["remote"] and not w["logged"] and "bytes_up" not in w for w in wire)


def test_past_the_workers_queue_an_answer_is_refused_with_429(lms):
    from costeer.gateway import GatewaySettings, create_app
    from costeer.playground import playground_router
    from tests.playground.conftest import make_models
    from tests.servers import UvicornThread

    app = create_app(None, GatewaySettings(max_waiting=0), routers=[playground_router(make_models(lms), prefix="")])
    srv = UvicornThread(app)
    models = app.state.gateway.worker.lock
    models.acquire()  # as if a generation held the models: the first answer waits for them
    held = True
    try:
        with httpx.Client(base_url=srv.url, timeout=60, trust_env=False) as http:
            with http.stream("POST", "/api/generate", json=request_body(max_new_tokens=4)) as first:
                lines = first.iter_lines()
                assert next(lines) == "event: run"  # admitted, waiting
                second = http.post("/api/generate", json=request_body(max_new_tokens=4))
                assert second.status_code == 429 and "busy" in second.json()["detail"]
                models.release()
                held = False
                events = sse_events(lines)
        assert events[-1] == ("end", {"stopped": False})  # the admitted answer ran once the models were free
    finally:
        if held:
            models.release()
        srv.stop()
