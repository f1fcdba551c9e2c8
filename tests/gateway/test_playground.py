"""The playground mounted on the gateway's app: one server, one worker, one model pair; the /v1 routes
keep OpenAI's error shape, the page's routes FastAPI's (whose messages the page shows)."""

import pytest
from fastapi.testclient import TestClient

from costeer import CoSteer
from costeer.gateway import GatewaySettings, create_app
from costeer.playground import Models, PlaygroundSettings, playground_router
from tests.playground.conftest import request_body, sse_events
from tests.tiny import bpe_tokenizer, gemma3, llama, make_lm


@pytest.fixture(scope="module")
def pair():
    tok = bpe_tokenizer()
    return CoSteer(make_lm("llm", llama(len(tok), seed=1), tok), make_lm("slm", gemma3(len(tok), seed=2), tok))


@pytest.fixture(scope="module")
def served(pair, tmp_path_factory):
    ctx = tmp_path_factory.mktemp("ctx") / "me.txt"
    ctx.write_text("I like spicy tofu")
    models = Models.serving(pair, PlaygroundSettings(llm="tiny-llm", slm="tiny-slm"))
    app = create_app(pair, GatewaySettings(context_file=ctx), routers=[playground_router(models)])
    with TestClient(app, base_url="http://127.0.0.1") as client:  # a loopback Host (not "testserver")
        yield client, models


def test_one_server_serves_the_api_and_the_page(served):
    client, _ = served
    assert client.get("/playground", follow_redirects=False).headers["location"] == "/playground/"
    assert "costeer playground" in client.get("/playground/").text
    assert "costeer" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert client.get("/playground/api/options").json()["models"] == {"llm": ["tiny-llm"], "slm": ["tiny-slm"]}


def test_the_page_answers_only_to_this_machines_names(served):
    """A page on a name rebound to 127.0.0.1 sends Origin = Host, which the same-origin check lets
    through: the keyless server refuses any Host but a loopback one."""
    client, _ = served
    evil = {"Host": "rebind.example", "Origin": "http://rebind.example"}
    assert client.get("/playground/", headers=evil).status_code == 403
    assert client.post("/playground/api/generate", json=request_body(max_new_tokens=2), headers=evil).status_code == 403


def test_a_playground_answer_runs_in_the_gateways_worker(served, pair, monkeypatch):
    client, models = served
    lock = client.app.state.gateway.worker.lock
    held = []
    pair_of = models.pair
    monkeypatch.setattr(models, "pair", lambda llm, slm: held.append(lock.locked()) or pair_of(llm, slm))
    with client.stream("POST", "/playground/api/generate", json=request_body(max_new_tokens=4)) as r:
        events = sse_events(r.iter_lines())
    assert held == [True]  # the models were taken under the worker's lock, as a /v1 request takes them
    done = {d["stream"]: d["text"] for k, d in events if k == "done"}
    want = pair.generate(request_body()["query"], f"Profile:\n{request_body()['profile']}", "costeer", max_new_tokens=4)
    assert done["costeer"] == want.text and events[-1] == ("end", {"stopped": False})


def test_the_served_pair_is_the_only_choice(served):
    client, _ = served
    with client.stream("POST", "/playground/api/generate", json=request_body(llm="smollm2-135m-instruct")) as r:
        events = sse_events(r.iter_lines())
    assert "not offered here" in events[-2][1]["message"] and events[-1][0] == "end"


def test_errors_keep_each_sides_shape(served):
    client, _ = served
    page = client.post("/playground/api/generate", json=request_body(profile=""))
    assert page.status_code == 422 and "context is empty" in page.json()["detail"][0]["msg"]
    api = client.post("/v1/chat/completions", json={"model": "costeer"})
    assert api.status_code == 400 and api.json()["error"]["code"]
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    assert client.get("/nothing").json() == {"detail": "Not Found"}
