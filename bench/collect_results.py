"""Summarise an evaluation suite (bench/eval_suite.sh) into the tables of docs/results.md.

    python bench/collect_results.py [runs/eval-suite]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ("llm", "slm", "slm_context", "light", "costeer", "llm_context")


def load(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/metrics.json"))}


def fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def cogenesis_table(m: dict) -> str:
    rows = ["| method | ROUGE-1 | ROUGE-L | detail recall | detail precision | words | degenerate | distinct-2 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ORDER:
        s = m["methods"].get(name)
        if s:
            rows.append(f"| {name} | {fmt(s.get('rouge1'))} | {fmt(s.get('rougeL'))} | {fmt(s.get('detail_recall'))} | "
                        f"{fmt(s.get('detail_precision'))} | {fmt(s.get('length_words'), 1)} | "
                        f"{fmt(s.get('degenerate'), 2)} | {fmt(s.get('distinct2'))} |")
    return "\n".join(rows)


def preference_table(runs: dict[str, dict]) -> str:
    head = "| dataset | preference | " + " | ".join(ORDER) + " | costeer vs llm | light vs llm |"
    rows = [head, "|---|---|" + "---:|" * (len(ORDER) + 2)]
    for name, m in runs.items():
        if m["family"] != "preference":
            continue
        words = {k: m["methods"][k].get("length_words") for k in ORDER if k in m["methods"]}
        llm = words.get("llm") or float("nan")
        rel = lambda k: f"{(words[k] / llm - 1):+.0%}" if words.get(k) is not None else "–"  # noqa: E731
        rows.append(f"| {m['task']} | {m['preference']} | " + " | ".join(fmt(words.get(k), 1) for k in ORDER)
                    + f" | {rel('costeer')} | {rel('light')} |")
    return "\n".join(rows)


def degeneration_table(runs: dict[str, dict]) -> str:
    rows = ["| run | " + " | ".join(ORDER) + " |", "|---|" + "---:|" * len(ORDER)]
    for name, m in runs.items():
        rows.append(f"| {name} | " + " | ".join(fmt(m['methods'].get(k, {}).get('degenerate'), 2) for k in ORDER) + " |")
    return "\n".join(rows)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/eval-suite")
    runs = load(root)
    if not runs:
        sys.exit(f"error: no metrics.json under {root}")
    if "cogenesis" in runs:
        print("### CoGenesis\n")
        print(cogenesis_table(runs["cogenesis"]), "\n")
    print("### Preference alignment: mean length in words\n")
    print(preference_table(runs), "\n")
    print("### Degeneration: share of responses with a repetition loop\n")
    print(degeneration_table(runs))


if __name__ == "__main__":
    main()
