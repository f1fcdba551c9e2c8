"""The prefix cache's store: memory LRU by bytes, encrypted files, and every bad input a fallback
(one warning line, a miss, nothing in plaintext on disk)."""

import errno
import logging
import os
import stat

import pytest

from costeer.engine import prefix_cache as pc
from costeer.engine.prefix_cache import Codec, PrefixCache, PrefixCacheConfig, PrefixPlan

RAW = Codec(encode=bytes, decode=bytes)
MODEL = "model-a|v1"
TOKENS = list(range(100, 160))
SECRET = b"my private profile says I live at 12 Elm Street " * 20  # the "state" a backend would store


def cache(tmp_path, key=None, **kw) -> PrefixCache:
    return PrefixCache(PrefixCacheConfig(directory=tmp_path / "prefix", key=key, **kw))


@pytest.fixture
def key():
    return pc.new_key()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def entry_files(tmp_path):
    return sorted((tmp_path / "prefix").glob("*.kv"))


# -- memory ---------------------------------------------------------------------------------


def test_memory_hit_needs_the_same_model_and_the_same_tokens(tmp_path):
    c = cache(tmp_path)
    c.store(MODEL, TOKENS, SECRET, len(SECRET), RAW)
    assert c.lookup(MODEL, TOKENS, RAW) == SECRET
    assert c.lookup("model-b|v1", TOKENS, RAW) is None
    assert c.lookup(MODEL, TOKENS[:-1], RAW) is None
    assert c.lookup(MODEL, TOKENS + [7], RAW) is None
    assert (c.hits, c.misses) == (1, 3)


def test_memory_is_bounded_by_bytes_least_recently_used_first(tmp_path):
    c = cache(tmp_path, max_memory_bytes=250)
    for i in range(3):
        c.store(MODEL, [i], bytes(100), 100, RAW)  # the third pushes the first out
    assert c.lookup(MODEL, [0], RAW) is None and c.memory_bytes == 200
    c.lookup(MODEL, [1], RAW)  # 1 is now the most recent: 2 goes next
    c.store(MODEL, [3], bytes(100), 100, RAW)
    assert c.lookup(MODEL, [2], RAW) is None and c.lookup(MODEL, [1], RAW) is not None
    c.store(MODEL, [4], bytes(1000), 1000, RAW)  # larger than the bound: not kept at all
    assert c.lookup(MODEL, [4], RAW) is None and c.memory_bytes == 200
    c.store(MODEL, [5, 6, 7], bytes(40), 40, RAW)  # [1], [3] and [5, 6, 7] held
    assert (c.memory_bytes, c.memory_tokens) == (240, 5)


def test_touch_is_a_memory_hit_without_the_state(tmp_path, key):
    """A backend whose context still holds a prefix asks only whether the cache has it: a hit, kept longest;
    never read from disk (the state itself is not wanted)."""
    c = cache(tmp_path, key=key, max_memory_bytes=250)
    c.store(MODEL, [0], bytes(100), 100, RAW)
    c.store(MODEL, [1], bytes(100), 100, RAW)
    assert c.touch(MODEL, [0]) and c.hits == 1
    assert not c.touch(MODEL, [0, 1]) and not c.touch("model-b|v1", [0]) and not c.touch(MODEL, [])
    c.store(MODEL, [2], bytes(100), 100, RAW)  # [0] was touched last: [1] goes
    assert c.touch(MODEL, [0]) and not c.touch(MODEL, [1])
    assert c.lookup(MODEL, [1], RAW) is not None  # still on disk: lookup reads it, touch does not
    assert (c.hits, c.misses) == (3, 0)
    off = cache(tmp_path, enabled=False)
    off.store(MODEL, [0], bytes(1), 1, RAW)
    assert not off.touch(MODEL, [0])


def test_disabled_cache_keeps_nothing(tmp_path, key):
    c = cache(tmp_path, key=key, enabled=False)
    c.store(MODEL, TOKENS, SECRET, len(SECRET), RAW)
    assert c.lookup(MODEL, TOKENS, RAW) is None and not entry_files(tmp_path)
    assert not PrefixPlan(c, (3,)).usable([[1, 2, 3, 4]])


def test_plan_leaves_a_token_to_prefill():
    plan = PrefixPlan(PrefixCache(), (0, 9))
    assert plan.usable([[1], [1, 2, 3]]) and plan.length(1, [1, 2, 3]) == 2
    assert not plan.usable([[1], [1]])  # nothing to cache once the last token must be prefilled
    assert not plan.usable([[1, 2, 3]])  # lengths for another batch
    with pytest.raises(ValueError):
        PrefixPlan(PrefixCache(), (-1,))


# -- on disk ----------------------------------------------------------------------------------


def test_no_key_writes_nothing(tmp_path):
    c = cache(tmp_path)
    c.store(MODEL, TOKENS, SECRET, len(SECRET), RAW)
    assert c.disk is None and not (tmp_path / "prefix").exists()


def test_disk_round_trip_encrypted_0600_and_named_by_a_keyed_hash(tmp_path, key):
    cache(tmp_path, key=key).store(MODEL, TOKENS, SECRET, len(SECRET), RAW)
    (f,) = entry_files(tmp_path)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "prefix").stat().st_mode) == 0o700
    blob = f.read_bytes()
    assert b"Elm Street" not in blob and SECRET[:32] not in blob  # never plaintext
    assert pc._digest(TOKENS) not in f.name  # the name is an HMAC under the key, not a plain hash
    fresh = cache(tmp_path, key=key)  # another process: memory empty, the file is read back
    assert fresh.lookup(MODEL, TOKENS, RAW) == SECRET
    assert fresh.lookup("model-b|v1", TOKENS, RAW) is None  # another model looks under another name


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_tampered_or_truncated_file_is_ignored_and_removed(tmp_path, key, caplog, damage):
    cache(tmp_path, key=key).store(MODEL, TOKENS, SECRET, len(SECRET), RAW)
    (f,) = entry_files(tmp_path)
    blob = bytearray(f.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x01
    elif damage == "truncate":
        blob = blob[: len(blob) - 40]
    elif damage == "empty":
        blob = bytearray()
    else:
        blob = bytearray(os.urandom(len(blob)))
    f.write_bytes(bytes(blob))
    c = cache(tmp_path, key=key)
    with caplog.at_level(logging.WARNING):
        assert c.lookup(MODEL, TOKENS, RAW) is None
    (line,) = warnings_of(caplog)
    assert "integrity" in line and "prefilling" in line
    assert not f.exists()  # rebuilt by the next prefill
    c.store(MODEL, TOKENS, SECRET, len(SECRET), RAW)
    assert cache(tmp_path, key=key).lookup(MODEL, TOKENS, RAW) == SECRET


def test_a_file_written_for_another_model_fails_its_tag(tmp_path, key, caplog):
    c = cache(tmp_path, key=key)
    c.store("model-b|v1", TOKENS, SECRET, len(SECRET), RAW)
    (f,) = entry_files(tmp_path)
    f.rename(f.with_name(c.disk.name(MODEL, TOKENS)))  # put it where model A's entry would be
    with caplog.at_level(logging.WARNING):
        assert cache(tmp_path, key=key).lookup(MODEL, TOKENS, RAW) is None
    assert len(warnings_of(caplog)) == 1


def test_a_state_the_backend_cannot_use_is_a_miss_with_one_warning(tmp_path, key, caplog):
    cache(tmp_path, key=key).store(MODEL, TOKENS, SECRET, len(SECRET), RAW)
    picky = Codec(encode=bytes, decode=lambda blob: None)
    with caplog.at_level(logging.WARNING):
        assert cache(tmp_path, key=key).lookup(MODEL, TOKENS, picky) is None
    (line,) = warnings_of(caplog)
    assert "does not fit" in line and not entry_files(tmp_path)


def test_wrong_key_is_memory_only_and_leaves_the_folder_alone(tmp_path, key, caplog):
    cache(tmp_path, key=key).store(MODEL, TOKENS, SECRET, len(SECRET), RAW)
    before = {p.name: p.read_bytes() for p in (tmp_path / "prefix").iterdir()}
    with caplog.at_level(logging.WARNING):
        other = cache(tmp_path, key=pc.new_key())
    (line,) = warnings_of(caplog)
    assert "does not match" in line and other.disk is None
    assert other.lookup(MODEL, TOKENS, RAW) is None
    other.store(MODEL, TOKENS, b"x", 1, RAW)  # kept in memory only
    assert {p.name: p.read_bytes() for p in (tmp_path / "prefix").iterdir()} == before


@pytest.mark.parametrize("bad", ["not base64 at all!", "c2hvcnQ="])
def test_malformed_key_is_memory_only(tmp_path, caplog, bad):
    with caplog.at_level(logging.WARNING):
        c = cache(tmp_path, key=bad)
    (line,) = warnings_of(caplog)
    assert "key" in line and "memory only" in line and c.disk is None
    c.store(MODEL, TOKENS, SECRET, len(SECRET), RAW)
    assert c.lookup(MODEL, TOKENS, RAW) == SECRET and not (tmp_path / "prefix").exists()


def test_missing_key_with_files_on_disk_says_so_once(tmp_path, key, caplog):
    cache(tmp_path, key=key).store(MODEL, TOKENS, SECRET, len(SECRET), RAW)
    c = cache(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert c.lookup(MODEL, TOKENS, RAW) is None
        assert c.lookup(MODEL, TOKENS, RAW) is None
    (line,) = warnings_of(caplog)
    assert "no key" in line


def _failing_open(errno_, prefix_dir):
    real_open = os.open

    def fake_open(path, flags, *a, **kw):
        if str(path).startswith(str(prefix_dir)) and flags & os.O_CREAT:
            raise OSError(errno_, os.strerror(errno_), str(path))
        return real_open(path, flags, *a, **kw)

    return fake_open


def test_full_disk_keeps_the_context_in_memory_with_one_warning(tmp_path, key, caplog, monkeypatch):
    c = cache(tmp_path, key=key)
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pc.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with caplog.at_level(logging.WARNING):
        for i in range(3):
            c.store(MODEL, TOKENS + [i], SECRET, len(SECRET), RAW)
    (line,) = warnings_of(caplog)
    assert "No space left" in line
    assert c.lookup(MODEL, TOKENS + [2], RAW) == SECRET  # served from memory
    assert not entry_files(tmp_path) and not list((tmp_path / "prefix").glob(".*.tmp"))


def test_read_only_cache_folder_is_memory_only_with_one_warning(tmp_path, key, caplog, monkeypatch):
    monkeypatch.setattr(pc.os, "open", _failing_open(errno.EROFS, tmp_path / "prefix"))
    with caplog.at_level(logging.WARNING):
        c = cache(tmp_path, key=key)
        c.store(MODEL, TOKENS, SECRET, len(SECRET), RAW)
        c.store(MODEL, TOKENS[:10], SECRET, len(SECRET), RAW)
    (line,) = warnings_of(caplog)
    assert "Read-only" in line
    assert c.lookup(MODEL, TOKENS, RAW) == SECRET


def test_disk_is_bounded_least_recently_used_first(tmp_path, key):
    c = cache(tmp_path, key=key, max_disk_bytes=3 * 1200)
    for i in range(5):
        c.store(MODEL, [i], bytes(1000), 1000, RAW)
    files = entry_files(tmp_path)
    assert len(files) == 3 and sum(f.stat().st_size for f in files) <= 3 * 1200
    fresh = cache(tmp_path, key=key)
    assert fresh.lookup(MODEL, [0], RAW) is None and fresh.lookup(MODEL, [4], RAW) is not None


def test_clear_removes_every_entry(tmp_path, key):
    c = cache(tmp_path, key=key)
    for i in range(3):
        c.store(MODEL, [i], SECRET, len(SECRET), RAW)
    n, size = pc.clear(tmp_path / "prefix")
    assert n == 4 and size > 3 * len(SECRET)  # three entries and the key check
    assert not list((tmp_path / "prefix").iterdir())
    assert pc.clear(tmp_path / "nothing-here") == (0, 0)


def test_from_env_reads_the_key_and_the_bounds(tmp_path, monkeypatch, key):
    monkeypatch.setenv("COSTEER_CACHE_KEY", key)
    monkeypatch.setenv("COSTEER_PREFIX_CACHE_MEMORY_MB", "1.5")
    cfg = PrefixCacheConfig.from_env()
    assert cfg.key == key and cfg.max_memory_bytes == int(1.5 * pc.MiB) and cfg.enabled
    monkeypatch.delenv("COSTEER_CACHE_KEY")
    key_file = pc.write_key_file(tmp_path / "k" / "cache.key")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    monkeypatch.setenv("COSTEER_CACHE_KEY_FILE", str(key_file))
    assert pc.parse_key(PrefixCacheConfig.from_env().key)
    with pytest.raises(FileExistsError):
        pc.write_key_file(key_file)  # never replaces a key that encrypted files may depend on
    assert not PrefixCacheConfig.from_env().exact and PrefixCacheConfig.from_env("exact").exact  # eval's default
    monkeypatch.setenv("COSTEER_PREFIX_CACHE", "exact")
    assert PrefixCacheConfig.from_env().exact
    monkeypatch.setenv("COSTEER_PREFIX_CACHE", "on")
    assert not PrefixCacheConfig.from_env("exact").exact  # the user's choice rules
    monkeypatch.setenv("COSTEER_PREFIX_CACHE", "off")
    assert not PrefixCacheConfig.from_env().enabled
