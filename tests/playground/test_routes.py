"""The playground's HTTP side without a browser: page and assets, options, the coefficient, the SSE answer."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from costeer import CoSteer, Method, SamplingConfig, SteeringConfig
from costeer.playground import create_app
from tests.playground.conftest import PROFILE, QUERY, make_models, request_body, sse_events

GENERATE = "/playground/api/generate"


@pytest.fixture(scope="module")
def client(lms):
    with TestClient(create_app(models=make_models(lms))) as c:
        yield c


def answer(client, **over) -> list[tuple[str, dict]]:
    with client.stream("POST", GENERATE, json=request_body(**over)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


def by_stream(events, kind: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for k, d in events:
        if k == kind:
            out.setdefault(d["stream"], []).append(d)
    return out


def test_page_and_its_assets_come_from_the_package(client):
    page = client.get("/playground/")
    assert page.status_code == 200 and "static/app.js" in page.text and "static/style.css" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN: nothing fetched from elsewhere
    assert client.get("/playground/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/playground/static/style.css").status_code == 200
    assert client.get("/playground/static/..%2Fplay.py").status_code == 404
    assert client.get("/playground/static/index.html").status_code == 404  # only the listed assets
    assert client.get("/", follow_redirects=False).headers["location"] == "/playground/"
    assert client.get("/playground", follow_redirects=False).headers["location"] == "/playground/"


def test_options_offer_the_default_pair_first_and_the_example_persona(client):
    opts = client.get("/playground/api/options").json()
    assert opts["models"]["llm"][0] == "tiny-llm" and opts["models"]["slm"][0] == "tiny-slm"
    assert [m["value"] for m in opts["methods"]][0] == "costeer"
    assert all(Method(m["value"]).steered for m in opts["methods"])
    assert {m["value"] for m in opts["extra"]} == {"light", "slm_context", "slm"}
    assert "Sam Okafor" in opts["example"]["profile"] and opts["example"]["query"]
    assert opts["fields"]["T"] == {"default": 20, "ge": 1, "le": 100}
    assert opts["chat"] is False and opts["cloud"] is None


@pytest.mark.parametrize("method", ["costeer", "light"])
def test_coefficient_is_the_engines_own(client, method):
    params = {"method": method, "T": 7, "alpha": 1.5, "beta": 2.5, "lam": 0.5, "eta": 3.0}
    got = client.get("/playground/api/coefficient", params=params).json()
    want = SteeringConfig(T=7, alpha=1.5, beta=2.5, lam=0.5, eta=3.0).coefficient(Method(method))
    assert got == {"method": method, "coefficient": pytest.approx(want)}
    assert client.get("/playground/api/coefficient", params=params | {"beta": 1.0}).json()["coefficient"] != got["coefficient"]


@pytest.mark.parametrize("bad", [{"T": 0}, {"eta": 0}, {"method": "llm"}, {"alpha": "x"}])
def test_coefficient_refuses_what_no_slider_gives(client, bad):
    assert client.get("/playground/api/coefficient", params={"method": "costeer"} | bad).status_code == 422


def test_an_answer_streams_llm_and_costeer_side_by_side(client, lms):
    events = answer(client, extra=["slm_context"])
    kinds = [k for k, _ in events]
    assert kinds[:3] == ["run", "status", "start"] and kinds[-1] == "end"
    start = events[2][1]
    assert [s["method"] for s in start["streams"]] == ["llm", "costeer", "slm_context"]
    assert start["streams"][1]["coefficient"] == pytest.approx(SteeringConfig().coefficient(Method.costeer))
    assert start["remote"] is False
    tokens, done = by_stream(events, "token"), {d["stream"]: d for k, d in events if k == "done"}
    # the tokens interleave: the second column's first token comes before the first column's last
    order = [d["stream"] for k, d in events if k == "token"]
    assert order.index("costeer") < len(order) - 1 - order[::-1].index("llm")
    # the page's answer is the API's answer (inspection changes no token)
    cs = CoSteer(lms["tiny-llm"], lms["tiny-slm"])
    context = f"Profile:\n{PROFILE}"
    for m in ("llm", "costeer", "slm_context"):
        want = cs.generate(QUERY, context, m, sampling=SamplingConfig(max_new_tokens=16))
        assert [t["id"] for t in tokens[m]] == want.token_ids
        assert "".join(t["text"] for t in tokens[m]) == done[m]["text"] == want.text
    # the heat-map data: on the steered column only
    assert all({"shift", "before", "after"} <= t.keys() for t in tokens["costeer"])
    assert any(abs(t["shift"]) > 1e-3 for t in tokens["costeer"])
    assert all(len(t["before"]) == len(t["after"]) == 5 for t in tokens["costeer"])
    assert not any("shift" in t for t in tokens["llm"] + tokens["slm_context"])
    # in-process: the wire panel says so, for the columns that use the LLM
    wire = {d["stream"]: d for k, d in events if k == "wire"}
    assert set(wire) == {"llm", "costeer"} and not wire["costeer"]["remote"]
    assert wire["costeer"]["token_ids"] == [t["id"] for t in tokens["costeer"]]
    assert events[-1] == ("end", {"stopped": False})


@pytest.mark.parametrize("bad, says", [
    ({"query": "   "}, "query is empty"),
    ({"profile": ""}, "context is empty"),
    ({"method": "llm"}, "needs a steered method"),
    ({"extra": ["llm_context"]}, "extra columns"),
    ({"max_new_tokens": 10_000}, "less than or equal"),
    ({"profile": "x" * 9_000}, "at most"),
    ({"api_key": "x"}, "Extra inputs"),
])  # fmt: skip
def test_bad_requests_are_refused_before_anything_runs(client, bad, says):
    r = client.post(GENERATE, json=request_body(**bad))
    assert r.status_code == 422 and says in r.text


def test_a_model_not_offered_is_an_error_on_the_page(client):
    events = answer(client, llm="/etc/passwd")
    assert ("error", {"message": events[-2][1]["message"]}) == events[-2]
    assert "not offered here" in events[-2][1]["message"] and events[-1][0] == "end"


def test_a_context_too_long_for_the_slm_is_an_error_on_the_page(client):
    # the tiny models read 512 positions
    events = answer(client, profile="spicy tofu " * 600, max_new_tokens=16)
    errors = [d["message"] for k, d in events if k == "error"]
    assert len(errors) == 1 and errors[0].startswith("the context is too long") and "512" in errors[0]
    assert "start" not in [k for k, _ in events]


def test_a_post_from_another_origin_is_refused(client):
    r = client.post(GENERATE, json=request_body(), headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    r = client.post("/playground/api/stop", json={"run_id": "x"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
