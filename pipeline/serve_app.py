"""The Ray Serve application behind ``mmpipe serve``: a FastAPI ingress (limits, validation, the
per-request timeout, metrics) in front of a model deployment whose replicas each load the model
and the inference stages once, and run batches of records gathered across concurrent requests
(``@serve.batch``) through the same scan, cleanup and feature stages as ``mmpipe predict``.

Only what a client sent wrong is a 4xx; a record the stages reject is answered with the others,
in ``rejects``, with the pipeline's reason code.
"""
# No ``from __future__ import annotations``: FastAPI reads the routes' annotations (``Request``) at runtime.

import asyncio
import json
import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from ray import serve
from ray.exceptions import RayActorError
from ray.util.metrics import Counter, Histogram, Metric
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.config import Config
from pipeline.metrics import LATENCY_BOUNDARIES, MetricSpec
from pipeline.sources import MAX_FIELD_CHARS
from stages.modalities import MODALITIES

logger = logging.getLogger("ray.serve")
APP_NAME = "mmpipe"


class ServeOptions(BaseModel):
    """``mmpipe serve``'s settings (command-line options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1)
    min_replicas: int | None = Field(None, ge=0)    # with max_replicas: autoscaling instead of ``replicas``
    max_replicas: int | None = Field(None, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    max_batch_size: int = Field(32, ge=1)            # records per model batch, across requests
    batch_wait_s: float = Field(0.01, ge=0)
    request_timeout_s: float = Field(30.0, gt=0)
    max_records: int = Field(32, ge=1)               # records per request
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    quantize: Literal["none", "int8"] = "none"
    replica_cpus: float = Field(1.0, ge=0)
    replica_gpus: float = Field(0.0, ge=0)
    align_model: str | None = None   # models/<name>/ of `mmpipe align`: POST /search over the store's index
    search_modalities: tuple[str, ...] = ()   # what that model maps (the modalities /search finds)

    def problems(self) -> list[str]:
        """Combinations the fields alone do not rule out."""
        out = []
        if self.max_records > self.max_batch_size:
            out.append(f"--max-records {self.max_records} is over --max-batch-size {self.max_batch_size}: "
                       "a request's records are predicted in one batch")
        if (self.min_replicas is None) != (self.max_replicas is None):
            out.append("autoscaling needs both --min-replicas and --max-replicas")
        elif self.min_replicas is not None and self.min_replicas > self.max_replicas:
            out.append(f"--min-replicas {self.min_replicas} is over --max-replicas {self.max_replicas}")
        if self.quantize == "int8" and self.replica_gpus > 0:
            out.append("--quantize int8 is dynamic quantisation for CPU replicas; drop it or --replica-gpus")
        return out


# -- metrics --------------------------------------------------------------------------------
# Exported like the pipeline's (pipeline/metrics.py): ``ray_`` prefix, ``_total`` on counters.
REQUEST_ROUTES = ("/predict", "/search", "/healthz", "/metadata")
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
SERVE_METRICS: dict[str, MetricSpec] = {
    "mmpipe_serve_requests": MetricSpec(Counter, "HTTP requests answered by the ingress, by route and status code.",
                                        ("route", "status")),
    "mmpipe_serve_request_seconds": MetricSpec(Histogram, "Time from a request's arrival at the ingress to its "
                                                          "answer, seconds.", ("route",)),
    "mmpipe_serve_rejects": MetricSpec(Counter, "Records of requests the stages rejected, by stage and reason code.",
                                       ("stage", "reason")),
    "mmpipe_serve_predictions": MetricSpec(Counter, "Records predicted.", ()),
    "mmpipe_serve_resent": MetricSpec(Counter, "Requests sent to the model again because their replica died.", ()),
    "mmpipe_serve_batch_records": MetricSpec(Histogram, "Records in one model batch (requests batched together).", ()),
    "mmpipe_serve_batch_seconds": MetricSpec(Histogram, "Wall time of one batch through the stages and the model, "
                                                        "seconds.", ()),
}


@lru_cache(maxsize=1)
def _metrics() -> dict[str, Metric]:
    """One instance per metric per replica process."""
    made: dict[str, Metric] = {}
    for name, spec in SERVE_METRICS.items():
        if spec.kind is Histogram:
            bounds = BATCH_BOUNDARIES if name == "mmpipe_serve_batch_records" else LATENCY_BOUNDARIES
            made[name] = Histogram(name, spec.description, boundaries=bounds, tag_keys=spec.tags)
        else:
            made[name] = spec.kind(name, spec.description, tag_keys=spec.tags)
    return made


# -- requests -------------------------------------------------------------------------------
class RecordBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | int | None = None


# One record of ``POST /predict``: an optional id and one optional string per modality (text
# itself; media as http(s) URLs or ``data:`` URIs).
RecordIn = create_model("RecordIn", __base__=RecordBase, **{m: (str | None, None) for m in MODALITIES})


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    records: list[RecordIn] = Field(min_length=1)


class SearchRequest(PredictRequest):
    """``POST /search``: the query records, the modality to find, how many results per query."""

    modality: Literal[MODALITIES]  # type: ignore[valid-type]
    k: int = Field(10, ge=1, le=1000)


class RequestError(Exception):
    """A request the client got wrong: answered ``status`` with ``{"error": code, "detail": ...}``."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past ``limit`` bytes: by its Content-Length, else while it streams."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RequestError(413, "body_too_large", f"the body is {length} bytes, over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body_too_large", f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(body: bytes, max_records: int, schema: type[PredictRequest] = PredictRequest) -> list[dict]:
    """The records of a ``POST /predict`` body, each with its ``id`` (its position when absent)."""
    return parse_payload(body, max_records, schema)[0]


def parse_payload(body: bytes, max_records: int, schema: type[PredictRequest]) -> tuple[list[dict], PredictRequest]:
    """The body checked against ``schema``: its records (ids filled in) and the whole request."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, "invalid_json", f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "invalid_json", "the body nests too deeply") from None
    if isinstance(payload, dict) and isinstance(payload.get("records"), list) and len(payload["records"]) > max_records:
        raise RequestError(422, "too_many_records",
                           f"{len(payload['records'])} records in one request, over the limit of {max_records}")
    try:
        request = schema.model_validate(payload)
    except ValidationError as exc:
        raise RequestError(422, "invalid_request", _validation_detail(exc)) from None
    records = [r.model_dump() for r in request.records]
    for k, r in enumerate(records):
        r["id"] = str(k) if r["id"] is None else r["id"]
        if len(str(r["id"])) > MAX_FIELD_CHARS:
            raise RequestError(422, "invalid_request", f"records.{k}.id is over {MAX_FIELD_CHARS} characters")
    seen: set[str] = set()
    for r in records:
        if str(r["id"]) in seen:
            raise RequestError(422, "invalid_request", f"id {r['id']!r} is repeated in the request")
        seen.add(str(r["id"]))
    return records, request


def _validation_detail(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])


def error_response(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


# -- the deployments ------------------------------------------------------------------------
@serve.deployment(name="model", health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
class ModelServer:
    """One replica: a ``Predictor`` (the model and the inference stages, loaded once) fed batches
    of requests gathered across concurrent callers."""

    def __init__(self, cfg: Config, model_dir: str, options: ServeOptions):
        from pipeline.serve_model import Predictor

        self.options = options
        self.predictor = Predictor(cfg, Path(model_dir), options.quantize)
        self.searcher = None
        if options.align_model:
            from pipeline.serve_model import Searcher

            self.searcher = Searcher(self.predictor, cfg.store, Path(options.align_model))
        self.predict.set_max_batch_size(options.max_batch_size)
        self.predict.set_batch_wait_timeout_s(options.batch_wait_s)
        self.metrics = _metrics()

    def ready(self) -> str:
        return self.predictor.name

    def metadata(self) -> dict[str, Any]:
        o = self.options
        return {**self.predictor.metadata(), "quantize": o.quantize,
                "limits": {"max_records": o.max_records, "max_body_bytes": o.max_body_bytes,
                           "request_timeout_s": o.request_timeout_s}}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=lambda items: sum(map(len, items)))
    async def predict(self, requests: list[list[dict]]) -> list[dict]:
        # The stages are synchronous CPU work: off the replica's event loop, one batch at a time.
        started = time.perf_counter()
        answers = await asyncio.to_thread(self.predictor.predict_batch, requests)
        self._record(answers, sum(map(len, requests)), time.perf_counter() - started)
        return answers

    async def search(self, records: list[dict], modality: str, k: int) -> dict:
        """The store's samples of ``modality`` nearest each query record (not batched across requests)."""
        answer = await asyncio.to_thread(self.searcher.search, records, modality, k)
        for r in answer["rejects"]:
            self.metrics["mmpipe_serve_rejects"].inc(1, {"stage": r["stage"], "reason": r["reason"]})
        return answer

    def _record(self, answers: list[dict], n_records: int, seconds: float) -> None:
        m = self.metrics
        m["mmpipe_serve_batch_records"].observe(n_records)
        m["mmpipe_serve_batch_seconds"].observe(seconds)
        predicted = sum(len(a["predictions"]) for a in answers)
        if predicted:
            m["mmpipe_serve_predictions"].inc(predicted)
        for r in (r for a in answers for r in a["rejects"]):
            m["mmpipe_serve_rejects"].inc(1, {"stage": r["stage"], "reason": r["reason"]})


api = FastAPI(title="mmpipe", description="Predictions from a trained mmpipe fusion model.", docs_url=None,
              redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
    return error_response(exc.status_code, code, str(exc.detail))


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    """A fault of the service (never of the request: those are answered above) as JSON too."""
    logger.exception("unexpected error answering %s", request.url.path)
    return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")


@api.middleware("http")
async def _count(request: Request, call_next):
    """Requests by route and status, and their latency, for every answer the ingress gives."""
    started, status = time.perf_counter(), 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        route = request.url.path if request.url.path in REQUEST_ROUTES else "other"
        m = _metrics()
        m["mmpipe_serve_requests"].inc(1, {"route": route, "status": str(status)})
        m["mmpipe_serve_request_seconds"].observe(time.perf_counter() - started, {"route": route})


@serve.deployment(name="ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    """HTTP in front of the model deployment: limits, validation, the per-request timeout."""

    def __init__(self, model, options: ServeOptions):
        self.model = model
        self.options = options
        self._metadata: dict | None = None

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        try:
            records = parse_request(await read_body(request, self.options.max_body_bytes), self.options.max_records)
        except RequestError as exc:
            return error_response(exc.status, exc.code, exc.detail)
        try:
            result = await asyncio.wait_for(self._predict(records), self.options.request_timeout_s)
        except asyncio.TimeoutError:
            return error_response(504, "timeout", f"no answer within {self.options.request_timeout_s:g} s "
                                                  "(the media fetches and the model, for this request)")
        return JSONResponse(result)

    async def _predict(self, records: list[dict]) -> dict:
        """The model's answer. A replica that dies with the request in its batch loses it: it is
        sent once more, and Serve's router takes it to a live replica (Serve replaces the dead one)."""
        try:
            return await self.model.predict.remote(records)
        except RayActorError as exc:
            logger.warning("a model replica died with a request of %d records in flight; sent again (%s)",
                           len(records), type(exc).__name__)
            _metrics()["mmpipe_serve_resent"].inc(1)
            return await self.model.predict.remote(records)

    @api.post("/search")
    async def search(self, request: Request) -> JSONResponse:
        """The contract of ``mmpipe search --json``: per query ``{"id", "results": [{"id", "score",
        "label"}]}``; query records the stages reject in ``rejects``."""
        if not self.options.align_model:
            return error_response(404, "search_disabled", "this service has no alignment model: start "
                                                          "`mmpipe serve` with --align models/<name>/")
        try:
            records, query = parse_payload(await read_body(request, self.options.max_body_bytes),
                                           self.options.max_records, SearchRequest)
        except RequestError as exc:
            return error_response(exc.status, exc.code, exc.detail)
        if query.modality not in self.options.search_modalities:
            return error_response(422, "modality_not_aligned", f"the alignment model maps "
                                  f"{', '.join(self.options.search_modalities)}, not {query.modality}")
        try:
            result = await asyncio.wait_for(self.model.search.remote(records, query.modality, query.k),
                                            self.options.request_timeout_s)
        except asyncio.TimeoutError:
            return error_response(504, "timeout", f"no answer within {self.options.request_timeout_s:g} s")
        return JSONResponse(result)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 once a model replica answers (it has loaded the model and the stages)."""
        try:
            name = await asyncio.wait_for(self.model.ready.remote(), 10)
        except (asyncio.TimeoutError, RayActorError) as exc:
            return error_response(503, "unavailable", f"no model replica answered ({type(exc).__name__})")
        return JSONResponse({"status": "ok", "model": name})

    @api.get("/metadata")
    async def metadata(self) -> JSONResponse:
        return JSONResponse(await self._model_metadata())

    async def _model_metadata(self) -> dict:
        if self._metadata is None:
            self._metadata = await self.model.metadata.remote()
        return self._metadata


def build_app(cfg: Config, model_dir: Path, options: ServeOptions):
    """The application: the ingress bound to the model deployment, sized by ``options``."""
    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.max_replicas is not None:
        scaling = {"autoscaling_config": {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                                          "target_ongoing_requests": options.target_ongoing_requests}}
    model = ModelServer.options(
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
        # a batch fills while the one before it runs
        max_ongoing_requests=2 * options.max_batch_size, **scaling,
    ).bind(cfg, str(model_dir), options)
    return Ingress.bind(model, options)
