"""CoSteer: a small on-device model steers a cloud LLM's decoding, token by token.

Layers, imported in one direction (docs/architecture.md):
steering -> engine -> api / chat / hf -> device / cloud -> gateway / playground -> eval -> cli.
"""

__version__ = "0.1.0"

from costeer.api import CoSteer, Generation  # noqa: E402
from costeer.engine.config import (  # noqa: E402
    GenerationConfig,
    Method,
    SamplingConfig,
    SteeringConfig,
    VariantConfig,
)

__all__ = ["CoSteer", "Generation", "GenerationConfig", "Method", "SamplingConfig", "SteeringConfig", "VariantConfig"]
