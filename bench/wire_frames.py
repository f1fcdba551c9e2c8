"""Bytes per token and fidelity of the cloud frames against full-vocabulary fusion.

    python bench/wire_frames.py [--llm smollm2-135m-instruct] [--slm ...] [--tokens 64]
        [--k 8,32,128,256] [--tails slm,uniform] [--values f16,packed] [--floor -12]
        [--cogenesis N] [--skip N] [--no-persona] [--free]

For each prompt (the example persona, plus the first N CoGenesis rows with --cogenesis) it
runs CoSteer in-process once, keeping every step's LLM log-probabilities and SLM pair. Then
for each (k, tail, values) it sends each step's LLM vector through the same code as the
socket (frames.encode_dist -> decode_downlink -> densify, the tail spread by the device's
SLM or uniformly) and fuses again. `--values packed` sends packed frames instead
(frames.encode_packed: every token down to --floor, at most k of them). It reports:
  - bytes/token: the DIST payload; entries: the tokens a frame holds (mean);
  - top-1 agreement: the share of steps (on the reference trajectory) where the fused argmax
    equals the full-vocabulary one;
  - mean KL(full || top-k) of the fused distributions;
  - with --free: whether a free-running greedy generation through the frames is identical.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from costeer import frames  # noqa: E402
from costeer.api import CoSteer  # noqa: E402
from costeer.device.ahead import SteeringAhead  # noqa: E402
from costeer.engine.config import Method, SamplingConfig  # noqa: E402
from costeer.engine.fusion import paper_pipeline  # noqa: E402
from costeer.engine.loop import DecodePlan, LocalModelSource, LocalSteeringSource, decode  # noqa: E402
from costeer.engine.models import load_lm  # noqa: E402
from costeer.engine.prompts import render_context  # noqa: E402
from costeer.steering import fuse  # noqa: E402


class Recording(LocalModelSource):
    def __init__(self, lm, prompt_ids):
        super().__init__(lm, prompt_ids)
        self.seen: list[torch.Tensor] = []

    def start(self):
        self.seen.append(super().start())
        return self.seen[-1]

    def advance(self, token_id):
        self.seen.append(super().advance(token_id))
        return self.seen[-1]


class RecordingPair(LocalSteeringSource):
    def __init__(self, lm, prompts):
        super().__init__(lm, prompts)
        self.seen: list[torch.Tensor] = []

    def start(self):
        self.seen.append(super().start())
        return self.seen[-1]

    def advance(self, token_id):
        self.seen.append(super().advance(token_id))
        return self.seen[-1]


class Framed(LocalModelSource):
    """The in-process LLM squeezed through a DIST frame (for the free-running check)."""

    def __init__(self, lm, prompt_ids, k, values, ahead, tail, floor):
        super().__init__(lm, prompt_ids)
        self.k, self.values, self.ahead, self.tail, self.pos, self.floor = k, values, ahead, tail, 0, floor

    def _wire(self, logp):
        dist = frames.decode_downlink(encode(logp, self.k, self.pos, self.values, self.floor))
        return frames.densify(dist, self.ahead.reference() if self.tail == "slm" and not dist.full else None)

    def start(self):
        logp = super().start()
        self.ahead.run_start()
        return self._wire(logp)

    def advance(self, token_id):
        logp = super().advance(token_id)
        self.pos += 1
        self.ahead.run_advance(token_id)
        return self._wire(logp)


def encode(logp, k, position, values, floor):
    """What the cloud's session sends (cloud/sessions.py: Registry._frame)."""
    if values == "packed" and k != frames.FULL:
        return frames.encode_packed(logp, k, position, floor)
    return frames.encode_dist(logp, k, position, "f16" if values == "packed" else values)


def prompts_of(cs, query, ctx, context_message=None):
    p = cs.prompts(query, ctx, context_message)
    return p["llm"], (p["slm"], p["slm_context"])


def record(cs, llm_prompt, slm_prompts, n, b):
    src, pair = Recording(cs.llm, llm_prompt), RecordingPair(cs.slm, slm_prompts)
    plan = DecodePlan(src, cs.vocab(), SamplingConfig(max_new_tokens=n), pair, paper_pipeline(b))
    ids = [s.token_id for s in decode(plan)]
    return ids, src.seen, pair.seen


def fidelity(cs, steps_llm, steps_pair, k, values, tail, b, floor):
    vocab = cs.vocab()
    ahead = SteeringAhead(None, vocab, cs.llm.vocab_size)
    agree, kl, nbytes, entries = 0, 0.0, 0, 0
    for i, (logp, pair) in enumerate(zip(steps_llm, steps_pair)):
        slm = vocab.slm_view(pair)
        full = fuse(vocab.llm_view(logp), slm[1], slm[0], b)
        data = encode(logp, k, i, values, floor)
        nbytes += len(data)
        dist = frames.decode_downlink(data)
        entries += dist.vocab_size if dist.full else int(dist.ids.numel())
        ahead.pair = pair
        dense = frames.densify(dist, ahead.reference() if tail == "slm" else None)
        approx = fuse(vocab.llm_view(dense), slm[1], slm[0], b)
        agree += int(approx.argmax() == full.argmax())
        p = full.double().exp()
        kl += float((p * (full.double() - approx.double())).nan_to_num(0.0).sum())
    n = len(steps_llm)
    return nbytes / n, agree / n, kl / n, entries / n


def free_running(cs, llm_prompt, slm_prompts, n, b, k, values, tail, floor):
    vocab = cs.vocab()
    ahead = SteeringAhead(LocalSteeringSource(cs.slm, slm_prompts), vocab, cs.llm.vocab_size)
    src = Framed(cs.llm, llm_prompt, k, values, ahead, tail, floor)
    plan = DecodePlan(src, vocab, SamplingConfig(max_new_tokens=n), ahead, paper_pipeline(b))
    return [s.token_id for s in decode(plan)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", default="smollm2-135m-instruct")
    ap.add_argument("--slm", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--k", default="8,32,128,256")
    ap.add_argument("--tails", default="slm,uniform")
    ap.add_argument("--values", default="f16", help="comma-separated: f16, f32, packed")
    ap.add_argument("--floor", type=float, default=frames.PACKED_FLOOR, help="packed frames: the log-probability floor")
    ap.add_argument("--cogenesis", type=int, default=0, help="also the first N rows of ../shared/datasets/cogenesis.jsonl")
    ap.add_argument("--skip", type=int, default=0, help="start after the first N CoGenesis rows (held-out rows)")
    ap.add_argument("--no-persona", action="store_true", help="CoGenesis rows only")
    ap.add_argument("--free", action="store_true", help="also run free-running greedy generations through the frames")
    a = ap.parse_args()

    llm = load_lm(a.llm, "cpu")
    cs = CoSteer(llm, llm if a.slm == a.llm else load_lm(a.slm, "cpu"))
    b = cs.config.steering.coefficient(Method.costeer)
    persona = yaml.safe_load((ROOT / "src/costeer/examples/persona.yaml").read_text())
    items = [] if a.no_persona else [("persona", *prompts_of(cs, persona["query"], render_context(persona["profile"])))]
    if a.cogenesis:
        from costeer.eval.tasks import load_task

        rows = load_task("cogenesis", ROOT.parent / "shared/datasets/cogenesis.jsonl", limit=a.skip + a.cogenesis)
        for ex in rows[a.skip :]:
            items.append((ex.id, *prompts_of(cs, ex.query, ex.context, ex.with_context_prompt())))

    recorded = []
    for name, lp, sp in items:
        ids, sl, spair = record(cs, lp, sp, a.tokens, b)
        recorded.append((name, lp, sp, ids, sl, spair))
    steps = sum(len(r[4]) for r in recorded)
    print(f"{a.llm} / {a.slm}: V={llm.vocab_size}, full float32 vector {4 * llm.vocab_size} bytes; "
          f"{len(items)} prompt(s), {steps} steps on the reference trajectories")  # fmt: skip
    head = f"{'k':>5} {'tail':>8} {'values':>6} {'bytes/token':>11} {'entries':>8} {'top-1 agree':>11} {'mean KL':>9}"
    print(head + ("  identical (free-running)" if a.free else ""))
    for kk in a.k.split(","):
        k = frames.FULL if kk == "full" else int(kk)
        for tail in a.tails.split(",") if k else ["-"]:
            for values in a.values.split(","):
                tot_b = tot_a = tot_kl = tot_e = 0.0
                for _, _, _, _, sl, spair in recorded:
                    nb, ag, kl, ne = fidelity(cs, sl, spair, k, values, tail, b, a.floor)
                    tot_b += nb * len(sl)
                    tot_a += ag * len(sl)
                    tot_kl += kl * len(sl)
                    tot_e += ne * len(sl)
                line = (f"{kk:>5} {tail:>8} {values:>6} {tot_b / steps:>11.0f} {tot_e / steps:>8.0f} "
                        f"{100 * tot_a / steps:>10.2f}% {tot_kl / steps:>9.2e}")  # fmt: skip
                if a.free:
                    same = sum(free_running(cs, lp, sp, a.tokens, b, k, values, tail, a.floor) == ids
                               for _, lp, sp, ids, _, _ in recorded)  # fmt: skip
                    line += f"  {same}/{len(recorded)}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
