"""Pages for people: the playground at ``/`` and the API docs at ``/docs`` and ``/redoc``.

Everything a browser loads comes from this server: the playground's HTML, CSS and JavaScript modules are
package data under ``serve/playground/`` (no build step), and Swagger UI / ReDoc come from the
``fastapi-offline`` package's bundled files instead of FastAPI's default CDN links, so both pages work on a
machine without internet. The playground talks to the server only through the public HTTP API.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

PLAYGROUND_DIR = Path(__file__).parent / "playground"
PLAYGROUND_PATH = "/"
DOCS_ASSETS = "/docs-assets"


def _docs_assets_dir() -> Path:
    """The Swagger UI / ReDoc files shipped inside the ``fastapi-offline`` package (a ``serve`` dependency)."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the fastapi-offline package is missing: pip install 'deepserve[serve]'")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def install_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` from local assets; create the app with ``docs_url=None`` and
    ``redoc_url=None`` so FastAPI's CDN-linked pages are not registered first."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=_docs_assets_dir()), name="docs-assets")
    oauth2_redirect = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
                                   oauth2_redirect_url=oauth2_redirect,
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")

    @app.get(oauth2_redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
                              redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)


def install_playground(app: FastAPI) -> None:
    """The playground page at ``/`` and its assets under ``/playground/``."""
    app.mount("/playground", StaticFiles(directory=PLAYGROUND_DIR), name="playground")
    index = PLAYGROUND_DIR / "index.html"

    @app.get(PLAYGROUND_PATH, include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(index, media_type="text/html")
