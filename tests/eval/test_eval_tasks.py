"""Dataset adapters: samples we wrote, the shared release rows when present, and user errors."""

from __future__ import annotations

import json
import re

import pytest

from costeer.eval.tasks import (
    LONGLAMP_FORMATS,
    PREFERENCES,
    TASKS,
    LexicalRetriever,
    load_task,
    cogenesis_sections,
    personal_text,
    reference_profile,
    render_longlamp_context,
    sample_path,
)

PREF_TASKS = [t for t, f in TASKS.items() if f == "preference"]
LONGLAMP = list(LONGLAMP_FORMATS)


def test_cogenesis_sample():
    exs = load_task("cogenesis", sample_path("cogenesis"))
    assert [e.id for e in exs] == ["s1_1", "s1_2"]
    e = exs[0]
    assert e.query.startswith("Write a short note inviting neighbours")
    assert e.context_prompt == e.raw["personalized_input"]  # the paper's with-context prompt, verbatim
    assert "## User Profile" in e.context and "## Task" not in e.context
    assert e.reference == e.raw["output"]
    assert "Plot 14" not in e.query and "plot 14" in personal_text(e)
    assert "helpful personal AI assistant" not in personal_text(e)


def test_cogenesis_reference_is_the_row_format_around_the_public_profile():
    for e in load_task("cogenesis", sample_path("cogenesis")):
        ref = e.reference_prompt()
        row, mine = cogenesis_sections(e.context_prompt), cogenesis_sections(ref)
        assert list(mine) == list(row)  # the same preamble and sections, in the same order
        assert mine[""] == row[""] and mine["Task"] == e.query.strip()
        assert ref.count(reference_profile()) == 1
        # nothing of the user's profile or history is in it
        name = re.search(r"Name: (.+)", row["User Profile"]).group(1).strip()
        assert name in e.context_prompt and name not in ref
        assert row["User Writing History"] not in ref and "plot 14" not in ref.lower()


def test_only_cogenesis_has_a_reference():
    assert load_task("helpsteer", sample_path("helpsteer"), preference="concise")[0].reference_prompt() is None
    assert load_task(LONGLAMP[0], sample_path(LONGLAMP[0]))[0].reference_prompt() is None


@pytest.mark.parametrize("task", LONGLAMP)
def test_longlamp_samples(task):
    exs = load_task(task, sample_path(task))
    assert len(exs) == 2
    for e in exs:
        assert e.context_prompt == f"{e.context}\n\n{e.query}"
        assert e.context.startswith(LONGLAMP_FORMATS[task].heading + "\n")
        assert e.context.endswith("\n\nNow it's your turn")
        assert e.reference == e.raw["output"]
        for i in range(1, 6):
            assert f"{LONGLAMP_FORMATS[task].first[0]}[{i}]: " in e.context
        assert "[6]" not in e.context


def test_longlamp_rendering_matches_the_paper_format():
    records = [{"title": f"T{i}", "abstract": f"A{i}"} for i in range(1, 7)]
    ctx = render_longlamp_context("longlamp_abstract", records)
    expected = (
        "The following are five titles with their abstracts.\n"
        "Title[1]: T1\nAbstract[1]: A1\n\n"
        "Title[2]: T2\nAbstract[2]: A2\n\n"
        "Title[3]: T3\nAbstract[3]: A3\n\n"
        "Title[4]: T4\nAbstract[4]: A4\n\n"
        "Title[5]: T5\nAbstract[5]: A5\n\n"
        "Now it's your turn"
    )
    assert ctx == expected
    # The official layout: "\n".join([heading, *records, "Now it's your turn\n", query])
    official = "\n".join(["The following are five titles with their abstracts."]
                         + [f"Title[{i}]: T{i}\nAbstract[{i}]: A{i}\n" for i in range(1, 6)]
                         + ["Now it's your turn\n", "Q"])
    assert f"{ctx}\n\nQ" == official


def test_review_and_writing_labels():
    rev = render_longlamp_context("longlamp_review", [{"description": "D", "reviewText": "R"}])
    assert rev == "The following are product descriptions with their user reviews.\nProduct[1]: D\nReview[1]: R\n\nNow it's your turn"
    wr = render_longlamp_context("longlamp_writing", [{"summary": "S", "content": "C"}])
    assert "Summary[1]: S\nContent[1]: C\n" in wr


@pytest.mark.parametrize("task", PREF_TASKS)
@pytest.mark.parametrize("pref", PREFERENCES)
def test_preference_tasks(task, pref):
    exs = load_task(task, sample_path(task), preference=pref)
    e = exs[2]
    assert e.id == "3" and e.query == "Why is the sky blue?"
    assert e.context_prompt == f"Why is the sky blue?\nYour answer should be as {pref} as possible"
    assert e.preference == pref and e.reference is None


def test_limit_and_folder_path(tmp_path):
    exs = load_task("helpsteer", sample_path("helpsteer").parent / "preference.sample.jsonl", preference="verbose", limit=2)
    assert len(exs) == 2
    # A folder is accepted and resolved to <task>.jsonl
    (tmp_path / "cogenesis.jsonl").write_text(sample_path("cogenesis").read_text())
    assert len(load_task("cogenesis", tmp_path)) == 2


def test_retrieval_from_profile_replaces_top5(tmp_path):
    row = json.loads(sample_path("longlamp_writing").read_text().splitlines()[0])
    row["input"] = "Generate the content for a reddit post Rye flour and my sourdough starter."
    f = tmp_path / "longlamp_writing.jsonl"
    f.write_text(json.dumps(row) + "\n")
    (released,) = load_task("longlamp_writing", f)
    (e,) = load_task("longlamp_writing", f, retriever=LexicalRetriever())
    assert released.context.startswith("The following are reddit post summaries with their content.\nSummary[1]: First time")
    assert e.context.count("Summary[") == 5  # five of the six history records
    assert "Summary[1]: Sourdough starter update" in e.context


def test_lexical_retriever_ranks_the_matching_record_first():
    docs = ["sourdough starter rye flour", "sailing a dinghy across the bay", "rebuilding an outboard motor"]
    assert LexicalRetriever().top_k("rye sourdough loaf", docs, k=2)[0] == 0
    assert LexicalRetriever().top_k("outboard motor carburettor", docs, k=1) == [2]


def test_missing_top5_falls_back_to_retrieval(tmp_path):
    row = json.loads(sample_path("longlamp_review").read_text().splitlines()[0])
    del row["top_5"]
    f = tmp_path / "longlamp_review.jsonl"
    f.write_text(json.dumps(row) + "\n")
    (e,) = load_task("longlamp_review", f)
    assert e.context.count("Product[") == 5


# ------------------------------------------------------------------ errors a user can cause


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_unknown_task():
    with pytest.raises(ValueError) as err:
        load_task("nope", sample_path("cogenesis"))
    assert "unknown task 'nope'" in _one_line(err)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError) as err:
        load_task("cogenesis", tmp_path / "absent.jsonl")
    assert isinstance(err.value, FileNotFoundError)
    assert "not found" in _one_line(err)


def test_missing_and_unexpected_preference():
    with pytest.raises(ValueError, match="needs a preference"):
        load_task("ultrachat", sample_path("ultrachat"))
    with pytest.raises(ValueError, match="unknown preference"):
        load_task("ultrachat", sample_path("ultrachat"), preference="funny")
    with pytest.raises(ValueError, match="takes no preference"):
        load_task("cogenesis", sample_path("cogenesis"), preference="concise")


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"input": "q"}', "'id'"),
        ('{"id": 3}', "'input'"),
        ('{"id": 3, "input": "q"}', "'personalized_input'"),
    ],
)
def test_malformed_row_names_the_line(tmp_path, bad, needle):
    f = tmp_path / "cogenesis.jsonl"
    good = sample_path("cogenesis").read_text().splitlines()[0]
    f.write_text(good + "\n\n" + bad + "\n")
    with pytest.raises(ValueError) as err:
        load_task("cogenesis", f)
    msg = _one_line(err)
    assert f"{f}:3:" in msg and needle in msg


def test_malformed_longlamp_record(tmp_path):
    f = tmp_path / "longlamp_abstract.jsonl"
    f.write_text(json.dumps({"id": 1, "input": "q", "top_5": [{"title": "t"}]}) + "\n")
    with pytest.raises(ValueError, match=r":1: malformed row: .*'abstract'"):
        load_task("longlamp_abstract", f)


def test_duplicate_ids(tmp_path):
    f = tmp_path / "truthfulqa.jsonl"
    f.write_text('{"id": 1, "input": "a"}\n{"id": 1, "input": "b"}\n')
    with pytest.raises(ValueError, match=":2: .*duplicate id"):
        load_task("truthfulqa", f, preference="concise")


# ------------------------------------------------------------------ the shared release rows


@pytest.mark.parametrize("task", [t for t in TASKS if t != "longlamp_abstract"])
def test_shared_release_rows(task, shared_file):
    path = shared_file(task)
    pref = "uplifting" if TASKS[task] == "preference" else None
    exs = load_task(task, path, preference=pref, limit=5)
    assert len(exs) == 5
    for e in exs:
        assert e.query and e.context and e.context_prompt
        assert e.query in e.context_prompt
        if TASKS[task] == "longlamp":
            assert e.context_prompt == f"{e.context}\n\n{e.query}"
            assert e.reference
        if task == "cogenesis":
            assert e.context_prompt.rstrip().endswith(e.query.strip())
            assert "Name:" in personal_text(e) and "helpful personal AI assistant" not in personal_text(e)


def test_shared_longlamp_profile_retrieval(shared_file):
    path = shared_file("longlamp_writing")
    (e,) = load_task("longlamp_writing", path, limit=1, retriever=LexicalRetriever())
    assert e.context.count("Content[") == 5
