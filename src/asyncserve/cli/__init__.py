"""The command line: ``asyncserve serve MODULE:ATTR``, ``asyncserve demo``, ``asyncserve worker MODULE:ATTR``,
``asyncserve jobs submit FILE``; also ``python -m asyncserve``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from asyncserve._utils import cause_of
from asyncserve.config import Settings
from asyncserve.exceptions import ConfigurationError
from asyncserve.logs import configure_logging

logger = logging.getLogger("asyncserve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncserve", description="Serve ML models without blocking.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a Service given as MODULE:ATTR")
    serve.add_argument("target", metavar="MODULE:ATTR", help="the service to serve, like mypackage.models:service")
    _add_server_options(serve)
    demo = commands.add_parser("demo", help="serve the demo models (a text embedder, FAQ search, iris classifier)")
    _add_server_options(demo)
    worker = commands.add_parser("worker", help="run job workers for a Service (no HTTP server)")
    worker.add_argument("target", metavar="MODULE:ATTR", help="the service whose models run the jobs")
    worker.add_argument("--broker", help="where the jobs are: sqlite://var/jobs.db (default), redis://host:6379/0")
    worker.add_argument("--concurrency", type=int, help="jobs run at once by each worker (default 64)")
    worker.add_argument("--workers", type=int, dest="job_workers", help="worker loops in this process (default 1)")
    worker.add_argument("--executor", choices=["thread", "process"], help="where CPU-bound predict runs")
    worker.add_argument("--executor-workers", type=int, help="threads or processes in the executor pool")
    worker.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    worker.add_argument("--log-format", choices=["text", "json"], help=_LOG_FORMAT_HELP)
    _add_jobs_commands(commands.add_parser("jobs", help="use the jobs API of a running server"))
    _add_keys_commands(commands.add_parser("keys", help="make API keys"))
    return parser


_LOG_FORMAT_HELP = "log lines on stderr: text (default) or json, one object a line"


def _add_keys_commands(keys: argparse.ArgumentParser) -> None:
    commands = keys.add_subparsers(dest="keys_command", required=True)
    new = commands.add_parser(
        "new", help="make an API key: print it once, and its line for the keys file",
        description="Make a random API key. The key is printed once; the server keeps only its SHA-256 digest, in "
        "the keys file (--api-keys-file), which a running server reads again when it changes.",
    )  # fmt: skip
    new.add_argument("name", help="who the key is for (its jobs are its own)")
    new.add_argument("--scopes", required=True, help="comma-separated: infer, jobs, admin, metrics")
    new.add_argument("--file", type=Path, help="append the key's line to this keys file (made if missing, mode 600)")
    new.add_argument("--rate", type=float, help="requests per second allowed on average")
    new.add_argument("--burst", type=int, help="requests allowed at once above the rate")
    new.add_argument("--concurrency", type=int, help="requests in flight at once")


def _version() -> str:
    import asyncserve

    return f"asyncserve {asyncserve.__version__}"


def _add_jobs_commands(jobs: argparse.ArgumentParser) -> None:
    commands = jobs.add_subparsers(dest="jobs_command", required=True)
    submit = commands.add_parser(
        "submit", help="submit a file of inputs as jobs and write each result as it finishes",
        description="Submit every row of FILE (JSON Lines, or CSV with a header row) as a job for --model, "
        "show progress on stderr, and write one JSON line per job to --out as it finishes. Exit status: 0 if "
        "every job succeeded, 1 if some did not, 2 if the run could not finish (see --resume).",
    )  # fmt: skip
    submit.add_argument("file", type=Path, metavar="FILE", help="the inputs: JSON Lines, or a .csv file")
    submit.add_argument("--model", required=True, help="the model that runs every job")
    submit.add_argument("--out", required=True, type=Path, metavar="FILE", help="where the results go (JSON Lines)")
    submit.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    submit.add_argument("--version", help="the model's version (default: the server's choice)")
    submit.add_argument("--batch-size", type=_positive, default=500, help="jobs per POST /v1/jobs/batch (default 500)")
    submit.add_argument("--concurrency", type=_positive, default=4, help="requests in flight at once (default 4)")
    submit.add_argument("--max-attempts", type=_positive, help="attempts per job (default: the server's, 3)")
    existing = submit.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="finish an interrupted run with the same --out")
    existing.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    # Unset options fall back to ASYNCSERVE_* variables, then to the defaults in Settings.
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on, 0 for any free one (default 8000)")
    parser.add_argument("--workers", type=int, help="server processes sharing the port (default 1)")
    parser.add_argument(
        "--grpc-port", type=int, help="also serve V2 over gRPC on this port, 0 for any (needs asyncserve[grpc])"
    )
    parser.add_argument("--executor", choices=["thread", "process"], help="where CPU-bound predict runs")
    parser.add_argument("--executor-workers", type=int, help="threads or processes in the executor pool")
    parser.add_argument(
        "--compute-threads", type=int, help="threads of BLAS/OpenMP per predict call (default: cores / workers)"
    )
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--log-format", choices=["text", "json"], help=_LOG_FORMAT_HELP)
    parser.add_argument("--ssl-certfile", help="PEM certificate chain: serve HTTPS (with --ssl-keyfile)")
    parser.add_argument("--ssl-keyfile", help="PEM private key of --ssl-certfile")
    parser.add_argument("--access-log", action="store_true", default=None, help="log one line per request")
    parser.add_argument("--api-keys-file", help="API keys (asyncserve keys new): each route then needs a key")
    parser.add_argument("--insecure", action="store_true", default=None, help="serve beyond loopback without keys")
    parser.add_argument("--allowed-hosts", help="Host names answered, comma-separated (* for any)")


def settings_from(args: argparse.Namespace) -> Settings:
    if args.command == "worker":
        return Settings.from_env(
            jobs=args.broker,
            job_concurrency=args.concurrency,
            job_workers=args.job_workers,
            executor=args.executor,
            executor_workers=args.executor_workers,
            log_level=args.log_level,
            log_format=args.log_format,
        )
    return Settings.from_env(
        host=args.host,
        port=args.port,
        workers=args.workers,
        grpc_port=args.grpc_port,
        executor=args.executor,
        executor_workers=args.executor_workers,
        compute_threads=args.compute_threads,
        log_level=args.log_level,
        log_format=args.log_format,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        access_log=args.access_log,
        api_keys_file=args.api_keys_file,
        insecure=args.insecure,
        allowed_hosts=args.allowed_hosts,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "jobs":
        return _jobs(args)
    if args.command == "keys":
        return _new_key(args)
    _import_from_current_directory()
    from asyncserve.server import bind_socket, run_worker, serve

    try:
        settings = settings_from(args)
        if args.command == "demo" and not settings.prediction_log:
            # The demo shows the embedded default: predictions logged to a JSON Lines file.
            log = Path("var/demo/predictions.jsonl").resolve()
            settings = dataclasses.replace(settings, prediction_log=str(log))
        configure_logging(settings.log_level, settings.log_format)
        if args.command == "worker":
            run_worker(args.target, settings)
            return 0
        target = "asyncserve.demo:service" if args.command == "demo" else args.target
        sock = bind_socket(settings.host, settings.port)
        if args.command == "demo":
            _print_demo_usage(sock, settings)
        serve(target, settings, sock=sock)
    except ConfigurationError as exc:
        return _failed(exc.message, exc, args)
    except Exception as exc:  # not ours to foresee: still one line, the traceback on demand
        return _failed(
            f"server: {type(exc).__name__}: {cause_of(exc)}; see --log-level debug for the traceback", exc, args
        )
    return 0


def _failed(message: str, exc: BaseException, args: argparse.Namespace) -> int:
    """Print the one-line error (and, with ``--log-level debug``, the traceback first); the exit status."""
    level = args.log_level or os.environ.get("ASYNCSERVE_LOG_LEVEL", "")
    if level.lower() == "debug":
        traceback.print_exception(exc, file=sys.stderr)
    print(f"asyncserve: error: {message}", file=sys.stderr)
    return 2


def _import_from_current_directory() -> None:
    """Let MODULE:ATTR name a module in the current directory, as uvicorn, gunicorn and Flask do.

    ``python -m asyncserve`` has it on ``sys.path`` already; the ``asyncserve`` script has its own
    directory there instead. Worker processes (``--workers``, ``--executor process``) are spawned with
    this ``sys.path``, so they import the same modules.
    """
    cwd = os.getcwd()
    if sys.path[:1] != [cwd]:
        sys.path.insert(0, cwd)


def _new_key(args: argparse.Namespace) -> int:
    from asyncserve.http.auth import new_key, with_limits

    try:
        key, known = new_key(args.name, args.scopes.split(","))
        known = with_limits(known, rate_per_s=args.rate, burst=args.burst, concurrency=args.concurrency)
        if args.file is not None:
            _append_key_line(args.file, known.name, known.line())
    except ConfigurationError as exc:
        print(f"asyncserve: error: {exc.message}", file=sys.stderr)
        return 2
    print(f"key for {args.name} (shown once; send it as 'Authorization: Bearer <key>'):\n{key}")
    where = f"added to {args.file}" if args.file is not None else "for the keys file (--api-keys-file)"
    print(f"line {where}:\n{known.line()}")
    return 0


def _append_key_line(path: Path, name: str, line: str) -> None:
    if path.exists() and f"name={name} " in path.read_text():
        raise ConfigurationError(f"{path} has a key named {name!r} already; pick another name or remove its line")
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as keys_file:
        keys_file.write(line + "\n")


def _jobs(args: argparse.Namespace) -> int:
    from asyncserve.cli import submit

    options = submit.SubmitOptions(
        file=args.file, model=args.model, out=args.out, url=args.url, version=args.version,
        batch_size=args.batch_size, concurrency=args.concurrency, max_attempts=args.max_attempts, resume=args.resume,
        overwrite=args.overwrite,
    )  # fmt: skip
    try:
        return submit.main(options)
    except ConfigurationError as exc:
        print(f"asyncserve: error: {exc.message}", file=sys.stderr)
        return 2


def _print_demo_usage(sock: socket.socket, settings: Settings) -> None:
    from asyncserve import demo

    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    print(f"asyncserve demo on {url}: API docs {url}/docs, metrics {url}/metrics, readiness {url}/v2/health/ready")
    if settings.grpc_port > 0:
        print(f"The Open Inference Protocol over gRPC answers on {host}:{settings.grpc_port} (tritonclient.grpc)")
    print(f"Every prediction is logged to {settings.prediction_log}")
    if settings.api_keys_file or settings.api_keys:
        print("This server needs API keys: add -H 'Authorization: Bearer <key>' to the requests below.")
    else:
        print(
            "Every route is open (loopback, no API keys). To require keys: asyncserve keys new me --scopes "
            "infer,jobs,admin,metrics --file var/keys.txt, then ASYNCSERVE_API_KEYS_FILE=var/keys.txt make demo"
        )
    print(demo.usage(url), flush=True)
