"""The hyper-parameter sweep: one generation per distinct b, skipped overflows, files written."""

from __future__ import annotations

import csv
import json
import math

import pytest

from costeer.engine.config import Method, SteeringConfig
from costeer.eval.sweep import DEFAULT_GRIDS, make_settings, parse_params, run_sweep, skip_reason
from costeer.eval.tasks import load_task, sample_path



def test_default_grids_cover_the_papers_ranges_and_defaults():
    d = SteeringConfig()
    assert (min(DEFAULT_GRIDS["alpha"]), max(DEFAULT_GRIDS["alpha"])) == (0.1, 5.0)
    assert (min(DEFAULT_GRIDS["lam"]), max(DEFAULT_GRIDS["lam"])) == (0.0, 5.0)
    assert (min(DEFAULT_GRIDS["eta"]), max(DEFAULT_GRIDS["eta"])) == (2.0, 20.0)
    assert (min(DEFAULT_GRIDS["T"]), max(DEFAULT_GRIDS["T"])) == (1, 100)
    for p, grid in DEFAULT_GRIDS.items():
        assert 4 <= len(grid) <= 6 and getattr(d, p) in grid


def test_settings_vary_one_parameter_and_share_b():
    settings = make_settings(DEFAULT_GRIDS, SteeringConfig())
    assert len(settings) == sum(map(len, DEFAULT_GRIDS.values()))
    defaults = [s for s in settings if s.steering == SteeringConfig()]
    assert len(defaults) == 5 and len({s.b_key for s in defaults}) == 1  # the default, once per grid
    lam0 = next(s for s in settings if s.param == "lam" and s.value == 0)
    assert lam0.skipped is None and 1e25 < lam0.b < 1e28  # huge but finite: it runs
    for s in settings:
        others = {k: v for k, v in s.steering.model_dump().items() if k != s.param}
        assert others == {k: v for k, v in SteeringConfig().model_dump().items() if k != s.param}


def test_skip_reason():
    assert skip_reason(1.78) is None and skip_reason(3e26) is None
    assert "not finite" in skip_reason(math.inf) and "not finite" in skip_reason(math.nan)
    assert "overflows" in skip_reason(1e60)
    s = make_settings({"T": [100]}, SteeringConfig(lam=0.0))[0]  # b ≈ 7e133
    assert s.skipped and "overflows" in s.skipped


def test_parse_params():
    assert parse_params(["lambda", "T", "alpha", "t"]) == ["lam", "T", "alpha"]
    with pytest.raises(ValueError, match="unknown sweep parameter 'gamma'"):
        parse_params(["gamma"])


def test_sweep_generates_each_b_once_and_writes_files(counting, tmp_path):
    exs = load_task("cogenesis", sample_path("cogenesis"))
    grids = {"T": [1, 20], "alpha": [2.0, 3.0], "lam": [0.0]}
    out = run_sweep(counting, exs, tmp_path, grids=grids, data=sample_path("cogenesis"), progress=False)
    # settings: T=1, T=20 (default), α=2 (default again), α=3, λ=0 -> 4 distinct b
    assert out["distinct_coefficients"] == 4
    assert len(counting.calls) == 4 * len(exs)
    assert {m for m, _ in counting.calls} == {Method.costeer.value}
    assert out["metric"] == "rougeL"
    by = {(s["param"], s["value"]): s for s in out["settings"]}
    assert by[("T", 20.0)]["score"] == by[("alpha", 2.0)]["score"] is not None
    assert all(0 <= s["score"] <= 1 for s in out["settings"])
    for name in ("sweep.json", "sweep.csv", "sweep.png", "run.json"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "sweep.json").read_text())["grids"] == {k: list(v) for k, v in grids.items()}
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert len(rows) == 5 and rows[0]["param"] == "T"

    # a rerun (or a wider sweep) reuses the cache: only new b values are generated
    counting.calls.clear()
    run_sweep(counting, exs, tmp_path, grids={**grids, "beta": [1.0, 2.0]}, data=sample_path("cogenesis"),
              progress=False)
    assert len(counting.calls) == len(exs)  # β=2 is new; β=1 is the default again


def test_skipped_setting_is_recorded_not_run(counting, tmp_path):
    exs = load_task("cogenesis", sample_path("cogenesis"), limit=1)
    out = run_sweep(counting, exs, tmp_path, grids={"T": [1, 100]}, base=SteeringConfig(lam=0.0), progress=False)
    skipped = [s for s in out["settings"] if s["skipped"]]
    assert [s["value"] for s in skipped] == [100.0] and skipped[0]["score"] is None
    assert len(counting.calls) == 1 and (tmp_path / "sweep.png").is_file()


def test_preference_sweep_scores_the_proxy(counting, tmp_path):
    exs = load_task("helpsteer", sample_path("helpsteer"), preference="concise", limit=2)
    out = run_sweep(counting, exs, tmp_path, grids={"lambda": [2.0, 5.0]}, progress=False)
    assert out["metric"] == "length_words" and list(out["grids"]) == ["lam"]
    assert all(isinstance(s["score"], float) for s in out["settings"])


def test_longlamp_sweep_uses_report_rouge(counting, tmp_path, needs_wordnet):
    exs = load_task("longlamp_abstract", sample_path("longlamp_abstract"), limit=1)
    out = run_sweep(counting, exs, tmp_path, grids={"eta": [10.0]}, progress=False)
    s = out["settings"][0]
    assert out["metric"] == "rougeL" and s["score"] == s["summary"]["rougeL"] and "meteor" in s["summary"]
