"""The gateway on tiny random models, driven by the real `openai` client and by plain HTTP."""

import json
import logging
import os
import threading
import time

import httpx
import openai
import pytest

from costeer import CoSteer
from costeer.engine.prompts import chat_ids, conversation
from costeer.gateway import GatewaySettings, check_bind, create_app
from tests.gateway.server import AppServer
from tests.tiny import bpe_tokenizer, gemma3, llama, make_lm

QUERY = "what should I cook tonight"
CONTEXT = "my name is Sam Okafor, I live in Seattle and I like spicy tofu with lentils"
OTHER_CONTEXT = "my name is Ana Lima, I live in Porto and I like grilled sardines"
PRIVATE_WORDS = ("Sam", "Okafor", "Seattle", "spicy tofu", "lentils")
TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": QUERY},
    {"role": "assistant", "content": "the cat sat on the mat"},
    {"role": "user", "content": "and for the dog"},
]
KEY = "gateway-key-0123456789"


@pytest.fixture(scope="module")
def pair():
    tok = bpe_tokenizer()
    return CoSteer(make_lm("llm", llama(len(tok), seed=1), tok), make_lm("slm", gemma3(len(tok), seed=2), tok))


@pytest.fixture(scope="module")
def context_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("ctx") / "me.txt"
    f.write_text(CONTEXT)
    return f


def _serve(pair, **settings):
    return AppServer(create_app(pair, GatewaySettings(**settings)))


@pytest.fixture(scope="module")
def gateway(pair, context_file):
    srv = _serve(pair, context_file=context_file, max_tokens_limit=64, max_body_bytes=32_768)
    yield srv
    srv.stop()


@pytest.fixture()
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_are_the_methods_served(client):
    ids = {m.id for m in client.models.list().data}
    assert {"costeer", "costeer_matched", "light", "llm", "slm", "slm_context"} <= ids
    assert "llm_context" not in ids  # it would hand the context to the LLM
    assert client.models.retrieve("light").id == "light"


@pytest.mark.parametrize("method", ["costeer", "llm", "slm_context"])
def test_streaming_and_not_give_the_text_of_generate(pair, client, method):
    want = pair.generate(QUERY, CONTEXT, method, max_new_tokens=12)
    msgs = [{"role": "user", "content": QUERY}]
    got = client.chat.completions.create(model=method, messages=msgs, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want.text and want.text
    assert got.choices[0].finish_reason == want.stop_reason
    public = "llm" if method != "slm_context" else "slm"
    assert got.usage.prompt_tokens == len(pair.prompts(QUERY, None)[public])  # the public prompt only
    assert got.usage.completion_tokens == len(want.token_ids) and got.model == method

    chunks = list(client.chat.completions.create(model=method, messages=msgs, max_completion_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.stop_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_a_multi_turn_conversation(pair, client):
    first = client.chat.completions.create(model="costeer", messages=TURNS[:2], max_tokens=8).choices[0].message.content
    assert first == pair.generate(TURNS[:2], CONTEXT, "costeer", max_new_tokens=8).text
    turns = [*TURNS[:2], {"role": "assistant", "content": first}, TURNS[3]]
    second = client.chat.completions.create(model="costeer", messages=turns, max_tokens=8)
    assert second.choices[0].message.content == pair.generate(turns, CONTEXT, "costeer", max_new_tokens=8).text
    assert second.usage.prompt_tokens == len(chat_ids(pair.llm.tokenizer, conversation(turns)))


def test_stop_strings(pair, client):
    full = pair.generate(QUERY, CONTEXT, "costeer", max_new_tokens=16).text
    stop = full[4:7]
    got = client.chat.completions.create(model="costeer", messages=[{"role": "user", "content": QUERY}],
                                         max_tokens=16, stop=[stop])  # fmt: skip
    assert got.choices[0].message.content == full[: full.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_an_unknown_model_is_404(client, gateway):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": QUERY}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    r = httpx.get(f"{gateway.url}/v1/models/llm_context", trust_env=False)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


BAD = [
    (b'{"model": "llm", "messages": [', 400, "invalid_json"),
    (b'["model", "llm"]', 400, "invalid_json"),
    (json.dumps({"model": "llm"}).encode(), 400, "invalid_value"),
    (json.dumps({"model": "llm", "messages": []}).encode(), 400, "invalid_value"),
    (json.dumps({"model": "llm", "messages": [{"role": "tool", "content": "x"}]}).encode(), 400, "invalid_request"),
    (json.dumps({"model": "llm", "messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), 400,
     "invalid_value"),
    (json.dumps({"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(), 400,
     "invalid_value"),
    (json.dumps({"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}).encode(), 400,
     "invalid_value"),
    (json.dumps({"model": "llm", "messages": [{"role": "user", "content": "x" * 40_000}]}).encode(), 413,
     "request_too_large"),
    ('{"model": "llm", "messages": [{"role": "user", "content": "café"}]}'.encode("latin-1"), 400, "invalid_encoding"),
    (json.dumps({"model": "llm", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), 400,
     "invalid_value"),
    (json.dumps({"model": "llm", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}).encode(), 400,
     "invalid_value"),
    # a JSON escape of a lone surrogate: text no tokenizer takes (it used to be a 500); refused as JSON
    (b'{"model": "llm", "messages": [{"role": "user", "content": "caf\\udce9"}]}', 400, "invalid_json"),
    (json.dumps({"model": "llm", "messages": [{"role": "user", "content": "hi"}], "temperature": 1,
                 "seed": 2**70}).encode(), 400, "invalid_value"),  # fmt: skip
]


@pytest.mark.parametrize("body, status, code", BAD, ids=["json", "not-object", "no-messages", "empty", "role", "n",
                                                         "max0", "max-over", "too-large", "not-utf8", "part",
                                                         "temperature", "surrogate", "seed"])  # fmt: skip
def test_bad_input_gets_an_openai_error_and_the_gateway_keeps_serving(gateway, body, status, code):
    r = httpx.post(f"{gateway.url}/v1/chat/completions", content=body, trust_env=False,
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    hi = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ok = httpx.post(f"{gateway.url}/v1/chat/completions", json=hi, trust_env=False, timeout=60)
    assert ok.status_code == 200


def test_a_chunked_body_over_the_limit_is_413(gateway):
    def parts():
        yield b'{"model": "llm", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 1000
        yield b'"}]}'

    r = httpx.post(f"{gateway.url}/v1/chat/completions", content=parts(), trust_env=False)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_body_that_trickles_in_is_408(pair):
    srv = _serve(pair, body_timeout_s=0.3)
    try:
        def parts():
            yield b'{"model": "llm", '
            time.sleep(1.0)
            yield b'"messages": [{"role": "user", "content": "hi"}]}'

        r = httpx.post(f"{srv.url}/v1/chat/completions", content=parts(), trust_env=False, timeout=30)
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
    finally:
        srv.stop()


def test_unknown_routes_and_methods_are_openai_errors(gateway):
    r = httpx.get(f"{gateway.url}/v1/nothing", trust_env=False)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{gateway.url}/v1/chat/completions", trust_env=False)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def _strip_content(obj):
    """The answer with the generated text taken out (the only field that may reflect the context)."""
    if isinstance(obj, dict):
        return {k: _strip_content(v) for k, v in obj.items() if k != "content"}
    if isinstance(obj, list):
        return [_strip_content(v) for v in obj]
    return obj


def test_no_answer_field_echoes_the_context_and_the_log_holds_none(gateway, caplog):
    caplog.set_level(logging.INFO)
    bodies = []
    for method in ("costeer", "costeer_matched", "slm_context", "light"):
        req = {"model": method, "messages": [{"role": "user", "content": QUERY}], "max_tokens": 6}
        r = httpx.post(f"{gateway.url}/v1/chat/completions", json=req, trust_env=False, timeout=60)
        bodies.append(r.json())
        s = httpx.post(f"{gateway.url}/v1/chat/completions", json={**req, "stream": True}, trust_env=False, timeout=60)
        events = [ln[6:] for ln in s.text.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        bodies += [json.loads(e) for e in events[:-1]]
        bodies.append(dict(s.headers) | dict(r.headers))
    # errors raised while the private branch is built must not quote it either
    bad = {"model": "costeer", "messages": [{"role": "user", "content": QUERY}], "max_tokens": 6, "seed": "x"}
    bodies.append(httpx.post(f"{gateway.url}/v1/chat/completions", json=bad, trust_env=False).json())
    dumped = json.dumps([_strip_content(b) for b in bodies])
    assert "chat.completion" in dumped
    for word in PRIVATE_WORDS:
        assert word not in dumped
    time.sleep(0.2)  # uvicorn's access line is written after the response
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "chat.completions model=costeer" in log and "POST /v1/chat/completions" in log
    for word in PRIVATE_WORDS:
        assert word not in log


def test_busy_is_429(pair, context_file):
    srv = _serve(pair, context_file=context_file, max_waiting=0)
    try:
        url = f"{srv.url}/v1/chat/completions"
        req = {"model": "llm", "messages": [{"role": "user", "content": QUERY}], "max_tokens": 3}
        out = {}
        with srv.gateway.worker.lock:  # a generation is running
            post = lambda: out.update(r=httpx.post(url, json=req, trust_env=False, timeout=60))  # noqa: E731
            first = threading.Thread(target=post)
            first.start()
            deadline = time.monotonic() + 30
            while srv.gateway.worker._admitted < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            busy = httpx.post(url, json=req, trust_env=False, timeout=60)
        first.join(60)
        assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
        assert out["r"].status_code == 200
        assert httpx.post(url, json=req, trust_env=False, timeout=60).status_code == 200
    finally:
        srv.stop()


def test_a_key_is_required_when_configured(pair):
    srv = _serve(pair, api_keys=frozenset({KEY}))
    try:
        msgs = [{"role": "user", "content": QUERY}]
        bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong-key-0123456789", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="llm", messages=msgs, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)
        assert good.chat.completions.create(model="llm", messages=msgs, max_tokens=2).choices[0].message.content
        assert httpx.get(f"{srv.url}/health", trust_env=False).status_code == 200
        # without a context file the methods that read one are not served
        assert {m.id for m in good.models.list().data} == {"llm", "slm"}
    finally:
        srv.stop()


def test_the_context_file_is_reloaded_when_it_changes(pair, tmp_path):
    f = tmp_path / "me.txt"
    f.write_text(CONTEXT)
    srv = _serve(pair, context_file=f)
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)

        def ask(model="slm_context"):
            return client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUERY}],
                                                  max_tokens=10).choices[0].message.content  # fmt: skip

        assert ask() == pair.generate(QUERY, CONTEXT, "slm_context", max_new_tokens=10).text
        f.write_text(OTHER_CONTEXT)
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a coarse clock may not move
        assert ask() == pair.generate(QUERY, OTHER_CONTEXT, "slm_context", max_new_tokens=10).text
        f.unlink()
        with pytest.raises(openai.InternalServerError) as e:
            ask()
        assert e.value.status_code == 503 and e.value.body["code"] == "context_unavailable"
        assert ask("llm")  # methods without the context still answer
    finally:
        srv.stop()


def test_a_non_loopback_bind_needs_a_key():
    check_bind("127.0.0.1", GatewaySettings())
    check_bind("::1", GatewaySettings())
    with pytest.raises(ValueError, match="needs an API key"):
        check_bind("0.0.0.0", GatewaySettings())
    check_bind("0.0.0.0", GatewaySettings(api_keys=frozenset({KEY})))
    with pytest.raises(ValueError, match="16 characters"):
        GatewaySettings(api_keys=frozenset({"short"}))


def test_a_client_that_goes_away_stops_its_generation():
    tok = bpe_tokenizer()
    lm = make_lm("llm", llama(len(tok), seed=1), tok)
    gate, calls = threading.Event(), []
    forward = lm.model.forward

    def gated(*a, **kw):  # the first forward (the prefill) waits until the client has given up
        calls.append(1)
        if len(calls) > 1:
            gate.wait(30)
        return forward(*a, **kw)

    lm.model.forward = gated
    srv = _serve(CoSteer(lm, None))
    try:
        req = {"model": "llm", "messages": [{"role": "user", "content": QUERY}], "max_tokens": 60}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/chat/completions", json=req, trust_env=False, timeout=1.0)
        time.sleep(1.5)  # the gateway notices the client is gone
        gate.set()
        deadline = time.monotonic() + 30
        while srv.gateway.worker._admitted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.gateway.worker._admitted == 0 and len(calls) < 10  # not the 60 tokens asked for
    finally:
        gate.set()
        srv.stop()


def test_the_gateway_streams_each_chunk_at_once(monkeypatch):
    """`costeer gateway` serves a socket whose connections have TCP_NODELAY: Nagle's algorithm would
    hold each SSE chunk written while the one before was not yet acknowledged (the client delays its
    ACKs up to 40 ms)."""
    import uvicorn

    from costeer.gateway import serve
    from tests.servers import accepted_nodelay

    given, announced = [], []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: given.extend(sockets))
    serve(create_app(None), "127.0.0.1", 0, announce=announced.append)
    (sock,) = given
    assert announced == [f"http://127.0.0.1:{sock.getsockname()[1]}"]
    assert accepted_nodelay(sock) == 1


def test_the_gateway_on_a_port_in_use_says_so_in_one_line_before_loading_a_model():
    import socket

    from typer.testing import CliRunner

    from costeer.cli import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(app, ["gateway", "--port", str(port), "--llm", "no-such-model", "--slm", "no-such-model"])
    assert r.exit_code != 0 and f"cannot listen on 127.0.0.1:{port}" in r.output
    assert "no-such-model" not in r.output and "Traceback" not in r.output


def _traces(caplog) -> list[str]:
    """Log records that carry a traceback or say an exception escaped the app."""
    return [r.getMessage() for r in caplog.records if r.exc_info or "Exception in ASGI" in r.getMessage()]


def test_a_client_that_hangs_up_mid_body_leaves_no_traceback(gateway, caplog):
    import socket

    caplog.set_level(logging.INFO)
    body = json.dumps({"model": "llm", "messages": [{"role": "user", "content": "hi"}]}).encode()
    with socket.create_connection(("127.0.0.1", gateway.port)) as s:  # announces 500 bytes, sends fewer, leaves
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 500\r\n\r\n" + body[:20])  # fmt: skip
        time.sleep(0.3)
    time.sleep(0.5)
    assert _traces(caplog) == []
    hi = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=hi, trust_env=False, timeout=60).status_code == 200


def test_a_conversation_over_the_window_tells_nothing_of_the_private_prompt(pair, gateway):
    """Too long for the SLM's with-context prompt only: the answer must not give that prompt's length
    (the context's length follows from it), and reads as OpenAI's context_length_exceeded."""
    limit = 64
    fits = lambda ids, lm: len(ids) + limit <= lm.window  # noqa: E731
    words = 10
    while True:  # the shortest query whose public prompts fit and whose private one does not
        words += 1
        p = pair.prompts("hello " * words, CONTEXT)
        if not fits(p["slm_context"], pair.slm):
            break
    assert fits(p["llm"], pair.llm) and fits(p["slm"], pair.slm)

    def ask(words: int) -> httpx.Response:
        req = {"model": "costeer", "messages": [{"role": "user", "content": "hello " * words}], "max_tokens": limit}
        return httpx.post(f"{gateway.url}/v1/chat/completions", json=req, trust_env=False, timeout=60)

    private, public = ask(words), ask(words * 2)  # the second overflows the LLM's own prompt
    assert private.status_code == public.status_code == 400
    err = private.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert f"{len(p['slm_context']):,}" not in err["message"] and str(len(p["slm_context"])) not in err["message"]
    assert "slm_context" not in err["message"]
    assert private.json() == public.json()  # nothing tells which prompt overflowed


def test_a_keyless_gateway_answers_only_to_this_machines_names(pair, gateway):
    """DNS rebinding: a web page whose name turns into 127.0.0.1 reaches the loopback gateway as its
    own origin, with its own name in Host. Without keys, only loopback names are served."""
    hi = {"model": "slm_context", "messages": [{"role": "user", "content": "who am I"}], "max_tokens": 2}
    evil = {"Host": f"rebind.example:{gateway.port}", "Origin": f"http://rebind.example:{gateway.port}"}
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json=hi, headers=evil, trust_env=False, timeout=60)
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(f"{gateway.url}/v1/models", headers=evil, trust_env=False).status_code == 403
    for host in ("localhost", "127.0.0.1", "[::1]", "127.0.0.2"):
        r = httpx.get(f"{gateway.url}/v1/models", headers={"Host": f"{host}:{gateway.port}"}, trust_env=False)
        assert r.status_code == 200, host
    # any page may have a browser POST text/plain to 127.0.0.1 (no preflight): unreadable, but it runs
    drive_by = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    r = httpx.post(f"{gateway.url}/v1/chat/completions", content=json.dumps(hi), headers=drive_by, trust_env=False)
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    r = httpx.get(f"{gateway.url}/v1/models", headers={"Origin": "null"}, trust_env=False)  # a sandboxed page
    assert r.status_code == 403
    r = httpx.get(f"{gateway.url}/v1/models", headers={"Origin": "http://localhost:3000"}, trust_env=False)
    assert r.status_code == 200
    keyed = _serve(pair, api_keys=frozenset({KEY}))  # behind a proxy with its own name: the key protects it
    try:
        r = httpx.get(f"{keyed.url}/v1/models", headers={"Host": "gw.example", "Authorization": f"Bearer {KEY}"},
                      trust_env=False)  # fmt: skip
        assert r.status_code == 200
    finally:
        keyed.stop()


def test_a_bug_in_a_route_is_a_500_in_openais_shape_without_a_traceback(pair, caplog, monkeypatch):
    """Starlette's last-resort handler answers and then re-raises, so uvicorn prints the traceback
    anyway; the gateway's log keeps the error's kind at its default level."""
    caplog.set_level(logging.INFO)
    srv = _serve(pair)
    try:
        def broken(name):
            raise RuntimeError("a bug that quotes nothing")

        monkeypatch.setattr(srv.gateway, "method", broken)
        hi = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=hi, trust_env=False, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        time.sleep(0.3)
        assert _traces(caplog) == []
        assert any("RuntimeError" in r.getMessage() for r in caplog.records)  # the kind is still logged
        assert httpx.get(f"{srv.url}/v1/models", trust_env=False).status_code == 200
    finally:
        srv.stop()


def test_connections_are_capped_and_a_silent_one_is_closed(pair):
    """uvicorn alone holds a connection that never sends its request for ever, and takes connections
    up to the file limit: the gateway's server closes a request that has not arrived within
    request_timeout_s and answers 503 at once past max_connections."""
    import socket

    from costeer.gateway.app import uvicorn_config
    from tests.servers import UvicornThread

    app = create_app(pair, GatewaySettings(max_connections=3, body_timeout_s=0.5, request_timeout_s=1.0))
    srv = UvicornThread(uvicorn_config(app, log_level="warning"))
    try:
        held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]
        with socket.create_connection(("127.0.0.1", srv.port)) as extra:
            extra.settimeout(5)
            assert extra.recv(100).startswith(b"HTTP/1.1 503")
        t0 = time.monotonic()
        for s in held:
            s.settimeout(10)
            assert s.recv(100) == b""  # closed by the server
        assert time.monotonic() - t0 < 5
        r = httpx.get(f"{srv.url}/v1/models", trust_env=False)  # room again
        assert r.status_code == 200
    finally:
        for s in held:
            s.close()
        srv.stop()


def test_a_request_timeout_must_leave_room_for_the_bodys_408():
    with pytest.raises(ValueError, match="request_timeout_s"):
        GatewaySettings(body_timeout_s=30, request_timeout_s=30)


def test_every_chunk_of_a_stream_has_the_same_created_time():
    """OpenAI: each chunk of a streamed completion has the same `created` timestamp."""
    tok = bpe_tokenizer()
    lm = make_lm("llm", llama(len(tok), seed=1), tok)
    forward = lm.model.forward

    def slow(*a, **kw):  # a stream that spans more than one second
        time.sleep(0.35)
        return forward(*a, **kw)

    lm.model.forward = slow
    srv = _serve(CoSteer(lm, None))
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        chunks = list(client.chat.completions.create(model="llm", messages=[{"role": "user", "content": QUERY}],
                                                     max_tokens=5, stream=True, stream_options={"include_usage": True}))  # fmt: skip
        assert len(chunks) >= 4 and len({c.created for c in chunks}) == 1
    finally:
        srv.stop()


def test_streaming_clients_that_never_read_neither_hold_the_worker_nor_keep_their_connections(pair):
    """A hostile probe kept: six clients ask for streamed answers and never read a byte (a receive window
    of 1 KB), beside an honest one. The honest answer comes, the worker ends up idle, and the server
    closes every silent connection in the end (here their answers fit the socket buffers: it closes them
    idle; an answer left unread is the send timeout's, tests/cloud/test_net.py)."""
    import socket

    from costeer.gateway.app import uvicorn_config
    from tests.servers import UvicornThread

    settings = GatewaySettings(max_connections=16, body_timeout_s=0.5, request_timeout_s=1.0, send_timeout_s=1.0)
    app = create_app(pair, settings)
    srv = UvicornThread(uvicorn_config(app, log_level="warning"))
    body = json.dumps({"model": "llm", "messages": [{"role": "user", "content": QUERY}], "max_tokens": 64,
                       "stream": True}).encode()  # fmt: skip
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    silent = []
    try:
        for _ in range(6):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connect: the window the server sees
            s.connect(("127.0.0.1", srv.port))
            s.sendall(head + body)
            silent.append(s)
        req = {"model": "llm", "messages": [{"role": "user", "content": QUERY}], "max_tokens": 8}
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=req, trust_env=False, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
        worker, deadline = app.state.gateway.worker, time.monotonic() + 30
        while worker._admitted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker._admitted == 0
        for s in silent:  # what was sent is read now; then the server's close
            s.settimeout(15)
            while s.recv(1 << 16):
                pass
    finally:
        for s in silent:
            s.close()
        srv.stop()
