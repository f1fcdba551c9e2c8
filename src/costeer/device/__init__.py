"""The device side of the cloud split: the cloud's LLM as a next-token source (run with the
on-device SLM pair) — our own cloud service (client.py) or a third-party serving engine
(engines.py) — the wire log and its audit. Imports the engine and `costeer.frames`."""

from costeer.device.client import DEFAULT_FRAMES, DEFAULT_K, CloudError, CloudLLM, CloudSource, Retry, connect_cloud, parse_frames, parse_k
from costeer.device.engines import EngineLLM, connect_engine
from costeer.device.wire import AuditReport, WireLog, audit_wire

__all__ = [
    "DEFAULT_FRAMES",
    "DEFAULT_K",
    "AuditReport",
    "CloudError",
    "CloudLLM",
    "CloudSource",
    "EngineLLM",
    "Retry",
    "WireLog",
    "audit_wire",
    "connect_cloud",
    "connect_engine",
    "parse_frames",
    "parse_k",
]
