"""The HTTP face of asynchronous jobs: submit, poll, list, stream, cancel; and running a job's prediction.

A job's inputs are stored as submitted, in one of two formats the handler knows how to run:
``{"format": "json", "inputs": <a row or a list of rows>}`` (the JSON API's body) or
``{"format": "v2", "request": <an Open Inference Protocol JSON request>}`` (``Prefer: respond-async``).
The job is durable in the broker before the 202 goes out.
"""

from __future__ import annotations

import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from asyncserve._utils import is_count
from asyncserve.config import WebhookSettings
from asyncserve.exceptions import IdempotencyConflict, InvalidRequest, NotFound, SchemaViolation
from asyncserve.http import jsonapi, v2
from asyncserve.http.routing import Request, Response, Router, StreamingResponse
from asyncserve.jobs import Broker, Job, JobRequest
from asyncserve.jobs.webhooks import validate_webhook_url
from asyncserve.runtime.admission import parse_priority
from asyncserve.runtime.pipeline import Pipeline
from asyncserve.runtime.registry import ModelEntry, ModelRegistry

_SUBMIT_FIELDS = {
    "model", "version", "inputs", "webhook", "priority", "ttl_s", "max_attempts", "queue_timeout_s", "idempotency_key",
}  # fmt: skip
_COUNTS = ("priority", "max_attempts")
"""The submission's integer options."""
_JSON_LINES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")


class JobsAPI:
    """Route handlers for ``/v1/jobs``, and ``run(job)``, the worker's handler."""

    def __init__(
        self, broker: Broker, registry: ModelRegistry, pipeline: Pipeline, webhooks: WebhookSettings, max_batch: int
    ) -> None:
        self.broker = broker
        self.registry = registry
        self.pipeline = pipeline
        self.webhooks = webhooks
        self.max_batch = max_batch

    def add_routes(self, router: Router) -> None:
        router.add("POST", "/v1/jobs", self.submit, "jobs_submit", scope="jobs")
        router.add("POST", "/v1/jobs/batch", self.submit_batch, "jobs_batch", scope="jobs")
        router.add("GET", "/v1/jobs", self.list, "jobs_list", scope="jobs")
        router.add("GET", "/v1/jobs/{job}", self.get, "jobs_get", scope="jobs")
        router.add("GET", "/v1/jobs/{job}/events", self.events, "jobs_events", scope="jobs")
        router.add("DELETE", "/v1/jobs/{job}", self.cancel, "jobs_cancel", scope="jobs")

    # Submitting

    async def submit(self, request: Request) -> Response:
        document = _parse(request.body)
        job_request = await self._job_request(document, "", request.headers.get("idempotency-key"), _owner(request))
        job, created = await self.broker.enqueue(job_request)
        _check_same_job(job, job_request, created)
        return _accepted(job, 202 if created else 200)

    async def submit_batch(self, request: Request) -> Response:
        """Many jobs at once: a JSON array of job objects, or JSON Lines (one job object per line)."""
        items = _parse_batch(request.body, request.headers.get("content-type", ""))
        if len(items) > self.max_batch:
            raise InvalidRequest(f"a batch holds at most {self.max_batch} jobs, got {len(items)}; split it")
        owner = _owner(request)
        requests = [await self._job_request(item, f"[{index}]", None, owner) for index, item in enumerate(items)]
        jobs = await self.broker.enqueue_many(requests)
        for index, (job, job_request) in enumerate(zip(jobs, requests, strict=True)):
            _check_same_job(job, job_request, created=False, where=f"job [{index}]: ")
        body = {"jobs": [{"id": job.id, "status": job.status.value, "url": _url(job)} for job in jobs]}
        return Response.json(body, 202)

    async def submit_v2(self, request: Request, entry: ModelEntry, body: bytes) -> Response:
        """``POST /v2/models/{m}/infer`` with ``Prefer: respond-async``: the V2 request becomes a job."""
        if request.headers.get("inference-header-content-length") is not None:
            raise InvalidRequest("asynchronous inference takes JSON tensors; send the request without binary data")
        decoded = v2.decode_infer_request(body, entry.spec, None)  # a bad request is refused now, not in the job
        _check_rows(decoded.rows, entry)
        inputs = {"format": "v2", "request": orjson.loads(body)}
        # As a V2 request reads it: null parameters are none, and the priority may be its digits as a string.
        priority = parse_priority(decoded.parameters.get("priority", 0), "parameters.priority")
        job_request = JobRequest(
            model=entry.spec.name, version=entry.spec.version, inputs=inputs, priority=priority,
            idempotency_key=request.headers.get("idempotency-key"), owner=_owner(request),
        )  # fmt: skip
        job, created = await self.broker.enqueue(job_request)
        _check_same_job(job, job_request, created)
        # 202 even for the job a known key made before: a 200 from a V2 infer route is an inference response.
        return _accepted(job, 202)

    async def _job_request(
        self, document: Any, path: str, idempotency_key: str | None, owner: str | None
    ) -> JobRequest:
        if not isinstance(document, dict):
            raise SchemaViolation(path, "a job is a JSON object with model and inputs")
        unknown = set(document) - _SUBMIT_FIELDS
        if unknown:
            raise SchemaViolation(
                f"{path}.{sorted(unknown)[0]}".lstrip("."), f"unknown field; use {sorted(_SUBMIT_FIELDS)}"
            )
        for field in ("model", "inputs"):
            if field not in document:
                raise SchemaViolation(f"{path}.{field}".lstrip("."), "field required")
        entry = self.registry.find(str(document["model"]), document.get("version"))
        if entry.spec.streams:
            label = entry.spec.label
            raise InvalidRequest(f"model {label!r} answers in parts, which a job cannot keep; stream it instead")
        # The inputs are checked now, so a job never fails later for a malformed body.
        columns, _ = jsonapi.decode_rows(orjson.dumps(document["inputs"]), entry.spec)
        _check_rows(len(next(iter(columns.values()), ())), entry)
        webhook = document.get("webhook")
        if webhook is not None:
            await validate_webhook_url(str(webhook), self.webhooks)
        idempotency_key = _one_idempotency_key(document.get("idempotency_key"), idempotency_key, path)
        options = {name: _whole(document[name]) for name in _COUNTS if name in document}
        options |= {name: document[name] for name in ("ttl_s", "queue_timeout_s") if name in document}
        return JobRequest(
            model=entry.spec.name, version=entry.spec.version, inputs={"format": "json", "inputs": document["inputs"]},
            webhook=webhook, idempotency_key=idempotency_key, owner=owner, **options,
        )  # fmt: skip

    # Reading

    async def get(self, request: Request) -> Response:
        return Response.json(_public(await self._job(request.params["job"], request)))

    async def list(self, request: Request) -> Response:
        """The client's own jobs (every job for an admin key, or when the server has no keys)."""
        query = _query(request)
        limit = _limit(query.get("limit", "100"))
        owner = None if _sees_every_job(request) else _owner(request)
        jobs, cursor = await self.broker.list(
            status=query.get("status"), model=query.get("model"), cursor=query.get("cursor"), limit=limit, owner=owner
        )
        return Response.json({"jobs": [_public(job) for job in jobs], "next_cursor": cursor})

    async def cancel(self, request: Request) -> Response:
        await self._job(request.params["job"], request)  # another client's job is not found
        job = await self.broker.cancel(request.params["job"])
        if job is None:
            raise NotFound(f"no job {request.params['job']!r}; it never existed or expired")
        return Response.json(_public(job))

    async def events(self, request: Request) -> Response:
        """Server-Sent Events: the job now, then at every change of status, until it is final."""
        job = await self._job(request.params["job"], request)
        return StreamingResponse(200, _sse(self.broker, job.id), content_type="text/event-stream")

    async def _job(self, job_id: str, request: Request) -> Job:
        job = await self.broker.get(job_id)
        # Another client's job is answered as one that does not exist: its id tells nothing.
        if job is None or not (_sees_every_job(request) or job.owner == _owner(request)):
            raise NotFound(f"no job {job_id!r}; it never existed or expired")
        return job

    # Running (the worker's handler)

    async def run(self, job: Job) -> Any:
        """Run a job's prediction through the same pipeline (and batcher) as a request; return its JSON result."""
        entry = self.registry.get_ready(job.model, job.version)
        inputs = job.inputs if isinstance(job.inputs, Mapping) else {}
        deadline = time.monotonic() + entry.spec.timeout_s
        if inputs.get("format") == "v2":
            body = orjson.dumps(inputs["request"])
            decoded = v2.decode_infer_request(body, entry.spec, None)
            prediction = await self.pipeline.run(
                entry, decoded.columns, decoded.rows, deadline, priority=job.priority, request_id=job.id
            )
            payload, _ = v2.encode_infer_response(entry.spec, decoded, prediction.outputs)
            return orjson.loads(payload)
        columns, as_list = jsonapi.decode_rows(orjson.dumps(inputs.get("inputs")), entry.spec)
        rows = len(next(iter(columns.values())))
        prediction = await self.pipeline.run(entry, columns, rows, deadline, priority=job.priority, request_id=job.id)
        return orjson.loads(jsonapi.encode_rows(entry.spec, prediction.outputs, as_list))


def _check_rows(rows: int, entry: ModelEntry) -> None:
    """A job runs its rows in one call of the model: more than it takes would fail later, so are refused now."""
    if rows > entry.spec.max_batch_size:
        raise InvalidRequest(
            f"the job has {rows} rows but model {entry.spec.label!r} takes at most {entry.spec.max_batch_size} per "
            "call; split them into several jobs"
        )


def _whole(value: Any) -> Any:
    """An integral JSON float (``5.0``) as the integer it is, as JSON Schema's ``integer`` takes it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _check_same_job(job: Job, request: JobRequest, created: bool, where: str = "") -> None:
    """A job found by its idempotency key must be the one asked for again: the key reused for another model or
    other inputs is a mistake to report (409), not a reason to answer with someone else's job."""
    if created or request.idempotency_key is None:
        return
    same = job.model == request.model and job.version == request.version
    if same and (job.inputs is None or job.inputs == request.inputs):  # (an expired job keeps no inputs)
        return
    raise IdempotencyConflict(
        f"{where}idempotency key {request.idempotency_key!r} was used for job {job.id} with another model or other "
        "inputs; send a new key for a new job"
    )


def _owner(request: Request) -> str | None:
    """Whose jobs a request makes and sees: its API key's name (None when the server has no keys)."""
    return None if request.key is None else request.key.name


def _sees_every_job(request: Request) -> bool:
    return request.key is None or "admin" in request.key.scopes


def _public(job: Job) -> dict[str, Any]:
    """A job as clients see it: no lease internals."""
    fields = job.to_dict()
    for internal in ("lease_owner", "fencing_token", "lease_expires_at", "not_before"):
        fields.pop(internal, None)
    fields["links"] = {"self": _url(job), "events": f"{_url(job)}/events"}
    return fields


def _url(job: Job) -> str:
    return f"/v1/jobs/{job.id}"


def _accepted(job: Job, status: int) -> Response:
    return Response.json(_public(job), status, {"location": _url(job)})


def _parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


def _one_idempotency_key(in_body: Any, in_header: str | None, path: str) -> Any:
    """The job's key: the ``Idempotency-Key`` header or the body's ``idempotency_key`` (a batch's only way)."""
    if in_header is not None and in_body is not None and in_body != in_header:
        where = f"{path}.idempotency_key".lstrip(".")
        raise SchemaViolation(where, "differs from the Idempotency-Key header; send one of them")
    return in_header if in_header is not None else in_body


def _parse_batch(body: bytes, content_type: str) -> list[Any]:
    if content_type.split(";", 1)[0].strip().lower() in _JSON_LINES:
        return [_parse(line) for line in body.splitlines() if line.strip()]
    items = _parse(body)
    if not isinstance(items, list) or not items:
        raise SchemaViolation("", "a batch is a non-empty JSON array of jobs (or JSON Lines)")
    return items


def _query(request: Request) -> dict[str, str]:
    # An empty value (`?cursor=`) is a value, refused as malformed, not a parameter left out.
    return dict(urllib.parse.parse_qsl(request.query, keep_blank_values=True))


def _limit(value: str) -> int:
    if not is_count(value) or not 1 <= int(value) <= 1000:
        raise InvalidRequest(f"limit must be an integer from 1 to 1000, got {value!r}")
    return int(value)


async def _sse(broker: Broker, job_id: str) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(broker.events(job_id)) as events:
        async for job in events:
            data = orjson.dumps(_public(job))
            yield (
                b"event: "
                + job.status.value.encode()
                + b"\nid: "
                + str(job.updated_at).encode()
                + b"\ndata: "
                + data
                + b"\n\n"
            )
