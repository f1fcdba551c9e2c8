"""Where costeer keeps what it computes once (converted weights, tokenizers, cached contexts)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """COSTEER_CACHE_DIR, else $XDG_CACHE_HOME/costeer, else ~/.cache/costeer."""
    env = os.environ.get("COSTEER_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "costeer"
