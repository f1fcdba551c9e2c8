"""Sweep the steering variants' parameters on CoGenesis: the trust region's ε and the plausible
head's τ, next to the paper's update (ε = ∞, τ = 0) and the two baselines.

    python bench/variant_sweep.py [--pair smollm2|gemma] [--rows 20] [--tokens 64] [--out runs/variant-sweep]

Each setting is one resumable run folder (`costeer eval` format) under --out; the plot
(ROUGE-L, personal-detail recall and the degeneration share against ε and τ, the baselines as
horizontal lines) goes to docs/img/variant-sweep-<pair>.png.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from throughput import PAIRS, parse_cogenesis_args  # noqa: E402  (bench/ is on sys.path when a bench script runs)
EPSILONS = (0.25, 0.5, 1.0, 2.0, math.inf)  # ∞: the paper's update (taken from the `costeer` run)
TAUS = (0.0, 0.001, 0.01, 0.1)  # 0: the paper's update
METRICS = (("rougeL", "ROUGE-L"), ("detail_recall", "personal-detail recall"), ("degenerate", "degenerate share"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parse_cogenesis_args(ap, ROOT / "runs/variant-sweep")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from costeer.api import CoSteer
    from costeer.engine.config import GenerationConfig, SamplingConfig, SteeringConfig, VariantConfig
    from costeer.eval.runner import run_eval
    from costeer.eval.tasks import load_task

    llm, slm = PAIRS[args.pair]
    sampling = SamplingConfig(max_new_tokens=args.tokens)
    cs = CoSteer.load(llm, slm, GenerationConfig(sampling=sampling), device="cpu", backend=args.backend)
    examples = load_task("cogenesis", args.data, limit=args.rows)
    out = args.out / args.pair
    models = {"llm": f"{llm} [{cs.llm.backend}]", "slm": f"{slm} [{cs.slm.backend}]"}

    def run(name, methods, variant=None):
        steering = SteeringConfig(variant=variant) if variant else SteeringConfig()
        return run_eval(cs, examples, methods, out / name, steering, sampling, data=args.data, limit=args.rows,
                        models=models)["methods"]  # fmt: skip

    base = run("baselines", ["llm", "slm_context", "costeer"])
    # the no-repeat guard off, so each curve shows its own stage alone
    # ε = ∞ and τ = 0 are the paper's update bit for bit (tests/steering/test_variants.py): the costeer run
    eps = [run(f"trust-eps{e}", ["costeer_trust"], VariantConfig(epsilon=e))["costeer_trust"]
           if math.isfinite(e) else base["costeer"] for e in EPSILONS]
    tau = [run(f"plausible-tau{t}", ["costeer_plausible"], VariantConfig(tau=t))["costeer_plausible"]
           if t > 0 else base["costeer"] for t in TAUS]

    # the repetition guard alone on the paper's update (no head, no trust region)
    guard = run("guard-only", ["costeer_guarded"], VariantConfig(tau=0.0, epsilon=None))["costeer_guarded"]

    fig, axes = plt.subplots(2, len(METRICS), figsize=(4.2 * len(METRICS), 7), squeeze=False)
    xs_eps = [e if math.isfinite(e) else 4.0 for e in EPSILONS]
    xs_tau = [t if t > 0 else 3e-4 for t in TAUS]
    for col, (key, label) in enumerate(METRICS):
        for row, (xs, series, xlabel) in enumerate(((xs_eps, eps, "trust region ε (nats; right: ∞ = the paper)"),
                                                    (xs_tau, tau, "plausible head τ (left: 0 = the paper)"))):
            ax = axes[row][col]
            ax.plot(xs, [s[key] for s in series], "o-", color="C0", label="variant")
            for name, style in (("llm", "C1--"), ("slm_context", "C2:"), ("costeer", "C3-.")):
                ax.axhline(base[name][key], color=style[:2], linestyle=style[2:], label=name)
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"CoGenesis, {args.rows} rows, {llm} / {slm}, greedy, {args.tokens} tokens "
                 f"(T=20, α=2, β=1, λ=2, η=10)")
    fig.tight_layout()
    img = ROOT / "docs/img" / f"variant-sweep-{args.pair}.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(img, dpi=110)
    print(f"wrote {img}")
    print("| setting | ROUGE-L | detail recall | degenerate |\n|---|---:|---:|---:|")
    for name in ("llm", "slm_context", "costeer"):
        s = base[name]
        print(f"| {name} | {s['rougeL']:.3f} | {s['detail_recall']:.3f} | {s['degenerate']:.2f} |")
    for e, s in zip(EPSILONS, eps):
        print(f"| costeer_trust ε={e} | {s['rougeL']:.3f} | {s['detail_recall']:.3f} | {s['degenerate']:.2f} |")
    for t, s in zip(TAUS, tau):
        print(f"| costeer_plausible τ={t} | {s['rougeL']:.3f} | {s['detail_recall']:.3f} | {s['degenerate']:.2f} |")
    print(f"| costeer + guard only (τ=0, ε=∞) | {guard['rougeL']:.3f} | {guard['detail_recall']:.3f} | "
          f"{guard['degenerate']:.2f} |")


if __name__ == "__main__":
    main()
