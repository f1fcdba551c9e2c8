"""`costeer chat` (the terminal loop) and `costeer gateway` (the server) on tiny model folders."""

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest
from typer.testing import CliRunner

from costeer.api import CoSteer
from costeer.cli import app
from costeer.engine.models import load_lm
from tests.servers import free_port, wait_http

runner = CliRunner()
QUERY, FOLLOW_UP = "what should I cook", "and for the dog"
CONTEXT = "name: Sam\ncity: Seattle\nlikes: spicy tofu"
OTHER = "name: Ana\ncity: Porto\nlikes: grilled sardines"


@pytest.fixture(scope="module")
def pair(folders):
    return CoSteer(load_lm(folders["llm"], "cpu"), load_lm(folders["slm"], "cpu"))


@pytest.fixture()
def contexts(tmp_path):
    a, b = tmp_path / "me.txt", tmp_path / "other.txt"
    a.write_text(CONTEXT)
    b.write_text(OTHER)
    return a, b


def test_chat_streams_keeps_history_resets_and_swaps_the_context(folders, pair, contexts):
    lines = [QUERY, FOLLOW_UP, "/reset", f"/context {contexts[1]}", "/context", f"/context {contexts[1]}.missing",
             QUERY, "/quit", "never read"]  # fmt: skip
    r = runner.invoke(app, ["chat", "--llm", folders["llm"], "--slm", folders["slm"], "-c", str(contexts[0]),
                            "--max-new-tokens", "6"], input="\n".join(lines) + "\n")  # fmt: skip
    assert r.exit_code == 0, r.output
    a1 = pair.generate(QUERY, CONTEXT, "costeer", max_new_tokens=6).text
    turns = [{"role": "user", "content": QUERY}, {"role": "assistant", "content": a1},
             {"role": "user", "content": FOLLOW_UP}]  # fmt: skip
    a2 = pair.generate(turns, CONTEXT, "costeer", max_new_tokens=6).text
    a3 = pair.generate(QUERY, OTHER, "costeer", max_new_tokens=6).text
    assert r.stdout == f"{a1}\n{a2}\n{a3}\n"
    assert "(conversation cleared)" in r.stderr and "/reset clears" in r.stderr
    assert "context file not found" in r.stderr


def test_chat_refuses_a_private_method_without_a_context(folders):
    r = runner.invoke(app, ["chat", "--llm", folders["llm"], "--slm", folders["slm"]], input="hi\n")
    assert r.exit_code == 2 and "needs a personal context" in r.output and "Traceback" not in r.output


def test_chat_turn_errors_keep_the_loop(folders, contexts):
    r = runner.invoke(app, ["chat", "--method", "llm", "--llm", folders["llm"], "--max-new-tokens", "3",
                            "--system", " "], input="hello\n")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.stdout.strip()  # a blank system prompt is dropped, the answer streamed; the input's end quits


TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUERY},
         {"role": "assistant", "content": "the cat sat on the mat"},
         {"role": "user", "content": FOLLOW_UP}]  # fmt: skip


def test_generate_takes_a_conversation(folders, pair, contexts, tmp_path):
    f = tmp_path / "turns.json"
    f.write_text(json.dumps(TURNS))
    r = runner.invoke(app, ["generate", "--llm", folders["llm"], "--slm", folders["slm"], "--messages", str(f),
                            "-c", str(contexts[0]), "--max-new-tokens", "6", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    g = pair.generate(TURNS, CONTEXT, "costeer", max_new_tokens=6)
    assert out["token_ids"] == g.token_ids and out["prompt_ids"] == g.prompt_ids


@pytest.mark.parametrize(
    "args, turns, message",
    [
        (["-q", QUERY, "--messages", "TURNS"], TURNS, "one of them"),
        ([], TURNS, "one of them"),
        (["--messages", "TURNS"], "{not json", "not valid JSON"),
        (["--messages", "TURNS"], {"role": "user"}, "JSON list"),
        (["--messages", "TURNS"], TURNS[:3], "end with a user turn"),
        (["--messages", "TURNS"], [{"role": "tool", "content": "x"}], "unknown role 'tool'"),
    ],
)
def test_generate_refuses_bad_conversations(folders, tmp_path, args, turns, message):
    f = tmp_path / "turns.json"
    f.write_text(turns if isinstance(turns, str) else json.dumps(turns))
    args = [str(f) if a == "TURNS" else a for a in args]
    r = runner.invoke(app, ["generate", "--llm", folders["llm"], "--method", "llm", *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--host", "0.0.0.0"], {"COSTEER_GATEWAY_KEYS": ""}, "needs an API key"),
        (["--host", "192.168.1.5"], {"COSTEER_GATEWAY_KEYS": "short"}, "16 characters"),
        (["--context-file", "missing.yaml"], {}, "file not found"),
    ],
)
def test_gateway_refuses_bad_settings_before_loading(args, env, message):
    r = runner.invoke(app, ["gateway", "--llm", "not-loaded", *args], env=env)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_gateway_serves_the_openai_client(folders, pair, contexts):
    port = free_port()
    env = dict(os.environ, COSTEER_GATEWAY_KEYS="")
    proc = subprocess.Popen([sys.executable, "-m", "costeer.cli", "gateway", "--llm", folders["llm"], "--slm",
                             folders["slm"], "-c", str(contexts[0]), "--port", str(port), "--device", "cpu",
                             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, 180, lambda: proc.stderr.read().decode())
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        got = client.chat.completions.create(model="costeer", messages=[{"role": "user", "content": QUERY}],
                                             max_tokens=6)  # fmt: skip
        assert got.choices[0].message.content == pair.generate(QUERY, CONTEXT, "costeer", max_new_tokens=6).text
        # the same server serves the playground, over the same pair (its pickers offer that pair only)
        page = f"http://127.0.0.1:{port}/playground/"
        assert "costeer playground" in httpx.get(page, trust_env=False, timeout=30).text
        opts = httpx.get(page + "api/options", trust_env=False, timeout=30).json()
        assert opts["models"] == {"llm": [folders["llm"]], "slm": [folders["slm"]]}
        body = {"query": QUERY, "profile": "I like spicy tofu", "llm": folders["llm"], "slm": folders["slm"],
                "max_new_tokens": 6}  # fmt: skip
        events = httpx.post(page + "api/generate", json=body, trust_env=False, timeout=120).text
        done = [json.loads(line[5:]) for line in events.splitlines() if line.startswith("data:") and '"stop_reason"' in line]
        want = pair.generate(QUERY, "Profile:\nI like spicy tofu", "costeer", max_new_tokens=6).text
        assert [d["text"] for d in done if d["stream"] == "costeer"] == [want]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("args, env, mounted, warned", [
    ([], {}, True, False),
    (["--no-playground"], {}, False, False),
    (["--host", "0.0.0.0"], {"COSTEER_GATEWAY_KEYS": "gateway-key-0123456789"}, False, True),  # the page has no key
])  # fmt: skip
def test_gateway_mounts_the_playground_on_its_own_server(folders, monkeypatch, args, env, mounted, warned):
    import costeer.cloud.net
    import costeer.gateway

    served = {}
    monkeypatch.setattr(costeer.cloud.net, "listen", lambda host, port: ("bound", host, port))  # no real port taken
    monkeypatch.setattr(costeer.gateway, "serve", lambda app, host, port, log_level, announce, sock: served.update(app=app, sock=sock))
    r = runner.invoke(app, ["gateway", "--llm", folders["llm"], "--slm", folders["slm"], "--device", "cpu", *args],
                      env=env)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert served["sock"] == ("bound", "0.0.0.0" if "--host" in args else "127.0.0.1", 8080)  # bound before serving
    from fastapi.testclient import TestClient

    client = TestClient(served["app"], base_url="http://localhost")  # a keyless gateway serves loopback names only
    assert client.get("/v1/models").status_code in (200, 401)  # served (with a key configured: asked for)
    assert client.get("/playground/").status_code == (200 if mounted else 404)
    assert ("the playground is not served on 0.0.0.0" in r.stderr) == warned
