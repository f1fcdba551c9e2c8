"""Reports from a tiny fake run folder: metrics.json, Markdown, CSV and PNG."""

from __future__ import annotations

import csv
import json
from statistics import fmean

import pytest

from costeer.eval.report import compute_metrics, load_generations, render_markdown, write_report
from costeer.eval.tasks import load_task, sample_path


def _write(run, method, rows):
    (run / f"{method}.jsonl").write_text("".join(json.dumps({"method": method, **r}) + "\n" for r in rows))


@pytest.fixture
def pref_run(tmp_path):
    exs = load_task("helpsteer", sample_path("helpsteer"), preference="uplifting")
    _write(tmp_path, "llm", [
        {"id": 1, "text": "Water them before you go.", "n_tokens": 7, "seconds": 1.0},
        {"id": 2, "text": "Take lessons.", "n_tokens": 4, "seconds": 0.5},
        {"id": 3, "text": "Rayleigh scattering.", "n_tokens": 5, "seconds": 0.5},
    ])
    _write(tmp_path, "costeer", [
        {"id": 1, "text": "Wonderful news: a self-watering pot keeps them happy and thriving!", "n_tokens": 14, "seconds": 2.0},
        {"id": 2, "text": "What a joyful adventure! Start with a few lessons and enjoy every note.", "n_tokens": 16, "seconds": 2.0},
        {"id": 99, "text": "not an example", "n_tokens": 3, "seconds": 0.1},
    ])
    _write(tmp_path, "llm_context", [
        {"id": 1, "text": "Amazing! Your plants will love a wick system - happy travels!", "n_tokens": 12, "seconds": 1.0},
    ])
    return tmp_path, exs


def test_report_files_on_two_method_run(pref_run):
    run, exs = pref_run
    m = compute_metrics(run, exs)
    assert m["task"] == "helpsteer" and m["preference"] == "uplifting"
    assert m["methods"]["llm"]["n"] == 3
    assert m["methods"]["costeer"]["n"] == 2
    assert m["methods"]["costeer"]["missing"] == 1 and m["methods"]["costeer"]["unknown"] == 1
    assert m["methods"]["costeer"]["tokens_per_s"] == pytest.approx(30 / 4)
    assert m["privacy_violating"] == ["llm_context"]
    assert m["methods"]["costeer"]["sentiment"] > m["methods"]["llm"]["sentiment"]

    paths = write_report(run, m)
    assert {p.name for p in paths.values()} == {"metrics.json", "report.md", "report.csv", "report.png"}
    assert json.loads(paths["json"].read_text())["methods"]["llm"]["n"] == 3
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = paths["md"].read_text()
    fair, upper = md.split("Privacy-violating upper bound")
    assert "| llm |" in fair and "| costeer |" in fair and "llm_context" not in fair
    assert "| llm_context |" in upper and "**" not in upper.split("\n\n**Bold**")[0]
    # uplifting: higher sentiment is best and costeer has it
    cost_row = next(line for line in fair.splitlines() if line.startswith("| costeer |"))
    s = m["methods"]["costeer"]["sentiment"]
    assert f"**{s:.3f}**" in cost_row

    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["method"] for r in rows] == ["llm", "costeer", "llm_context"]
    assert rows[2]["privacy_violating"] == "True"
    assert float(rows[1]["sentiment"]) == pytest.approx(s)


def test_reward_scorer_adds_the_armorm_column(pref_run):
    run, exs = pref_run

    class FakeReward:
        def score(self, ex, text):
            return len(text) / 100

    m = compute_metrics(run, exs, reward=FakeReward())
    assert m["methods"]["llm"]["armorm"] == pytest.approx(fmean([0.25, 0.13, 0.20]))
    assert "| ArmoRM |" in render_markdown(m)


def test_llm_context_never_wins(tmp_path):
    exs = load_task("truthfulqa", sample_path("truthfulqa"), preference="verbose")
    _write(tmp_path, "slm", [{"id": 3, "text": "Light scatters."}])
    _write(tmp_path, "llm", [{"id": 3, "text": "Sunlight scatters off air molecules, blue the most."}])
    _write(tmp_path, "llm_context", [{"id": 3, "text": " ".join(["word"] * 200)}])
    md = render_markdown(compute_metrics(tmp_path, exs))
    llm_row = next(line for line in md.splitlines() if line.startswith("| llm |"))
    assert "**8.0**" in llm_row  # verbose: most words among fair methods; llm_context's 200 is not bolded
    assert "**200.0**" not in md


def test_longlamp_report_has_rouge_and_meteor(tmp_path, needs_wordnet):
    exs = load_task("longlamp_writing", sample_path("longlamp_writing"))
    _write(tmp_path, "slm", [{"id": e.id, "text": "I went sailing."} for e in exs])
    _write(tmp_path, "costeer", [{"id": e.id, "text": e.reference} for e in exs])
    m = compute_metrics(tmp_path, exs)
    assert m["methods"]["costeer"]["rouge1"] == pytest.approx(1.0)
    assert m["methods"]["costeer"]["meteor"] > 0.99
    md = write_report(tmp_path, m)["md"].read_text()
    assert "| R-1 | R-L | MET |" in md and "**100.00**" in md


def test_cogenesis_report_with_judge_and_recall(tmp_path):
    exs = load_task("cogenesis", sample_path("cogenesis"))
    _write(tmp_path, "llm", [{"id": e.id, "text": e.raw["output_without_context"]} for e in exs])
    _write(tmp_path, "costeer", [{"id": e.id, "text": e.reference} for e in exs])

    class FakeJudge:
        calls = 0

        def rate(self, kind, ex, answer):
            FakeJudge.calls += 1
            return (9.0 if "Meanwood" in answer or "physiotherapy" in answer else 5.0), "reply"

    m = compute_metrics(tmp_path, exs, judge=FakeJudge())
    assert m["methods"]["costeer"]["judge_overall"] == 9.0 and m["methods"]["llm"]["judge_personal"] == 5.0
    assert m["methods"]["costeer"]["detail_recall"] > m["methods"]["llm"]["detail_recall"]
    assert FakeJudge.calls == 8
    compute_metrics(tmp_path, exs, judge=FakeJudge())  # cached: no new judge calls
    assert FakeJudge.calls == 8


def test_bad_run_folders(tmp_path):
    with pytest.raises(ValueError, match="no <method>.jsonl"):
        load_generations(tmp_path)
    (tmp_path / "slm.jsonl").write_text('{"id": 1, "method": "llm", "text": "x"}\n')
    with pytest.raises(ValueError, match=r"slm.jsonl:1: row says method 'llm'"):
        load_generations(tmp_path)
    (tmp_path / "slm.jsonl").write_text('{"id": 1, "method": "slm"}\n')
    with pytest.raises(ValueError, match=r"slm.jsonl:1: malformed generation row: text"):
        load_generations(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_generations(tmp_path / "absent")
