"""The browser playground (docs/playground.md): a router served by the device's one HTTP server.

    from costeer.gateway import create_app
    from costeer.playground import Models, PlaygroundSettings, playground_router
    models = Models(PlaygroundSettings(llm="smollm2-135m-instruct", slm="smollm2-135m-instruct"))
    app = create_app(None, routers=[playground_router(models, prefix="")])    # `costeer playground`

`costeer gateway` mounts `playground_router(Models.serving(cs, settings))` at /playground beside its API.
"""

from costeer.playground.models import Models, PlaygroundSettings
from costeer.playground.routes import playground_router

__all__ = ["Models", "PlaygroundSettings", "playground_router"]
