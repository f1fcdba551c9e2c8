"""Hyper-parameter sensitivity, as in the paper's Figure 2 (§5.2.3).

One parameter varies at a time over the paper's range while the others stay at the defaults
(Appendix B.1: T=20, α=2, β=1, λ=2, η=10); method ``costeer`` only. Each setting is scored with a
headline metric: ROUGE-L where the examples have a reference (the paper's Figure 2 metric; CoGenesis
included), else the preference's headline from :func:`costeer.eval.report.headline_metrics` (ArmoRM when a
reward scorer is given, otherwise the preference's proxy: length, sentiment or distinct-2).

Work is shared between settings. The fused policy is exactly log_softmax(log π_base + b·Δ), so a setting
matters only through its effective coefficient b = ``SteeringConfig.coefficient(Method.costeer)``:
generations are cached by (example id, b rounded to 12 significant digits), one folder per b under
``<out>/cache/``. Settings with the same b (the default point, which every parameter's grid contains;
different T values whose b has converged; ...) are generated once, and an interrupted sweep resumes from
the cache. Settings whose b is not finite or overflows the float32 logits are recorded as skipped.
λ = 0 (with α > 0) is kept in the grid: b grows like (1+αη)^T, huge (≈3e26 at the defaults) but finite.

Outputs in ``<out>``: ``sweep.json`` (every setting with b, score and full metric summary), ``sweep.csv``
and ``sweep.png`` (one panel per parameter).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from pydantic import BaseModel, ConfigDict

from costeer.engine.config import Method, SamplingConfig, SteeringConfig

from .report import METRICS, compute_metrics, headline_metrics
from .runner import (RunSpec, append_generations, check_models, check_scorable, claim_folder, default_models,
                     done_ids, progress_bar)
from .tasks import Example

if TYPE_CHECKING:
    from costeer.api import CoSteer

#: The paper's ranges (α, β 0.1-5; λ 0-5; η 2-20; T 1-100), each holding its default.
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "alpha": (0.1, 0.5, 1.0, 2.0, 3.0, 5.0),
    "beta": (0.1, 0.5, 1.0, 2.0, 3.0, 5.0),
    "lam": (0.0, 0.5, 1.0, 2.0, 3.0, 5.0),
    "eta": (2.0, 5.0, 10.0, 15.0, 20.0),
    "T": (1, 5, 10, 20, 50, 100),
}
PARAM_ALIASES = {"lambda": "lam", "t": "T"}
SYMBOLS = {"alpha": "α", "beta": "β", "lam": "λ", "eta": "η", "T": "T"}
_FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


class Setting(BaseModel):
    """One point of the sweep and its outcome."""

    model_config = ConfigDict(extra="forbid")

    param: str
    value: float
    steering: SteeringConfig
    b: float | None = None
    skipped: str | None = None
    score: float | None = None
    summary: dict[str, Any] | None = None  # report.compute_metrics' summary for method costeer

    @property
    def b_key(self) -> str:
        return coefficient_key(self.b)


def coefficient_key(b: float) -> str:
    """The cache key: b to 12 significant digits, so float noise between equal settings merges."""
    return f"{b:.12g}"


def parse_params(names: Iterable[str]) -> list[str]:
    out: list[str] = []
    for raw in names:
        name = PARAM_ALIASES.get(raw.strip().lower(), raw.strip())
        if name not in DEFAULT_GRIDS:
            raise ValueError(f"unknown sweep parameter {raw.strip()!r}; choose from: alpha, beta, lambda, eta, T")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("no sweep parameters given")
    return out


def skip_reason(b: float) -> str | None:
    """Why a coefficient cannot be run, or None."""
    if not math.isfinite(b):
        return f"b = {b} is not finite"
    if abs(b) > _FLOAT32_MAX:  # the fusion multiplies float32 logits by b: it would turn into inf/NaN
        return f"b = {b:.3g} overflows float32 logits"
    return None


def make_settings(grids: dict[str, Sequence[float]], base: SteeringConfig) -> list[Setting]:
    """One setting per grid value, the other parameters at ``base``."""
    out = []
    for param, values in grids.items():
        for v in values:
            if param == "T" and v != int(v):
                raise ValueError(f"T must be a whole number of FTRL steps, got {v}")
            st = SteeringConfig.model_validate({**base.model_dump(), param: int(v) if param == "T" else float(v)})
            b = st.coefficient(Method.costeer)
            reason = skip_reason(b)
            out.append(Setting(param=param, value=float(v), steering=st, b=b if math.isfinite(b) else None,
                               skipped=reason))
    return out


# ---------------------------------------------------------------------------------------------- scoring


def _has_references(examples: Sequence[Example]) -> bool:
    return all(ex.reference for ex in examples)


def score_folder(folder: Path, examples: Sequence[Example], reward: Any = None) -> tuple[str, float | None, dict]:
    """(metric, value, costeer summary) for one cached b."""
    metrics = compute_metrics(folder, examples, reward=reward)
    summary = dict(metrics["methods"]["costeer"])
    if not _has_references(examples):
        key = headline_metrics(metrics)[0]
        return key, summary.get(key), summary
    return "rougeL", summary.get("rougeL"), summary


# ---------------------------------------------------------------------------------------------- sweep


def run_sweep(
    cs: "CoSteer",
    examples: Sequence[Example],
    out_dir: str | Path,
    params: Iterable[str] | None = None,
    grids: dict[str, Sequence[float]] | None = None,
    base: SteeringConfig | None = None,
    sampling: SamplingConfig | None = None,
    *,
    data: str | Path | None = None,
    limit: int | None = None,
    models: dict[str, str | None] | None = None,
    reward: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sweep ``params`` (default all five) over ``grids`` (default :data:`DEFAULT_GRIDS`) around ``base``
    (default the paper's defaults) and write sweep.json / sweep.csv / sweep.png. Returns sweep.json's content.

    Generations are cached by (example id, rounded b) in ``<out>/cache/b=<b>/costeer.jsonl``: each distinct
    b is generated once however many settings share it, and a rerun only generates what is missing."""
    if not examples:
        raise ValueError("no examples to run")
    given = {parse_params([k])[0]: list(v) for k, v in (grids or {}).items()}  # accepts "lambda" too
    names = parse_params(params) if params is not None else list(given or DEFAULT_GRIDS)
    grids = {p: given.get(p, DEFAULT_GRIDS[p]) for p in names}
    base = base or SteeringConfig()
    sampling = sampling or cs.config.sampling
    check_models(cs, [Method.costeer])
    check_scorable(examples)
    out = Path(out_dir)
    spec = RunSpec(kind="sweep", task=examples[0].task, preference=examples[0].preference,
                   data=str(Path(data).resolve()) if data is not None else None,
                   **(models or default_models(cs)), steering=None, sampling=sampling)
    claim_folder(out, spec, [Method.costeer.value], limit)

    settings = make_settings(grids, base)
    runnable: dict[str, Setting] = {}  # b key -> the first setting with that b (the one generated)
    for s in settings:
        if s.skipped is None:
            runnable.setdefault(s.b_key, s)
    folders = {k: out / "cache" / f"b={k}" for k in runnable}
    pending = {}
    for k, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        pending[k] = [ex for ex in examples if ex.id not in done_ids(folder / "costeer.jsonl")]
    with progress_bar(sum(map(len, pending.values())), "sweep", progress) as bar:
        for k, todo in pending.items():
            bar.set_postfix_str(f"b={float(k):.3g}")
            append_generations(cs, todo, Method.costeer, folders[k] / "costeer.jsonl",
                               runnable[k].steering, sampling, bar)

    scores = {k: score_folder(f, examples, reward) for k, f in folders.items()}
    metric = next(iter(scores.values()))[0] if scores else ("rougeL" if _has_references(examples) else None)
    for s in settings:
        if s.skipped is None:
            _, s.score, s.summary = scores[s.b_key]
    result = {
        "task": spec.task,
        "preference": spec.preference,
        "metric": metric,
        "n_examples": len(examples),
        "base": base.model_dump(),
        "grids": {p: list(v) for p, v in grids.items()},
        "distinct_coefficients": len(folders),
        "settings": [s.model_dump() for s in settings],
    }
    write_sweep(out, result, settings)
    return result


def write_sweep(out: Path, result: dict[str, Any], settings: Sequence[Setting]) -> dict[str, Path]:
    paths = {"json": out / "sweep.json", "csv": out / "sweep.csv", "png": out / "sweep.png"}
    paths["json"].write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["param", "value", "T", "alpha", "beta", "lam", "eta", "b", result["metric"] or "score", "skipped"])
        for s in settings:
            st = s.steering
            w.writerow([s.param, s.value, st.T, st.alpha, st.beta, st.lam, st.eta, repr(s.b),
                        "" if s.score is None else repr(s.score), s.skipped or ""])
    plot_sweep(result, settings, paths["png"])
    return paths


def plot_sweep(result: dict[str, Any], settings: Sequence[Setting], path: Path) -> None:
    # Agg canvas without pyplot (as report.plot_bars): no global backend, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    params = list(result["grids"])
    key = result["metric"]
    info = METRICS.get(key) if key else None
    scale = info.scale if info else 1.0
    fig = Figure(figsize=(3.0 * len(params), 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    base = result["base"]
    for ax, p in zip(axes, params):
        points = [s for s in settings if s.param == p]
        # Even spacing with the values as labels: the grids are roughly geometric and λ includes 0.
        xs = [i for i, s in enumerate(points) if s.score is not None]
        ys = [points[i].score * scale for i in xs]
        ax.plot(xs, ys, marker="o", color="C0")
        for i, s in enumerate(points):
            if s.value == base[p] and s.score is not None:
                ax.plot([i], [s.score * scale], marker="o", color="C3", zorder=3)
        ax.set_xticks(range(len(points)), [f"{s.value:g}" for s in points], fontsize=8)
        skipped = sum(1 for s in points if s.skipped)
        ax.set_xlabel(SYMBOLS[p] + (f"  ({skipped} skipped)" if skipped else ""))
        ax.grid(alpha=0.3)
    label = (info.label + (" ×100" if scale != 1 else "")) if info else (key or "score")
    axes[0].set_ylabel(label)
    title = result["task"] + (f" ({result['preference']})" if result.get("preference") else "")
    fig.suptitle(f"{title}: costeer {label} vs one hyper-parameter (red: default)", fontsize=9)
    fig.savefig(path, dpi=120)
