"""Dataset adapters for the CoSteer release format (one JSON object per line, stable ``id``, public ``input``).

Every task becomes a list of :class:`Example`. What each model sees:

* ``query`` — the public input. The cloud LLM (and the SLM's *without-context* branch) see only this.
* ``context_prompt`` — the complete *with-context* user message of the paper for this task. Always set.
  The SLM's with-context branch (and the privacy-violating ``llm_context`` baseline) should use it verbatim.
* ``context`` — the private text alone (profile, retrieved history, stated preference), for audits, metrics
  and judges. For LongLaMP ``f"{context}\\n\\n{query}" == context_prompt`` exactly (the official layout);
  for CoGenesis and the preference tasks the paper's with-context message is not of that shape
  (CoGenesis ends with a "## Task" section, preferences are appended after the input), which is why
  ``context_prompt`` exists and wins: use :meth:`Example.with_context_prompt`.

LongLaMP rendering follows the official CoSteer code (USTC-StarTeam/CoSteer): for abstracts
"The following are five titles with their abstracts." + ``Title[i]: …\\nAbstract[i]: …`` records +
"Now it's your turn"; the refactored release uses the same layout with "product descriptions with their
user reviews" (Product/Review) and "reddit post summaries with their content" (Summary/Content), which we follow.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict

from costeer.errors import CoSteerError
from costeer.eval.retrieval import LexicalRetriever, Retriever

PREFERENCES: tuple[str, ...] = ("concise", "creative", "uplifting", "verbose")


class TaskFileNotFoundError(CoSteerError, FileNotFoundError, ValueError):
    """A missing dataset file: a FileNotFoundError that ``except ValueError`` also catches."""


@dataclass(frozen=True)
class LongLampFormat:
    """How a LongLaMP task renders its five history records for the SLM."""

    heading: str
    first: tuple[str, str]  # (label, record field)
    second: tuple[str, str]


LONGLAMP_FORMATS: dict[str, LongLampFormat] = {
    "longlamp_abstract": LongLampFormat(
        "The following are five titles with their abstracts.", ("Title", "title"), ("Abstract", "abstract")
    ),
    "longlamp_review": LongLampFormat(
        "The following are product descriptions with their user reviews.",
        ("Product", "description"),
        ("Review", "reviewText"),
    ),
    "longlamp_writing": LongLampFormat(
        "The following are reddit post summaries with their content.", ("Summary", "summary"), ("Content", "content")
    ),
}
LONGLAMP_TURN = "Now it's your turn"

#: task name -> family ("cogenesis", "longlamp", "preference"); the family decides prompts and metrics.
TASKS: dict[str, str] = {
    "cogenesis": "cogenesis",
    **{name: "longlamp" for name in LONGLAMP_FORMATS},
    "helpsteer": "preference",
    "personal_preference_eval": "preference",
    "truthfulqa": "preference",
    "ultrachat": "preference",
}

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"


class Example(BaseModel):
    """One evaluation item, task-independent."""

    model_config = ConfigDict(frozen=True)

    id: str
    task: str
    query: str
    context: str
    context_prompt: str
    reference: str | None = None
    preference: str | None = None
    raw: dict[str, Any]

    def with_context_prompt(self) -> str:
        """The user message for a branch that may see the private context."""
        return self.context_prompt

    def reference_prompt(self) -> str | None:
        """The matched reference for `costeer_matched`: the with-context prompt's format around a public
        reference profile instead of the user's (None where the task has none: the delta is then taken
        against the bare query, as the paper does)."""
        if TASKS[self.task] == "cogenesis":
            return cogenesis_reference(self.context_prompt, self.query)
        return None


def task_family(name: str) -> str:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def preference_prompt(query: str, preference: str) -> str:
    """The paper's with-context prompt for the preference-alignment tasks."""
    return f"{query}\nYour answer should be as {preference} as possible"


# ----------------------------------------------------------------------------------------------- CoGenesis

_COGEN_SECTION = re.compile(r"^## (.+?)\s*$", re.MULTILINE)


def cogenesis_sections(personalized_input: str) -> dict[str, str]:
    """Split a CoGenesis ``personalized_input`` into its "## Heading" sections.

    Key "" holds the instruction preamble; others e.g. "User Profile", "User Writing History", "Task".
    """
    parts: dict[str, str] = {}
    matches = list(_COGEN_SECTION.finditer(personalized_input))
    parts[""] = personalized_input[: matches[0].start() if matches else len(personalized_input)].strip()
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(personalized_input)
        parts[m.group(1)] = personalized_input[m.end() : end].strip()
    return parts


def reference_profile() -> str:
    """The shipped public reference profile (a made-up user, CoGenesis' "## User Profile" and "## User
    Writing History" sections): the control that `costeer_matched`'s delta is taken against."""
    from importlib import resources

    return resources.files("costeer").joinpath("examples/reference_profile.md").read_text(encoding="utf-8").strip()


def cogenesis_reference(personalized_input: str, query: str) -> str:
    """The row's prompt with the reference profile in place of the user's: the same instruction preamble,
    the same sections, the same task. Only the profile and the writing history differ."""
    preamble = cogenesis_sections(personalized_input)[""]
    head = f"{preamble}\n\n" if preamble else ""
    return f"{head}{reference_profile()}\n\n## Task\n{query.strip()}\n"


def _cogenesis_context(personalized_input: str) -> str:
    # The private block is everything before the trailing "## Task" section (which repeats the public input).
    idx = personalized_input.rfind("\n## Task")
    return (personalized_input[:idx] if idx >= 0 else personalized_input).strip()


def personal_text(example: Example) -> str:
    """The user-specific part of the context, without generic instructions (for detail-recall and judges)."""
    family = TASKS[example.task]
    if family == "cogenesis":
        sec = cogenesis_sections(example.raw["personalized_input"])
        return "\n".join(v for k, v in sec.items() if k.startswith("User")).strip() or example.context
    if family == "longlamp":
        fmt = LONGLAMP_FORMATS[example.task]
        # Drop heading and "Now it's your turn" so only the user's own records count.
        lines = example.context.splitlines()
        return "\n".join(ln for ln in lines if ln not in (fmt.heading, LONGLAMP_TURN)).strip()
    return example.context


# ----------------------------------------------------------------------------------------------- LongLaMP


def render_longlamp_context(task: str, records: Sequence[dict[str, Any]]) -> str:
    """The five history records as the SLM sees them, ending in "Now it's your turn".

    With the query appended as f"{context}\\n\\n{query}" this equals the official prompt byte for byte.
    """
    fmt = LONGLAMP_FORMATS[task]
    (l1, k1), (l2, k2) = fmt.first, fmt.second
    blocks = [fmt.heading]
    for i, rec in enumerate(records[:5], start=1):
        missing = [k for k in (k1, k2) if k not in rec]
        if missing:
            raise ValueError(f"{task} history record {i} lacks field {missing[0]!r}")
        blocks.append(f"{l1}[{i}]: {rec[k1]}\n{l2}[{i}]: {rec[k2]}\n")
    blocks.append(LONGLAMP_TURN)
    return "\n".join(blocks)


def record_text(task: str, record: dict[str, Any]) -> str:
    """Text of one history record used for retrieval (both rendered fields, and a review's summary)."""
    fmt = LONGLAMP_FORMATS[task]
    keys = [fmt.first[1], fmt.second[1]] + (["summary"] if task == "longlamp_review" else [])
    return "\n".join(str(record[k]) for k in dict.fromkeys(keys) if record.get(k))


# ----------------------------------------------------------------------------------------------- retrieval (retrieval.py)


def retrieve_history(task: str, query: str, profile: Sequence[dict[str, Any]], retriever: Retriever,
                     k: int = 5) -> list[dict[str, Any]]:
    """The k records of a user's whole history that best match the query, best first."""
    docs = [record_text(task, r) for r in profile]
    return [profile[i] for i in retriever.top_k(query, docs, k)]


# ----------------------------------------------------------------------------------------------- loading


def _require_str(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: malformed row: field {key!r} must be a non-empty string")
    return value


def _example(task: str, row: dict[str, Any], where: str, preference: str | None,
             retriever: Retriever | None) -> Example:
    if not isinstance(row.get("id"), (int, str)) or isinstance(row.get("id"), bool) or str(row["id"]) == "":
        raise ValueError(f"{where}: malformed row: missing or invalid 'id' (a string or an integer)")
    query = _require_str(row, "input", where)
    family = TASKS[task]
    common = {"id": str(row["id"]), "task": task, "query": query, "raw": row}
    if family == "cogenesis":
        full = _require_str(row, "personalized_input", where)
        return Example(**common, context=_cogenesis_context(full), context_prompt=full,
                       reference=row.get("output"))
    if family == "longlamp":
        if retriever is not None or "top_5" not in row:
            profile = row.get("profile")
            if not isinstance(profile, list) or not all(isinstance(r, dict) for r in profile):
                raise ValueError(f"{where}: malformed row: needs a 'profile' list of records to retrieve from")
            records = retrieve_history(task, query, profile, retriever or LexicalRetriever())
        else:
            records = row["top_5"]
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError(f"{where}: malformed row: 'top_5' must be a list of records")
        try:
            context = render_longlamp_context(task, records)
        except ValueError as err:
            raise ValueError(f"{where}: malformed row: {err}") from None
        return Example(**common, context=context, context_prompt=f"{context}\n\n{query}",
                       reference=row.get("output"))
    assert preference is not None
    return Example(**common, context=f"Your answer should be as {preference} as possible",
                   context_prompt=preference_prompt(query, preference), preference=preference)


def resolve_path(name: str, path: str | Path) -> Path:
    """A dataset file, or a folder holding ``<name>.jsonl``."""
    p = Path(path)
    if p.is_dir():
        p = p / f"{name}.jsonl"
    if not p.is_file():
        raise TaskFileNotFoundError(f"dataset file not found: {p}")
    return p


def load_task(name: str, path: str | Path, preference: str | None = None, limit: int | None = None,
              retriever: Retriever | None = None) -> list[Example]:
    """Read a task's JSONL file (or a folder with ``<name>.jsonl``) into examples.

    ``preference`` is required for, and only accepted by, the preference-alignment tasks.
    ``retriever`` (LongLaMP only) re-selects the five history records from the row's whole ``profile``
    instead of using the released ``top_5``; rows without ``top_5`` fall back to BM25 retrieval.
    ``limit`` keeps the first N rows.
    """
    family = task_family(name)
    if family == "preference":
        if preference is None:
            raise ValueError(f"task {name!r} needs a preference: one of {', '.join(PREFERENCES)}")
        if preference not in PREFERENCES:
            raise ValueError(f"unknown preference {preference!r}; choose one of: {', '.join(PREFERENCES)}")
    elif preference is not None:
        raise ValueError(f"task {name!r} takes no preference (only the preference-alignment tasks do)")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    file = resolve_path(name, path)

    examples: list[Example] = []
    seen: set[str] = set()
    with file.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: malformed row: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: malformed row: expected a JSON object")
            ex = _example(name, row, where, preference, retriever)
            if ex.id in seen:
                raise ValueError(f"{where}: malformed row: duplicate id {ex.id!r}")
            seen.add(ex.id)
            examples.append(ex)
    return examples


def sample_path(name: str) -> Path:
    """The small hand-written sample file shipped for a task (for demos and tests)."""
    family = task_family(name)
    # "<task>.sample.jsonl": hand-written rows, named apart from the released dataset files
    return SAMPLES_DIR / ("preference.sample.jsonl" if family == "preference" else f"{name}.sample.jsonl")
