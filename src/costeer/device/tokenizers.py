"""The device's cache of cloud tokenizers, keyed by fingerprint (`frames.tokenizer_fingerprint`):
fetched from a cloud once, then loaded from disk (the wire audit reads it back too)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from costeer.engine.models import cache_root


def tokenizer_dir(fingerprint: str) -> Path:
    return cache_root() / "tokenizers" / fingerprint


def cached_tokenizer(fingerprint: str):
    """The tokenizer with this fingerprint from the device's cache, or None."""
    d = tokenizer_dir(fingerprint)
    if not d.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def store_tokenizer(fingerprint: str, files: dict[str, str]) -> None:
    """Write a tokenizer's files ({name: text}) into the cache, all at once (a rename of a
    finished folder), so that a reader never sees half of it."""
    d = tokenizer_dir(fingerprint)
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (tmp / Path(name).name).write_text(text, encoding="utf-8")
    if d.exists():  # another process cached it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, d)
