"""The confidence gate against personalisation: `costeer` on CoGenesis with the gate off and at
a few thresholds, on the same rows; how often it fires and what it does to the metrics.

    python bench/gate_eval.py [--gates 0.5,0.9] [--rows 12] [--pair smollm2] [--out runs/gate]

Each threshold is one resumable `costeer eval` folder. The gate's firing rate comes from the
generations' own records (`timing.gated_tokens`); decode speed is in bench/throughput.py (the
run folders' timings share the machine with whatever else runs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from throughput import PAIRS, parse_cogenesis_args  # noqa: E402  (bench/ is on sys.path when a bench script runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gates", default="0.5,0.9")
    args = parse_cogenesis_args(ap, ROOT / "runs/gate")

    from costeer.api import CoSteer
    from costeer.engine.config import GenerationConfig, SamplingConfig, SteeringConfig
    from costeer.eval.runner import run_eval
    from costeer.eval.tasks import load_task

    llm, slm = PAIRS[args.pair]
    sampling = SamplingConfig(max_new_tokens=args.tokens)
    cs = CoSteer.load(llm, slm, GenerationConfig(sampling=sampling), device="cpu", backend=args.backend)
    examples = load_task("cogenesis", args.data, limit=args.rows)
    models = {"llm": f"{llm} [{cs.llm.backend}]", "slm": f"{slm} [{cs.slm.backend}]"}
    rows = []
    for gate in [None, *(float(g) for g in args.gates.split(",") if g)]:
        folder = args.out / args.pair / ("off" if gate is None else f"gate{gate}")
        methods = ["llm", "slm_context", "costeer"] if gate is None else ["costeer"]
        m = run_eval(cs, examples, methods, folder, SteeringConfig(gate=gate), sampling, data=args.data,
                     limit=args.rows, models=models)["methods"]  # fmt: skip
        recs = [json.loads(line) for line in (folder / "costeer.jsonl").read_text().splitlines() if line.strip()]
        fired = sum(r["timing"].get("gated_tokens", 0) for r in recs) / max(1, sum(r["n_tokens"] for r in recs))
        if gate is None:
            rows += [("llm", None, m["llm"]), ("slm_context", None, m["slm_context"])]
        rows.append(("costeer" + ("" if gate is None else f", gate {gate}"), fired, m["costeer"]))
    print(f"CoGenesis, first {args.rows} rows, {llm} / {slm}, {args.backend}, greedy, {args.tokens} tokens\n")
    print("| method | gate fired | ROUGE-L | detail recall | degenerate | words |\n|---|---:|---:|---:|---:|---:|")
    for name, fired, s in rows:
        fired_s = "–" if fired is None else f"{fired:.0%}"
        print(f"| {name} | {fired_s} | {s['rougeL']:.3f} | {s['detail_recall']:.3f} | {s['degenerate']:.2f} | "
              f"{s['length_words']:.1f} |")


if __name__ == "__main__":
    main()
