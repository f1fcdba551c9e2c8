"""The device's cache of cloud tokenizers, keyed by fingerprint (`frames.tokenizer_fingerprint`):
fetched from a cloud once, then loaded from disk (the wire audit reads it back too).

The fingerprint and the file names come from the cloud, so both are checked before they name a
path (docs/security.md): a fingerprint is 64 hex digits, a file name a plain name, and every path
resolves inside the cache."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from costeer.engine.models import cache_root
from costeer.errors import CoSteerError

FINGERPRINT = re.compile(r"[0-9a-f]{64}")  # sha256, hex (frames.tokenizer_fingerprint)
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # no separator, no leading dot
MAX_FILES = 16  # save_pretrained writes 3 to 6


class TokenizerRefused(CoSteerError, ValueError):
    """A fingerprint or tokenizer files from a cloud that the cache does not take."""


def check_fingerprint(fingerprint: object) -> str:
    if not isinstance(fingerprint, str) or not FINGERPRINT.fullmatch(fingerprint):
        raise TokenizerRefused(f"tokenizer_fingerprint must be 64 hex digits, got {str(fingerprint)[:80]!r}")
    return fingerprint


def _inside(root: Path, path: Path) -> Path:
    """`path`, resolved, when it lies inside `root` (resolved); raises otherwise."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise TokenizerRefused(f"refusing a tokenizer path outside the cache: {path}")
    return resolved


def _root() -> Path:
    return cache_root() / "tokenizers"


def tokenizer_dir(fingerprint: str) -> Path:
    return _inside(_root(), _root() / check_fingerprint(fingerprint))


def cached_tokenizer(fingerprint: str):
    """The tokenizer with this fingerprint from the device's cache, or None."""
    d = tokenizer_dir(fingerprint)
    if not d.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def check_files(files: object) -> dict[str, str]:
    """{name: text} with plain names, at most MAX_FILES of them; raises TokenizerRefused."""
    if not isinstance(files, dict) or not files:
        raise TokenizerRefused("tokenizer files must be a non-empty object {name: text}")
    if len(files) > MAX_FILES:
        raise TokenizerRefused(f"{len(files)} tokenizer files, more than {MAX_FILES}")
    for name, text in files.items():
        if not FILE_NAME.fullmatch(name):
            raise TokenizerRefused(f"tokenizer file name {name[:80]!r} is not a plain file name")
        if not isinstance(text, str):
            raise TokenizerRefused(f"tokenizer file {name} is not text")
    return files


def store_tokenizer(fingerprint: str, files: object):
    """Write a tokenizer's files ({name: text}, checked) into the cache, all at once (a rename of a
    finished folder), so that a reader never sees half of it; kept only when the tokenizer they
    make has `fingerprint` -> that tokenizer. Raises TokenizerRefused, leaving nothing behind."""
    d = tokenizer_dir(fingerprint)
    files = check_files(files)
    d.parent.mkdir(parents=True, exist_ok=True)
    # a folder of its own: two connects in one process (threads) must not write into each other's files
    tmp = _inside(d.parent, Path(tempfile.mkdtemp(prefix=d.name + ".tmp", dir=d.parent)))
    try:
        for name, text in files.items():
            _inside(tmp, tmp / name).write_text(text, encoding="utf-8")
        tok = _load_checked(tmp, fingerprint)
        try:
            os.replace(tmp, d)
        except OSError:
            if not d.is_dir():
                raise
            # another store (thread or process) cached it meanwhile: the same files, checked the same way
        return tok
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_checked(folder: Path, fingerprint: str):
    from transformers import AutoTokenizer

    from costeer.frames import tokenizer_fingerprint

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)  # never trust_remote_code
    except Exception as e:  # noqa: BLE001 - whatever the files make the library raise, they are refused
        raise TokenizerRefused(f"its files do not load ({type(e).__name__})") from None
    if tokenizer_fingerprint(tok) != fingerprint:
        raise TokenizerRefused("the tokenizer its files make does not match its fingerprint")
    return tok
