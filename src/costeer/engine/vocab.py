"""Vocabulary alignment between the LLM and the SLM.

Identical token-to-id maps fuse position by position. Different tokenizers fuse on the
intersection of their vocabularies compared as *decoded strings* (byte-level BPE writes a
leading space as `Ġ`, SentencePiece as `▁`; raw keys would share far fewer entries), plus one
explicit STOP entry that stands for each side's end-of-sequence / end-of-turn tokens. The
chosen aligned token is fed to each model under its own id.
"""

from __future__ import annotations

import functools

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from costeer.errors import CoSteerError

_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class IncompatibleVocabularies(CoSteerError, ValueError):
    """The two tokenizers share too little to steer one with the other."""


@dataclass(frozen=True)
class VocabMap:
    """Maps each model's log-probabilities onto a common index space of size `size`.

    identity: both sides use the same ids (views are slices, no copy).
    otherwise: llm_index / slm_index [K] gather the shared tokens; entry `stop_index` (the
    last one) is the STOP entry, whose log-probability is the logsumexp over the stop ids.
    """

    size: int
    identity: bool
    llm_index: Tensor | None = None  # [K-1] long: aligned position -> LLM id (STOP excluded)
    slm_index: Tensor | None = None  # [K-1] long: aligned position -> SLM id
    llm_stop: Tensor | None = None  # [S_llm] long
    slm_stop: Tensor | None = None  # [S_slm] long
    stop_ids: frozenset[int] = frozenset()  # identity case: aligned stop positions

    @property
    def stop_index(self) -> int | None:
        return None if self.identity else self.size - 1

    def _view(self, logp: Tensor, index: Tensor | None, stop: Tensor | None) -> Tensor:
        if self.identity:
            return logp[..., : self.size]
        shared = logp.index_select(-1, index.to(logp.device))
        stop_lp = torch.logsumexp(logp.index_select(-1, stop.to(logp.device)), dim=-1, keepdim=True)
        return torch.cat([shared, stop_lp], dim=-1)

    def llm_view(self, logp: Tensor) -> Tensor:
        """[..., V_llm] -> [..., K]"""
        return self._view(logp, self.llm_index, self.llm_stop)

    def slm_view(self, logp: Tensor) -> Tensor:
        """[..., V_slm] -> [..., K]"""
        return self._view(logp, self.slm_index, self.slm_stop)

    def is_stop(self, k: int) -> bool:
        return k in self.stop_ids if self.identity else k == self.stop_index

    def llm_positions(self) -> Tensor:
        """LLM id -> aligned position, -1 where the id is not shared; the LLM's stop ids -> the STOP entry
        (identity: every id below `size` is its own position).   -> long [largest mapped id + 1]"""
        if self.identity:
            return torch.arange(self.size)
        position = torch.full((int(max(self.llm_index.max(), self.llm_stop.max())) + 1,), -1, dtype=torch.long)
        position[self.llm_index] = torch.arange(len(self.llm_index))
        position[self.llm_stop] = self.stop_index
        return position

    def llm_token(self, k: int) -> int:
        """Aligned position -> LLM id (STOP maps to the LLM's first stop id)."""
        if self.identity:
            return k
        return int(self.llm_stop[0]) if k == self.stop_index else int(self.llm_index[k])

    def slm_token(self, k: int) -> int:
        if self.identity:
            return k
        return int(self.slm_stop[0]) if k == self.stop_index else int(self.slm_index[k])


def support_mask(vocab: VocabMap, llm_tokenizer, text: str) -> Tensor:
    """Aligned positions of the tokens `text` is written with (plus the stop entries).   -> bool [K]

    The text is tokenized as a whole and word by word, with and without a leading space, so that a name
    at the start of a line in the context ("\nMartin") still supports " Martin" in the answer. The LLM's
    tokenizer: the chosen aligned token is what the LLM is fed."""
    pieces = [text] + [w for word in set(text.split()) for w in (word, " " + word)]
    ids = {i for enc in llm_tokenizer(pieces, add_special_tokens=False)["input_ids"] for i in enc}
    mask = torch.zeros(vocab.size, dtype=torch.bool)
    if vocab.identity:
        ids |= set(vocab.stop_ids)
        mask[[i for i in ids if i < vocab.size]] = True
        return mask
    position = vocab.llm_positions()
    found = torch.tensor([i for i in ids if i < len(position)], dtype=torch.long)
    k = position[found]
    mask[k[k >= 0]] = True
    mask[vocab.stop_index] = True
    return mask


def special_ids(tokenizer) -> set[int]:
    """Ids the tokenizer marks special (its named specials and added tokens flagged special)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)
    return ids


def _decode_all(tokenizer, seqs: list[list[int]]) -> list[str]:
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None:  # fast path: the Rust tokenizer decodes the whole vocabulary at once
        return backend.decode_batch(seqs, skip_special_tokens=False)
    return [tokenizer.decode(s, skip_special_tokens=False) for s in seqs]


def token_strings(tokenizer) -> list[str | None]:
    """Each id's decoded string, or None where it cannot be compared across tokenizers
    (special tokens, byte-fallback pieces, partial UTF-8 bytes, empty strings).

    Each token is decoded after a fixed anchor token and the anchor's text removed: decoders
    such as SentencePiece's Metaspace drop a token's leading space at the start of a text,
    which would make " the" and "the" collide.
    """
    n = len(tokenizer)
    special = special_ids(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    alone = _decode_all(tokenizer, [[i] for i in range(n)])
    anchor = next(
        (i for i, s in enumerate(alone) if i not in special and len(s) == 1 and s.isascii() and s.isalpha()), None
    )
    if anchor is None:
        strings = alone
    else:
        prefix = alone[anchor]
        after = _decode_all(tokenizer, [[anchor, i] for i in range(n)])
        strings = [s[len(prefix) :] if s.startswith(prefix) else "" for s in after]
    out: list[str | None] = []
    for i, (s, piece) in enumerate(zip(strings, pieces)):
        bad = i in special or not s or "\ufffd" in s or (piece is not None and _BYTE_FALLBACK.match(piece))
        out.append(None if bad else s)
    return out


def _first_ids(strings: list[str | None]) -> dict[str, int]:
    first: dict[str, int] = {}
    for i, s in enumerate(strings):
        if s is not None and s not in first:
            first[s] = i
    return first


def shared_alignment(llm_tokenizer, slm_tokenizer, llm_vocab_size: int, slm_vocab_size: int, llm_stop, slm_stop,
                     min_shared: float = 0.3) -> VocabMap:
    """align_vocabularies, kept for the last few pairs of tokenizer objects: a new CoSteer over models already
    loaded (a fresh prefix cache, another request, the playground's pair) does not align them again. Across
    tokenizers that took 1.9 s (Gemma-3 and SmolLM2, 262,144 and 49,152 tokens), and made a first query with
    a new CoSteer 1.7 s slower than one with the alignment done (bench/ttft.py's `first` against `today`)."""
    return _aligned(llm_tokenizer, slm_tokenizer, int(llm_vocab_size), int(slm_vocab_size), frozenset(llm_stop),
                    frozenset(slm_stop), float(min_shared))  # fmt: skip


@functools.lru_cache(maxsize=4)  # keyed by the tokenizer objects themselves (identity): each loaded model's own
def _aligned(llm_tokenizer, slm_tokenizer, llm_vocab_size, slm_vocab_size, llm_stop, slm_stop, min_shared) -> VocabMap:
    return align_vocabularies(llm_tokenizer, slm_tokenizer, llm_vocab_size, slm_vocab_size, llm_stop, slm_stop, min_shared)


def align_vocabularies(
    llm_tokenizer,
    slm_tokenizer,
    llm_vocab_size: int,
    slm_vocab_size: int,
    llm_stop: frozenset[int],
    slm_stop: frozenset[int],
    min_shared: float = 0.3,
) -> VocabMap:
    """Build the map; raises IncompatibleVocabularies when the shared part is too small."""
    if llm_tokenizer.get_vocab() == slm_tokenizer.get_vocab():
        # Same tokenizer; logits rows past the tokenizer (padding rows) differ between sizes.
        size = min(llm_vocab_size, slm_vocab_size)
        return VocabMap(size=size, identity=True, stop_ids=frozenset(i for i in llm_stop if i < size))

    if not llm_stop or not slm_stop:
        raise IncompatibleVocabularies("both models need an end-of-sequence token to align their vocabularies")
    llm_first = _first_ids(token_strings(llm_tokenizer))
    slm_first = _first_ids(token_strings(slm_tokenizer))
    shared = sorted(
        (i, slm_first[s])
        for s, i in llm_first.items()
        if s in slm_first
        and i < llm_vocab_size
        and slm_first[s] < slm_vocab_size
        and i not in llm_stop  # stops travel only through the STOP entry
        and slm_first[s] not in slm_stop
    )
    smaller = min(len(llm_first), len(slm_first))
    if smaller == 0 or len(shared) < min_shared * smaller:
        raise IncompatibleVocabularies(
            f"the two tokenizers share {len(shared)} of {smaller} token strings "
            f"(need at least {min_shared:.0%}): pick an SLM from the LLM's model family"
        )
    llm_ids, slm_ids = zip(*shared)
    return VocabMap(
        size=len(shared) + 1,
        identity=False,
        llm_index=torch.tensor(llm_ids, dtype=torch.long),
        slm_index=torch.tensor(slm_ids, dtype=torch.long),
        llm_stop=torch.tensor(sorted(llm_stop), dtype=torch.long),
        slm_stop=torch.tensor(sorted(slm_stop), dtype=torch.long),
    )
