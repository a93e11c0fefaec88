"""The OpenAPI description of the jobs API (``http/jobs.py``): submit, list, read, cancel, follow.

A job's body names a model and holds its inputs exactly as the model's JSON API takes them, so the
submission schema is one variant per model (and per version), each pointing at the model's
``{name}.Inputs`` schema that ``openapi.py`` defines. V2's ``Prefer: respond-async`` (a V2 request
made a job) is added to the V2 infer operations here too. Only a server with jobs has these routes,
and only one with a webhook secret takes a ``webhook``: ``JobsDocument`` says which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from asyncserve.http.openapi_parts import (
    BODY,
    PRIORITY,
    build_operation,
    header,
    json_response,
    nullable,
    object_schema,
    param_ref,
    path_parameter,
    row_or_rows,
)
from asyncserve.jobs.broker import MAX_ATTEMPTS, MAX_PRIORITY, MAX_TTL_S, JobStatus
from asyncserve.model import ModelSpec

SUBMIT_ERRORS = (*BODY, 404, 409, 503)
"""What a submission may answer besides 400 (bad JSON, a streaming model, an option out of range)."""
KEY_LENGTH = 2048
_NOT_PRINTABLE = r"[\x00-\x1f\x7f-\xa0\xad]"
"""What ``str.isprintable`` refuses, as far as a portable pattern says it: exact for Latin-1 (any header
value), while beyond it the server also refuses format characters, separators but the space and unassigned
code points. Used under ``not``: an anchored ``$`` would take a final newline in Python's regular expressions."""
_JOB_ID = r"^[0-9a-f]{32}$"


@dataclass(frozen=True)
class JobsDocument:
    """What the document says of a server's jobs: ``max_batch`` jobs per batch, and whether it sends webhooks."""

    max_batch: int
    webhooks: bool


def add_jobs(
    document: dict[str, Any], specs: Sequence[ModelSpec], served: Sequence[ModelSpec], jobs: JobsDocument
) -> None:
    """Add the jobs API to ``document`` (``served``: the spec each model name's /v1 routes serve)."""
    components = document["components"]
    components["schemas"].update(jobs_schemas(specs, served, jobs))
    components["parameters"].update(jobs_parameters())
    paths = document["paths"]
    paths.update(jobs_paths(jobs))
    for path in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer"):
        paths[path]["post"] = respond_async(paths[path]["post"])
    document["tags"].append({"name": "jobs", "description": "Predictions that run in the background."})


def jobs_schemas(specs: Sequence[ModelSpec], served: Sequence[ModelSpec], jobs: JobsDocument) -> dict[str, Any]:
    """``JobSubmission`` (one variant per model that can run as a job), ``Job`` and ``JobList``."""
    variants = [_variant(spec, spec.name, jobs, versioned=False) for spec in served if not spec.streams]
    variants += [
        _variant(spec, f"{spec.name}.v{spec.version}", jobs, versioned=True)
        for spec in specs
        if spec.version is not None and not spec.streams
    ]
    return {
        # No model that a job can run: no submission is valid.
        "JobSubmission": {"anyOf": variants} if variants else {"not": {}},
        "Job": _job_schema(),
        "JobList": object_schema(
            {
                "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
                "next_cursor": {**nullable({"type": "string"}), "description": "The next page's `cursor`; null: none."},
            },
            ["jobs", "next_cursor"],
        ),
    }


def jobs_parameters() -> dict[str, Any]:
    return {
        "IdempotencyKey": header(
            "Idempotency-Key",
            "Submitting again with this key answers the first job (200) instead of making another; the key "
            "reused for other inputs is a 409. Printable text.",
            _key_schema(),
        ),
        "PreferAsync": header(
            "Prefer",
            "RFC 7240 preferences; `respond-async` makes the request a job and answers 202 with it.",
            {"type": "string", "examples": ["respond-async"]},
        ),
    }


def jobs_paths(jobs: JobsDocument) -> dict[str, Any]:
    job = [path_parameter("job_id", "The job's id, as its submission answered it.", ())]
    return {
        "/v1/jobs": {"post": _submit_operation(), "get": _list_operation()},
        "/v1/jobs/batch": {"post": _batch_operation(jobs)},
        "/v1/jobs/{job_id}": {
            "parameters": job,
            "get": _job_operation("Read a job: its status, and its result once it succeeded.", "get_job"),
            "delete": _job_operation(
                "Cancel a queued or running job; a finished one is answered as it is.", "cancel_job"
            ),
        },
        "/v1/jobs/{job_id}/events": {"parameters": job, "get": _events_operation()},
    }


def respond_async(operation: dict[str, Any]) -> dict[str, Any]:
    """A V2 infer ``operation`` that also takes ``Prefer: respond-async``: 202, and the request is a job."""
    accepted = _accepted(
        "With `Prefer: respond-async`: the job (its result is the V2 response), or the one its idempotency key made."
    )
    return {
        **operation,
        "parameters": [*operation["parameters"], param_ref("PreferAsync"), param_ref("IdempotencyKey")],
        "responses": {
            **operation["responses"],
            "202": accepted,
            "409": {"$ref": "#/components/responses/IdempotencyConflict"},
        },
    }


# -- operations ----------------------------------------------------------------------------------


def _submit_operation() -> dict[str, Any]:
    return build_operation(
        "Submit a job: a prediction that runs in the background, to poll, stream or cancel.",
        {"202": _accepted("The job, queued."), "200": _accepted("The job this idempotency key made before.")},
        SUBMIT_ERRORS,
        scope="jobs",
        tag="jobs",
        operationId="submit_job",
        description=(
            "The inputs are checked now, as the model's JSON API checks them (a row, or a list of at most "
            "`max_batch_size` rows), so a job never fails later for a malformed body."
        ),
        parameters=[param_ref("IdempotencyKey")],
        requestBody={"required": True, "content": {"application/json": {"schema": _submission()}}},
    )


def _batch_operation(jobs: JobsDocument) -> dict[str, Any]:
    item = object_schema(
        {"id": {"type": "string"}, "status": _status(), "url": {"type": "string"}}, ["id", "status", "url"]
    )
    submitted = object_schema({"jobs": {"type": "array", "items": item}}, ["jobs"])
    answer = {
        "description": "The jobs, in the order sent; a known idempotency key answers its first job.",
        "content": {"application/json": {"schema": submitted}},
    }
    return build_operation(
        "Submit many jobs at once: all are stored, or none.",
        {"202": answer},
        SUBMIT_ERRORS,
        scope="jobs",
        tag="jobs",
        operationId="submit_jobs",
        description="A JSON array of jobs, or JSON Lines; each job may carry its own `idempotency_key`.",
        requestBody={"required": True, "content": _batch_body(jobs.max_batch)},
    )


def _batch_body(max_batch: int) -> dict[str, Any]:
    jobs = {"type": "array", "items": _submission(), "minItems": 1, "maxItems": max_batch}
    # Also taken as application/jsonl and application/x-jsonlines.
    lines = {"type": "string", "description": f"JSON Lines: one job object per line, at most {max_batch}."}
    return {"application/json": {"schema": jobs}, "application/x-ndjson": {"schema": lines}}


def _list_operation() -> dict[str, Any]:
    query = [
        _query("status", "Only the jobs in this status.", _status()),
        _query("model", "Only the jobs of this model.", {"type": "string"}),
        _query("cursor", "The `next_cursor` of the previous page.", {"type": "string", "pattern": _JOB_ID}),
        _query("limit", "At most this many jobs (100 by default).", {"type": "integer", "minimum": 1, "maximum": 1000}),
    ]
    return build_operation(
        "The client's own jobs, newest first (every job for an `admin` key, or on a server without keys).",
        {"200": json_response("A page of jobs.", "JobList")},
        (),
        scope="jobs",
        tag="jobs",
        operationId="list_jobs",
        parameters=query,
    )


def _job_operation(summary: str, operation_id: str) -> dict[str, Any]:
    return build_operation(
        summary, {"200": json_response("The job.", "Job")}, (404,), scope="jobs", tag="jobs", operationId=operation_id
    )


def _events_operation() -> dict[str, Any]:
    events = {
        "description": "Server-Sent Events: the job now, then at each change of status until it is final; each "
        "event is named by the status, its id is the job's `updated_at`, its data the job (as `GET` answers it).",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    return build_operation("Follow a job.", {"200": events}, (404,), scope="jobs", tag="jobs", operationId="job_events")


def _accepted(description: str) -> dict[str, Any]:
    location = {"description": "The job's URL.", "schema": {"type": "string"}, "required": True}
    return {**json_response(description, "Job"), "headers": {"Location": location}}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


# -- schemas -------------------------------------------------------------------------------------


def _submission() -> dict[str, Any]:
    return {"$ref": "#/components/schemas/JobSubmission"}


def _variant(spec: ModelSpec, key: str, jobs: JobsDocument, *, versioned: bool) -> dict[str, Any]:
    """A job of ``spec``: at its version when ``versioned``, else of its name's highest version."""
    inputs = row_or_rows({"$ref": f"#/components/schemas/{key}.Inputs"}, spec.max_batch_size)
    version = {"type": "string", "const": spec.version} if versioned else {"type": "null"}
    properties = {
        "model": {"type": "string", "const": spec.name},
        "version": version,
        "inputs": {**inputs, "description": f"As `POST /v1/models/{spec.name}/predict` takes them."},
        **_options(jobs),
    }
    return {
        "type": "object",
        "title": spec.label if versioned else spec.name,
        "properties": properties,
        "required": ["model", "inputs", *(["version"] if versioned else [])],
        "additionalProperties": False,
    }


def _options(jobs: JobsDocument) -> dict[str, Any]:
    seconds = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TTL_S}
    options: dict[str, Any] = {
        "priority": {"type": "integer", "minimum": 0, "maximum": MAX_PRIORITY, "description": PRIORITY},
        "ttl_s": {**seconds, "description": "Seconds the result is kept once the job ends (a day by default)."},
        "max_attempts": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_ATTEMPTS,
            "description": "Tries before the job fails (3 by default).",
        },
        "queue_timeout_s": {**nullable(seconds), "description": "A job queued this long expires."},
        "idempotency_key": {
            **nullable(_key_schema()),
            "description": "As the `Idempotency-Key` header (the same value, if both are sent); a batch's only way.",
        },
    }
    if jobs.webhooks:
        url = {"type": "string", "format": "uri", "maxLength": 2048}
        options["webhook"] = {
            **nullable(url),
            "description": "An http(s) URL on public addresses, POSTed the job, signed, when it ends.",
        }
    return options


def _key_schema() -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": KEY_LENGTH, "not": {"pattern": _NOT_PRINTABLE}}


def _status() -> dict[str, Any]:
    return {"type": "string", "enum": [status.value for status in JobStatus]}


def _job_schema() -> dict[str, Any]:
    text, number = nullable({"type": "string"}), {"type": "number"}
    when = {**nullable(number), "description": "Unix seconds; null until it happens."}
    links = object_schema({"self": {"type": "string"}, "events": {"type": "string"}}, ["self", "events"])
    properties: dict[str, Any] = {
        "id": {"type": "string", "pattern": _JOB_ID},
        "model": {"type": "string"},
        "version": text,
        "inputs": {"description": "As sent: `{format: json, inputs}` or `{format: v2, request}`; null once expired."},
        "priority": {"type": "integer", "minimum": 0, "maximum": MAX_PRIORITY},
        "status": _status(),
        "result": {"description": "The model's outputs, as its JSON API (or V2) answers them; null until it succeeds."},
        "error": {**text, "description": "Why the last attempt failed."},
        "dead_letter": {"type": "boolean", "description": "Whether the job failed because its attempts ran out."},
        "attempts": {"type": "integer", "minimum": 0},
        "max_attempts": {"type": "integer", "minimum": 1},
        "webhook": text,
        "webhook_attempts": {"type": "array", "items": {"type": "object"}},
        "idempotency_key": text,
        "owner": {**text, "description": "The name of the API key that submitted it."},
        "created_at": number,
        "updated_at": number,
        "started_at": when,
        "finished_at": when,
        "ttl_s": number,
        "deadline_at": {**when, "description": "When the job expires if still queued (`queue_timeout_s`)."},
        "links": links,
    }
    return object_schema(properties, list(properties))
