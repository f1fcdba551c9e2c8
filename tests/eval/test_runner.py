"""run_eval on a tiny model pair: files, resume by id, a kill's half-written line, refused mismatches."""

from __future__ import annotations

import json

import pytest

from costeer.engine.config import SamplingConfig, SteeringConfig
from costeer.eval.report import load_generations
from costeer.eval.runner import done_ids, read_run, report_run, run_eval
from costeer.eval.tasks import load_task, sample_path

TASK = "cogenesis"
DATA = sample_path(TASK)



def _examples(limit=None):
    return load_task(TASK, DATA, limit=limit)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_writes_generations_run_json_and_report(counting, tmp_path):
    m = run_eval(counting, _examples(), ["llm", "costeer"], tmp_path, data=DATA, progress=False)
    assert m["methods"]["costeer"]["n"] == 2 and m["methods"]["llm"]["n"] == 2
    for name in ("metrics.json", "report.md", "report.csv", "report.png", "run.json"):
        assert (tmp_path / name).is_file(), name
    row = _rows(tmp_path / "costeer.jsonl")[0]
    assert {"id", "method", "text", "n_tokens", "seconds", "token_ids", "stop_reason"} <= set(row)
    assert row["n_tokens"] == len(row["token_ids"]) <= 8 and row["coefficient"] == pytest.approx(1.78326, abs=1e-4)
    rec = read_run(tmp_path)
    assert rec.task == TASK and rec.methods == ["llm", "costeer"] and rec.steering == SteeringConfig()
    assert rec.sampling.max_new_tokens == 8 and rec.llm == "llm" and rec.slm == "slm"


def test_resume_generates_only_missing_ids(counting, tmp_path):
    run_eval(counting, _examples(limit=1), ["llm", "costeer"], tmp_path, data=DATA, limit=1, progress=False)
    first = _rows(tmp_path / "costeer.jsonl")
    assert len(counting.calls) == 2 and len(first) == 1

    run_eval(counting, _examples(limit=2), ["llm", "costeer"], tmp_path, data=DATA, limit=2, progress=False)
    assert len(counting.calls) == 4  # one new example per method, nothing redone
    rows = _rows(tmp_path / "costeer.jsonl")
    assert [r["id"] for r in rows] == ["s1_1", "s1_2"] and rows[0] == first[0]  # the first row is untouched
    assert read_run(tmp_path).limit == 2

    run_eval(counting, _examples(limit=2), ["llm", "costeer"], tmp_path, data=DATA, progress=False)
    assert len(counting.calls) == 4  # all done: a rerun generates nothing


def test_truncated_last_line_is_dropped_and_regenerated(counting, tmp_path):
    run_eval(counting, _examples(), ["llm"], tmp_path, data=DATA, progress=False)
    path = tmp_path / "llm.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:25])  # a kill in the middle of the second row
    assert done_ids(path) == {"s1_1"} and path.read_text() == lines[0]

    path.write_text(lines[0] + lines[1][:25])
    counting.calls.clear()
    run_eval(counting, _examples(), ["llm"], tmp_path, data=DATA, progress=False)
    assert len(counting.calls) == 1
    assert [g.id for g in load_generations(tmp_path)["llm"]] == ["s1_1", "s1_2"]


def test_complete_last_row_without_newline_is_kept(counting, tmp_path):
    run_eval(counting, _examples(), ["llm"], tmp_path, data=DATA, progress=False)
    path = tmp_path / "llm.jsonl"
    path.write_text(path.read_text().rstrip("\n"))
    counting.calls.clear()
    run_eval(counting, _examples(), ["llm"], tmp_path, data=DATA, progress=False)
    assert counting.calls == [] and len(_rows(path)) == 2


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "llm.jsonl"
    path.write_text('{"id": "a", "method": "llm", "text": "x"}\nnot json\n{"id": "b", "method": "llm", "text": "y"}\n')
    with pytest.raises(ValueError, match=r"llm.jsonl:2: malformed"):
        done_ids(path)


@pytest.mark.parametrize("change, field", [
    ({"steering": SteeringConfig(alpha=3.0)}, "steering.alpha"),
    ({"sampling": SamplingConfig(max_new_tokens=4)}, "sampling.max_new_tokens"),
    ({"models": {"llm": "other-llm", "slm": "slm"}}, "llm"),
])
def test_resume_with_other_settings_is_refused(counting, tmp_path, change, field):
    run_eval(counting, _examples(limit=1), ["llm"], tmp_path, data=DATA, progress=False)
    counting.calls.clear()
    with pytest.raises(ValueError, match=rf"run.json is for a different run \({field}:") as err:
        run_eval(counting, _examples(limit=1), ["llm"], tmp_path, data=DATA, progress=False, **change)
    assert "\n" not in str(err.value) and counting.calls == []


def test_other_task_is_refused_and_foreign_folder_too(counting, tmp_path):
    run_eval(counting, _examples(limit=1), ["slm"], tmp_path, data=DATA, progress=False)
    pref = load_task("helpsteer", sample_path("helpsteer"), preference="concise", limit=1)
    with pytest.raises(ValueError, match="task: 'cogenesis' there, 'helpsteer' now"):
        run_eval(counting, pref, ["slm"], tmp_path, data=sample_path("helpsteer"), progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "llm.jsonl").write_text("")
    with pytest.raises(ValueError, match="no run.json"):
        run_eval(counting, pref, ["slm"], foreign, progress=False)


def test_unknown_method_and_missing_model(cs, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        run_eval(cs, _examples(), ["nope"], tmp_path, progress=False)
    from costeer.api import CoSteer

    with pytest.raises(ValueError, match="needs an SLM"):
        run_eval(CoSteer(cs.llm, None, cs.config), _examples(), ["costeer"], tmp_path, progress=False)
    assert not (tmp_path / "run.json").exists()  # nothing claimed before the checks


def test_report_run_rereads_run_json(counting, tmp_path):
    run_eval(counting, _examples(limit=1), ["llm", "slm_context"], tmp_path, data=DATA, limit=1, progress=False)
    (tmp_path / "report.md").unlink()
    m = report_run(tmp_path)
    assert m["task"] == TASK and m["n_examples"] == 1  # the recorded limit: no "missing" rows
    assert m["methods"]["llm"]["missing"] == 0 and (tmp_path / "report.md").is_file()


def test_missing_wordnet_fails_before_generating(counting, tmp_path, monkeypatch):
    from costeer.eval import metrics as M

    def missing():
        raise M.WordNetMissingError("METEOR needs NLTK's WordNet, which was not found: run scripts/setup_wordnet.sh")

    monkeypatch.setattr(M, "ensure_wordnet", missing)
    exs = load_task("longlamp_abstract", sample_path("longlamp_abstract"), limit=1)
    with pytest.raises(ValueError, match="WordNet"):
        run_eval(counting, exs, ["llm"], tmp_path, progress=False)
    assert counting.calls == []


def test_the_runner_hands_each_example_its_reference(counting, tmp_path, monkeypatch):
    seen = []
    gen = counting.cs.generate

    def spy(query, context=None, method="costeer", **kw):
        seen.append((str(getattr(method, "value", method)), kw.get("reference_message")))
        return gen(query, context, method, **kw)

    monkeypatch.setattr(counting.cs, "generate", spy)
    exs = _examples()
    run_eval(counting, exs, ["costeer_matched"], tmp_path, data=DATA, progress=False)
    assert seen == [("costeer_matched", e.reference_prompt()) for e in exs]
    assert all(ref and "## User Profile" in ref for _, ref in seen)



def test_a_row_past_the_window_names_its_example_and_keeps_the_rows_before(counting, tmp_path):
    # every rerun stops at the same row: the error must say which one (it used to name neither)
    from costeer.api import PromptTooLong
    from tests.tiny import WINDOW

    first, second = _examples()
    too_long = second.model_copy(update={"context_prompt": "I like tofu. " * WINDOW})
    with pytest.raises(PromptTooLong, match=f"example {second.id} \\(slm_context\\): .* shorten the prompt"):
        run_eval(counting, [first, too_long], ["slm_context"], tmp_path, data=DATA, progress=False)
    assert [r["id"] for r in _rows(tmp_path / "slm_context.jsonl")] == [first.id]
