"""`costeer playground`: a local web page that shows the steering happen (docs/playground.md).

    from costeer.playground import PlaygroundSettings, create_app
    app = create_app(PlaygroundSettings(llm="smollm2-135m-instruct", slm="smollm2-135m-instruct"))

`playground_router(models)` is the same page as a router, for an app that serves more (the gateway).
"""

from costeer.playground.models import Models, PlaygroundSettings
from costeer.playground.routes import playground_router

__all__ = ["Models", "PlaygroundSettings", "create_app", "playground_router"]


def create_app(settings: PlaygroundSettings | None = None, models: Models | None = None):
    """A FastAPI app serving the page at /playground/ (and / redirecting there); `models` instead of
    `settings` brings its own loader (tests)."""
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse

    if models is None and settings is None:
        raise ValueError("create_app needs settings or models")
    app = FastAPI(title="costeer playground", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(playground_router(models or Models(settings)))

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/playground/")

    return app
