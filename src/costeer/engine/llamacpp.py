"""Model backend on llama.cpp (through llama-cpp-python's C API) for GGUF files.

Same contract as the transformers backend's `DecodeBatch`: B sequences decoded together,
start() -> [B, V] next-token log-probabilities after the prompts, advance(tokens[B]) -> [B, V].
The B sequences share ONE llama.cpp context (sequence id b for row b, one KV stream each) and
every step is ONE `llama_decode` over a `llama_batch` holding one token per sequence, so the
SLM's two branches cost one forward, as in the transformers backend.

Why the C API and not `llama_cpp.Llama`: the high-level object holds one sequence per context
and (in 0.3.36) keeps its `scores` at zero unless `logits_all=True`, which stores n_ctx × V
floats; here we read the last position's logits (`llama_get_logits_ith`) of each sequence only.

Tokenisation stays with the HF tokenizer read from the same GGUF (same ids), so prompts, chat
templates and the vocabulary alignment are backend-independent.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from costeer.engine.prefix_cache import Codec, PrefixPlan
from costeer.errors import CoSteerError

log = logging.getLogger(__name__)

_init_lock = threading.Lock()
_lib = None
_log_callback = None  # the ctypes callback must outlive every call into the library


def available() -> bool:
    """Is llama-cpp-python importable (without importing it)?"""
    return importlib.util.find_spec("llama_cpp") is not None


# Warnings that say nothing to a user: Gemma-3's sliding-window cache is kept at full size (every
# context we create says so), which is what a cache that only grows needs.
_QUIET_WARNINGS = (b"using full-size SWA cache",)


def _log_sink(level, text, user_data):
    # llama.cpp logs every tensor it loads; keep its warnings and errors only.
    if level in (3, 4) and not any(w in text for w in _QUIET_WARNINGS):  # GGML_LOG_LEVEL_WARN, _ERROR
        os.write(2, text)


def _ll():
    """llama_cpp, initialised once, its info logs silenced."""
    global _lib, _log_callback
    with _init_lock:
        if _lib is None:
            import llama_cpp

            llama_cpp.llama_backend_init()
            _log_callback = llama_cpp.llama_log_callback(_log_sink)
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            _lib = llama_cpp
    return _lib


def default_threads() -> int:
    """Threads for llama.cpp: the cores this process may run on (respects taskset), or
    COSTEER_THREADS."""
    env = os.environ.get("COSTEER_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class LlamaCppError(CoSteerError, RuntimeError):
    """llama.cpp could not load or run a model."""


class LlamaCppModel:
    """A GGUF model loaded into llama.cpp; open() gives decode batches, each on a context of its own
    (a kept idle one of the right shape, else a new one: `contexts`, at most `idle_contexts` idle)."""

    def __init__(self, path: str, n_threads: int | None = None, n_gpu_layers: int | None = None,
                 idle_contexts: int = 2):  # fmt: skip
        ll = _ll()
        self.contexts = IdleContexts(ll, idle_contexts)
        mp = ll.llama_model_default_params()
        if n_gpu_layers is not None:
            mp.n_gpu_layers = n_gpu_layers
        self._ll = ll
        self.path = path
        self.model = ll.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {path}")
        vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(vocab))
        self.n_ctx_train = int(ll.llama_model_n_ctx_train(self.model))
        # end-of-generation ids the GGUF names (-1 where it names none)
        self.eos_ids = frozenset(i for i in (ll.llama_vocab_eos(vocab), ll.llama_vocab_eot(vocab)) if 0 <= i < self.n_vocab)
        self.n_threads = n_threads or default_threads()

    def open(self, prompts: list[list[int]], reserve: int = 1024, prefix: PrefixPlan | None = None) -> "LlamaDecodeBatch":
        return LlamaDecodeBatch(self, prompts, reserve, prefix)

    def identity(self, n_stream: int) -> str:
        """What a sequence's saved state depends on: the GGUF file, the library, the context's stream count
        (llama_state_seq_set_data refuses a state from a context with another) and the KV cache's types."""
        st = os.stat(self.path)
        version = getattr(self._ll, "__version__", "?")
        return (f"llamacpp|{os.path.realpath(self.path)}|{st.st_size}|{st.st_mtime_ns}|llama-cpp-python {version}|"
                f"streams {n_stream}|kv f16")  # fmt: skip

    def close_contexts(self) -> None:
        """Free the idle contexts (those in use are freed when their batch closes)."""
        contexts = getattr(self, "contexts", None)
        if contexts is not None:
            contexts.clear()

    def __del__(self):
        self.close_contexts()  # before the model they were created on
        model, self.model = getattr(self, "model", None), None
        if model and self._ll is not None:
            try:
                self._ll.llama_model_free(model)
            except Exception:  # interpreter shutdown: the library may be gone already
                pass


# Tokens per llama.cpp compute step (a longer llama_decode is split into steps of this many). The
# rounding of a prompt's logits depends on where those steps start (up to 0.5 nats on SmolLM2's likely
# tokens, docs/prefix-cache.md): in the cache's exact mode a prefix ends on a multiple of it, and the
# rest is then split exactly as in a whole-prompt prefill, bit for bit.
N_UBATCH = 512

# Streams of every context that uses the prefix cache (the most sequences a decode batch with a
# private prefix holds: the shared model's LLM row and SLM pair).
PREFIX_STREAMS = 3

# A sequence state crosses the disk as it is; llama.cpp checks it on restore (and the disk store has
# authenticated it before: it was written by this program, with this key, for this model).
STATE_CODEC: Codec[bytearray] = Codec(encode=bytes, decode=bytearray)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# -- one llama_decode over (token, sequence, position, wants-logits) rows ---------------------


def _decode_rows(ll, ctx, batch, cap: int, rows: list[tuple[int, int, int, bool]], room: str) -> list[int]:
    """llama_decode over the rows -> batch indices of the rows that asked for logits, in order.
    `room` says how big the context is (for the error when it is full)."""
    if len(rows) > cap:
        raise LlamaCppError(f"{len(rows)} tokens in one step exceed the batch size {cap}")
    out_index: list[int] = []
    for i, (tok, seq, pos, logits) in enumerate(rows):
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits
        if logits:
            out_index.append(i)
    batch.n_tokens = len(rows)
    rc = ll.llama_decode(ctx, batch)
    if rc != 0:
        raise LlamaCppError(f"llama_decode failed ({rc}): the context ({room}) is full" if rc == 1 else f"llama_decode failed ({rc})")
    return out_index


def _logprobs(ll, ctx, out: np.ndarray, out_index: list[int]) -> Tensor:
    """The logits rows `out_index` of the last llama_decode -> [n, V] log-probabilities (a new
    tensor; `out` [>= n, V] is the reused staging buffer)."""
    V = out.shape[1]
    for row, i in enumerate(out_index):
        ctypes.memmove(out[row].ctypes.data, ll.llama_get_logits_ith(ctx, i), V * 4)
    return torch.log_softmax(torch.from_numpy(out[: len(out_index)]), dim=-1)


def _new_context(model: "LlamaCppModel", n_ctx: int, n_batch: int, n_seq_max: int, unified: bool, n_ubatch: int = 512,
                 flash_attn: bool | None = None):  # fmt: skip
    """A llama.cpp context on `model` -> (ctx, llama_batch of n_batch rows). flash_attn None: llama.cpp's
    choice (on for the CPU)."""
    ll = model._ll
    cp = ll.llama_context_default_params()
    if flash_attn is not None:
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_ubatch
    cp.n_seq_max = n_seq_max
    cp.kv_unified = unified
    cp.n_threads = cp.n_threads_batch = model.n_threads
    cp.no_perf = True
    ctx = ll.llama_init_from_model(model.model, cp)
    if not ctx:
        raise LlamaCppError("llama.cpp could not create a context")
    return ctx, ll.llama_batch_init(n_batch, 0, n_seq_max)


def _free_context(ll, ctx, batch) -> None:
    """Free a context and its llama_batch (nothing when ctx is None: freed already)."""
    if ctx:
        try:
            ll.llama_batch_free(batch)
            ll.llama_free(ctx)
        except Exception:  # interpreter shutdown: the library may be gone already
            pass


@dataclass(eq=False)
class KeptContext:
    """A context of a decode batch's shape (`n_stream` KV streams of `n_ctx_seq` cells, `cap` tokens per
    llama_decode) and, per sequence, the prefix whose exact state its first cells hold (None: nothing
    known), so that the next batch over the same private context keeps it instead of restoring it."""

    ctx: object
    batch: object  # the llama_batch of `cap` rows
    n_stream: int
    n_ctx_seq: int
    cap: int
    held: list[tuple[int, ...] | None]

    def fits(self, n_stream: int, n_ctx_seq: int, cap: int) -> bool:
        # A bigger context computes the same: the attention spans the cells in use (padded to 256),
        # not the buffer; a batch checks its own bound (LlamaDecodeBatch._decode_raw).
        return self.n_stream == n_stream and self.n_ctx_seq >= n_ctx_seq and self.cap >= cap

    def free(self, ll) -> None:
        ctx, self.ctx = self.ctx, None
        _free_context(ll, ctx, self.batch)


class IdleContexts:
    """The decode-batch contexts of one model that no batch is using, at most `size` (each holds a KV buffer
    sized for its batch: 35 MB per stream of 1,536 cells on SmolLM2, a CoGenesis profile's room). A generation takes one
    (or a new one) and gives it back when it closes, so a query does not create and free a context, and
    the next query over the same private context finds its prefix still in the cells. A context is in at
    most one place: taken out of the list under the lock, so two batches never share one."""

    def __init__(self, ll, size: int = 2):
        if size < 0:
            raise ValueError("idle_contexts must be >= 0")
        self._ll, self.size = ll, size
        self._idle: list[KeptContext] = []  # least recently given back first
        self._lock = threading.Lock()
        self.created = self.reused = 0

    def take(self, model: "LlamaCppModel", n_stream: int, n_ctx_seq: int, cap: int,
             wanted: list[tuple[int, ...] | None]) -> KeptContext:  # fmt: skip
        """An idle context of this shape (the one holding most of the `wanted` prefixes), else a new one."""
        with self._lock:
            fit = [k for k in self._idle if k.fits(n_stream, n_ctx_seq, cap)]
            if fit:
                best = max(reversed(fit), key=lambda k: sum(w is not None and w == h for w, h in zip(wanted, k.held)))
                self._idle.remove(best)
                self.reused += 1
                return best
            self.created += 1
        ctx, batch = _new_context(model, n_ctx_seq * n_stream, cap, n_stream, unified=False, n_ubatch=N_UBATCH)
        return KeptContext(ctx, batch, n_stream, n_ctx_seq, cap, [None] * n_stream)

    def give(self, kept: KeptContext) -> None:
        """Keep a context no batch uses any more; beyond `size`, free the least recently kept."""
        with self._lock:
            self._idle.append(kept)
            dropped = self._idle[: -self.size] if self.size else list(self._idle)
            del self._idle[: len(dropped)]
        for k in dropped:
            k.free(self._ll)

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for k in idle:
            k.free(self._ll)

    def __len__(self) -> int:
        return len(self._idle)


class _OwnsContext:
    """Frees `self.ctx` and `self.batch` once (close(), or when collected)."""

    def close(self) -> None:
        ctx, self.ctx = getattr(self, "ctx", None), None
        _free_context(self._ll, ctx, getattr(self, "batch", None))

    __del__ = close


class LlamaDecodeBatch:
    """B sequences in one llama.cpp context. start() -> [B, V]; advance(tokens[B]) -> [B, V];
    extend(tokens[n]) appends the same n tokens to every sequence -> [B, V] after the last.

    The context comes from the model's idle ones when one of this shape is kept (`IdleContexts`) and goes
    back there on close(): every sequence is emptied (or cut back to a prefix it holds) before use."""

    def __init__(self, model: LlamaCppModel, prompts: list[list[int]], reserve: int = 1024,
                 prefix: PrefixPlan | None = None):  # fmt: skip
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        ll = model._ll
        self._ll, self.model = ll, model
        self.prompts = [list(p) for p in prompts]
        self.B = len(prompts)
        self.pos = [0] * self.B  # next position of each sequence
        self.prefix = prefix if prefix is not None and prefix.usable(self.prompts) else None
        # A saved sequence state names its context's stream count: with a prefix cache every context
        # has the same (the SLM pair's 2 rows and the shared model's 3), so a state moves between them.
        n_stream = max(self.B, PREFIX_STREAMS) if self.prefix is not None else self.B
        # One KV stream per sequence (kv_unified off): each row then computes exactly what it
        # computes alone (a unified cache changes the attention's layout, and with it the
        # rounding: up to 0.6 nats on tail tokens). Room for the longest prompt plus `reserve`.
        n_ctx_seq = _round_up(max(len(p) for p in prompts) + max(reserve, 16), 256)
        self.n_ctx_seq, self.n_stream, self.n_ctx = n_ctx_seq, n_stream, n_ctx_seq * n_stream
        self._cap = _round_up(max(max(len(p) for p in prompts), 512), 64)  # a whole prompt per llama_decode
        self._n_prefix = [self._prefix_length(seq, p) for seq, p in enumerate(self.prompts)]
        wanted = [tuple(p[:n]) if n else None for p, n in zip(self.prompts, self._n_prefix)]
        self._kept: KeptContext | None = model.contexts.take(model, n_stream, n_ctx_seq, self._cap, wanted)
        self.ctx, self.batch = self._kept.ctx, self._kept.batch
        self._mem = ll.llama_get_memory(self.ctx)
        self._out = np.empty((self.B, model.n_vocab), dtype=np.float32)  # [B, V], reused

    def close(self) -> None:
        """Give the context back to the model's idle ones (once)."""
        kept, self._kept, self.ctx = getattr(self, "_kept", None), None, None
        if kept is not None:
            self.model.contexts.give(kept)

    def __del__(self):
        kept, self._kept = getattr(self, "_kept", None), None
        if kept is not None:  # never closed: free it here (the collector must not take the pool's lock)
            kept.free(self._ll)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> Tensor:
        return _logprobs(self._ll, self.ctx, self._out, self._decode_raw(rows))

    def _decode_raw(self, rows: list[tuple[int, int, int, bool]]) -> list[int]:
        """llama_decode over the rows -> batch indices of the rows that asked for logits."""
        room = f"{self.n_ctx_seq} tokens per sequence"
        if any(pos >= self.n_ctx_seq for _, _, pos, _ in rows):  # a kept context may be bigger than asked
            raise LlamaCppError(f"llama_decode failed (1): the context ({room}) is full")
        return _decode_rows(self._ll, self.ctx, self.batch, self._cap, rows, room)

    def start(self) -> Tensor:
        # One llama_decode per prompt: a batch mixing sequences of different lengths is split into
        # equal-length ubatches, i.e. the longer prompt would be prefilled in chunks, which rounds
        # differently (up to 0.35 nats on likely tokens measured on SmolLM2). Per prompt, every row
        # is exactly what it is alone; the per-token steps after it batch all sequences.
        # With a prefix cache, a prompt's stable prefix is kept, restored (or prefilled and saved) first, and
        # only the rest is decoded here: a hit and a miss then compute the rest on the same state.
        # A prompt equal to an earlier one (the shared model's LLM row and the SLM's row without context
        # read the same public prompt) is not prefilled again: its twin's cells are copied, bit for bit
        # what the prefill computes (each prompt is decoded alone, in a stream of its own).
        out: list[Tensor] = []
        for seq, p in enumerate(self.prompts):
            twin = self._twin(seq)
            if twin is not None and self._copy_sequence(twin, seq):
                out.append(out[twin])
            else:
                n = self._prefix(seq, p)
                out.append(self._decode([(t, seq, n + j, n + j == len(p) - 1) for j, t in enumerate(p[n:])]))
            self.pos[seq] = len(p)
        return torch.cat(out)

    def _twin(self, seq: int) -> int | None:
        """An earlier sequence with the same prompt and no prefix (nor one for `seq`), or None."""
        if self._n_prefix[seq]:
            return None
        p = self.prompts[seq]
        return next((s for s in range(seq) if not self._n_prefix[s] and self.prompts[s] == p), None)

    def _copy_sequence(self, src: int, dst: int) -> bool:
        """Sequence `dst` holds exactly `src`'s cells (its state through llama.cpp's sequence state API)."""
        self._forget(dst)
        state = self._get_state(src)
        if state is not None and self._restore(dst, state):
            return True
        log.debug("llama.cpp did not copy sequence %d to %d; prefilling it", src, dst)
        return False

    def _forget(self, seq: int, keep: int = 0) -> None:
        """Empty `seq` from position `keep` on (all of it: 0); what it held is no longer known."""
        self._kept.held[seq] = None
        self._ll.llama_memory_seq_rm(self._mem, seq, keep if keep else -1, -1)

    # -- the prefix cache (engine/prefix_cache.py) -----------------------------------------

    def _prefix_length(self, seq: int, prompt: list[int]) -> int:
        """Tokens of prompt `seq` kept in the prefix cache (exact mode: a multiple of the compute step)."""
        if self.prefix is None:
            return 0
        n = self.prefix.length(seq, prompt)
        return n // N_UBATCH * N_UBATCH if self.prefix.cache.config.exact else n

    def _prefix(self, seq: int, prompt: list[int]) -> int:
        """Sequence `seq` holds its prompt's stable prefix -> its length (0: no prefix, the sequence empty).
        The prefix's cells are kept when the context already holds them from the last batch over it (the
        same bytes a restore would write, in the same cells) and the cache still has them; else restored,
        else prefilled and saved."""
        n = self._n_prefix[seq]
        tokens = tuple(prompt[:n])
        held = self._kept.held[seq]
        if n and held == tokens and self.prefix.cache.touch(self.model.identity(self.n_stream), tokens):
            self._forget(seq, keep=n)
        else:
            self._forget(seq)
            if n:
                self._restore_or_prefill(seq, tokens)
        self._kept.held[seq] = tokens if n else None
        return n

    def _restore_or_prefill(self, seq: int, tokens: tuple[int, ...]) -> None:
        cache, identity = self.prefix.cache, self.model.identity(self.n_stream)
        state = cache.lookup(identity, tokens, STATE_CODEC)
        if state is not None and self._set_state(seq, state):
            return
        self._decode_raw([(t, seq, j, False) for j, t in enumerate(tokens)])
        state = self._get_state(seq)
        if state is not None:
            cache.store(identity, tokens, state, len(state), STATE_CODEC)

    def _get_state(self, seq: int) -> bytearray | None:
        size = self._ll.llama_state_seq_get_size(self.ctx, seq)
        buf = bytearray(size)
        n = self._ll.llama_state_seq_get_data(self.ctx, (ctypes.c_uint8 * size).from_buffer(buf), size, seq)
        return buf[:n] if 0 < n < size else (buf if n else None)

    def _restore(self, seq: int, state: bytearray) -> bool:
        """Restore a saved state into `seq`; False (the sequence left empty) if llama.cpp refuses it."""
        size = len(state)
        if self._ll.llama_state_seq_set_data(self.ctx, (ctypes.c_uint8 * size).from_buffer(state), size, seq):
            return True
        self._ll.llama_memory_seq_rm(self._mem, seq, -1, -1)
        return False

    def _set_state(self, seq: int, state: bytearray) -> bool:
        """A cached state into `seq`; False (one warning) if llama.cpp refuses it."""
        if self._restore(seq, state):
            return True
        log.warning("prefix cache: llama.cpp refused a cached state; prefilling")
        return False

    def advance(self, tokens: list[int]) -> Tensor:
        if len(tokens) != self.B:
            raise ValueError(f"need one token per sequence ({self.B}), got {len(tokens)}")
        rows = [(t, seq, self.pos[seq], True) for seq, t in enumerate(tokens)]
        self.pos = [p + 1 for p in self.pos]
        return self._decode(rows)

    def rewind(self, n: int) -> None:
        """Forget the last n tokens fed to every sequence (a device's guessed tokens): their cells
        removed, which puts the stream's search head back on the first freed cell, so the next step
        takes the cells, and computes the distributions, it would have without them."""
        fed = min(p - len(q) for p, q in zip(self.pos, self.prompts))
        if not 0 <= n <= fed:
            raise ValueError(f"cannot rewind {n} tokens: {fed} were fed since start()")
        for seq in range(self.B) if n else ():
            self.pos[seq] -= n
            if not self._ll.llama_memory_seq_rm(self._mem, seq, self.pos[seq], -1):
                raise LlamaCppError(f"llama.cpp could not remove the last {n} tokens of sequence {seq}")

    def room_ahead(self, n: int) -> bool:
        """Whether n more tokens fed from here could all be rewound (cells are removed one by one: always)."""
        return True

    def extend(self, tokens: list[int]) -> Tensor:
        if not tokens:
            raise ValueError("extend() needs at least one token")
        step = max(1, self._cap // self.B)  # a long catch-up goes in batch-sized chunks
        for c in range(0, len(tokens), step):
            chunk, last = tokens[c : c + step], c + step >= len(tokens)
            rows = []
            for seq in range(self.B):
                rows += [(t, seq, self.pos[seq] + j, last and j == len(chunk) - 1) for j, t in enumerate(chunk)]
                self.pos[seq] += len(chunk)
            out = self._decode(rows)
        return out



# A look-ahead node has to equal the step it stands for, bit for bit. Measured on SmolLM2 Q4_1
# (docs/wire-format.md, "Look-ahead"), llama.cpp's CPU kernels round by (1) whether a llama_decode
# holds one token or several (another matmul path once a sequence passes 256 cells: up to 1 nat on
# tail tokens, 0.5 on the top 20) and (2) where a sequence's cells lie in the shared cache (flash
# attention by their order; with it off too, another sequence's cells in between moved a step by 0.8
# nats). Rounding differences this small grow that large because activations are quantised to 8 bits.
# So a tree's nodes are steps of the session's own sequence, in the cells its steps would take: the
# next node of the main chain (the greedy child of the greedy child...) kept, every other node
# decoded alone at the same position and removed again (llama_memory_seq_rm puts the cache's search
# head back on the freed cell). Branches are therefore leaves: only the main chain grows. A session
# alone in the pool then gets exactly its per-token distributions; sessions stepped together round
# as several rows do, with or without look-ahead (making every decode several rows would cost a lone
# step 55%, measured; docs/wire-format.md).
LLAMA_MAX_SEQ = 256  # llama.cpp's limit on sequence ids per context


def stack_rows(rows: list[Tensor | None], vocab_size: int) -> Tensor:
    """A level's rows -> [n, V]; a row not computed (its sequence stopped: a pool's grow) is NaN."""
    return torch.stack([torch.full((vocab_size,), float("nan")) if r is None else r for r in rows])


@dataclass
class _SeqTree:
    """The look-ahead tree grown from one sequence: node 0 is the root (the sequence's next position
    `root`); `chain` lists the main chain's nodes, whose cells the sequence keeps; every other node is
    a leaf whose cell was removed once computed."""

    root: int
    parent: list[int] = field(default_factory=lambda: [-1])
    depth: list[int] = field(default_factory=lambda: [0])
    token: list[int] = field(default_factory=lambda: [-1])
    chain: list[int] = field(default_factory=lambda: [0])


class LlamaSequencePool(_OwnsContext):
    """Independent sequences that come and go, served from ONE llama.cpp context: one unified KV
    cache of `n_cells` cells that all of them share (allocated once: the memory of the whole
    pool is bounded, whatever the number of sequences), sequence ids 0..n_seq_max-1.

    prefill(seq, tokens) -> [V] feeds one sequence alone, in one llama_decode (pieces of at most
    `chunk` tokens, the ubatch size, split exactly where a whole-prompt llama_decode splits);
    step([(seq, token)]) -> [n, V] feeds one token to each of n sequences in ONE llama_decode;
    drop(seq) frees a sequence's cells. The caller keeps each sequence's tokens within the cells
    (a full cache fails the step with LlamaCppError).

    Look-ahead: grow([(seq, parent, token)]) -> [n, V] adds nodes to the sequences' trees, each a
    child of its tree's main chain (0 = the sequence's next position): every node a step of the
    sequence's own, the main chain's kept and the others removed again (see above); commit(seq, node)
    cuts the sequence back to the path to `node` -> the path's tokens past the main chain (a branch
    leaf's token), which the caller feeds again as steps."""

    extends_branches = False  # only the main chain has children
    branches_free = 1 << 30  # branches need no sequence of their own
    # a row in a batched step costs about 85% of a lone step (2.8 ms + 4.8 ms a row): too little
    # saved to hold a tick for late steps (cloud/scheduler.Gather)
    batch_pays_at = None

    def __init__(self, model: LlamaCppModel, n_cells: int, n_seq_max: int, chunk: int = 512):
        if n_seq_max < 1 or n_cells < 1 or chunk < 1:
            raise ValueError("a pool needs at least one sequence, one cell and a chunk of one token")
        if n_seq_max > LLAMA_MAX_SEQ:
            raise ValueError(f"a pool holds at most {LLAMA_MAX_SEQ} sequences")
        ll = model._ll
        self._ll, self.model, self.chunk = ll, model, chunk
        self.n_cells = _round_up(n_cells, 256)
        self._cap = max(chunk, n_seq_max)  # one step of every sequence fits one ubatch
        # A unified cache: cells go to whichever sequence needs them, so memory follows the
        # tokens actually held, not n_seq_max times the longest possible sequence.
        self.ctx, self.batch = _new_context(model, self.n_cells, self._cap, n_seq_max, unified=True, n_ubatch=self._cap)
        self._mem = ll.llama_get_memory(self.ctx)
        self._out = np.empty((self._cap, model.n_vocab), dtype=np.float32)  # [n, V], reused
        self.pos: dict[int, int] = {}  # next position of each live sequence
        self.trees: dict[int, _SeqTree] = {}

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> Tensor:
        return _logprobs(self._ll, self.ctx, self._out, _decode_rows(self._ll, self.ctx, self.batch, self._cap, rows,
                                                                     f"{self.n_cells} cells shared"))  # fmt: skip

    def prefill(self, seq: int, tokens: list[int]) -> Tensor:
        if not 0 < len(tokens) <= self.chunk:
            raise ValueError(f"a prefill piece holds 1 to {self.chunk} tokens, got {len(tokens)}")
        p = self.pos.get(seq, 0)
        logp = self._decode([(t, seq, p + j, j == len(tokens) - 1) for j, t in enumerate(tokens)])[0]
        self.pos[seq] = p + len(tokens)
        return logp

    def step(self, items: list[tuple[int, int]]) -> Tensor:
        rows = [(t, seq, self.pos[seq], True) for seq, t in items]
        out = self._decode(rows)
        for seq, _ in items:
            self.pos[seq] += 1
        return out

    def grow(self, rows: list[tuple[int, int, int]], stop: Callable[[int], bool] | None = None) -> Tensor:
        """Branch nodes first, each alone and removed again; then the main chains' next nodes of all
        sequences in one llama_decode -> [n, V] in the order of `rows`. `stop(seq)`, asked before each
        forward: that sequence's rows still to compute are not (NaN rows; its tree takes no node of them)."""
        out: list[Tensor | None] = [None] * len(rows)
        chain_rows: list[tuple[int, int, int, int]] = []  # (row, seq, position, token)
        tips: dict[int, int] = {}  # seq -> its main chain's last node before this level
        for i, (seq, parent, token) in enumerate(rows):
            if stop is not None and stop(seq):
                continue
            tree = self.trees.setdefault(seq, _SeqTree(self.pos[seq]))
            tip = tips.setdefault(seq, tree.chain[-1])
            if parent != tip:
                raise ValueError("on llama.cpp only the main chain's last node takes children (one level at a time)")
            at = tree.root + tree.depth[parent]
            tree.parent.append(parent)
            tree.depth.append(tree.depth[parent] + 1)
            tree.token.append(token)
            if tree.chain[-1] == tip:  # the first child named: the main chain's next node
                tree.chain.append(len(tree.parent) - 1)
                chain_rows.append((i, seq, at, token))
            else:  # a leaf: where the step would put it, then gone again
                out[i] = self._decode([(token, seq, at, True)])[0].clone()
                self._ll.llama_memory_seq_rm(self._mem, seq, at, -1)
        if stop is not None:
            for row in [r for r in chain_rows if stop(r[1])]:  # never decoded: off the main chain again
                chain_rows.remove(row)
                self.trees[row[1]].chain.pop()
        if chain_rows:
            logps = self._decode([(t, seq, at, True) for _, seq, at, t in chain_rows])
            for (i, _, _, _), lp in zip(chain_rows, logps):
                out[i] = lp
        return stack_rows(out, self.model.n_vocab)

    def commit(self, seq: int, node: int) -> list[int]:
        tree = self.trees.pop(seq, None)
        if tree is None:
            if node != 0:
                raise ValueError("commit to a node of a tree that was never grown")
            return []
        path = []
        while node > 0:
            path.append(node)
            node = tree.parent[node]
        path.reverse()
        kept = 0
        while kept < len(path) and path[kept] in tree.chain:
            kept += 1
        end = tree.root + kept
        self._ll.llama_memory_seq_rm(self._mem, seq, end, -1)
        self.pos[seq] = end
        return [tree.token[n] for n in path[kept:]]

    def drop(self, seq: int) -> None:
        self.trees.pop(seq, None)
        if self.pos.pop(seq, None) is not None:
            self._ll.llama_memory_seq_rm(self._mem, seq, -1, -1)
