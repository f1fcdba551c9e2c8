"""Engine pieces: model backends, vocabulary alignment, prompts, sampling and the decode loop.

Imports only `costeer.steering` and `costeer.errors` below it; nothing here knows about the CLI
(docs/architecture.md).
"""
