"""The Starlette application: health, readiness, metrics, and the pages (Jinja2, templates/).

Pages never show patient name, ID or birth date unless ``http.show_patient_data`` is on (then they
are read from the first spooled file of the study; the database holds none). With
``http.bearer_token`` set, every path but /healthz needs ``Authorization: Bearer <token>`` (pages
also accept ``?token=<token>``, which their links carry on).
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from ..metrics import Metrics
from ..settings import Settings
from ..store.db import Database
from ..store.overview import instance_path, recent_studies, status_report, study_detail
from ..store.spool import Spool
from .images import Thumbnails
from .readiness import Readiness

log = logging.getLogger("cxr_worker.http")

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: Paths open without the bearer token (liveness probes carry no secrets).
OPEN_PATHS = frozenset({"/healthz"})
PATIENT_TAGS = ("PatientName", "PatientID", "PatientBirthDate")


@dataclass
class Face:
    """What the HTTP face reads: the service's settings, database, spool, metrics and readiness."""

    settings: Settings
    db: Database
    spool: Spool
    metrics: Metrics
    readiness: Readiness
    model: dict = field(default_factory=dict)  # name, version, uid of the loaded model
    thumbnails: Thumbnails = field(default_factory=Thumbnails)


def patient_data(path: str | Path) -> dict[str, str]:
    """Patient name, ID and birth date from a spooled file's header ("" where absent or unreadable)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(PATIENT_TAGS))
    except Exception:  # noqa: BLE001 - a page never fails over a header
        return {tag: "" for tag in PATIENT_TAGS}
    return {tag: str(ds.get(tag, "") or "") for tag in PATIENT_TAGS}


class BearerToken(BaseHTTPMiddleware):
    def __init__(self, app, token: str) -> None:
        super().__init__(app)
        self.token = token.encode()

    async def dispatch(self, request: Request, call_next):
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), self.token):
            return JSONResponse({"error": "bearer token required"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)


def build_app(face: Face) -> Starlette:
    templates = Jinja2Templates(directory=str(TEMPLATES))  # autoescape on (Starlette default)
    http = face.settings.http

    def context(request: Request, **values) -> dict:
        token = request.query_params.get("token")
        return dict(q=f"?token={token}" if token else "", refresh=http.refresh_seconds,
                    show_patient=http.show_patient_data, model=face.model, **values)

    def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    def readyz(request: Request) -> Response:
        checks = face.readiness.checks()
        failed = [c.name for c in checks if not c.ok]
        body = {"ready": not failed, "failed": failed, "checks": {c.name: c.as_dict() for c in checks}}
        return JSONResponse(body, status_code=200 if not failed else 503)

    def metrics(request: Request) -> Response:
        return Response(face.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def api_status(request: Request) -> Response:
        return JSONResponse(status_report(face.db))

    def index(request: Request) -> Response:
        rows = recent_studies(face.db, http.recent_studies)
        patients = {}
        if http.show_patient_data:
            for row in rows:
                detail = study_detail(face.db, row.study_uid)
                if detail is not None and detail.instances:
                    patients[row.study_uid] = patient_data(detail.instances[0].path)
        checks = face.readiness.checks()
        return templates.TemplateResponse(request, "index.html", context(
            request, studies=rows, patients=patients, report=status_report(face.db), checks=checks))

    def study(request: Request) -> Response:
        uid = request.path_params["study_uid"]
        detail = study_detail(face.db, uid)
        if detail is None:
            return PlainTextResponse("unknown study", status_code=404)
        heatmaps = {i.sop_instance_uid for i in detail.instances
                    if face.spool.heatmap_path(uid, i.sop_instance_uid).is_file()}
        patient = patient_data(detail.instances[0].path) if http.show_patient_data and detail.instances else {}
        return templates.TemplateResponse(request, "study.html", context(
            request, study=detail, heatmaps=heatmaps, patient=patient))

    def thumbnail(request: Request) -> Response:
        path = instance_path(face.db, request.path_params["study_uid"], request.path_params["sop_uid"])
        if path is None:
            return PlainTextResponse("unknown instance", status_code=404)
        try:
            data = face.thumbnails.png(path)
        except Exception as exc:  # noqa: BLE001 - a film that cannot be rendered is a 422, never a crash
            return PlainTextResponse(f"cannot render: {type(exc).__name__}", status_code=422)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    def heatmap(request: Request) -> Response:
        path = face.spool.heatmap_path(request.path_params["study_uid"], request.path_params["sop_uid"])
        if not path.is_file():
            return PlainTextResponse("no heatmap", status_code=404)
        return Response(path.read_bytes(), media_type="image/jpeg")

    routes = [
        Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics),
        Route("/api/status", api_status), Route("/", index),
        Route("/studies/{study_uid}", study),
        Route("/studies/{study_uid}/instances/{sop_uid}/thumbnail.png", thumbnail),
        Route("/studies/{study_uid}/instances/{sop_uid}/heatmap.jpg", heatmap),
    ]
    middleware = [Middleware(BearerToken, token=http.bearer_token)] if http.bearer_token else []
    return Starlette(routes=routes, middleware=middleware)
