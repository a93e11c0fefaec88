"""The interactive API docs at ``GET /docs``: Swagger UI, served from the package, so it works offline.

Swagger UI is vendored in ``http/swagger-ui/``: the bundle and the stylesheet of the npm package
``swagger-ui-dist`` (the Swagger UI project's own build, Apache-2.0; ``LICENSE``, ``NOTICE`` and the
bundle's third-party notices beside them), byte for byte. Not the PyPI package ``swagger-ui-bundle``:
its latest release (1.1.0, November 2023) ships Swagger UI 4.15.5, which cannot render an OpenAPI
3.1 document such as ours, and it would bring Jinja2 to every install for a template we do not use.

The page and the two files are read from the package once, on first request, off the event loop.
"""

from __future__ import annotations

import asyncio
import html
import json
from pathlib import Path

SWAGGER_UI_VERSION = "5.36.0"
"""The vendored Swagger UI (``swagger-ui-dist`` on npm); to update it, replace the files and this number."""

ASSETS = Path(__file__).with_name("swagger-ui")
"""Where the vendored files are."""

ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
}
"""The files ``/docs`` loads, served at ``/docs/<name>``, and their content types."""


class DocsAssets:
    """Swagger UI's files, read from the package on first use and kept (about 2 MB).

    Example::

        assets = DocsAssets()
        body = await assets.read("swagger-ui.css")
    """

    def __init__(self, directory: Path = ASSETS) -> None:
        self.directory = directory
        self._files: dict[str, bytes] = {}

    async def read(self, name: str) -> bytes:
        """The bytes of ``name``, one of ``ASSET_TYPES``."""
        body = self._files.get(name)
        if body is None:
            body = self._files[name] = await asyncio.to_thread((self.directory / name).read_bytes)
        return body


def docs_html(openapi_url: str, title: str, assets_url: str = "/docs") -> str:
    """The Swagger UI page for ``GET /docs``, reading the document at ``openapi_url``.

    Its scripts and styles come from ``assets_url`` (this server), never from another host; the
    validator badge, which would send the document to validator.swagger.io, is off.
    """
    # json.dumps makes a JS string literal; escaping "<" keeps a "</script>" in it from ending the script.
    url = json.dumps(openapi_url).replace("<", "\\u003c")
    assets = html.escape(assets_url)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="{assets}/swagger-ui.css?v={SWAGGER_UI_VERSION}">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js?v={SWAGGER_UI_VERSION}"></script>
<script>
window.ui = SwaggerUIBundle({{
  url: {url},
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
}});
</script>
</body>
</html>
"""
