"""Tiny randomly initialised models and tokenizers built in the test (no download)."""

from __future__ import annotations

import functools

import torch
from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from costeer.engine.models import LM, from_transformers

CORPUS = [
    "the cat sat on the mat and the dog ran to the park",
    "hello world, my name is Sam and I live in Seattle with my dog Biscuit",
    "a quick brown fox jumps over the lazy dog near the river",
    "I like spicy food, tofu, lentils and long runs on Sunday morning",
] * 25

CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@functools.lru_cache(maxsize=None)
def bpe_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE (leading space written `Ġ`), like SmolLM2 / Llama-3 / Qwen."""
    t = ByteLevelBPETokenizer()
    t.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=["<|end|>", "<|user|>", "<|assistant|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=t._tokenizer, eos_token="<|end|>", pad_token="<|end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


@functools.lru_cache(maxsize=None)
def sp_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE (leading space written `▁`), like Gemma / Llama-2; no chat template."""
    t = SentencePieceBPETokenizer()
    t.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=["<eos>", "<unk>", "<bos>"])
    return PreTrainedTokenizerFast(tokenizer_object=t._tokenizer, eos_token="<eos>", unk_token="<unk>", bos_token="<bos>")


@functools.lru_cache(maxsize=None)
def disjoint_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over Greek words: shares no token string with the others."""
    words = ["<|end|>", "[UNK]"] + ["αλφα", "βητα", "γαμμα", "δελτα", "εψιλον", "ζητα", "ητα", "θητα"]
    t = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    t.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|end|>", unk_token="[UNK]")


# The tiny models' trained window: the API refuses a longer prompt, and the eval samples' with-context
# prompts reach about 1,100 tokens on these tokenizers. No weight depends on it.
WINDOW = 4096


def llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=WINDOW,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def gemma3(vocab_size: int, seed: int = 0, sliding_window: int = 8) -> Gemma3ForCausalLM:
    """Gemma-3 text model with a short sliding window, so padded batches cross it."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=WINDOW,
    )
    return Gemma3ForCausalLM(cfg).eval()


def make_lm(name: str, model, tokenizer) -> LM:
    # random configs carry arbitrary default eos ids; tie them to the tokenizer's
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    return from_transformers(model, tokenizer, name)
