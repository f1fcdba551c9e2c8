"""The device's OpenAI-compatible HTTP server (`costeer gateway`): apps written against the
OpenAI chat API get CoSteer answers, with the private context read from the gateway's own
configuration only. Imports the API layer (costeer.api, costeer.chat), never the CLI."""

from costeer.gateway.app import Gateway, create_app, serve
from costeer.gateway.config import DEFAULT_HOST, DEFAULT_PORT, GatewaySettings, check_bind

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Gateway", "GatewaySettings", "check_bind", "create_app", "serve"]
