"""Turn a run folder of generations into metrics and a Table-1-style comparison.

A run folder holds one ``<method>.jsonl`` per method (rows: ``id, method, text, n_tokens, seconds``), e.g.
``slm.jsonl``, ``slm_context.jsonl``, ``llm.jsonl``, ``costeer.jsonl``, ``light.jsonl``, ``llm_context.jsonl``.
:func:`compute_metrics` scores them against the task's examples; :func:`write_report` writes
``metrics.json``, ``report.md``, ``report.csv`` and ``report.png`` next to them.

``llm_context`` (the cloud LLM reading the private context) violates the privacy setting: it is shown apart
as the near-upper bound and never competes for the best value, as in the paper's Table 1.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any, Callable, Iterable, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from costeer.engine.methods import METHODS, PAPER_METHODS

from . import metrics as M
from .tasks import TASKS, Example, personal_text

# From the method table (engine/methods.py): the methods whose LLM reads the private context, and the paper's order.
PRIVACY_VIOLATING: tuple[str, ...] = tuple(s.name for s in METHODS if s.privacy_violating)
METHOD_ORDER: tuple[str, ...] = PAPER_METHODS
_METHOD_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class GenerationRow(BaseModel):
    """One generated answer, as the engine writes it."""

    model_config = ConfigDict(extra="allow")

    id: str
    method: str
    text: str
    n_tokens: int | None = None
    seconds: float | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _id_to_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, str)) and not isinstance(v, bool) else v


@dataclass(frozen=True)
class MetricInfo:
    label: str
    higher_is_better: bool | None  # None: no "best" (e.g. length, unless the preference says which way)
    scale: float = 1.0  # display only: ROUGE/METEOR ×100 as in the paper
    digits: int = 3


METRICS: dict[str, MetricInfo] = {
    "judge_overall": MetricInfo("Ovl", True, 1, 2),
    "judge_personal": MetricInfo("Per", True, 1, 2),
    "rouge1": MetricInfo("R-1", True, 100, 2),
    "rougeL": MetricInfo("R-L", True, 100, 2),
    "meteor": MetricInfo("MET", True, 100, 2),
    "armorm": MetricInfo("ArmoRM", True, 1, 4),
    "detail_recall": MetricInfo("Detail recall", True, 1, 3),
    "detail_precision": MetricInfo("Detail precision", True, 1, 3),
    "length_words": MetricInfo("Words", None, 1, 1),
    "sentiment": MetricInfo("Sentiment", None, 1, 3),
    "readability": MetricInfo("Flesch", None, 1, 1),
    "distinct1": MetricInfo("Dist-1", True, 1, 3),
    "distinct2": MetricInfo("Dist-2", True, 1, 3),
    "degenerate": MetricInfo("Degenerate", False, 1, 3),
    "rep4": MetricInfo("Rep-4", False, 1, 3),
    "n_tokens": MetricInfo("Tokens", None, 1, 1),
    "seconds": MetricInfo("Seconds", False, 1, 2),
    "tokens_per_s": MetricInfo("Tok/s", True, 1, 1),
}

# Which way a proxy should move for a stated preference.
PREFERENCE_DIRECTIONS: dict[str, dict[str, bool]] = {
    "concise": {"length_words": False},
    "verbose": {"length_words": True},
    "uplifting": {"sentiment": True},
    "creative": {},
}
HEADLINE: dict[str, tuple[str, ...]] = {
    "cogenesis": ("judge_overall", "judge_personal", "rougeL", "detail_recall"),
    "longlamp": ("rouge1", "rougeL", "meteor"),
    "preference": ("armorm",),
}
_PREFERENCE_HEADLINE = {"concise": "length_words", "verbose": "length_words", "uplifting": "sentiment",
                        "creative": "distinct2"}


# ---------------------------------------------------------------------------------------------- loading


def load_generations(run_dir: str | Path) -> dict[str, list[GenerationRow]]:
    """Every ``<method>.jsonl`` in the folder, keyed by method."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    out: dict[str, list[GenerationRow]] = {}
    for file in sorted(run.glob("*.jsonl")):
        method = file.stem
        if method.startswith(".") or not _METHOD_NAME.match(method):
            continue
        rows: list[GenerationRow] = []
        seen: set[str] = set()
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"{file}: not a generation file (byte {err.start} is not UTF-8)") from None
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            try:
                row = GenerationRow.model_validate(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: malformed generation row: invalid JSON ({err.msg})") from None
            except ValidationError as err:
                first = err.errors()[0]
                raise ValueError(f"{where}: malformed generation row: {'.'.join(map(str, first['loc']))}: "
                                 f"{first['msg']}") from None
            if row.method != method:
                raise ValueError(f"{where}: row says method {row.method!r} but the file is {method}.jsonl")
            if row.id in seen:
                raise ValueError(f"{where}: duplicate id {row.id!r}")
            seen.add(row.id)
            rows.append(row)
        out[method] = rows
    if not out:
        raise ValueError(f"no <method>.jsonl generation files in {run}")
    return out


def ordered_methods(methods: Iterable[str]) -> list[str]:
    """Paper order first (baselines, CoSteer, then the upper bound), unknown methods after, alphabetically."""
    ms = set(methods)
    known = [m for m in METHOD_ORDER if m in ms]
    return known + sorted(ms - set(METHOD_ORDER))


# ---------------------------------------------------------------------------------------------- scoring


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return fmean(vals) if vals else None


def _progress(items: list, label: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=label, unit="ex")


class _JudgeCache:
    """Judge replies cost money: keep them in ``judge_cache.json`` so reruns only ask for new ones."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, ask: Callable[[], tuple[float | None, str]]) -> float | None:
        if key not in self.data:
            rating, reply = ask()
            self.data[key] = {"rating": rating, "reply": reply}
        return self.data[key]["rating"]

    def save(self) -> None:
        if self.data:
            self.path.write_text(json.dumps(self.data, indent=1, ensure_ascii=False))


def _score_one(family: str, ex: Example, gen: GenerationRow, method: str, judge: Any, reward: Any,
               cache: _JudgeCache | None) -> dict[str, Any]:
    text = gen.text
    row: dict[str, Any] = {
        "id": ex.id,
        "length_words": M.length_words(text),
        "sentiment": M.sentiment(text),
        "readability": M.readability(text),
        "rep4": M.repeated_ngram_ratio(text, 4),
        "degenerate": float(M.has_repetition_loop(text)),
        "n_tokens": gen.n_tokens,
        "seconds": gen.seconds,
    }
    if family == "longlamp":
        if ex.reference is None:
            raise ValueError(f"example {ex.id} has no reference output to score against")
        row.update(M.rouge(text, ex.reference))
        row["meteor"] = M.meteor(text, ex.reference)
    if family == "cogenesis":
        if ex.reference:
            row.update(M.rouge(text, ex.reference))  # against `output`, the reference written with context
        row.update(M.personal_detail_recall(text, personal_text(ex), ex.query))
        if judge is not None and cache is not None:
            for kind, key in (("overall", "judge_overall"), ("personal", "judge_personal")):
                row[key] = cache.get(f"{kind}|{method}|{ex.id}", lambda k=kind: judge.rate(k, ex, text))
    if family == "preference" and reward is not None:
        row["armorm"] = reward.score(ex, text)
    return row


def compute_metrics(run_dir: str | Path, examples: Sequence[Example], *, judge: Any = None,
                    reward: Any = None, progress: bool = False) -> dict[str, Any]:
    """Score every method's generations against ``examples``.

    ``judge`` (a :class:`~costeer.eval.judge.JudgeClient`) adds the CoGenesis judge scores; ``reward``
    (an :class:`~costeer.eval.reward.ArmoRMScorer`) adds ArmoRM for the preference tasks. Generations whose
    id is not among the examples are counted as ``unknown`` and ignored; examples a method did not answer
    are counted as ``missing``. ``progress`` shows a tqdm bar per method (useful with a judge or ArmoRM).
    """
    if not examples:
        raise ValueError("no examples to score against")
    task = examples[0].task
    family = TASKS[task]
    preference = examples[0].preference
    by_id = {ex.id: ex for ex in examples}
    gens = load_generations(run_dir)
    if family == "longlamp":
        M.ensure_wordnet()  # fail before any work, with the setup hint, if METEOR cannot run
    cache = _JudgeCache(Path(run_dir) / "judge_cache.json") if judge is not None else None

    methods: dict[str, dict[str, Any]] = {}
    per_example: dict[str, list[dict[str, Any]]] = {}
    try:
        for method in ordered_methods(gens):
            rows = gens[method]
            matched = [(by_id[g.id], g) for g in rows if g.id in by_id]
            scored = [_score_one(family, ex, g, method, judge, reward, cache)
                      for ex, g in _progress(matched, method, progress)]
            per_example[method] = scored
            texts = [g.text for _, g in matched]
            summary: dict[str, Any] = {
                "n": len(matched),
                "missing": len(by_id) - len(matched),
                "unknown": len(rows) - len(matched),
            }
            keys = [k for k in METRICS if any(k in r for r in scored)]
            for k in keys:
                summary[k] = _mean(r.get(k) for r in scored)
            summary["distinct1"] = M.distinct_n(texts, 1)
            summary["distinct2"] = M.distinct_n(texts, 2)
            tok = [g.n_tokens for _, g in matched if g.n_tokens is not None and g.seconds]
            secs = [g.seconds for _, g in matched if g.n_tokens is not None and g.seconds]
            summary["tokens_per_s"] = sum(tok) / sum(secs) if secs and sum(secs) > 0 else None
            for k in ("judge_overall", "judge_personal"):
                if k in keys:
                    summary[f"{k}_unparsed"] = sum(1 for r in scored if r.get(k) is None)
            methods[method] = summary
    finally:
        if cache is not None:
            cache.save()

    return {
        "task": task,
        "family": family,
        "preference": preference,
        "n_examples": len(examples),
        "privacy_violating": [m for m in methods if m in PRIVACY_VIOLATING],
        "methods": methods,
        "per_example": per_example,
    }


# ---------------------------------------------------------------------------------------------- report


def _directions(preference: str | None) -> dict[str, bool | None]:
    d = {k: info.higher_is_better for k, info in METRICS.items()}
    d.update(PREFERENCE_DIRECTIONS.get(preference or "", {}))
    return d


def table_metrics(metrics: dict[str, Any]) -> list[str]:
    """Metric columns to show: every known metric some method has a value for, in METRICS order."""
    present = {k for s in metrics["methods"].values() for k, v in s.items() if v is not None}
    return [k for k in METRICS if k in present]


def best_values(metrics: dict[str, Any]) -> dict[str, float]:
    """Per metric, the best value among the privacy-preserving methods (only where a direction is defined
    and at least two methods differ)."""
    directions = _directions(metrics.get("preference"))
    fair = {m: s for m, s in metrics["methods"].items() if m not in PRIVACY_VIOLATING}
    best: dict[str, float] = {}
    for k in table_metrics(metrics):
        up = directions.get(k)
        vals = [s[k] for s in fair.values() if s.get(k) is not None]
        if up is None or len(vals) < 2 or max(vals) == min(vals):  # a tie everywhere marks nothing
            continue
        best[k] = max(vals) if up else min(vals)
    return best


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    info = METRICS[key]
    return f"{value * info.scale:.{info.digits}f}"


def _is_best(value: float | None, best: float | None) -> bool:
    return value is not None and best is not None and math.isclose(value, best, rel_tol=1e-12, abs_tol=1e-12)


def render_markdown(metrics: dict[str, Any]) -> str:
    cols = table_metrics(metrics)
    best = best_values(metrics)
    methods = ordered_methods(metrics["methods"])
    fair = [m for m in methods if m not in PRIVACY_VIOLATING]
    upper = [m for m in methods if m in PRIVACY_VIOLATING]
    header = "| Method | n | " + " | ".join(METRICS[k].label for k in cols) + " |"
    rule = "|---|---:|" + "---:|" * len(cols)

    def line(m: str) -> str:
        s = metrics["methods"][m]
        cells = []
        for k in cols:
            txt = _fmt(k, s.get(k))
            cells.append(f"**{txt}**" if m not in PRIVACY_VIOLATING and _is_best(s.get(k), best.get(k)) else txt)
        return f"| {m} | {s['n']} | " + " | ".join(cells) + " |"

    title = metrics["task"] + (f" ({metrics['preference']})" if metrics.get("preference") else "")
    out = [f"# {title}: {metrics['n_examples']} examples", "", header, rule, *map(line, fair)]
    if upper:
        out += ["", "Privacy-violating upper bound (the cloud LLM reads the private context; not a valid "
                "setting, shown for reference as in the paper's Table 1):", "", header, rule, *map(line, upper)]
    scaled = [METRICS[k].label for k in cols if METRICS[k].scale != 1]
    lower = [METRICS[k].label for k in cols if _directions(metrics.get("preference")).get(k) is False]
    notes = ["**Bold**: best among the privacy-preserving methods ("
             + (f"lower is better for {', '.join(lower)}; " if lower else "")
             + "no mark where a metric has no preferred direction or all methods tie)."]
    if scaled:
        notes.append(f"{', '.join(scaled)} are ×100.")
    missing = {m: s["missing"] for m, s in metrics["methods"].items() if s.get("missing")}
    if missing:
        notes.append("Examples without a generation: " + ", ".join(f"{m} {n}" for m, n in missing.items()) + ".")
    return "\n".join(out + ["", *notes]) + "\n"


def write_csv(metrics: dict[str, Any], path: Path) -> None:
    cols = table_metrics(metrics)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "privacy_violating", "n", "missing", *cols])
        for m in ordered_methods(metrics["methods"]):
            s = metrics["methods"][m]
            w.writerow([m, m in PRIVACY_VIOLATING, s["n"], s["missing"],
                        *["" if s.get(k) is None else repr(float(s[k])) for k in cols]])


def headline_metrics(metrics: dict[str, Any]) -> list[str]:
    """Up to four metrics for the chart: the paper's metrics for the task, else the first table columns."""
    cols = table_metrics(metrics)
    wanted = list(HEADLINE.get(metrics.get("family", ""), ()))
    pref = metrics.get("preference")
    if pref in _PREFERENCE_HEADLINE:
        wanted.append(_PREFERENCE_HEADLINE[pref])
    chosen = [k for k in wanted if k in cols] or cols
    return chosen[:4]


def plot_bars(metrics: dict[str, Any], path: Path) -> None:
    # The object-oriented API with the Agg canvas: no pyplot, so no global backend switch and no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = headline_metrics(metrics)
    methods = ordered_methods(metrics["methods"])
    fig = Figure(figsize=(3.2 * max(len(keys), 1), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(keys), 1), squeeze=False)[0]
    for ax, k in zip(axes, keys):
        info = METRICS[k]
        vals = [metrics["methods"][m].get(k) for m in methods]
        heights = [0.0 if v is None else v * info.scale for v in vals]
        colors = ["0.75" if m in PRIVACY_VIOLATING else f"C{i}" for i, m in enumerate(methods)]
        bars = ax.bar(range(len(methods)), heights, color=colors)
        for b, m in zip(bars, methods):
            if m in PRIVACY_VIOLATING:
                b.set_hatch("//")
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(info.label + (" ×100" if info.scale != 1 else ""), fontsize=10)
    fig.suptitle(metrics["task"] + (f" ({metrics['preference']})" if metrics.get("preference") else "")
                 + " — hatched: privacy-violating upper bound", fontsize=9)
    fig.savefig(path, dpi=120)


def write_report(run_dir: str | Path, metrics: dict[str, Any]) -> dict[str, Path]:
    """Write metrics.json, report.md, report.csv and report.png into ``run_dir``; returns their paths."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    paths = {"json": run / "metrics.json", "md": run / "report.md", "csv": run / "report.csv",
             "png": run / "report.png"}
    paths["json"].write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(metrics), encoding="utf-8")
    write_csv(metrics, paths["csv"])
    plot_bars(metrics, paths["png"])
    return paths
