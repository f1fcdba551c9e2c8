"""Greedy agreement between two backends (or any two run folders of the same task and rows):
per method, the share of rows whose whole output is identical, and the mean share of tokens
generated before the outputs first differ.

    python bench/backend_agreement.py RUN_A RUN_B [RUN_A2 RUN_B2 ...]

e.g. runs/eval-suite/cogenesis (transformers) against runs/variants/smollm2/cogenesis (llama.cpp):
same pair, same rows, greedy, 64 new tokens; rows present in both folders are compared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def outputs(run: Path, method: str) -> dict[str, list[int]]:
    path = run / f"{method}.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a truncated last line
        out[rec["id"]] = rec["token_ids"]
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(a: Path, b: Path) -> list[dict]:
    rows = []
    for path in sorted(a.glob("*.jsonl")):
        method = path.stem
        x, y = outputs(a, method), outputs(b, method)
        ids = sorted(set(x) & set(y))
        if not ids:
            continue
        same = sum(x[i] == y[i] for i in ids)
        prefix = [common_prefix(x[i], y[i]) / max(1, max(len(x[i]), len(y[i]))) for i in ids]
        first = sum(bool(x[i]) and bool(y[i]) and x[i][0] == y[i][0] for i in ids)
        rows.append({"run": a.name, "method": method, "rows": len(ids), "identical": same / len(ids),
                     "first_token": first / len(ids), "prefix_share": sum(prefix) / len(prefix)})  # fmt: skip
    return rows


def main() -> None:
    args = [Path(p) for p in sys.argv[1:]]
    if len(args) < 2 or len(args) % 2:
        sys.exit("usage: backend_agreement.py RUN_A RUN_B [RUN_A2 RUN_B2 ...]")
    print("| run | method | rows | identical outputs | same first token | tokens before first difference |")
    print("|---|---|---:|---:|---:|---:|")
    for a, b in zip(args[::2], args[1::2]):
        for r in compare(a, b):
            print(f"| {r['run']} | {r['method']} | {r['rows']} | {r['identical']:.0%} | {r['first_token']:.0%} | "
                  f"{r['prefix_share']:.0%} |")


if __name__ == "__main__":
    main()
