"""`costeer eval / report / sweep` on tiny model folders: files written, one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from costeer.cli import app
from tests.eval.tiny_pair import save_pair

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folders = save_pair(tmp_path_factory.mktemp("models"))
    return ["--llm", folders["llm"], "--slm", folders["slm"], "--device", "cpu"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_eval_then_report(models, tmp_path):
    out = tmp_path / "run"
    r = run("eval", "--task", "cogenesis", "--methods", "llm,costeer,slm_context", "--limit", 2,
            "--max-new-tokens", 8, "--out", out, *models)
    assert r.exit_code == 0, r.output
    for name in ("metrics.json", "report.md", "report.csv", "report.png", "run.json",
                 "llm.jsonl", "costeer.jsonl", "slm_context.jsonl"):
        assert (out / name).is_file(), name
    assert "| costeer | 2 |" in r.stdout
    rec = json.loads((out / "run.json").read_text())
    assert rec["data"].endswith("samples/cogenesis.sample.jsonl") and rec["methods"] == ["llm", "costeer", "slm_context"]
    assert rec["steering"]["T"] == 20 and rec["sampling"]["max_new_tokens"] == 8

    (out / "report.md").unlink()
    r = run("report", out)
    assert r.exit_code == 0, r.output
    assert "| costeer | 2 |" in r.stdout and (out / "report.md").is_file()

    # resuming with other hyper-parameters is refused in one line
    r = run("eval", "--task", "cogenesis", "--methods", "llm", "--limit", 2, "--max-new-tokens", 8,
            "--alpha", 3, "--out", out, *models)
    assert r.exit_code == 2 and "steering.alpha" in r.output and "Traceback" not in r.output


def test_sweep_cli(models, tmp_path):
    # a preference task: short prompts keep the tiny SLM's prefill cheap
    r = run("sweep", "--task", "helpsteer", "--preference", "verbose", "--limit", 2, "--max-new-tokens", 8,
            "--params", "lambda,eta", "--out", tmp_path, *models)
    assert r.exit_code == 0, r.output
    for name in ("sweep.json", "sweep.csv", "sweep.png"):
        assert (tmp_path / name).is_file(), name
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert list(result["grids"]) == ["lam", "eta"] and len(result["settings"]) == 11
    assert result["distinct_coefficients"] == 10 and result["metric"] == "length_words"
    assert "length_words" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["eval", "--task", "nope"], "unknown task 'nope'"),
    (["eval", "--task", "cogenesis", "--data", "/no/such.jsonl"], "dataset file not found"),
    (["eval", "--task", "cogenesis", "--methods", "llm,bogus"], "unknown method 'bogus'"),
    (["eval", "--task", "cogenesis", "--cloud", "http://localhost:1"], "drop it with --cloud"),
    (["eval", "--task", "helpsteer"], "needs a preference"),
    (["report", "/no/such/run"], "run folder not found"),
    (["sweep", "--task", "cogenesis", "--params", "alpha,gamma"], "unknown sweep parameter 'gamma'"),
    (["sweep", "--task", "nope"], "unknown task 'nope'"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path):
    r = run(*args, "--out", tmp_path / "out") if args[0] != "report" else run(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len([ln for ln in r.output.splitlines() if ln.startswith("error:")]) == 1
    assert not (tmp_path / "out").exists()  # failed before touching the output folder or loading models


def test_report_without_run_json_needs_task(tmp_path):
    r = run("report", tmp_path)
    assert r.exit_code == 2 and "give --task" in r.output


def test_eval_cloud_unreachable_is_one_line(tmp_path):
    r = runner.invoke(app, ["eval", "--task", "cogenesis", "--methods", "costeer", "--cloud", "http://127.0.0.1:1",
                            "--out", str(tmp_path / "out")], env={"COSTEER_API_KEY": "k"})  # fmt: skip
    assert r.exit_code == 2, r.output
    assert "cannot reach the cloud at http://127.0.0.1:1" in r.output and "Traceback" not in r.output
