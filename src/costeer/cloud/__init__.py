"""The cloud side: the LLM served over a WebSocket. Imports the engine and `costeer.frames`,
never `costeer.device`."""

from costeer.cloud.server import create_app, serve
from costeer.cloud.sessions import ServerSettings, read_api_keys

__all__ = ["ServerSettings", "create_app", "read_api_keys", "serve"]
