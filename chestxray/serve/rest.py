"""A plain HTTP API beside the Gradio page, in the same process: ``POST /v1/predict``, ``GET /v1/models``,
``GET /healthz`` (OpenAPI docs at ``/v1/docs``).

Same model, limits and work threads as the page: every prediction waits for one of the shared model slots
(:data:`~chestxray.serve.limits.SLOTS`) in the event loop, runs on the work threads, and a full queue is
answered at once with 503 and ``Retry-After``. Uploads over :data:`~chestxray.serve.limits.MAX_UPLOAD_BYTES`
are refused before they are read. Every error is ``{"error": "one line"}`` with a 4xx status (5xx for the
server's own faults). Responses hold the file's technical fields only: never its name, nor any DICOM element
other than the reduced codes the reader keeps.
"""
from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chestxray import __version__
from chestxray.serve import runtime
from chestxray.serve.encode import encode_png
from chestxray.serve.errors import ServiceError, guarded, one_line
from chestxray.serve.limits import MAX_UPLOAD_BYTES, RETRY_AFTER_S, SLOTS, Busy, ModelSlots

if TYPE_CHECKING:
    from chestxray.serve.service import Scored, Service

#: Where the API's own routes and docs live (``/healthz`` stays at the root, where probes look).
PREFIX = "/v1"
#: Room for the multipart envelope around a file of :data:`MAX_UPLOAD_BYTES` (boundaries, headers, fields).
FORM_OVERHEAD = 64 * 2**10
TOO_LARGE = f"Upload too large (limit {MAX_UPLOAD_BYTES / 2**20:g} MB)."


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The API's one error shape: ``{"error": "one line"}``."""
    return JSONResponse({"error": one_line(message)}, status, headers=headers)


def busy() -> JSONResponse:
    """503 with ``Retry-After``: the queue before the model is full."""
    return error(503, str(Busy()), {"Retry-After": str(RETRY_AFTER_S)})


class Gate:
    """ASGI wrapper of the API: refuses a body over ``limit`` bytes (413; before reading it when Content-Length
    says so, else as soon as the stream passes it) and a POST while the model's queue is full (503), before
    the upload is received and parsed."""

    def __init__(self, app: ASGIApp, limit: int, slots: ModelSlots):
        self.app, self.limit, self.slots = app, limit, slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await error(413, TOO_LARGE)(scope, receive, send)
        if scope["method"] == "POST" and self.slots.waiting >= self.slots.max_waiting:
            return await busy()(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI passes an HTTPException from the body's parsing through
                raise HTTPException(413, TOO_LARGE)
            return message

        await self.app(scope, limited, send)


def prediction_json(s: Scored) -> dict[str, Any]:
    """The answer to ``/v1/predict``, with the report's field names (:func:`chestxray.report.report_dict`): the
    model, labels, probabilities, thresholds, the labels above them, the input gate's warnings, what the
    probabilities are, the file's technical fields."""
    from chestxray.report import probability_scale, technical_fields

    a = s.analysis
    return {"model": s.model, "labels": list(a.labels), "probabilities": a.prob_dict(),
            "thresholds": {k: a.threshold(k) for k in a.labels},
            "above_threshold": a.positives(),  # most probable first
            "warnings": [str(w) for w in a.warnings], "probability_scale": probability_scale(a),
            "image": technical_fields(s.xray)}


def model_json(service: Service, name: str) -> dict[str, Any]:
    """One model of ``/v1/models``: what it is and its card's headline figures (no model is loaded)."""
    try:
        card = service.registry.card(name)
    except Exception as err:  # noqa: BLE001 - one broken folder must not hide the others
        return {"name": name, "default": name == service.default, "error": one_line(err)}
    metrics = card.get("metrics") or {}
    headline = next(({"group": title, **m} for title, m in metrics.items()), None)  # the headline group first
    return {"name": name, "default": name == service.default, "arch": card.get("arch"),
            "input_size": card.get("img_size"), "labels": card.get("labels"), "label_set": card.get("label_set"),
            "threshold_rule": card.get("threshold_rule"), "calibrated": bool(card.get("calibration")),
            "headline": headline, "validation_mean_auroc": card.get("val_mean_auroc"),
            "thresholds": card.get("thresholds")}


def _predict(service: Service, data: bytes, model: str | None, cam: str | None, method: str, alpha: float,
             scale: str, png_only: bool) -> tuple[dict[str, Any] | None, bytes | None]:
    """The work of one ``/v1/predict`` on a work thread: (JSON body or None, overlay PNG or None)."""
    runtime.configure_torch()
    s = service.score(data, model, cam, method, alpha, scale)
    png = None if s.overlay is None else encode_png(s.overlay)
    if png_only:
        return None, png
    body = prediction_json(s)
    if png is not None:
        body["cam"] = {"label": cam, "method": method, "scale": scale, "alpha": alpha,
                       "png_base64": base64.b64encode(png).decode("ascii")}
    return body, png


def create_api(service: Service) -> FastAPI:
    """The ``/v1`` application over ``service`` (mount it at :data:`PREFIX`)."""
    api = FastAPI(title="chestxray HTTP API", version=__version__, docs_url="/docs", redoc_url=None,
                  description="Chest X-ray findings with Grad-CAM: research and education only, not a medical "
                              "device. Errors are `{\"error\": \"one line\"}`; `GET /healthz` (at the root) "
                              "answers while the server runs.")

    @api.exception_handler(ServiceError)
    async def _service_error(_: Request, err: ServiceError) -> JSONResponse:
        return error(err.status, str(err))

    @api.exception_handler(Busy)
    async def _busy(_: Request, __: Busy) -> JSONResponse:
        return busy()

    @api.exception_handler(HTTPException)
    async def _http_error(_: Request, err: HTTPException) -> JSONResponse:
        return error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = (err.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        hint = " (send the image as multipart/form-data: -F file=@film.png)" if where == "file" else ""
        return error(422, f"{where}: {first.get('msg', 'invalid')}{hint}")

    @api.post("/predict", summary="Every label's probability for one film; its heatmap as PNG when asked",
              responses={200: {"content": {"image/png": {}},
                               "description": "JSON; the overlay PNG alone with `Accept: image/png` and `cam`"}})
    async def predict(request: Request,
                      file: UploadFile = File(description="PNG, JPEG or DICOM, at most 25 MB"),
                      model: str | None = Form(None, description="a name from /v1/models (default: the default)"),
                      cam: str | None = Form(None, description="a label: add its Grad-CAM overlay (PNG)"),
                      method: str = Form("gradcam", description="CAM method of the overlay"),
                      scale: str = Form("minmax", description="heatmap scale: minmax or probability"),
                      alpha: float = Form(0.4, description="heatmap opacity at value 1")) -> Response:
        png_only = "image/png" in request.headers.get("accept", "")
        if png_only and not cam:
            raise ServiceError("Accept: image/png needs cam=LABEL (the label whose overlay to send).", 400)
        data = await file.read()
        await file.close()
        body, png = await SLOTS.run(lambda: runtime.submit(guarded, _predict, service, data, model or None,
                                                           cam or None, method, alpha, scale, png_only))
        return Response(png, media_type="image/png") if png_only else JSONResponse(body)

    @api.get("/models", summary="The installed models with their cards' headline figures")
    async def models() -> JSONResponse:
        listed = await asyncio.wrap_future(runtime.submit(
            guarded, lambda: [model_json(service, n) for n in service.available]))
        return JSONResponse({"default": service.default, "models": listed})

    return api


def routes(service: Service) -> list[BaseRoute]:
    """The API's routes, to put before the Gradio page's own: ``launch(app_kwargs={"routes": routes(svc)})``."""

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "models": service.available, "loaded": service.registry.loaded(),
                             "waiting": SLOTS.waiting})

    return [Route("/healthz", healthz, methods=["GET"]),
            Mount(PREFIX, app=Gate(create_api(service), MAX_UPLOAD_BYTES + FORM_OVERHEAD, SLOTS))]
