"""`costeer generate --cloud`, `costeer audit-wire` and `costeer serve`'s key check, on tiny folders."""

import json

import pytest
from typer.testing import CliRunner

from costeer.cli import app
from costeer.engine.models import load_lm
from tests.cloud.server_util import KEY_A, ThreadServer

runner = CliRunner()
QUERY = "what should I cook"


@pytest.fixture(scope="module")
def cloud(folders):
    srv = ThreadServer(load_lm(folders["llm"], "cpu"))
    yield srv
    srv.stop()


@pytest.fixture()
def context_file(tmp_path):
    f = tmp_path / "me.yaml"
    f.write_text("name: Sam Okafor\ncity: Seattle\nlikes: [spicy tofu, lentils, running on Sunday mornings]\n"
                 "dog: a golden retriever named Biscuit\n")  # fmt: skip
    return f


def run(*args, key=KEY_A):
    return runner.invoke(app, list(args), env={"COSTEER_API_KEY": key})


def test_generate_over_the_cloud_equals_in_process(folders, cloud, context_file, tmp_path):
    common = ["-q", QUERY, "--context-file", str(context_file), "--slm", folders["slm"], "--max-new-tokens", "12",
              "--json"]  # fmt: skip
    local = run("generate", "--llm", folders["llm"], *common)
    assert local.exit_code == 0, local.output
    log = tmp_path / "wire.jsonl"
    remote = run("generate", "--cloud", cloud.url, "--cloud-k", "full", "--wire-log", str(log), *common)
    assert remote.exit_code == 0, remote.output
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (local, remote))
    assert a["token_ids"] == b["token_ids"] and a["prompt_ids"] == b["prompt_ids"]
    assert b["llm"] == cloud.url

    audit = run("audit-wire", str(log), "--context-file", str(context_file))
    assert audit.exit_code == 0, audit.output
    assert "no leak found" in audit.output

    packed = run("generate", "--cloud", cloud.url, "--cloud-k", "packed", *common)
    assert packed.exit_code == 0, packed.output
    assert json.loads(packed.stdout.strip().splitlines()[-1])["token_ids"]

    streamed = run("generate", "--cloud", cloud.url, "-q", QUERY, "--context-file", str(context_file),
                   "--slm", folders["slm"], "--max-new-tokens", "6")  # fmt: skip
    assert streamed.exit_code == 0 and streamed.stdout.strip()

    for shape in ("chain:4", "tree:3:9", "off"):  # look-ahead: the same tokens (docs/wire-format.md)
        ahead = run("generate", "--cloud", cloud.url, "--cloud-k", "full", "--lookahead", shape, *common)
        assert ahead.exit_code == 0, ahead.output
        assert json.loads(ahead.stdout.strip().splitlines()[-1])["token_ids"] == a["token_ids"], shape


@pytest.mark.parametrize("flag, on", [([], True), (["--no-run-ahead"], False)])
def test_run_ahead_is_on_by_default_and_can_be_switched_off(folders, cloud, context_file, monkeypatch, flag, on):
    """--no-run-ahead reaches connect_cloud; the tokens are the same either way."""
    import costeer.device as device

    seen, connect = [], device.connect_cloud

    def recorded(*a, **kw):
        seen.append(kw.get("run_ahead"))
        return connect(*a, **kw)

    monkeypatch.setattr(device, "connect_cloud", recorded)
    r = run("generate", "--cloud", cloud.url, "--lookahead", "tree:3:9", *flag, "-q", QUERY, "--context-file",
            str(context_file), "--slm", folders["slm"], "--max-new-tokens", "8", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert seen == [on] and json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]


def test_audit_wire_exits_1_on_a_leak(folders, cloud, context_file, tmp_path):
    log = tmp_path / "wire.jsonl"
    query = "what should I cook for dinner tonight"
    r = run("generate", "--cloud", cloud.url, "--wire-log", str(log), "-q", query, "--context-file",
            str(context_file), "--slm", folders["slm"], "--max-new-tokens", "4")  # fmt: skip
    assert r.exit_code == 0, r.output
    # audited against a "context" that holds the query's words and a query that does not:
    # the prompt on the wire now counts as a leak
    other = tmp_path / "ctx.txt"
    other.write_text(f"private: {query} with friends")
    audit = run("audit-wire", str(log), "--context-file", str(other), "--query", "something else entirely")
    assert audit.exit_code == 1 and "LEAK" in audit.output
    audit = run("audit-wire", str(log), "--context-file", str(other), "--json")
    assert audit.exit_code == 0 and json.loads(audit.stdout)["clean"]


@pytest.mark.parametrize(
    "args, key, message",
    [
        (["--wire-log", "x.jsonl"], KEY_A, "give --cloud too"),
        (["--cloud", "CLOUD"], "bad-key", "HTTP 401"),
        (["--cloud", "CLOUD"], "", "no API key"),
        (["--cloud", "CLOUD", "--cloud-k", "lots"], KEY_A, "k must be"),
        (["--cloud", "CLOUD", "--cloud-k", "packed:0"], KEY_A, "k must be"),
        (["--cloud", "CLOUD", "--cloud-k", "packed", "--cloud-api", "llamacpp"], KEY_A, "needs --cloud-api costeer"),
        (["--cloud", "CLOUD", "--lookahead", "many"], KEY_A, "lookahead must be"),
        (["--cloud", "CLOUD", "--lookahead", "tree:2:4", "--cloud-api", "llamacpp"], KEY_A, "needs --cloud-api costeer"),
        (["--cloud", "CLOUD", "--method", "llm_context"], KEY_A, "would send the private context"),
        (["--cloud", "CLOUD", "--max-new-tokens", "3000"], KEY_A, "exceeds the limit"),  # the cloud's 2,048
        (["--cloud", "CLOUD", "--lookahead", "sideways"], KEY_A, "lookahead must be"),
        (["--cloud", "CLOUD", "--lookahead", "chain:20"], KEY_A, "exceeds the limit of 16"),  # the cloud's bound
    ],
)
def test_cloud_errors_are_one_line(args, key, message, folders, cloud, context_file):
    args = [a.replace("CLOUD", cloud.url) for a in args]
    r = run("generate", "-q", QUERY, "--context-file", str(context_file), "--slm", folders["slm"], *args, key=key)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_serve_refuses_to_start_without_keys():
    r = runner.invoke(app, ["serve", "--llm", "whatever"], env={"COSTEER_API_KEYS": ""})
    assert r.exit_code == 2 and "no API keys" in r.output


def test_eval_over_the_cloud_equals_in_process(folders, cloud, tmp_path):
    common = ["eval", "--task", "helpsteer", "--preference", "concise", "--limit", "2", "--methods", "costeer,llm",
              "--slm", folders["slm"], "--max-new-tokens", "6"]  # fmt: skip
    local = run(*common, "--llm", folders["llm"], "--out", str(tmp_path / "local"))
    assert local.exit_code == 0, local.output
    remote = run(*common, "--cloud", cloud.url, "--cloud-k", "full", "--out", str(tmp_path / "remote"))
    assert remote.exit_code == 0, remote.output
    for method in ("costeer", "llm"):
        rows = [[json.loads(line)["token_ids"] for line in (tmp_path / side / f"{method}.jsonl").read_text().splitlines()]
                for side in ("local", "remote")]  # fmt: skip
        assert rows[0] == rows[1] and len(rows[0]) == 2
    assert cloud.url in json.loads((tmp_path / "remote" / "run.json").read_text())["llm"]


def test_audit_wire_checks_a_multi_turn_prompt_against_its_own_conversation(folders, cloud, context_file, tmp_path):
    # two runs appended to one log: a one-turn query, then a conversation; each OPEN must be exactly its
    # own public conversation's prompt (the audit used to compare every OPEN with the first query's)
    log, convo = tmp_path / "wire.jsonl", tmp_path / "turns.json"
    turns = [{"role": "user", "content": "what should I cook"}, {"role": "assistant", "content": "Try a curry."},
             {"role": "user", "content": "something quicker please"}]  # fmt: skip
    convo.write_text(json.dumps(turns))
    common = ["--cloud", cloud.url, "--wire-log", str(log), "--context-file", str(context_file), "--slm",
              folders["slm"], "--max-new-tokens", "4"]  # fmt: skip
    assert run("generate", "-q", QUERY, *common).exit_code == 0
    assert run("generate", "--messages", str(convo), *common).exit_code == 0
    audit = run("audit-wire", str(log), "--context-file", str(context_file), "--json")
    report = json.loads(audit.stdout)
    assert audit.exit_code == 0 and report["clean"] and report["prompt_is_query"] is True, report
    # a conversation noted that is not what was sent: the check says so
    lines = log.read_text().splitlines()
    forged = [json.loads(x) for x in lines]
    for rec in forged:
        if rec.get("dir") == "meta" and "messages" in rec and len(rec["messages"]) == 3:
            rec["messages"][2]["content"] = "something else"
    log.write_text("\n".join(json.dumps(r) for r in forged) + "\n")
    report = json.loads(run("audit-wire", str(log), "--context-file", str(context_file), "--json").stdout)
    assert report["prompt_is_query"] is False and any("not exactly" in n for n in report["notes"]), report
