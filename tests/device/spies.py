"""Test helper: watch the sources a remote LLM's connect() builds (both device test files use it)."""

from __future__ import annotations


def spy_sources(llm) -> list:
    """Wrap llm.connect so that every CloudSource it builds is appended to the returned list."""
    sources, connect = [], llm.connect

    def spy(*a, **kw):
        pair = connect(*a, **kw)
        sources.append(pair[0])
        return pair

    llm.connect = spy
    return sources
