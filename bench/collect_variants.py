"""Summarise the steering-variants suite (bench/variants_suite.sh) into the tables of
docs/results.md, with the issue's acceptance checks per variant and pair.

    python bench/collect_variants.py [runs/variants]

Checks (per pair; a variant must pass all of them on both pairs):
  CoGenesis   ROUGE-L ≥ llm's, and personal-detail recall ≥ slm_context's;
  preference  concise ≥ 30% shorter than llm, verbose ≥ 30% longer (mean words);
  degeneration (share of responses with a repeated-4-gram loop) ≤ llm's on every run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEERED = ("costeer", "costeer_plausible", "costeer_trust", "costeer_plausible_trust", "costeer_guarded",
           "costeer_matched")
ORDER = ("llm", "slm_context", *STEERED)


def load(root: Path) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for p in sorted(root.glob("*/*/metrics.json")):
        out.setdefault(p.parent.parent.name, {})[p.parent.name] = json.loads(p.read_text())
    return out


def fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def cogenesis_table(m: dict) -> str:
    rows = [f"{m['n_examples']} rows.\n",
            "| method | ROUGE-1 | ROUGE-L | detail recall | words | degenerate | distinct-2 |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for k in ORDER:
        s = m["methods"].get(k)
        if s:
            rows.append(f"| {k} | {fmt(s.get('rouge1'))} | {fmt(s.get('rougeL'))} | {fmt(s.get('detail_recall'))} | "
                        f"{fmt(s.get('length_words'), 1)} | {fmt(s.get('degenerate'), 2)} | {fmt(s.get('distinct2'))} |")
    return "\n".join(rows)


def present(runs: dict[str, dict]) -> list[str]:
    """The methods that some run of this pair has, in ORDER."""
    return [k for k in ORDER if any(k in m["methods"] for m in runs.values())]


def length_table(runs: dict[str, dict]) -> str:
    ORDER = present(runs)  # noqa: N806
    rows = ["| run | rows | " + " | ".join(ORDER) + " |", "|---|---:|" + "---:|" * len(ORDER)]
    for name, m in runs.items():
        if m["family"] != "preference":
            continue
        w = {k: m["methods"][k].get("length_words") for k in ORDER if k in m["methods"]}
        llm = w.get("llm")
        cells = []
        for k in ORDER:
            if w.get(k) is None:
                cells.append("–")
            elif k == "llm" or not llm:
                cells.append(fmt(w[k], 1))
            else:
                cells.append(f"{w[k]:.1f} ({w[k] / llm - 1:+.0%})")
        rows.append(f"| {name} | {m['n_examples']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def degeneration_table(runs: dict[str, dict]) -> str:
    ORDER = present(runs)  # noqa: N806
    rows = ["| run | " + " | ".join(ORDER) + " |", "|---|" + "---:|" * len(ORDER)]
    for name, m in runs.items():
        rows.append(f"| {name} | " + " | ".join(fmt(m["methods"].get(k, {}).get("degenerate"), 2) for k in ORDER) + " |")
    return "\n".join(rows)


def checks(runs: dict[str, dict], method: str) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {}
    cg = runs.get("cogenesis")
    if cg and method in cg["methods"]:
        s, m = cg["methods"], cg["methods"][method]
        out["ROUGE-L ≥ llm"] = m["rougeL"] >= s["llm"]["rougeL"]
        out["recall ≥ slm_context"] = m["detail_recall"] >= s["slm_context"]["detail_recall"]
    for pref, sign in (("concise", -1), ("verbose", 1)):
        rel = [r["methods"][method]["length_words"] / r["methods"]["llm"]["length_words"] - 1
               for r in runs.values() if r.get("preference") == pref and method in r["methods"]]
        out[f"{pref} {'≤ −30%' if sign < 0 else '≥ +30%'}"] = (all(sign * x >= 0.30 for x in rel) if rel else None)
    deg = [r["methods"][method]["degenerate"] <= r["methods"]["llm"]["degenerate"]
           for r in runs.values() if method in r["methods"]]
    out["degeneration ≤ llm"] = all(deg) if deg else None
    return out


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/variants")
    pairs = load(root)
    if not pairs:
        sys.exit(f"error: no metrics.json under {root}/*/")
    names = {"smollm2": "SmolLM2-135M / SmolLM2-135M", "gemma": "Gemma-3-270m / SmolLM2-135M"}
    for pair, runs in pairs.items():
        print(f"## {names.get(pair, pair)}\n")
        if "cogenesis" in runs:
            print("### CoGenesis\n")
            print(cogenesis_table(runs["cogenesis"]), "\n")
        print("### Preference alignment: mean words (change against llm)\n")
        print(length_table(runs), "\n")
        print("### Degeneration: share of responses with a repeated 4-gram loop\n")
        print(degeneration_table(runs), "\n")
    print("## Acceptance checks (✓ on both pairs needed)\n")
    crit = list(checks(next(iter(pairs.values())), "costeer"))
    print("| method | " + " | ".join(crit) + " |")
    print("|---|" + "---|" * len(crit))
    tried = {k for runs in pairs.values() for k in present(runs)}
    for method in (m for m in STEERED if m in tried):
        cells = []
        for c in crit:
            marks = []
            for pair, runs in pairs.items():
                v = checks(runs, method).get(c)
                marks.append(f"{pair}: {'–' if v is None else ('✓' if v else '✗')}")
            cells.append(", ".join(marks))
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
