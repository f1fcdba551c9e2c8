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
import os
import threading

import numpy as np
import torch
from torch import Tensor

from costeer.errors import CoSteerError

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
    """A GGUF model loaded into llama.cpp; open() gives decode batches on fresh contexts."""

    def __init__(self, path: str, n_threads: int | None = None, n_gpu_layers: int | None = None):
        ll = _ll()
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

    def open(self, prompts: list[list[int]], reserve: int = 1024) -> "LlamaDecodeBatch":
        return LlamaDecodeBatch(self, prompts, reserve)

    def __del__(self):
        model, self.model = getattr(self, "model", None), None
        if model and self._ll is not None:
            try:
                self._ll.llama_model_free(model)
            except Exception:  # interpreter shutdown: the library may be gone already
                pass


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class LlamaDecodeBatch:
    """B sequences in one llama.cpp context. start() -> [B, V]; advance(tokens[B]) -> [B, V];
    extend(tokens[n]) appends the same n tokens to every sequence -> [B, V] after the last."""

    def __init__(self, model: LlamaCppModel, prompts: list[list[int]], reserve: int = 1024):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        ll = model._ll
        self._ll, self.model = ll, model
        self.prompts = [list(p) for p in prompts]
        self.B = len(prompts)
        self.pos = [0] * self.B  # next position of each sequence
        # One KV stream per sequence (kv_unified off): each row then computes exactly what it
        # computes alone (a unified cache changes the attention's layout, and with it the
        # rounding: up to 0.6 nats on tail tokens). Room for the longest prompt plus `reserve`.
        n_ctx_seq = _round_up(max(len(p) for p in prompts) + max(reserve, 16), 256)
        n_ctx = n_ctx_seq * self.B
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = _round_up(max(max(len(p) for p in prompts), 512), 64)  # a whole prompt per llama_decode
        cp.n_ubatch = 512
        cp.n_seq_max = self.B
        cp.kv_unified = False
        cp.n_threads = cp.n_threads_batch = model.n_threads
        cp.no_perf = True
        self.ctx = ll.llama_init_from_model(model.model, cp)
        if not self.ctx:
            raise LlamaCppError("llama.cpp could not create a context")
        self.n_ctx = n_ctx
        self._cap = cp.n_batch
        self.batch = ll.llama_batch_init(self._cap, 0, self.B)
        self._out = np.empty((self.B, model.n_vocab), dtype=np.float32)  # [B, V], reused

    # -- one llama_decode over (token, sequence, position, wants-logits) rows ----------------

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> Tensor:
        out_index = self._decode_raw(rows)
        V = self.model.n_vocab
        for row, i in enumerate(out_index):
            ptr = self._ll.llama_get_logits_ith(self.ctx, i)
            ctypes.memmove(self._out[row].ctypes.data, ptr, V * 4)
        return torch.log_softmax(torch.from_numpy(self._out[: len(out_index)]), dim=-1)  # a new tensor

    def _decode_raw(self, rows: list[tuple[int, int, int, bool]]) -> list[int]:
        """llama_decode over the rows -> batch indices of the rows that asked for logits."""
        if len(rows) > self._cap:
            raise LlamaCppError(f"{len(rows)} tokens in one step exceed the batch size {self._cap}")
        b = self.batch
        out_index: list[int] = []  # batch index of each sequence's logits row, in sequence order
        for i, (tok, seq, pos, logits) in enumerate(rows):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
            if logits:
                out_index.append(i)
        b.n_tokens = len(rows)
        rc = self._ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise LlamaCppError(
                f"llama_decode failed ({rc}): the context ({self.n_ctx // self.B} tokens per sequence) is full"
                if rc == 1 else f"llama_decode failed ({rc})"
            )
        return out_index

    def start(self) -> Tensor:
        # One llama_decode per prompt: a batch mixing sequences of different lengths is split into
        # equal-length ubatches, i.e. the longer prompt would be prefilled in chunks, which rounds
        # differently (up to 0.35 nats on likely tokens measured on SmolLM2). Per prompt, every row
        # is exactly what it is alone; the per-token steps after it batch all sequences.
        out = []
        for seq, p in enumerate(self.prompts):
            out.append(self._decode([(t, seq, j, j == len(p) - 1) for j, t in enumerate(p)]))
            self.pos[seq] = len(p)
        return torch.cat(out)

    def advance(self, tokens: list[int]) -> Tensor:
        if len(tokens) != self.B:
            raise ValueError(f"need one token per sequence ({self.B}), got {len(tokens)}")
        rows = [(t, seq, self.pos[seq], True) for seq, t in enumerate(tokens)]
        self.pos = [p + 1 for p in self.pos]
        return self._decode(rows)

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

    def close(self) -> None:
        ctx, self.ctx = getattr(self, "ctx", None), None
        if ctx:
            try:
                self._ll.llama_batch_free(self.batch)
                self._ll.llama_free(ctx)
            except Exception:  # interpreter shutdown
                pass

    __del__ = close
