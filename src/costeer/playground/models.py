"""The models the playground's pickers offer, loaded on first use (one pair held at a time).

Only the specs listed in `PlaygroundSettings.models` can be chosen: a page never names a path
to load. With `cloud`, the LLM is that `costeer serve` (connected when first needed, so an
unreachable cloud is an error on the page, not at start-up), with a wire log the wire panel reads.
`Models.serving(cs, settings)` offers one pair already loaded (the gateway's) and loads nothing.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from costeer.api import CoSteer
from costeer.engine.config import GenerationConfig


@dataclass(frozen=True)
class PlaygroundSettings:
    llm: str  # the LLM picker's default (and, with `cloud`, the cloud's URL stands in its place)
    slm: str  # the SLM picker's default
    models: tuple[str, ...] = ()  # more specs the pickers offer (presets, files, folders: the operator's)
    cloud: str | None = None  # ws://HOST:PORT of `costeer serve`: the LLM runs there
    cloud_k: str | None = None  # frames to ask the cloud for (None: the device's default)
    api_key: str | None = None  # None: COSTEER_API_KEY
    device: str = "auto"
    backend: str = "auto"
    wire_dir: Path | None = None  # where the cloud's wire log goes (None: a temporary folder)
    pair_only: bool = False  # the pickers offer the default pair alone (a pair the server already holds)

    def __post_init__(self):
        if not self.llm or not self.slm:
            raise ValueError("the playground needs a default LLM and SLM")

    def offered(self) -> dict[str, list[str]]:
        """What each picker lists, the default first."""
        if self.pair_only:
            return {"llm": [self.cloud or self.llm], "slm": [self.slm]}
        specs = list(dict.fromkeys((self.llm, self.slm, *self.models)))
        slms = [self.slm] + [s for s in specs if s != self.slm]
        llms = [self.cloud] if self.cloud else [self.llm] + [s for s in specs if s != self.llm]
        return {"llm": llms, "slm": slms}


class Models:
    """(llm, slm) -> CoSteer, loading what the pair needs; the same spec loads once per pair."""

    def __init__(self, settings: PlaygroundSettings, load_lm: Callable | None = None, connect: Callable | None = None):
        from costeer.engine.models import load_lm as _load_lm

        self.settings = settings
        self._load_lm = load_lm or (lambda spec: _load_lm(spec, settings.device, settings.backend))
        self._connect = connect or self._connect_cloud
        self._pair: tuple[tuple[str, str], CoSteer] | None = None
        self._cloud = None
        self._lock = threading.Lock()
        self.wire_path: Path | None = None

    @classmethod
    def serving(cls, cs: CoSteer, settings: PlaygroundSettings) -> "Models":
        """The pair `cs` (the gateway's, loaded at its start) as the pickers' only choice, named
        `settings.llm` (or `settings.cloud`) and `settings.slm`."""
        settings = replace(settings, pair_only=True)

        def refuse(spec: str):
            raise ValueError(f"the playground here serves its server's pair, not '{spec}'")

        models = cls(settings, load_lm=refuse, connect=lambda: refuse(settings.cloud))
        offered = settings.offered()
        models._pair = ((offered["llm"][0], offered["slm"][0]), cs)
        return models

    def pair(self, llm: str, slm: str) -> CoSteer:
        offered = self.settings.offered()
        if llm not in offered["llm"]:
            raise ValueError(f"LLM '{llm}' is not offered here (choose from {', '.join(offered['llm'])})")
        if slm not in offered["slm"]:
            raise ValueError(f"SLM '{slm}' is not offered here (choose from {', '.join(offered['slm'])})")
        with self._lock:
            if self._pair is None or self._pair[0] != (llm, slm):
                self._pair = None  # let the previous pair's weights go before loading the next
                self._pair = ((llm, slm), self._load(llm, slm))
            return self._pair[1]

    def _load(self, llm: str, slm: str) -> CoSteer:
        slm_lm = self._load_lm(slm)
        if self.settings.cloud:
            if self._cloud is None:
                self._cloud = self._connect()
            return CoSteer(self._cloud, slm_lm, GenerationConfig())
        llm_lm = slm_lm if llm == slm else self._load_lm(llm)  # one model on both sides: loaded once
        return CoSteer(llm_lm, slm_lm, GenerationConfig())

    def _connect_cloud(self):
        from costeer.device import connect_cloud

        wire_dir = self.settings.wire_dir or Path(tempfile.mkdtemp(prefix="costeer-playground-"))
        self.wire_path = wire_dir / "wire.jsonl"
        frames = {"k": self.settings.cloud_k} if self.settings.cloud_k else {}  # else the device's default
        return connect_cloud(self.settings.cloud, self.settings.api_key, wire_log=self.wire_path, **frames)
