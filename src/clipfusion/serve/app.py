"""The HTTP application: the ``/v1`` API, health and readiness, the inspector page and the API's own page.

Where the work happens, so that the event loop never waits on a model or a decoder: the body is read
asynchronously (and refused past ``max_upload_mb`` without reading the rest); decoding, the overlays and the
JSON are made in a small thread pool (``io_threads``: bounded concurrency, so bounded memory); scoring happens
in the detector's worker thread (:mod:`clipfusion.serve.batching`). A request is admitted at the door or
refused with 503 and ``Retry-After`` before its body is read, so a burst costs neither memory nor time.

Every error is one line of JSON, ``{"error": "..."}``, with the status code that says whose fault it is:
400 (a bad image or request, naming the upload), 401 (token), 404 (no such detector), 413 (too many bytes,
pixels or images), 503 (loading, overloaded or shutting down: come back after ``Retry-After`` seconds).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from clipfusion.errors import ClipfusionError, ConfigError, InputError
from clipfusion.provenance import WEIGHTS_NOTE, random_weights_banner, weights_kind
from clipfusion.serve.batching import BatcherClosed
from clipfusion.serve.pool import FAILED, DetectorPool, Slot
from clipfusion.thresholds import Decision, Thresholds, decide, pixel_mask

if TYPE_CHECKING:
    from PIL import Image

    from clipfusion.detector import AnomalyResult

T = TypeVar("T")
BaseModelT = TypeVar("BaseModelT", bound=BaseModel)
log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
#: the page and its assets; served from the package, never looked up by a request's path
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}
#: the page may talk to this server only; the browser enforces it (and the browser test checks it)
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
DOCS_POLICY = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class ServeSettings:
    """What the HTTP layer enforces (the batching limits are :class:`~clipfusion.serve.pool.Limits`)."""

    max_upload_mb: float = 20.0
    max_images: int = 16
    token: str | None = None
    cors_origins: tuple[str, ...] = ()
    io_threads: int = 2
    overlay_max_side: int = 1024

    def __post_init__(self) -> None:
        if not 0 < self.max_upload_mb <= 4096:
            raise ConfigError(f"--max-upload-mb must lie in (0, 4096], got {self.max_upload_mb}")
        if self.max_images < 1:
            raise ConfigError(f"--max-images must be at least 1, got {self.max_images}")
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("--token must be at least 16 characters (e.g. `openssl rand -hex 24`)")
        if self.io_threads < 1:
            raise ConfigError(f"io_threads must be at least 1, got {self.io_threads}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class ApiError(Exception):
    """An answer other than 200: status, one line, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())
        self.headers = headers or {}


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


# -- the schema FastAPI's page documents --------------------------------------------------------------------


class EncodedMap(BaseModel):
    """The anomaly map: base64 of the raw float32 values, little-endian, row-major (exact; decode with
    ``numpy.frombuffer(base64.b64decode(data), '<f4').reshape(shape)``)."""

    dtype: Literal["float32"] = "float32"
    byte_order: Literal["little"] = "little"
    shape: list[int] = Field(description="[height, width]: the output size of the configuration")
    data: str = Field(description="base64 of height × width little-endian float32 values")


class ImageResult(BaseModel):
    file: str = Field(description="the upload's file name (a label only; nothing is read from it)")
    width: int = Field(description="the image's width in pixels, as decoded (EXIF rotation applied)")
    height: int
    score: float = Field(description="the image's anomaly score; higher is more anomalous")
    decision: Decision | None = Field(None, description="score > threshold, when the detector has thresholds")
    anomalous_pixels: float | None = Field(
        None, description="fraction of map pixels above the pixel threshold, when it has one"
    )
    map_min: float
    map_max: float
    anomaly_map: EncodedMap | None = Field(None, description="absent with ?map=false")
    overlay_png: str | None = Field(
        None, description="base64 PNG: the heat map over the image (absent with ?overlay=false)"
    )


class PredictResponse(BaseModel):
    detector: str
    weights: Literal["random", "pretrained"]
    weights_note: str
    threshold: float | None
    pixel_threshold: float | None
    results: list[ImageResult]


class ThresholdsIn(BaseModel):
    image: float = Field(description="image threshold: scores above it are anomalous")
    pixel: float = Field(description="pixel threshold: map values above it are masked")


class ErrorBody(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "a bad image or request (one line naming the upload and the problem)",
        401: "missing or wrong bearer token (only when the server has one)",
        404: "no detector of that name",
        413: "too many bytes (--max-upload-mb), pixels or images (--max-images)",
        503: "loading, full (--max-queue) or shutting down: retry after the Retry-After header's seconds",
    }.items()
}

MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more image files (PNG, JPEG, BMP, TIFF, WebP …)",
                        }
                    },
                }
            }
        },
    }
}


# -- reading uploads -----------------------------------------------------------------------------------------


class _UploadTooLarge(Exception):
    pass


class _InMemoryParser(MultiPartParser):
    # the body is capped before parsing, so files may stay in memory (no temporary files on the server)
    spool_max_size = 1 << 40


async def _capped(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise _UploadTooLarge
        yield chunk


_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def _label(filename: str | None, index: int) -> str:
    """An upload's name for messages and results: the last path component, printable, bounded."""
    name = _UNSAFE.sub("", (filename or "").replace("\\", "/").rsplit("/", 1)[-1]).strip()
    return name[:200] or f"image-{index + 1}"


async def read_uploads(request: Request, settings: ServeSettings) -> list[tuple[str, bytes]]:
    """The image files of a multipart request, refused (413) as soon as it is over the byte limit."""
    limit_mb = f"{settings.max_upload_mb:g} MB"
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(
            400,
            "send the images as multipart/form-data, one part per image (e.g. curl -F images=@photo.png)",
        )
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"invalid Content-Length {declared!r}")
        if int(declared) > settings.max_upload_bytes:
            raise ApiError(
                413, f"request body too large ({int(declared) / 2**20:.1f} MB; the limit is {limit_mb})"
            )
    parser = _InMemoryParser(
        request.headers,
        _capped(request.stream(), settings.max_upload_bytes),
        max_files=settings.max_images,
        max_fields=settings.max_images,
    )
    try:
        form = await parser.parse()
    except _UploadTooLarge:
        raise ApiError(413, f"request body too large (over the limit of {limit_mb})") from None
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise ApiError(413, f"too many images in one request (at most {settings.max_images})") from None
        raise ApiError(400, f"malformed multipart body ({exc.message})") from None
    except ClientDisconnect:
        raise ApiError(400, "the client went away before the upload was complete") from None
    uploads: list[tuple[str, bytes]] = []
    try:
        for index, (field, value) in enumerate(form.multi_items()):
            if isinstance(value, str):
                raise ApiError(
                    400,
                    f"unexpected form field {field!r}: only image files are read (send files, e.g. "
                    "-F images=@photo.png; options are query parameters)",
                )
            uploads.append((_label(value.filename, index), await value.read()))
    finally:
        await form.close()
    if not uploads:
        raise ApiError(400, "no image in the request (send one or more files, e.g. -F images=@photo.png)")
    return uploads


async def _read_json(request: Request, model: type[BaseModelT], *, limit: int) -> BaseModelT:
    """A small JSON body, read with a cap (FastAPI's own body reading has none) and validated."""
    from pydantic import ValidationError

    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, f"request body too large (over {limit // 1024} KiB)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client went away before the request was complete") from None
    try:
        return model.model_validate_json(b"".join(chunks))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(400, f"{where}: {first.get('msg', 'invalid')}") from None


def _decode_all(uploads: list[tuple[str, bytes]]) -> list[Image.Image]:
    from clipfusion.data.images import MIN_SIDE, ImageTooLargeError, load_image_bytes

    images = []
    for name, data in uploads:
        try:
            images.append(load_image_bytes(data, name, min_side=MIN_SIDE))
        except ImageTooLargeError as exc:
            raise ApiError(413, str(exc)) from None
        except InputError as exc:
            raise ApiError(400, str(exc)) from None
    return images


# -- describing a detector -----------------------------------------------------------------------------------


def _weights(slot: Slot) -> str:
    return weights_kind(slot.record.config)


def describe(slot: Slot) -> dict[str, Any]:
    record = slot.record
    thresholds = slot.detector.thresholds if slot.detector is not None else record.thresholds
    info: dict[str, Any] = {
        "name": slot.name,
        "state": slot.state,
        "error": slot.error,
        "object_name": record.object_name,
        "shots": len(record.references),
        "references": [str(ref.get("name")) for ref in record.references],
        "weights": _weights(slot),
        "weights_note": WEIGHTS_NOTE[_weights(slot)],
        "banner": random_weights_banner(record.config),
        "thresholds": None
        if thresholds is None
        else {
            "image": thresholds.image,
            "pixel": thresholds.pixel,
            "origin": thresholds.origin,
            "set_by_hand": list(thresholds.by_hand),
            "quantile": thresholds.quantile,
            "n_images": thresholds.n_images,
        },
        "output_size": record.config.output_size,
        "config": record.config.to_dict(),
        "created": record.record.get("created"),
        "load_seconds": slot.load_seconds,
        # the detectors that use this one's copy of the models (itself included): loaded once for all
        "shares_models_with": list(slot.shares_models_with),
        "queue": {
            "limit": slot.gate.limit,
            "inside": slot.gate.inside,
            "admitted": slot.gate.admitted,
            "refused": slot.gate.refused,
            "waiting_images": slot.batcher.queued if slot.batcher else 0,
            "scoring_images": slot.batcher.busy if slot.batcher else 0,
            "batch_size": slot.batcher.batch_size if slot.batcher else None,
            "max_wait_ms": slot.batcher.max_wait_s * 1000 if slot.batcher else None,
        },
        "stats": slot.batcher.stats.to_dict() if slot.batcher else None,
    }
    return info


def _encode_results(
    name: str,
    slot: Slot,
    images: list[Image.Image],
    uploads: list[tuple[str, bytes]],
    results: list[AnomalyResult],
    *,
    want_map: bool,
    want_overlay: bool,
    vmin: float | None,
    vmax: float | None,
    overlay_max_side: int,
) -> bytes:
    import base64

    import numpy as np

    from clipfusion.serve.encoding import encode_map, overlay_png

    thresholds = slot.detector.thresholds if slot.detector is not None else None
    weights = _weights(slot)
    out = []
    for (file, _), image, result in zip(uploads, images, results, strict=True):
        anomaly_map = result.anomaly_map
        item: dict[str, Any] = {
            "file": file,
            "width": image.width,
            "height": image.height,
            "score": result.score,
            "decision": None,
            "anomalous_pixels": None,
            "map_min": float(anomaly_map.min()),
            "map_max": float(anomaly_map.max()),
        }
        if thresholds is not None:
            item["decision"] = decide(result.score, thresholds.image)
            item["anomalous_pixels"] = float(np.mean(pixel_mask(anomaly_map, thresholds.pixel)))
        if want_map:
            item["anomaly_map"] = encode_map(anomaly_map)
        if want_overlay:
            png = overlay_png(
                image,
                anomaly_map,
                vmin=vmin,
                vmax=vmax,
                max_side=overlay_max_side,
                weights_note=WEIGHTS_NOTE[weights],
            )
            item["overlay_png"] = base64.b64encode(png).decode("ascii")
        out.append(item)
    body = {
        "detector": name,
        "weights": weights,
        "weights_note": WEIGHTS_NOTE[weights],
        "threshold": thresholds.image if thresholds is not None else None,
        "pixel_threshold": thresholds.pixel if thresholds is not None else None,
        "results": out,
    }
    return json.dumps(body, allow_nan=False).encode()


# -- the application -----------------------------------------------------------------------------------------


class _TokenAuth:
    """``Authorization: Bearer <token>`` on every ``/v1`` request (the page, its assets, the API's page and
    the health probes carry no data and stay open, so that a browser can load the page and ask for the
    token, and a supervisor can probe without it)."""

    def __init__(self, app: Callable[..., Awaitable[None]], token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                message = "missing bearer token" if not given else "wrong bearer token"
                response = _error_response(
                    401,
                    f"{message}: send the header 'Authorization: Bearer <token>'",
                    {"WWW-Authenticate": 'Bearer realm="clipfusion"'},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _read_package_file(name: str) -> bytes:
    return resources.files("clipfusion.serve").joinpath("static", name).read_bytes()


def _docs_assets_dir() -> Path | None:
    """Swagger UI's files as the ``fastapi-offline`` package ships them (no CDN), or None."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if folder.is_dir() else None


def create_app(
    pool: DetectorPool,
    settings: ServeSettings | None = None,
    *,
    manage_pool: bool = True,
    on_failure: Callable[[str, str], None] | None = None,
) -> FastAPI:
    """The application for ``pool``. With ``manage_pool`` (the default) its lifespan starts loading the
    detectors and stops their workers at shutdown; two apps may share one pool when only one manages it."""
    from clipfusion.provenance import __version__

    settings = settings or ServeSettings()
    executor = ThreadPoolExecutor(max_workers=settings.io_threads, thread_name_prefix="clipfusion-io")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_pool:
            pool.start(on_failure)
        try:
            yield
        finally:
            app.state.draining = True
            await asyncio.to_thread(executor.shutdown, True)
            if manage_pool:
                await asyncio.to_thread(pool.close)

    app = FastAPI(
        title="clipfusion",
        version=__version__,
        summary="Training-free anomaly detection (CLIPFusion): scores, maps and overlays for images.",
        description=(
            "Each detector is a fitted folder made by `clipfusion fit`. Post images to "
            "`/v1/detectors/{name}/predict` as multipart/form-data. Maps come back as base64 float32 "
            '(exact; see the `EncodedMap` schema). Errors are `{"error": "one line"}`. '
            "The inspector page is at `/`."
        ),
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.draining = False
    app.state.pool = pool
    app.state.settings = settings

    # -- errors: one line of JSON each -----------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        # refused uploads and tokens are the operator's business; a full door is routine (debug only)
        level = logging.DEBUG if exc.status in (404, 503) else logging.WARNING
        log.log(level, f"{request.method} {request.url.path}: {exc.status} {exc.message}")
        return _error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error(f"unexpected error: {type(exc).__name__}: {exc}", exc_info=exc)
        return _error_response(500, f"internal error ({type(exc).__name__}: {exc})")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        return _error_response(400, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    bearer = [Depends(HTTPBearer(auto_error=False))] if settings.token else []
    api = APIRouter(prefix="/v1", dependencies=bearer, responses={401: ERRORS[401]})

    def slot_for(name: str) -> Slot:
        slot = pool.slots.get(name)
        if slot is None:
            known = ", ".join(sorted(pool.slots))
            raise ApiError(404, f"no detector named {name!r} (this server has: {known})")
        return slot

    def ready_slot(name: str) -> Slot:
        slot = slot_for(name)
        if app.state.draining:
            raise ApiError(503, "the server is shutting down", {"Retry-After": "5", "Connection": "close"})
        if slot.state == FAILED:
            raise ApiError(503, f"detector {name!r} could not be loaded: {slot.error}")
        if not slot.ready or slot.batcher is None:
            raise ApiError(503, f"detector {name!r} is still loading", {"Retry-After": "5"})
        return slot

    async def in_threads(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, lambda: fn(*args, **kwargs))

    @api.get("/detectors", summary="The detectors this server holds, with configuration and thresholds")
    async def list_detectors() -> dict[str, Any]:
        return {"detectors": [describe(slot) for slot in pool.slots.values()]}

    @api.get("/detectors/{name}", summary="One detector", responses={404: ERRORS[404]})
    async def get_detector(name: str) -> dict[str, Any]:
        return describe(slot_for(name))

    @api.post(
        "/detectors/{name}/predict",
        summary="Score images: per image a score, a decision, the anomaly map and an overlay",
        response_model=PredictResponse,
        responses={code: ERRORS[code] for code in (400, 404, 413, 503)},
        openapi_extra=MULTIPART_BODY,
    )
    async def predict(
        name: str,
        request: Request,
        include_map: bool = Query(True, alias="map", description="include the anomaly map (base64 float32)"),
        include_overlay: bool = Query(True, alias="overlay", description="include the overlay PNG"),
        vmin: float | None = Query(None, description="overlay colour scale: value drawn blue"),
        vmax: float | None = Query(None, description="overlay colour scale: value drawn red"),
    ) -> Response:
        if (vmin is None) != (vmax is None) or (vmin is not None and not vmin < vmax):
            raise ApiError(400, "give vmin and vmax together, with vmin < vmax")
        for value in (vmin, vmax):
            if value is not None and not math.isfinite(value):
                raise ApiError(400, "vmin and vmax must be finite numbers")
        slot = ready_slot(name)
        batcher = slot.batcher
        assert batcher is not None
        if not slot.gate.enter():
            wait = batcher.retry_after()
            raise ApiError(
                503,
                f"detector {name!r} is busy ({slot.gate.limit} requests in hand); retry in {wait} s",
                {"Retry-After": str(wait)},
            )
        try:
            uploads = await read_uploads(request, settings)
            images = await in_threads(_decode_all, uploads)
            try:
                futures = batcher.submit(images)
            except BatcherClosed:
                raise ApiError(503, "the server is shutting down", {"Retry-After": "5"}) from None
            try:
                results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
            except ClipfusionError as exc:  # e.g. out of memory at one image a batch: capacity, not a bug
                raise ApiError(503, f"detector {name!r}: {exc}", {"Retry-After": "10"}) from None
            body = await in_threads(
                _encode_results,
                name,
                slot,
                images,
                uploads,
                list(results),
                want_map=include_map,
                want_overlay=include_overlay,
                vmin=vmin,
                vmax=vmax,
                overlay_max_side=settings.overlay_max_side,
            )
        finally:
            slot.gate.leave()
        return Response(body, media_type="application/json")

    @api.post(
        "/detectors/{name}/thresholds",
        summary="A thresholds.json for `clipfusion predict --thresholds` with these two values",
        responses={code: ERRORS[code] for code in (400, 404, 413, 503)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ThresholdsIn.model_json_schema()}},
            }
        },
    )
    async def make_thresholds(name: str, request: Request) -> dict[str, Any]:
        """The detector's thresholds with the image and pixel thresholds replaced (what the page exports):
        a value that differs from the calibrated one is marked as set by hand, beside the calibrated values
        it replaced (a detector fitted without calibration: both set by hand, no calibration claimed); the
        calibrated values themselves give back the calibration. Either way it carries the configuration,
        object and references that ``predict --thresholds`` checks."""
        slot = ready_slot(name)
        detector = slot.detector
        assert detector is not None
        values = await _read_json(request, ThresholdsIn, limit=64 * 1024)
        if not (math.isfinite(values.image) and math.isfinite(values.pixel)):
            raise ApiError(400, "image and pixel thresholds must be finite numbers")
        if detector.thresholds is not None:
            thresholds = detector.thresholds.with_values(values.image, values.pixel)
        else:
            thresholds = Thresholds.hand_set(values.image, values.pixel, detector)
        return thresholds.to_dict()

    app.include_router(api)

    # -- health -----------------------------------------------------------------------------------------
    @app.get("/healthz", summary="The process is up (200 while it runs, also while loading)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="200 once every detector is loaded; 503 while loading, after a failed load or when stopping",
        responses={503: {"description": "not ready"}},
    )
    async def readyz() -> JSONResponse:
        states = {name: slot.state for name, slot in pool.slots.items()}
        ready = pool.ready and not app.state.draining
        body: dict[str, Any] = {"ready": ready, "detectors": states}
        if app.state.draining:
            body["stopping"] = True
        failed = {n: s.error for n, s in pool.slots.items() if s.state == FAILED}
        if failed:
            body["errors"] = failed
        return JSONResponse(body, status_code=200 if ready else 503)

    # -- the inspector page and the API's page ----------------------------------------------------------
    page_headers = {"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"}
    page = _read_package_file("index.html")
    static = {name: _read_package_file(name) for name in STATIC_FILES}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=page_headers)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in static:
            raise ApiError(404, f"no such file: {name}")
        return Response(static[name], media_type=STATIC_FILES[name], headers=page_headers)

    docs_dir = _docs_assets_dir()
    docs_assets = {n: (docs_dir / n).read_bytes() for n in DOCS_ASSETS} if docs_dir else {}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if not docs_assets:
            raise ApiError(
                404,
                "the API page needs the fastapi-offline package (pip install 'clipfusion[serve]'); "
                "the schema itself is at /openapi.json",
            )
        html = get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="clipfusion API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )
        html.headers["Content-Security-Policy"] = DOCS_POLICY
        return html

    @app.get("/docs-assets/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in docs_assets:
            raise ApiError(404, f"no such file: {name}")
        return Response(
            docs_assets[name], media_type=DOCS_ASSETS[name], headers={"Cache-Control": "max-age=3600"}
        )

    # -- middleware: the token inside, CORS outside (a preflight carries no token) ------------------------
    if settings.token:
        app.add_middleware(_TokenAuth, token=settings.token)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After"],
        )
    return app


def is_local_host(host: str) -> bool:
    """Whether binding to ``host`` keeps the server to this machine (the loopback addresses)."""
    import ipaddress

    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


__all__ = ["ApiError", "ServeSettings", "create_app", "describe", "is_local_host", "read_uploads"]
