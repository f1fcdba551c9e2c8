"""Engine pieces: model backends, vocabulary alignment, prompts, sampling and the decode loop.

Imports only `costeer.steering` below it; nothing here knows about the CLI.
"""
