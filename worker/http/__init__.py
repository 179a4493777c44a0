"""The HTTP face of `cxr-worker serve`: /healthz, /readyz, /metrics and the web pages (docs/worker.md, "HTTP").

Starlette routes served by uvicorn on a thread of the service process; Jinja2 templates beside this
module. No pynetdicom here: readiness asks the listener through a callable the service hands in.
"""

from .app import Face, build_app
from .readiness import Check, Readiness
from .server import HTTPServer

__all__ = ["Check", "Face", "HTTPServer", "Readiness", "build_app"]
