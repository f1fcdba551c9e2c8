"""The KV prefix cache: a private context is prefilled once, later prompts that start with it restore it.

A with-context prompt is laid out as [stable prefix | the rest]: the template's head and the context
first, the query after (engine/prompts.py, `stable_prefix_len`). With a cache, a backend prefills such a
prompt in two steps, the prefix and then the rest, and keeps the model's KV state after the prefix; a
later prompt with the same prefix tokens restores that state and prefills only the rest. A hit and a
miss therefore compute the same thing: the prefix's state is the same bytes either way.

Entries are keyed by the model's identity (backend, model file or checkpoint, library versions: each
backend writes its own, engine/models.py and engine/llamacpp.py) and a hash of the prefix's token ids,
and kept

- in memory, least recently used first out, bounded by bytes (`max_memory_bytes`);
- on disk only with a key the user holds (COSTEER_CACHE_KEY, or a key file): each entry is one
  AES-GCM-encrypted file, mode 0600, named by an HMAC of its key fields (a file name says nothing of the
  context), bound by the cipher's associated data to its name and its model's identity, so a file that
  was tampered with, truncated, or written for another model, backend, version or key fails its tag and
  is ignored (and removed: it is rebuilt by the next prefill). Without a key nothing is written.

Every failure on disk (no room, a read-only folder, a bad file, a wrong key) costs one warning line and a
normal prefill, never an error: the cache is only ever a shortcut.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import logging
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Sequence, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from costeer.engine.paths import cache_root
from costeer.errors import CoSteerError

log = logging.getLogger(__name__)

S = TypeVar("S")  # a backend's state: bytes (llama.cpp) or a KV snapshot (transformers)

MAGIC = b"CSTPFX01"  # file format; a new layout gets a new magic and old files fail their tag
NONCE = 12
SUFFIX = ".kv"
KEY_CHECK = "key.check"  # a constant encrypted with the key that wrote the folder
_KEY_CHECK_TEXT = b"costeer prefix cache key check"
KEY_ENV = "COSTEER_CACHE_KEY"
KEY_FILE_ENV = "COSTEER_CACHE_KEY_FILE"
MiB = 1 << 20


class CacheKeyError(CoSteerError, ValueError):
    """A cache key that is not 32 bytes of urlsafe base64."""


def default_key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "costeer" / "cache.key"


def default_directory() -> Path:
    return cache_root() / "prefix"


def parse_key(text: str) -> bytes:
    """A key as `new_key()` writes it (urlsafe base64 of 32 bytes) -> the 32 bytes."""
    try:
        raw = base64.urlsafe_b64decode(text.strip().encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise CacheKeyError("the cache key is not urlsafe base64") from None
    if len(raw) != 32:
        raise CacheKeyError(f"the cache key must be 32 bytes, got {len(raw)}")
    return raw


def new_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")


def write_key_file(path: Path) -> Path:
    """Create a new key file readable by its owner only; an existing one is never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(new_key() + "\n")
    return path


class PrefixCacheConfig(BaseModel):
    """Where and how much. `from_env` reads COSTEER_PREFIX_CACHE (off|0 disables it, exact sets `exact`),
    COSTEER_PREFIX_CACHE_MEMORY_MB, COSTEER_PREFIX_CACHE_DISK_MB, COSTEER_CACHE_KEY, COSTEER_CACHE_KEY_FILE."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    max_memory_bytes: int = Field(512 * MiB, ge=0)
    max_disk_bytes: int = Field(2048 * MiB, ge=0)
    directory: Path | None = None  # None: <cache root>/prefix
    key: str | None = Field(None, repr=False)  # urlsafe base64 of 32 bytes; None: memory only
    key_source: str = ""  # where the key came from, for messages
    # llama.cpp: cut prefixes at a compute-step boundary (engine/llamacpp.py, N_UBATCH) so a cached prompt
    # computes bit for bit what a whole-prompt prefill does, at the price of prefilling up to 511 more
    # tokens on a hit. Off: the prefix is cut just before the query (the fastest hit; the split moves
    # log-probabilities by rounding, docs/prefix-cache.md). No effect on transformers.
    exact: bool = False

    @classmethod
    def from_env(cls, default_mode: str = "on") -> "PrefixCacheConfig":
        """default_mode: the mode when COSTEER_PREFIX_CACHE is unset (`costeer eval` asks for "exact", so
        that a run's outputs never depend on a speed setting)."""
        env = os.environ
        mode = env.get("COSTEER_PREFIX_CACHE", default_mode).strip().lower()
        kw: dict = {"enabled": mode not in ("off", "0", "false", "no"), "exact": mode == "exact"}
        for name, field in (("MEMORY", "max_memory_bytes"), ("DISK", "max_disk_bytes")):
            raw = env.get(f"COSTEER_PREFIX_CACHE_{name}_MB")
            if raw:
                try:
                    kw[field] = max(0, int(float(raw) * MiB))
                except ValueError:
                    log.warning("prefix cache: COSTEER_PREFIX_CACHE_%s_MB=%r is not a number; default kept", name, raw)
        key, source = env.get(KEY_ENV), KEY_ENV
        if not key:
            path = Path(env.get(KEY_FILE_ENV) or default_key_file()).expanduser()
            source = str(path)
            try:
                key = path.read_text(encoding="ascii").strip() or None
            except FileNotFoundError:
                key = None
            except (OSError, UnicodeDecodeError) as e:
                log.warning("prefix cache: cannot read the key file %s (%s): memory only", path, _why(e))
                key = None
        return cls(**kw, key=key, key_source=source if key else "")


def _why(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__


def _token_bytes(tokens: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}I", *tokens)


@dataclass(frozen=True)
class Codec(Generic[S]):
    """How a backend's state crosses the disk: state -> bytes, bytes -> state (None: unusable)."""

    encode: Callable[[S], bytes]
    decode: Callable[[bytes], S | None]


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    state: object
    nbytes: int


class PrefixCache:
    """KV states of prompt prefixes, in memory (LRU by bytes) and, with a key, encrypted on disk.

    Thread-safe: a long-lived CoSteer (the gateway) shares one across requests."""

    def __init__(self, config: PrefixCacheConfig | None = None):
        self.config = config or PrefixCacheConfig()
        self._memory: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._memory_bytes = 0
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self.hits = self.misses = 0
        self.disk: _DiskStore | None = None
        if self.config.enabled and self.config.key is not None:
            try:
                key = parse_key(self.config.key)
            except CacheKeyError as e:
                log.warning("prefix cache: %s (%s): memory only", e, self.config.key_source)
            else:
                self.disk = _DiskStore(self.directory, key, self.config.max_disk_bytes).opened()

    @classmethod
    def from_env(cls, default_mode: str = "on") -> "PrefixCache":
        return cls(PrefixCacheConfig.from_env(default_mode))

    @property
    def directory(self) -> Path:
        return self.config.directory or default_directory()

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes

    @property
    def memory_tokens(self) -> int:
        """Prefix tokens whose states are held in memory (every entry's)."""
        with self._lock:
            return sum(len(e.tokens) for e in self._memory.values())

    def __len__(self) -> int:
        return len(self._memory)

    # -- the two calls a backend makes -------------------------------------------------------

    def lookup(self, identity: str, tokens: Sequence[int], codec: Codec[S]) -> S | None:
        """The state after exactly `tokens` on the model `identity`, or None."""
        if not self.config.enabled or not tokens:
            return None
        entry = self._hit_in_memory(identity, tokens)
        if entry is not None:
            return entry.state
        state = self._load(identity, tokens, codec)
        with self._lock:
            if state is None:
                self.misses += 1
            else:
                self.hits += 1
        return state

    def touch(self, identity: str, tokens: Sequence[int]) -> bool:
        """Is the state after exactly `tokens` in memory? If so it counts as a hit and is kept longest: a
        backend whose context still holds that very state (llama.cpp, a kept context) uses it in place."""
        return self.config.enabled and bool(tokens) and self._hit_in_memory(identity, tokens) is not None

    def _hit_in_memory(self, identity: str, tokens: Sequence[int]) -> _Entry | None:
        key = (identity, _digest(tokens))
        with self._lock:
            entry = self._memory.get(key)
            if entry is None or entry.tokens != tuple(tokens):
                return None
            self._memory.move_to_end(key)
            self.hits += 1
            return entry

    def store(self, identity: str, tokens: Sequence[int], state: S, nbytes: int, codec: Codec[S]) -> None:
        """Keep the state after `tokens` (in memory, and encrypted on disk with a key)."""
        if not self.config.enabled or not tokens:
            return
        self._remember(identity, tokens, state, nbytes)
        if self.disk is not None:
            self.disk.write(identity, tokens, codec.encode(state))

    def _remember(self, identity: str, tokens: Sequence[int], state: object, nbytes: int) -> None:
        if nbytes > self.config.max_memory_bytes:
            return
        key = (identity, _digest(tokens))
        with self._lock:
            old = self._memory.pop(key, None)
            if old is not None:
                self._memory_bytes -= old.nbytes
            self._memory[key] = _Entry(tuple(tokens), state, nbytes)
            self._memory_bytes += nbytes
            while self._memory_bytes > self.config.max_memory_bytes:
                _, dropped = self._memory.popitem(last=False)
                self._memory_bytes -= dropped.nbytes

    def _load(self, identity: str, tokens: Sequence[int], codec: Codec[S]) -> S | None:
        if self.disk is None:
            self._warn_locked_files()
            return None
        payload = self.disk.read(identity, tokens)
        if payload is None:
            return None
        state = codec.decode(payload)
        if state is None:
            self.disk.reject(identity, tokens, "does not fit the model")
            return None
        self._remember(identity, tokens, state, len(payload))
        return state

    def _warn_locked_files(self) -> None:
        """Cached contexts on disk but no key to read them: say so once."""
        if "nokey" in self._warned or not self.config.enabled:
            return
        self._warned.add("nokey")
        try:
            n = sum(1 for p in self.directory.glob(f"*{SUFFIX}"))
        except OSError:
            return
        if n:
            log.warning("prefix cache: %d encrypted contexts in %s but no key (%s or %s): memory only",
                        n, self.directory, KEY_ENV, default_key_file())  # fmt: skip

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()
            self._memory_bytes = 0


def _digest(tokens: Sequence[int]) -> str:
    return hashlib.sha256(_token_bytes(tokens)).hexdigest()


class _DiskStore:
    """Encrypted entry files under one folder. Any OSError is a warning and a miss."""

    def __init__(self, directory: Path, key: bytes, max_bytes: int):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.dir, self.max_bytes = Path(directory), max_bytes
        self._aead, self._mac_key = AESGCM(key), hashlib.sha256(b"costeer prefix names" + key).digest()
        self.writable = True
        self._lock = threading.Lock()

    def opened(self) -> "_DiskStore | None":
        """Check the folder's key; None (memory only, one warning) when it belongs to another key."""
        check = self.dir / KEY_CHECK
        try:
            blob = check.read_bytes()
        except FileNotFoundError:
            self._write_file(check, self._seal(_KEY_CHECK_TEXT, b"key"))
            return self
        except OSError as e:
            log.warning("prefix cache: cannot read %s (%s): memory only", self.dir, _why(e))
            return None
        if self._open(blob, b"key") != _KEY_CHECK_TEXT:
            log.warning("prefix cache: the key does not match the one that wrote %s: memory only "
                        "(`costeer cache clear` starts the folder over)", self.dir)  # fmt: skip
            return None
        return self

    # -- names and sealing ----------------------------------------------------------------

    def name(self, identity: str, tokens: Sequence[int]) -> str:
        mac = hmac.new(self._mac_key, identity.encode() + b"\0" + _token_bytes(tokens), hashlib.sha256)
        return mac.hexdigest()[:40] + SUFFIX

    def _seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return MAGIC + nonce + self._aead.encrypt(nonce, plaintext, MAGIC + aad)

    def _open(self, blob: bytes, aad: bytes) -> bytes | None:
        from cryptography.exceptions import InvalidTag

        if len(blob) < len(MAGIC) + NONCE + 16 or not blob.startswith(MAGIC):
            return None
        nonce = blob[len(MAGIC) : len(MAGIC) + NONCE]
        try:
            return self._aead.decrypt(nonce, blob[len(MAGIC) + NONCE :], MAGIC + aad)
        except InvalidTag:
            return None

    # -- entries ---------------------------------------------------------------------------

    def read(self, identity: str, tokens: Sequence[int]) -> bytes | None:
        name = self.name(identity, tokens)
        path = self.dir / name
        try:
            if path.stat().st_size > self.max_bytes + 4096:
                raise OSError(errno.EFBIG, "larger than the cache's bound")
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            self._warn(f"cannot read {path} ({_why(e)}); prefilling")
            return None
        plain = self._open(blob, name.encode() + b"\0" + identity.encode())
        head = 4 + 4 * len(tokens)
        if plain is None or len(plain) < head or plain[:head] != struct.pack("<I", len(tokens)) + _token_bytes(tokens):
            self.reject(identity, tokens, "failed its integrity check (tampered, truncated, or another model's)")
            return None
        try:
            os.utime(path)  # recently used: the size bound drops the oldest first
        except OSError:
            pass
        return plain[head:]

    def reject(self, identity: str, tokens: Sequence[int], why: str) -> None:
        """A file that must not be used: one warning, and removed so the next prefill rebuilds it."""
        path = self.dir / self.name(identity, tokens)
        log.warning("prefix cache: %s %s; ignored, prefilling", path.name, why)
        try:
            path.unlink()
        except OSError:
            pass

    def write(self, identity: str, tokens: Sequence[int], payload: bytes) -> None:
        if not self.writable:
            return
        name = self.name(identity, tokens)
        plain = struct.pack("<I", len(tokens)) + _token_bytes(tokens) + payload
        blob = self._seal(plain, name.encode() + b"\0" + identity.encode())
        if len(blob) > self.max_bytes:
            return
        with self._lock:
            if self._write_file(self.dir / name, blob):
                self._bound()

    def _write_file(self, path: Path, blob: bytes) -> bool:
        """Write atomically, 0600 from the first byte; an error stops writes with one warning."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, path)
            return True
        except OSError as e:
            self.writable = False
            _unlink_quietly(tmp)
            self._warn(f"cannot write to {self.dir} ({_why(e)}); this session's contexts stay in memory")
            return False

    def _bound(self) -> None:
        """Drop the least recently used files until the folder fits `max_bytes`."""
        try:
            files = [(p.stat(), p) for p in self.dir.glob(f"*{SUFFIX}")]
        except OSError:
            return
        total = sum(st.st_size for st, _ in files)
        for st, p in sorted(files, key=lambda f: f[0].st_mtime_ns):
            if total <= self.max_bytes:
                break
            _unlink_quietly(p)
            total -= st.st_size

    def _warn(self, msg: str) -> None:
        log.warning("prefix cache: %s", msg)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def clear(directory: Path | None = None) -> tuple[int, int]:
    """Remove every cached context (and the key check) under the folder -> (files, bytes)."""
    d = Path(directory or default_directory())
    n = size = 0
    if not d.is_dir():
        return 0, 0
    for p in list(d.glob(f"*{SUFFIX}")) + list(d.glob(".*.tmp")) + [d / KEY_CHECK]:
        try:
            st = p.stat()
            p.unlink()
        except FileNotFoundError:
            continue
        n, size = n + 1, size + st.st_size
    return n, size


@dataclass(frozen=True)
class PrefixPlan:
    """Which prompts of a decode batch start with a stable prefix: `lengths[b]` tokens of prompt b
    (0: none), to restore from / keep in `cache`."""

    cache: PrefixCache
    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        if any(n < 0 for n in self.lengths):
            raise ValueError("prefix lengths must be >= 0")

    def usable(self, prompts: Sequence[Sequence[int]]) -> bool:
        """Does the plan fit these prompts, and does any of them have a prefix to cache?"""
        return (self.cache.config.enabled and len(self.lengths) == len(prompts)
                and any(min(n, len(p) - 1) > 0 for n, p in zip(self.lengths, prompts)))  # fmt: skip

    def length(self, b: int, prompt: Sequence[int]) -> int:
        """Prompt b's prefix, leaving at least one token to prefill (its logits are the first token's)."""
        return min(self.lengths[b], len(prompt) - 1)
