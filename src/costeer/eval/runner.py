"""Run methods over a task's examples into a resumable run folder, then score it.

A run folder holds ``<method>.jsonl`` (one generation per line, appended and flushed as soon as it is made),
``run.json`` (what produced them) and, at the end, :func:`costeer.eval.report.write_report`'s
``metrics.json``, ``report.md``, ``report.csv`` and ``report.png``.

Resuming: rerunning into the same folder skips the example ids a method's file already holds, so a run
killed half-way (or extended with a larger ``limit`` or more methods) only generates what is missing.
A kill can leave a half-written last line; it is dropped and that example generated again. A folder whose
``run.json`` names other models, task, data, steering or sampling settings is refused: mixing generations
from two configurations would silently corrupt the comparison.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError

from costeer.engine.config import Method, SamplingConfig, SteeringConfig

from . import metrics as M
from .report import GenerationRow, compute_metrics, write_report
from .tasks import TASKS, Example, load_task, sample_path

if TYPE_CHECKING:  # the API pulls in torch; keep importing this module cheap
    from costeer.api import CoSteer

RUN_FILE = "run.json"


class GenerationRecord(GenerationRow):
    """One line of ``<method>.jsonl``: what :class:`report.GenerationRow` reads, plus what replays it."""

    token_ids: list[int]
    stop_reason: str
    coefficient: float | None = None  # b for the steered methods
    timing: dict[str, float] = {}


class RunSpec(BaseModel):
    """Everything that decides a generation's text: two runs may share a folder only if these are equal."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["eval", "sweep"] = "eval"
    task: str
    preference: str | None = None
    data: str | None = None
    llm: str | None = None
    slm: str | None = None
    steering: SteeringConfig | None = None  # None for a sweep: it varies, and its cache is keyed by b
    sampling: SamplingConfig


class RunRecord(RunSpec):
    """``run.json``: the spec plus bookkeeping that may grow between resumes."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    methods: list[str] = []
    limit: int | None = None  # the largest limit any resume used (None: the whole file)
    updated: str = ""

    def spec(self) -> RunSpec:
        return RunSpec.model_validate(self.model_dump(include=set(RunSpec.model_fields)))


# ---------------------------------------------------------------------------------------------- run.json


def parse_methods(methods: Iterable[str]) -> list[Method]:
    """Method names -> Methods, in the given order without repeats; a clear error for an unknown one."""
    out: list[Method] = []
    for name in methods:
        name = name.strip()
        try:
            m = Method(name)
        except ValueError:
            raise ValueError(f"unknown method {name!r}; choose from: {', '.join(x.value for x in Method)}") from None
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError("no methods given")
    return out


def _first_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str | None:
    for key in dict.fromkeys([*old, *new]):  # RunSpec's field order: task before data, etc.
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a!r} there, {b!r} now"
    return None


def read_run(run_dir: str | Path) -> RunRecord | None:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return RunRecord.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as err:
        raise ValueError(f"{path}: not a costeer run.json ({err.errors()[0]['msg']})") from None


def _merge_limit(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else max(a, b)


def claim_folder(run_dir: Path, spec: RunSpec, methods: Sequence[str], limit: int | None) -> RunRecord:
    """Check that ``run_dir`` is new or holds this very spec, and (re)write its run.json.

    Raises ValueError (one line) when the folder belongs to a different run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a folder: give --out a new or existing folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    old = read_run(run_dir)
    if old is None:
        if any(run_dir.glob("*.jsonl")):
            raise ValueError(f"{run_dir} holds generations but no {RUN_FILE}; use a new output folder")
        merged_methods, merged_limit = list(methods), limit
    else:
        diff = _first_difference(old.spec().model_dump(mode="json"), spec.model_dump(mode="json"))
        if diff:
            raise ValueError(f"{run_dir / RUN_FILE} is for a different run ({diff}); "
                             "use a new output folder or the same settings")
        merged_methods = old.methods + [m for m in methods if m not in old.methods]
        merged_limit = _merge_limit(old.limit, limit)
    record = RunRecord(**spec.model_dump(), methods=merged_methods, limit=merged_limit,
                       updated=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    (run_dir / RUN_FILE).write_text(record.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return record


# ---------------------------------------------------------------------------------------------- JSONL


def done_ids(path: Path) -> set[str]:
    """Ids already generated in ``path``, after repairing a last line cut short by a kill.

    Only the tail can be partial (the newline is the last byte of every write), so a malformed line
    before it is real corruption and raises; a partial tail is truncated away."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    body, _, tail = data.rpartition(b"\n")
    ids: set[str] = set()
    for lineno, line in enumerate(body.split(b"\n") if body else [], start=1):
        if line.strip():
            ids.add(_parse_id(line, f"{path}:{lineno}"))
    if tail.strip():
        try:
            ids.add(_parse_id(tail, ""))
            with path.open("ab") as fh:  # a complete row that only lacks its newline
                fh.write(b"\n")
        except ValueError:
            os.truncate(path, len(data) - len(tail))
    return ids


def _parse_id(line: bytes, where: str) -> str:
    try:
        return GenerationRow.model_validate(json.loads(line.decode("utf-8"))).id
    except (UnicodeDecodeError, json.JSONDecodeError, ValidationError):
        raise ValueError(f"{where}: malformed generation row") from None


def generate_record(cs: "CoSteer", ex: Example, method: Method, steering: SteeringConfig | None,
                    sampling: SamplingConfig | None) -> GenerationRecord:
    """One example through one method; ``seconds`` is wall time, prefill included."""
    from costeer.api import PromptTooLong

    start = time.perf_counter()
    try:
        g = cs.generate(ex.query, context=ex.context, method=method, context_message=ex.with_context_prompt(),
                        reference_message=ex.reference_prompt(), steering=steering, sampling=sampling)
    except PromptTooLong as e:  # the same row stops every rerun: say which one it is
        raise PromptTooLong(f"example {ex.id} ({method.value}): {e}") from None
    seconds = time.perf_counter() - start
    return GenerationRecord(id=ex.id, method=method.value, text=g.text, n_tokens=len(g.token_ids),
                            seconds=seconds, token_ids=g.token_ids, stop_reason=g.stop_reason,
                            coefficient=g.coefficient, timing=g.timing())


def append_generations(cs: "CoSteer", examples: Sequence[Example], method: Method, path: Path,
                       steering: SteeringConfig | None, sampling: SamplingConfig | None, bar: Any = None) -> None:
    """Generate ``examples`` and append each row as soon as it exists (flushed, so a kill loses at most one)."""
    with path.open("a", encoding="utf-8") as fh:
        for ex in examples:
            _write_row(fh, generate_record(cs, ex, method, steering, sampling), bar)


def _write_row(fh, rec: GenerationRecord, bar: Any) -> None:
    fh.write(rec.model_dump_json() + "\n")
    fh.flush()
    if bar is not None:
        bar.update(1)


def append_by_example(cs: "CoSteer", examples: Sequence[Example], pending: dict[Method, set[str]], out: Path,
                      steering: SteeringConfig | None, sampling: SamplingConfig | None, bar: Any = None) -> None:
    """Every pending method of an example before the next example: the methods that read its private
    context (slm_context, costeer, light, …) then share one prefill of it through the prefix cache."""
    files = {m: (out / f"{m.value}.jsonl").open("a", encoding="utf-8") for m in pending}
    try:
        for ex in examples:
            for m, ids in pending.items():
                if ex.id in ids:
                    if bar is not None:
                        bar.set_postfix_str(m.value)
                    _write_row(files[m], generate_record(cs, ex, m, steering, sampling), bar)
    finally:
        for fh in files.values():
            fh.close()


def progress_bar(total: int, label: str, enabled: bool):
    """A tqdm bar (count, rate, ETA) on stderr; a disabled one still accepts update()."""
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="gen", disable=not enabled or total == 0, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- runs


def default_models(cs: "CoSteer") -> dict[str, str | None]:
    return {"llm": cs.llm.name if cs.llm else None, "slm": cs.slm.name if cs.slm else None}


def check_models(cs: "CoSteer", methods: Sequence[Method]) -> None:
    for m in methods:
        if m.uses_llm and cs.llm is None:
            raise ValueError(f"method '{m.value}' needs an LLM")
        if m.uses_slm and cs.slm is None:
            raise ValueError(f"method '{m.value}' needs an SLM")


def check_scorable(examples: Sequence[Example]) -> None:
    """Fail before generating, not after, when the task's metrics cannot run (METEOR needs WordNet)."""
    if TASKS[examples[0].task] == "longlamp":
        try:
            M.ensure_wordnet()
        except M.WordNetMissingError as err:
            raise ValueError(str(err)) from None  # a setup problem the user fixes: one line in the CLI


def run_eval(
    cs: "CoSteer",
    examples: Sequence[Example],
    methods: Iterable[str | Method],
    out_dir: str | Path,
    steering: SteeringConfig | None = None,
    sampling: SamplingConfig | None = None,
    *,
    data: str | Path | None = None,
    limit: int | None = None,
    models: dict[str, str | None] | None = None,
    judge: Any = None,
    reward: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate every (method, example) missing from ``out_dir``, then score and report the folder.

    ``steering`` / ``sampling`` default to ``cs.config``'s. ``data`` (the dataset file) and ``models``
    (``{"llm": spec, "slm": spec}``, default the loaded models' names) are recorded in run.json and must
    match on resume; ``limit`` is recorded so ``costeer report`` scores the same examples.
    ``judge`` / ``reward`` are passed to :func:`compute_metrics`. Returns the metrics.
    """
    if not examples:
        raise ValueError("no examples to run")
    ms = parse_methods(m.value if isinstance(m, Method) else m for m in methods)
    check_models(cs, ms)
    check_scorable(examples)
    steering, sampling = steering or cs.config.steering, sampling or cs.config.sampling
    out = Path(out_dir)
    spec = RunSpec(task=examples[0].task, preference=examples[0].preference,
                   data=str(Path(data).resolve()) if data is not None else None,
                   **(models or default_models(cs)), steering=steering, sampling=sampling)
    claim_folder(out, spec, [m.value for m in ms], limit)

    pending = {m: {ex.id for ex in examples} - done_ids(out / f"{m.value}.jsonl") for m in ms}
    with progress_bar(sum(map(len, pending.values())), spec.task, progress) as bar:
        append_by_example(cs, examples, pending, out, steering, sampling, bar)

    metrics = compute_metrics(out, examples, judge=judge, reward=reward)
    write_report(out, metrics)
    return metrics


def report_run(run_dir: str | Path, task: str | None = None, data: str | Path | None = None,
               preference: str | None = None, *, judge: Any = None, reward: Any = None) -> dict[str, Any]:
    """Re-score a run folder; task, data, preference and limit default to its run.json."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    rec = read_run(run)
    task = task or (rec.task if rec else None)
    if task is None:
        raise ValueError(f"no {RUN_FILE} in {run}: give --task (and --data)")
    same_task = rec is not None and rec.task == task
    preference = preference or (rec.preference if same_task else None)
    data = data or (rec.data if same_task and rec.data else sample_path(task))
    examples = load_task(task, data, preference=preference, limit=rec.limit if same_task else None)
    metrics = compute_metrics(run, examples, judge=judge, reward=reward)
    write_report(run, metrics)
    return metrics
