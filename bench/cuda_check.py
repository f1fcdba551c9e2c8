"""The CUDA code path, checked without model weights: random-weight models built in the script.

    python bench/cuda_check.py [--out bench/out/cuda_check.json] [--tokens 64] [--runs 5]

1. Every method on both tiny pairs (one tokenizer; two tokenizers on the vocabulary intersection),
   greedy, on the GPU and on the CPU: the same tokens. The heads are sharpened so that no two tokens tie
   within float32 rounding, which would let the two devices legitimately pick different ones.
2. Every fusion pipeline on random log-probabilities at V = 49,152 (SmolLM2) and 262,144 (Gemma-3): the
   GPU's policy against the CPU's, and its time per token.
3. The split with the cloud's LLM on the GPU (uvicorn in a thread, full and packed frames): the device gets
   the in-process tokens.
4. Decode speed of a random model with SmolLM2-135M's shape: `llm` against `costeer` (three sequences) on
   the transformers backend, median of --runs.

Needs a CUDA device (exit 2 without one). It imports the tests' tiny models, so run it from the repository.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from costeer.api import CoSteer  # noqa: E402
from costeer.engine.config import STEERING_STAGES, Method, SamplingConfig, SteeringConfig  # noqa: E402
from costeer.engine.fusion import fusion_pipeline  # noqa: E402
from costeer.engine.loop import DecodePlan, LocalModelSource, LocalSteeringSource, decode  # noqa: E402
from costeer.engine.models import LM  # noqa: E402
from costeer.engine.vocab import VocabMap  # noqa: E402
from tests.tiny import bpe_tokenizer, gemma3, llama, make_lm, sp_tokenizer  # noqa: E402

QUERY = "what should I cook tonight"
CONTEXT = "my name is Sam and I live in Seattle with my dog Biscuit; I like spicy tofu and lentils"
DEVICE = "cuda"  # --device
REFERENCE = "my name is Alex and I live in Boston with my cat Pepper; I like mild pasta and rice\n\n" + QUERY


def on(lm: LM, device: str) -> LM:
    return LM(lm.name, copy.deepcopy(lm.model).to(device), lm.tokenizer, torch.device(device), lm.stop_ids)


def sharpened(lm: LM, scale: float = 40.0) -> LM:
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(scale)
    return lm


def check_methods(tokens: int) -> dict:
    a, b = bpe_tokenizer(), sp_tokenizer()
    pairs = {
        "one tokenizer": (make_lm("llm", llama(len(a), seed=1), a), make_lm("slm", gemma3(len(a), seed=2), a)),
        "two tokenizers": (make_lm("llm", llama(len(a), seed=4), a), make_lm("slm", gemma3(len(b), seed=5), b)),
    }
    out = {}
    for name, (llm, slm) in pairs.items():
        llm, slm = sharpened(llm), sharpened(slm)
        cpu, gpu = CoSteer(llm, slm), CoSteer(on(llm, DEVICE), on(slm, DEVICE))
        res = {}
        for m in Method:
            kw = dict(max_new_tokens=tokens, reference_message=REFERENCE)  # read by costeer_matched only
            want = cpu.generate(QUERY, CONTEXT, m, **kw).token_ids
            got = gpu.generate(QUERY, CONTEXT, m, **kw).token_ids
            res[m.value] = {"same_tokens": got == want, "n": len(want)}
        out[name] = res
        print(name, {k: v["same_tokens"] for k, v in res.items()}, flush=True)
    return out


def sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn, runs: int = 30) -> float:
    fn()
    sync()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def check_fusion() -> dict:
    out = {}
    g = torch.Generator().manual_seed(0)
    for V in (49_152, 262_144):
        base, pers, bslm = (torch.log_softmax(3 * torch.randn(V, generator=g), -1) for _ in range(3))
        history = torch.randint(0, V, (48,), generator=g).tolist()
        for m in STEERING_STAGES:
            pipe = fusion_pipeline(m, SteeringConfig())
            want = pipe(base, pers, bslm, history)
            dev = [t.to(DEVICE) for t in (base, pers, bslm)]
            got = pipe(*dev, history)
            finite = torch.isfinite(want)
            diff = float((got.cpu()[finite] - want[finite]).abs().max())
            same_support = bool((torch.isfinite(got.cpu()) == finite).all())
            ms = _median_ms(lambda: pipe(*dev, history))
            out[f"{m.value}@{V}"] = {"max_abs_diff": diff, "same_support": same_support, "gpu_ms": round(ms, 3)}
            print(m.value, V, out[f"{m.value}@{V}"], flush=True)
    return out


def check_split(tokens: int) -> dict:
    from costeer.device import connect_cloud
    from tests.cloud.server_util import KEY_A, ThreadServer

    tok = bpe_tokenizer()
    llm = sharpened(make_lm("tiny-llm", llama(len(tok), seed=1), tok))
    slm = sharpened(make_lm("tiny-slm", gemma3(len(tok), seed=2), tok))
    srv = ThreadServer(on(llm, DEVICE), max_new_tokens=tokens)
    try:
        out = {}
        local = CoSteer(llm, slm)
        for k in ("full", "packed"):
            for m in ("costeer", "llm"):
                want = local.generate(QUERY, CONTEXT, m, max_new_tokens=tokens).token_ids
                got = CoSteer(connect_cloud(srv.url, api_key=KEY_A, k=k), slm).generate(
                    QUERY, CONTEXT, m, max_new_tokens=tokens).token_ids  # fmt: skip
                out[f"{m}/{k}"] = got == want
        print("split", out, flush=True)
        return out
    finally:
        srv.stop()


def check_speed(tokens: int, runs: int) -> dict:
    """A random model with SmolLM2-135M's shape; no stop ids, so every run is `tokens` long."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49_152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(DEVICE)
    lm = LM("random-smollm2-shape", model, bpe_tokenizer(), torch.device(DEVICE), frozenset())
    vocab = VocabMap(size=49_152, identity=True, stop_ids=frozenset())
    sampling = SamplingConfig(max_new_tokens=tokens)
    prompt = list(range(1, 200))
    res = {}
    for m in ("llm", "costeer", "costeer_trust", "costeer_guarded"):
        times = []
        for _ in range(runs + 1):  # the first run warms the kernels up
            sync()
            t = time.perf_counter()
            if m == "llm":
                steps = list(decode(DecodePlan(LocalModelSource(lm, prompt, tokens), vocab, sampling)))
            else:
                fusion = fusion_pipeline(Method(m), SteeringConfig())
                steps = list(decode(DecodePlan(LocalModelSource(lm, prompt, tokens), vocab, sampling,
                                               LocalSteeringSource(lm, (prompt[:50], prompt), tokens), fusion)))  # fmt: skip
            sync()
            times.append(time.perf_counter() - t)
            assert len(steps) == tokens
        res[m] = {"tok_s": round(tokens / statistics.median(times[1:]), 1)}
    for m in res:
        res[m]["vs_llm"] = round(res[m]["tok_s"] / res["llm"]["tok_s"], 3)
    print("speed", res, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/cuda_check.json")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cuda[:N]; cpu only to dry-run the script itself")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device (this script checks the GPU code path)", file=sys.stderr)
        sys.exit(2)
    name = torch.cuda.get_device_name(torch.device(DEVICE)) if DEVICE.startswith("cuda") else "cpu"
    report = {"device": name, "torch": torch.__version__}
    report["methods"] = check_methods(min(args.tokens, 32))
    report["fusion"] = check_fusion()
    report["split"] = check_split(min(args.tokens, 32))
    report["speed"] = check_speed(args.tokens, args.runs)
    ok = (all(r["same_tokens"] for p in report["methods"].values() for r in p.values())
          and all(f["same_support"] and f["max_abs_diff"] < 1e-3 for f in report["fusion"].values())
          and all(report["split"].values()))  # fmt: skip
    report["ok"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("ok" if ok else "MISMATCH", "->", args.out)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
