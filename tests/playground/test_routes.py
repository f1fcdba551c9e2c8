"""The playground's HTTP side without a browser: page and assets, options, the coefficient, the SSE answer."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from costeer import CoSteer, Method, SamplingConfig, SteeringConfig
from costeer.chat import reply
from costeer.engine.methods import METHODS
from costeer.engine.prompts import chat_ids
from costeer.playground.play import MAX_TURN_CHARS, MAX_TURNS
from tests.playground.conftest import PROFILE, QUERY, make_models, playground_app, request_body, sse_events

GENERATE = "/api/generate"


@pytest.fixture(scope="module")
def client(lms):
    with TestClient(playground_app(make_models(lms)), base_url="http://127.0.0.1") as c:  # a loopback Host
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
    page = client.get("/")
    assert page.status_code == 200 and "static/app.js" in page.text and "static/style.css" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN: nothing fetched from elsewhere
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/..%2Fplay.py").status_code == 404
    assert client.get("/static/index.html").status_code == 404  # only the listed assets


def test_options_offer_the_default_pair_first_and_the_example_persona(client):
    opts = client.get("/api/options").json()
    assert opts["models"]["llm"][0] == "tiny-llm" and opts["models"]["slm"][0] == "tiny-slm"
    assert "Sam Okafor" in opts["example"]["profile"] and opts["example"]["query"]
    assert opts["fields"]["T"] == {"default": 20, "ge": 1, "le": 100}
    assert opts["chat"] == {"max_turns": MAX_TURNS} and opts["cloud"] is None


def test_the_methods_come_from_the_method_table(client):
    got = client.get("/api/methods").json()
    assert got["default"] == "costeer" and got["always"] == "llm"
    # every row but the one that hands the context to the LLM, with the row's own facts
    assert [m["name"] for m in got["methods"]] == [s.name for s in METHODS if s.name != "llm_context"]
    for m in got["methods"]:
        spec = Method(m["name"]).spec
        assert (m["steered"], m["needs_context"], m["help"]) == (spec.steered, spec.needs_context, spec.help)
    # the page lists no method of its own: no row's name is a string in its script (element ids aside:
    # the model pickers are $("llm") and $("slm"))
    script = re.sub(r'\$\("\w+"\)', "", client.get("/static/app.js").text)
    assert not [s.name for s in METHODS if re.search(rf"[\"'`]{s.name}[\"'`]", script)]


def test_any_offered_method_can_be_an_extra_column(client):
    events = answer(client, extra=["costeer_trust", "slm"], max_new_tokens=4)
    start = next(d for k, d in events if k == "start")
    assert [s["method"] for s in start["streams"]] == ["llm", "costeer", "costeer_trust", "slm"]
    assert events[-1] == ("end", {"stopped": False})


@pytest.mark.parametrize("method", ["costeer", "light"])
def test_coefficient_is_the_engines_own(client, method):
    params = {"method": method, "T": 7, "alpha": 1.5, "beta": 2.5, "lam": 0.5, "eta": 3.0}
    got = client.get("/api/coefficient", params=params).json()
    want = SteeringConfig(T=7, alpha=1.5, beta=2.5, lam=0.5, eta=3.0).coefficient(Method(method))
    assert got == {"method": method, "coefficient": pytest.approx(want)}
    assert client.get("/api/coefficient", params=params | {"beta": 1.0}).json()["coefficient"] != got["coefficient"]


@pytest.mark.parametrize("bad", [{"T": 0}, {"eta": 0}, {"method": "llm"}, {"alpha": "x"}])
def test_coefficient_refuses_what_no_slider_gives(client, bad):
    assert client.get("/api/coefficient", params={"method": "costeer"} | bad).status_code == 422


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


def test_a_context_too_long_for_the_slm_is_the_apis_error_on_the_page(client, lms):
    window = lms["tiny-slm"].window
    panel = "spicy tofu " * 700  # three full panels: more tokens than the tiny SLM's window
    events = answer(client, profile=panel, history=panel, preference=panel, max_new_tokens=16)
    errors = [d["message"] for k, d in events if k == "error"]
    # the API's PromptTooLong, its first line: the branch, the sizes and the window
    assert len(errors) == 1 and errors[0].startswith("the slm_context prompt (")
    assert f"exceeds the trained window of tiny-slm ({window:,} tokens)" in errors[0]
    assert "start" not in [k for k, _ in events]


def test_chat_mode_the_second_turn_carries_the_first(client, lms):
    first = answer(client, max_new_tokens=8)
    said = next(d["text"] for k, d in first if k == "done" and d["stream"] == "costeer")
    turns = [{"role": "user", "content": QUERY}, {"role": "assistant", "content": said}]
    second = answer(client, query="and for dessert", turns=turns, max_new_tokens=8)
    start = next(d for k, d in second if k == "start")
    conversation = [*turns, {"role": "user", "content": "and for dessert"}]
    llm_prompt = chat_ids(lms["tiny-llm"].tokenizer, conversation)
    assert start["turn"] == 2 and start["llm_prompt_tokens"] == len(llm_prompt)
    # the LLM read the whole public conversation, and each column is chat.reply's answer to it
    wire = {d["stream"]: d for k, d in second if k == "wire"}
    assert wire["llm"]["llm_prompt_ids"] == wire["costeer"]["llm_prompt_ids"] == llm_prompt
    cs, context = CoSteer(lms["tiny-llm"], lms["tiny-slm"]), f"Profile:\n{PROFILE}"
    tokens = by_stream(second, "token")
    for m in ("llm", "costeer"):
        want = reply(cs, conversation, m, context, max_new_tokens=8)
        assert "".join(want) == "".join(t["text"] for t in tokens[m])
        assert [t["id"] for t in tokens[m]] == want.stream.generation.token_ids
    # the private context went to the SLM's with-context branch only: never into the LLM's prompt
    assert "Seattle" not in lms["tiny-llm"].tokenizer.decode(llm_prompt)


@pytest.mark.parametrize("turns, says", [
    ([{"role": "assistant", "content": "hi"}], "user, assistant"),
    ([{"role": "user", "content": "hi"}], "user, assistant"),
    ([{"role": "system", "content": "hi"}, {"role": "assistant", "content": "x"}], "literal_error"),
    ([{"role": "user", "content": "x" * (MAX_TURN_CHARS + 1)}, {"role": "assistant", "content": "y"}], "at most"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * (MAX_TURNS + 1), "at most"),
])  # fmt: skip
def test_bad_earlier_turns_are_refused(client, turns, says):
    r = client.post(GENERATE, json=request_body(turns=turns))
    assert r.status_code == 422 and says in r.text


def test_a_post_from_another_origin_is_refused(client):
    r = client.post(GENERATE, json=request_body(), headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    r = client.post("/api/stop", json={"run_id": "x"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403


def test_the_reference_panel_is_what_costeer_matched_reads(client, lms):
    # the reference profile goes to the SLM's without-context branch of the matched method only, in the
    # context's format: the page's answer is reply(..., reference=...), and it is not the one without it
    reference = "name: Jordan Avery\nlives_in: Columbus\nlikes: grilled fish, rice and beans"
    events = answer(client, method="costeer_matched", reference=reference, extra=["costeer"])
    tokens = by_stream(events, "token")
    cs = CoSteer(lms["tiny-llm"], lms["tiny-slm"])
    context, sampling = f"Profile:\n{PROFILE}", SamplingConfig(max_new_tokens=16)

    def ids(method, ref):
        r = reply(cs, QUERY, method, context, ref, sampling=sampling)
        for _ in r:
            pass
        return r.stream.generation.token_ids

    matched = ids("costeer_matched", f"Profile:\n{reference}")
    assert [t["id"] for t in tokens["costeer_matched"]] == matched
    assert matched != ids("costeer_matched", None)  # the panel changed the answer
    assert [t["id"] for t in tokens["costeer"]] == ids("costeer", None)  # other methods ignore it
    assert client.get("/api/options").json()["example"]["reference"].startswith("name: Jordan Avery")
