"""What users found on the device side: every mistake a user can make gives one clear line and a
non-zero exit (never a traceback, never silent wrong output); options a run would not read are named."""

import json
import os
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from costeer.cli import app
from tests.tiny import WINDOW

runner = CliRunner()

LONG_CONTEXT = " ".join(f"fact {i}: I like item number {i} a lot." for i in range(2000))  # > WINDOW tokens


def generate(folders, *args):
    return runner.invoke(app, ["generate", "--llm", folders["llm"], "--slm", folders["slm"], *args])


def one_error_line(r, message: str) -> str:
    """The run failed with exit 2 and one `error:` line holding `message`; -> that line."""
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.output
    return errors[0]


@pytest.mark.parametrize(
    "flag, value, reason",
    [
        ("--eta", "0", "--eta 0.0: must be greater than 0"),
        ("--T", "1000000", "--T 1000000: must be less than or equal to 100000"),
        ("--alpha", "-1", "--alpha -1.0: must be greater than or equal to 0"),
        ("--lambda", "-2", "--lambda -2.0: must be greater than or equal to 0"),
        ("--top-p", "0", "--top-p 0.0: must be greater than 0"),
    ],
)
def test_a_bad_hyper_parameter_names_the_flag_and_the_reason(folders, flag, value, reason):
    r = generate(folders, "-q", "hi", "--context", "I surf.", flag, value)
    line = one_error_line(r, reason)
    assert "validation error" not in line


def test_an_unknown_device_is_one_line(folders):
    one_error_line(generate(folders, "--method", "llm", "-q", "hi", "--device", "tpu"), "unknown device 'tpu'")


@pytest.mark.parametrize("spec", ["/no/such/model.gguf", "models/missing.gguf", "./nowhere"])
def test_a_missing_model_file_says_file_not_found(spec):
    r = runner.invoke(app, ["generate", "--llm", spec, "--method", "llm", "-q", "hi"])
    one_error_line(r, f"model file not found: {spec}")


def test_a_non_utf8_context_file_is_named(folders, tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("Je m'appelle Zoé, j'habite à Orléans.".encode("latin-1"))
    line = one_error_line(generate(folders, "-q", "hi", "--context-file", str(f)), "is not UTF-8")
    assert str(f) in line


def test_greedy_decoding_names_the_sampling_options_it_ignores(folders):
    r = generate(folders, "--method", "llm", "-q", "hi", "--max-new-tokens", "2", "--seed", "3", "--top-k", "5")
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--top-k, --seed" in warnings[0] and "--top-p" not in warnings[0]
    r = generate(folders, "--method", "llm", "-q", "hi", "--max-new-tokens", "2", "--temperature", "0.7", "--seed", "3")
    assert r.exit_code == 0 and "warning:" not in r.stderr


def test_a_gate_without_a_steered_method_is_refused(folders, tmp_path):
    one_error_line(generate(folders, "--method", "llm", "-q", "hi", "--gate", "0.5"), "llm does not steer")
    r = runner.invoke(app, ["eval", "--task", "cogenesis", "--limit", "1", "--llm", folders["llm"], "--slm",
                            folders["slm"], "--methods", "llm,slm", "--gate", "0.5", "--out", str(tmp_path / "run")])
    one_error_line(r, "llm, slm does not steer")


def test_a_context_past_the_trained_window_is_refused_before_any_forward(folders):
    r = generate(folders, "-q", "what should I cook", "--context", LONG_CONTEXT, "--max-new-tokens", "4")
    line = one_error_line(r, f"exceeds the trained window of slm ({WINDOW:,} tokens)")
    assert "slm_context prompt" in line and "truncate" in line
    assert r.stdout == ""  # nothing generated


def test_truncate_context_cuts_the_end_and_says_so(folders):
    r = generate(folders, "-q", "what should I cook", "--context", LONG_CONTEXT, "--max-new-tokens", "4",
                 "--truncate-context", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if line.startswith("note: cut the context")]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    kept = len(LONG_CONTEXT) - out["context_cut"]
    assert len(notes) == 1 and f"first {kept:,} of {len(LONG_CONTEXT):,} characters" in notes[0]
    n = len(out["prompt_ids"]["slm_context"])
    assert WINDOW - 4 - 16 < n <= WINDOW - 4  # cut to fit, not far below


def test_serve_on_a_port_in_use_fails_in_one_line_before_loading(folders):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, COSTEER_API_KEYS="key-0123456789abcdef")
        p = subprocess.run([sys.executable, "-m", "costeer.cli", "serve", "--llm", folders["llm"], "--port", str(port),
                            "--device", "cpu"], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


# ---- found by probing the CLI as a careless user (branch probe-cli) ---------------------------------


@pytest.mark.parametrize("flag, value", [("--beta", "inf"), ("--beta", "nan"), ("--alpha", "inf"), ("--eta", "inf"),
                                         ("--lambda", "inf"), ("--temperature", "inf")])  # fmt: skip
def test_a_non_finite_hyper_parameter_is_refused_not_decoded(folders, flag, value):
    # --beta inf used to decode b = inf: an empty answer, exit 0, stop_reason "stop"
    r = generate(folders, "-q", "hi", "--context", "I surf.", "--max-new-tokens", "2", flag, value)
    one_error_line(r, f"{flag} {float(value)!r}: must be a finite number")


@pytest.mark.parametrize("args", [["-q", "caf\udce9", "--method", "llm"],  # argv bytes not UTF-8 (surrogateescape)
                                  ["-q", "hi", "--context", "caf\udce9", "--method", "slm_context"]])
def test_text_that_is_not_utf8_is_one_line(folders, args):
    r = generate(folders, *args, "--max-new-tokens", "2")
    one_error_line(r, "not UTF-8 text")


@pytest.mark.parametrize("name, text", [("deep.json", "[" * 100_000 + "]" * 100_000),
                                        ("deep.yaml", "[" * 5_000 + "]" * 5_000),
                                        ("deep900.json", "[" * 900 + "1" + "]" * 900)])  # fmt: skip
def test_a_context_file_nested_too_deeply_is_one_line(folders, tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    line = one_error_line(generate(folders, "-q", "hi", "--context-file", str(f)), "nested too deeply")
    assert str(f) in line


def test_an_eval_out_that_is_a_file_is_one_line(folders, tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("mine\n")
    r = runner.invoke(app, ["eval", "--task", "cogenesis", "--limit", "1", "--llm", folders["llm"], "--methods", "llm",
                            "--max-new-tokens", "2", "--out", str(f)])  # fmt: skip
    one_error_line(r, "is not a folder")
    assert f.read_text() == "mine\n"


def test_a_prompt_too_long_without_a_context_gives_advice_that_applies(folders):
    # --truncate-context cannot help: method llm reads no context
    r = generate(folders, "--method", "llm", "-q", LONG_CONTEXT, "--max-new-tokens", "2")
    line = one_error_line(r, "exceeds the trained window of llm")
    assert "truncate" not in line and "shorten the prompt or lower --max-new-tokens" in line


def test_a_seed_too_large_names_the_flag(folders):
    r = generate(folders, "--method", "llm", "-q", "hi", "--temperature", "1", "--seed", str(2**70))
    one_error_line(r, "--seed")


def test_serve_refuses_a_packed_floor_that_is_not_a_log_probability():
    r = runner.invoke(app, ["serve", "--llm", "not-loaded", "--packed-floor", "nan"],
                      env={"COSTEER_API_KEYS": "key-0123456789abcdef"})  # fmt: skip
    one_error_line(r, "packed_floor")


@pytest.mark.parametrize("text", ["name: [unclosed\n", "{}\n"])
def test_gateway_refuses_an_unreadable_context_before_loading(tmp_path, monkeypatch, text):
    # it used to start and answer every steered request 503
    import costeer.cli as cli

    monkeypatch.setattr(cli, "_load_models", lambda *a, **k: pytest.fail("models loaded"))
    f = tmp_path / "me.yaml"
    f.write_text(text)
    r = runner.invoke(app, ["gateway", "--context-file", str(f), "--port", "1"])
    one_error_line(r, str(f))


@pytest.mark.parametrize("command", ["gateway", "serve", "playground"])
@pytest.mark.parametrize("level", ["loud", "notset"])  # notset: logging takes it, uvicorn raised KeyError
def test_an_unknown_log_level_is_refused_before_loading_or_serving(monkeypatch, command, level):
    import costeer.cli as cli
    import costeer.gateway

    monkeypatch.setattr(cli, "_load_models", lambda *a, **k: pytest.fail("models loaded"))
    monkeypatch.setattr(costeer.gateway, "serve", lambda *a, **k: pytest.fail("served"))
    monkeypatch.setenv("COSTEER_API_KEYS", "key-0123456789abcdef")
    r = runner.invoke(app, [command, "--llm", "not-loaded", "--log-level", level, "--port", "1"])
    one_error_line(r, f"unknown --log-level '{level}'")


def test_audit_wire_refuses_a_file_that_is_not_a_wire_log(tmp_path):
    ctx = tmp_path / "me.txt"
    ctx.write_text("I am Sam, a vegetarian runner in Seattle with a dog.")
    for text in ("[1, 2]\n", '{"id": "s1", "text": "hello"}\n'):  # a list; an eval generation row
        log = tmp_path / "w.jsonl"
        log.write_text(text)
        line = one_error_line(runner.invoke(app, ["audit-wire", str(log), "--context-file", str(ctx)]),
                              "is not a wire-log record")  # fmt: skip
        assert f"{log}:1" in line


def test_cloud_options_without_cloud_are_named_in_a_warning(folders):
    r = generate(folders, "--method", "llm", "-q", "hi", "--max-new-tokens", "2", "--cloud-k", "5", "--insecure")
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--cloud-k, --insecure are read with --cloud only" in warnings[0]
    r = generate(folders, "--method", "llm", "-q", "hi", "--max-new-tokens", "2")
    assert r.exit_code == 0 and "warning:" not in r.stderr


def test_chat_refuses_a_reference_file_its_method_does_not_read(folders, tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_text("I am Alex, a cyclist in Lyon.")
    r = runner.invoke(app, ["chat", "--llm", folders["llm"], "--method", "llm", "--reference-file", str(ref)], input="hi\n")
    one_error_line(r, "--reference-file is read by costeer_matched only, not by llm")


def test_report_names_a_generation_file_that_is_not_utf8(tmp_path):
    (tmp_path / "llm.jsonl").write_bytes(b"\xff\n")  # a folder without run.json: --task says which
    r = runner.invoke(app, ["report", str(tmp_path), "--task", "cogenesis"])
    one_error_line(r, f"{tmp_path / 'llm.jsonl'}: not a generation file")


def test_a_folder_given_as_the_context_file_is_called_a_folder(folders, tmp_path):
    one_error_line(generate(folders, "-q", "hi", "--context-file", str(tmp_path)), f"{tmp_path} is a folder")


def test_serve_names_an_api_keys_file_that_is_not_utf8(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_bytes(b"\xffkey-0123456789abcdef\n")
    r = runner.invoke(app, ["serve", "--llm", "not-loaded", "--api-keys-file", str(f)], env={"COSTEER_API_KEYS": ""})
    one_error_line(r, f"API keys file {f} is not UTF-8")


@pytest.mark.parametrize("as_json", [True, False])
def test_ctrl_c_mid_generation_keeps_the_tokens_so_far(folders, monkeypatch, as_json):
    # --json used to print nothing at all: the tokens already generated were lost
    from costeer.api import GenerationStream

    whole = GenerationStream.__iter__

    def cut_after_three(self):
        for i, chunk in enumerate(whole(self)):
            if i == 3:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(GenerationStream, "__iter__", cut_after_three)
    r = generate(folders, "--method", "llm", "-q", "hi", "--max-new-tokens", "8", *(["--json"] if as_json else []))
    one_error_line(r, "interrupted")
    if as_json:
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert len(out["token_ids"]) >= 3 and out["stop_reason"] == "interrupted"
    else:
        assert r.stdout.strip()  # the text so far, ended by a newline before the error line
