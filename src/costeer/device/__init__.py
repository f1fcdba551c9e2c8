"""The device side of the cloud split: the cloud's LLM as a next-token source (run with the
on-device SLM pair) — our own cloud service (client.py: the WebSocket source) or a third-party
serving engine (engines.py) — and the wire log with its audit (wire.py). Beside them: transport.py
(HTTP, CloudError, Retry), tokenizers.py (the tokenizer cache), ahead.py (the SLM pair run while
the cloud computes), options.py (the frames and the look-ahead to ask for). Imports run one way:
client / engines -> ahead, options, transport -> wire -> tokenizers; all of them may import the
engine and `costeer.frames`, never `costeer.cloud` (docs/architecture.md; tests/test_layers.py checks
the directions)."""

from costeer.device.client import CloudLLM, CloudSource, connect_cloud
from costeer.device.engines import EngineLLM, connect_engine
from costeer.device.options import DEFAULT_FRAMES, DEFAULT_K, CloudFrames, Lookahead
from costeer.device.transport import CloudError, Retry
from costeer.device.wire import AuditReport, WireLog, audit_wire

__all__ = [
    "DEFAULT_FRAMES",
    "DEFAULT_K",
    "AuditReport",
    "CloudError",
    "CloudFrames",
    "CloudLLM",
    "CloudSource",
    "EngineLLM",
    "Lookahead",
    "Retry",
    "WireLog",
    "audit_wire",
    "connect_cloud",
    "connect_engine",
]
