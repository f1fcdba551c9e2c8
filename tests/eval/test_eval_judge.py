"""LLM-as-judge: prompts, the [[rating]] parser, and the client against a loopback stand-in server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from costeer.eval.judge import OVERALL_PROMPT, PERSONAL_PROMPT, JudgeClient, JudgeError, build_prompt, parse_rating
from costeer.eval.tasks import load_task, sample_path


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("The answer is good. Rating: [[7]]", 7.0),
        ("Rating: [[7.5]]", 7.5),
        ("[[ 10 ]]", 10.0),
        ("[[1]]", 1.0),
        ('Format is "Rating: [[5]]". My verdict: Rating: [[8]]', 8.0),  # the last rating wins
    ],
)
def test_parse_good_replies(reply, expected):
    assert parse_rating(reply) == expected


@pytest.mark.parametrize(
    "reply",
    ["Rating: 7", "Rating: [7]", "[[seven]]", "[[11]]", "[[0]]", "[[-3]]", "", None, "[[7]", "Rating: [[]]"],
)
def test_parse_malformed_replies(reply):
    assert parse_rating(reply) is None


def test_prompts_follow_the_paper():
    assert "Please act as an impartial evaluator and assess the quality" in OVERALL_PROMPT
    assert "Please act as an impartial judge an evaluate the AI assistant's response" in PERSONAL_PROMPT
    for p in (OVERALL_PROMPT, PERSONAL_PROMPT):
        assert 'strictly following this format: "[[rating]]", for example: "Rating: [[5]]".' in p
        assert p.index("[User Profile and Writing History]") < p.index("[Question]") < p.index(
            "[The Start of Assistant's Answer]") < p.index("[The End of Assistant's Answer]")


def test_build_prompt_fills_profile_history_question_answer():
    (ex, _) = load_task("cogenesis", sample_path("cogenesis"))
    p = build_prompt("personal", ex, "MY ANSWER")
    assert "Name: Priya Okafor" in p
    assert "Task: Write a thank-you message to the beekeeping club." in p
    assert f"[Question]\n{ex.query}\n" in p
    assert "[The Start of Assistant's Answer]\nMY ANSWER\n[The End of Assistant's Answer]" in p
    assert "## Task" not in p and "helpful personal AI assistant" not in p
    with pytest.raises(ValueError, match="unknown judge prompt"):
        build_prompt("style", ex, "x")


class _StandIn(BaseHTTPRequestHandler):
    requests: list = []
    replies: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        status, content = type(self).replies.pop(0)
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_args):
        pass


@pytest.fixture
def stand_in(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    _StandIn.requests, _StandIn.replies = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)  # loopback only
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _StandIn
    server.shutdown()
    server.server_close()


def test_client_against_stand_in_server(stand_in):
    url, handler = stand_in
    handler.replies = [(200, "Clear and personal. Rating: [[8]]"), (200, "No rating here")]
    (ex, _) = load_task("cogenesis", sample_path("cogenesis"))
    client = JudgeClient(url, api_key="sk-test", model="judge-model", retries=0)
    assert client.rate("overall", ex, "Hello neighbours") == (8.0, "Clear and personal. Rating: [[8]]")
    assert client.rate("personal", ex, "Hello neighbours")[0] is None
    first = handler.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "judge-model" and first["body"]["temperature"] == 0.0
    assert first["body"]["messages"][0]["content"] == build_prompt("overall", ex, "Hello neighbours")


def test_client_retries_server_errors_then_fails_cleanly(stand_in):
    url, handler = stand_in
    handler.replies = [(503, ""), (200, "[[6]]")]
    assert JudgeClient(url, retries=1).complete("hi") == "[[6]]"
    handler.replies = [(401, "")]
    with pytest.raises(JudgeError, match="failed"):
        JudgeClient(url, retries=3).complete("hi")
    assert len(handler.requests) == 3  # a 4xx is not retried
