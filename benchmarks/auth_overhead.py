"""What API keys cost: the trivial model served with no keys vs with a keys file, wrk sending a key.

Three ``asyncserve serve benchmarks.trivial:service`` servers run at once, pinned to one core, and
wrk, pinned to the other, loads ``POST /v1/models/echo/predict`` on each in turn, in a fixed order
within every round (no-keys, keys-1, keys-N, no-keys, keys-1, keys-N, ...), so that the ratios are
taken between runs seconds apart:

- ``no-keys``: no keys configured; every route is open and wrk sends no ``Authorization`` header;
- ``keys-1``: ``--api-keys-file`` with one key of scope ``infer``, made by
  ``asyncserve keys new bench --scopes infer --file FILE``; wrk sends ``Authorization: Bearer <key>``
  on every request (its Lua script sets ``wrk.headers``);
- ``keys-N``: the same key in a file that also holds N - 1 other keys (``--other-keys``, default
  499), to show that looking a key up does not grow with the number of keys.

Before measuring, each keyed server must refuse a request without a key and one with a wrong key
(401), and every server must answer ``x * 2`` to a request with the key it expects. The
requirement checked: authentication costs at most 5% of throughput, i.e. the median over rounds of
keyed req/s / no-keys req/s is at least 0.95.

Usage::

    .venv/bin/python -m benchmarks.auth_overhead                 # c=64, 10 s runs, 2 s warm-up, 5 rounds
    .venv/bin/python -m benchmarks.auth_overhead --quick         # a 2 s smoke run, 1 round
    .venv/bin/python -m benchmarks.auth_overhead --other-keys 0  # only no-keys and keys-1
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncserve.http.auth import Authenticator, new_key
from benchmarks import endpoints, harness, measure, report, wrk
from benchmarks.harness import REPO, BenchmarkError, Server, ServerSpec
from benchmarks.measure import Scenario, Settings
from benchmarks.wrk import WrkResult

NAME = "auth-overhead"
BASELINE = "no-keys"
ENDPOINT = endpoints.V1_PREDICT
CONCURRENCY = 64
ROUNDS = 5
OTHER_KEYS = 499
REQUIRED_RATIO = 0.95
"""Authentication may cost at most 5% of throughput."""
KEY_NAME = "bench"


@dataclass(frozen=True)
class Variant:
    """One server: its label, its keys file (None: no keys) and the key wrk sends (None: no header)."""

    label: str
    keys_file: Path | None
    token: str | None
    key_count: int

    def spec(self) -> ServerSpec:
        options = () if self.keys_file is None else ("--api-keys-file", str(self.keys_file))
        return ServerSpec(self.label, harness.asyncserve_command("benchmarks.trivial:service", *options))


def make_keys_file(path: Path, other_keys: int) -> str:
    """A keys file: ``other_keys`` keys of other clients, then one made by ``asyncserve keys new``; returns its key.

    The other keys are made by the function the command calls (``new_key``), in-process: starting
    the command hundreds of times would only be slower. Their keys are thrown away.
    """
    scopes = (("infer",), ("infer", "jobs"), ("metrics",), ("admin",))
    lines = [new_key(f"client-{i:04d}", scopes[i % len(scopes)])[1].line() for i in range(other_keys)]
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(0o600)
    command = [*harness.installed_asyncserve(), "keys", "new", KEY_NAME, "--scopes", "infer", "--file", str(path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    if completed.returncode != 0:
        raise BenchmarkError(f"`asyncserve keys new` failed ({completed.returncode}): {completed.stderr[-500:]}")
    token = next((word for word in completed.stdout.split() if word.startswith("as_")), None)
    if token is None:
        raise BenchmarkError(f"`asyncserve keys new` printed no key:\n{completed.stdout[:500]}")
    count = sum(1 for line in path.read_text().splitlines() if line.strip())
    if count != other_keys + 1:
        raise BenchmarkError(f"{path} holds {count} keys, not {other_keys + 1}")
    return token


def variants(workdir: Path, other_keys: int) -> list[Variant]:
    one = workdir / "keys-1.txt"
    chosen = [Variant(BASELINE, None, None, 0), Variant("keys-1", one, make_keys_file(one, 0), 1)]
    if other_keys > 0:
        many = workdir / f"keys-{other_keys + 1}.txt"
        chosen.append(Variant(f"keys-{other_keys + 1}", many, make_keys_file(many, other_keys), other_keys + 1))
    return chosen


def write_script(variant: Variant, workdir: Path) -> Path:
    """wrk's script for the predict endpoint, setting ``Authorization: Bearer <key>`` when the server wants keys."""
    directory = workdir / variant.label
    directory.mkdir(exist_ok=True)
    script = wrk.write_script(ENDPOINT, directory)
    if variant.token is not None:
        script.write_text(f'wrk.headers["Authorization"] = "Bearer {variant.token}"\n' + script.read_text())
    return script


def _request(port: int, token: str | None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(harness.HOST, port, timeout=5.0)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request(ENDPOINT.method, ENDPOINT.path, body=ENDPOINT.body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def check(server: Server, variant: Variant) -> None:
    """The server answers ``x * 2`` with the key wrk will send, and (when keyed) 401 without it or with another."""
    status, body = _request(server.port, variant.token)
    if status != 200 or not ENDPOINT.check(body):
        raise BenchmarkError(f"{variant.label} answered {status} {body[:300]!r} to a request with its key")
    if variant.token is None:
        return
    for token, what in ((None, "no key"), ("as_" + "x" * 43, "a wrong key")):
        status, body = _request(server.port, token)
        if status != 401:
            raise BenchmarkError(f"{variant.label} answered {status} {body[:300]!r}, not 401, to {what}")


def auth_path_us(key_count: int, repeats: int = 7, number: int = 20_000) -> float:
    """Microseconds of the auth calls one keyed request makes, in-process, best of ``repeats``.

    The server calls ``identify`` and ``authorize`` on the request's head (a 401 or 403 before the
    body is read), both again with ``admit`` when it dispatches, and ``release`` when it answers
    (``src/asyncserve/http/app.py``). This times that sequence on an ``Authenticator`` holding
    ``key_count`` keys with headers like wrk's: a lower bound of the cost per request, less noisy than req/s
    (it leaves out parsing the extra header).
    """
    token, known = new_key(KEY_NAME, ["infer"])
    others = [new_key(f"client-{i:04d}", ["infer"])[1] for i in range(key_count - 1)]
    auth = Authenticator([*others, known])
    headers = {"host": f"{harness.HOST}:8000", "content-type": "application/json", "content-length": "16"}
    headers["authorization"] = f"Bearer {token}"

    def one_request() -> None:
        auth.authorize(auth.identify(headers), "infer")
        key = auth.identify(headers)
        auth.authorize(key, "infer")
        if key is not None:
            auth.admit(key, time.monotonic())
            auth.release(key)

    best = min(timeit.repeat(one_request, repeat=repeats, number=number))
    return round(best / number * 1e6, 3)


def cpu_us_per_request(run: WrkResult) -> float:
    return round(run.server_cpu_s / run.requests * 1e6, 2) if run.requests else float("nan")


def run_benchmark(
    settings: Settings, other_keys: int
) -> tuple[list[Variant], dict[str, list[WrkResult]], dict[str, Any]]:
    """Start the servers, check them, warm them up and run the rounds; the runs by server label."""
    harness.require_tool("wrk")
    harness.require_tool("taskset")
    harness.check_cpus(settings.server_cpu, settings.load_cpu)
    scenario = Scenario(ENDPOINT, settings.concurrencies[0])
    with tempfile.TemporaryDirectory(prefix="asyncserve-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        chosen = variants(workdir, other_keys)
        by_label = {variant.label: variant for variant in chosen}
        servers = measure.start_servers(stack, [variant.spec() for variant in chosen], settings, workdir)
        for server in servers:
            check(server, by_label[server.spec.label])
        scripts = {variant.label: write_script(variant, workdir) for variant in chosen}
        for server in servers:
            _log(f"warm-up {server.spec.label}")
            script = scripts[server.spec.label]
            wrk.run_wrk(server.port, ENDPOINT.path, script, scenario.concurrency, settings.warmup_s, settings.load_cpu)

        def run_once(server: Server, scenario: Scenario, number: int) -> WrkResult:
            result = measure.run_wrk(server, scenario, scripts[server.spec.label], settings)
            _log(f"round {number} {server.spec.label:>9} c={scenario.concurrency:<4} {measure.brief(result)}"
                         f"  {cpu_us_per_request(result):6.1f} CPU-us/req")  # fmt: skip
            return result

        runs = measure.interleave(servers, [scenario], settings.repeats, run_once, rotate=False)
    exit_codes = {server.spec.label: server.exit_code for server in servers}
    return chosen, {label: label_runs for (label, _, _), label_runs in runs.items()}, exit_codes


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ratio(value: float, baseline: float) -> float | None:
    return round(value / baseline, 4) if baseline > 0 else None


def results(
    chosen: Sequence[Variant],
    runs: dict[str, list[WrkResult]],
    in_process_us: dict[str, float],
    exit_codes: dict[str, Any],
    settings: Settings,
    facts: dict[str, Any],
) -> dict[str, Any]:
    keyed = [variant.label for variant in chosen if variant.token is not None]
    rounds: list[dict[str, Any]] = []
    for index in range(settings.repeats):
        round_runs = {label: label_runs[index] for label, label_runs in runs.items()}
        base = round_runs[BASELINE]
        rounds.append({
            "round": index + 1,
            "runs": {label: {**run.as_dict(), "cpu_us_per_request": cpu_us_per_request(run)}
                     for label, run in round_runs.items()},
            "rps_ratio": {label: _ratio(round_runs[label].rps, base.rps) for label in keyed},
            "requests_per_cpu_s_ratio": {
                label: _ratio(round_runs[label].requests_per_cpu_s, base.requests_per_cpu_s) for label in keyed
            },
        })  # fmt: skip
    medians: dict[str, Any] = {
        "rps": {label: round(statistics.median(r.rps for r in label_runs), 1) for label, label_runs in runs.items()},
        "cpu_us_per_request": {
            label: round(statistics.median(cpu_us_per_request(r) for r in label_runs), 2)
            for label, label_runs in runs.items()
        },
        "rps_ratio": {label: _median([r["rps_ratio"][label] for r in rounds]) for label in keyed},
        "requests_per_cpu_s_ratio": {
            label: _median([r["requests_per_cpu_s_ratio"][label] for r in rounds]) for label in keyed
        },
    }
    verdict = {
        label: {
            "median_rps_ratio": medians["rps_ratio"][label],
            "required_at_least": REQUIRED_RATIO,
            "holds": medians["rps_ratio"][label] is not None and medians["rps_ratio"][label] >= REQUIRED_RATIO,
        }
        for label in keyed
    }
    return {
        "benchmark": NAME,
        "requirement": "Authentication costs at most 5% of throughput in the overhead benchmark "
        f"(median over rounds of keyed req/s / no-keys req/s >= {REQUIRED_RATIO})",
        "machine": facts,
        "settings": {
            **measure.settings_dict(settings),
            "rounds": settings.repeats,
            "order": "fixed within each round: " + ", ".join(variant.label for variant in chosen),
            "endpoint": f"{ENDPOINT.method} {ENDPOINT.path}",
            "body": (ENDPOINT.body or b"").decode(),
            "servers": {
                variant.label: {
                    "command": " ".join(variant.spec().command).replace("{port}", "<port>"),
                    "keys_in_file": variant.key_count,
                    "wrk_sends": "Authorization: Bearer <key of scope infer>" if variant.token else "no Authorization",
                }
                for variant in chosen
            },
        },
        "exit_codes": exit_codes,
        "rounds": rounds,
        "medians": medians,
        "verdict": verdict,
        "auth_calls_in_process_us_per_request": in_process_us,
        "auth_calls_share_of_no_keys_cpu": {
            label: _ratio(us, medians["cpu_us_per_request"][BASELINE]) for label, us in in_process_us.items()
        },
    }


def _median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 4) if present else None


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def table(data: dict[str, Any]) -> str:
    labels = list(data["rounds"][0]["runs"])
    keyed = list(data["rounds"][0]["rps_ratio"])
    headers = ["round", *(f"{label} req/s" for label in labels), *(f"{label} / {BASELINE}" for label in keyed)]
    headers += [f"{label} CPU µs/req" for label in labels]
    headers += ["server CPU share", "errors"]
    rows = []
    for r in data["rounds"]:
        runs = r["runs"]
        rows.append([
            str(r["round"]), *(f"{runs[label]['rps']:,.0f}" for label in labels),
            *(_fmt(r["rps_ratio"][label]) for label in keyed),
            *(_fmt(runs[label]["cpu_us_per_request"], ".1f") for label in labels),
            " / ".join(f"{runs[label]['cpu_share']:.2f}" for label in labels),
            " / ".join(str(runs[label]["errors"]) for label in labels),
        ])  # fmt: skip
    m = data["medians"]
    rows.append([
        "**median**", *(f"{m['rps'][label]:,.0f}" for label in labels),
        *(f"**{_fmt(m['rps_ratio'][label])}**" for label in keyed),
        *(_fmt(m["cpu_us_per_request"][label], ".1f") for label in labels), "", "",
    ])  # fmt: skip
    return report.markdown_table(headers, rows)


_MANY_KEYS_NOTE = (
    "The keyed servers differ only in the size of their keys file: the server finds a key by its SHA-256 digest "
    "in a dictionary, so the ratio of the one with many keys shows whether the lookup grows with the key count."
)


def markdown(data: dict[str, Any]) -> str:
    settings, facts = data["settings"], data["machine"]
    servers = "\n".join(
        f"- {label} ({s['keys_in_file']} key(s) in its file; wrk sends {s['wrk_sends']}): `{s['command']}`"
        for label, s in settings["servers"].items()
    )
    keyed = list(data["verdict"])
    ratio_lines = [
        f"- {label}: median req/s ratio **{_fmt(v['median_rps_ratio'])}** "
        f"(req/CPU-s ratio {_fmt(data['medians']['requests_per_cpu_s_ratio'][label])}): "
        + ("the requirement holds." if v["holds"] else f"the requirement does NOT hold (needs >= {REQUIRED_RATIO}).")
        for label, v in data["verdict"].items()
    ]
    parts = [
        "# API keys: authentication overhead",
        f"Requirement: {data['requirement']}.",
        report.facts_markdown(facts) + f"\n- git rev-parse HEAD: {facts['git_head']}",
        f"`{settings['endpoint']}` with `{settings['body']}` at c={settings['concurrencies'][0]}: "
        f"{settings['rounds']} rounds of `{settings['wrk']}` (d={settings['duration_s']} s) after a "
        f"{settings['warmup_s']} s warm-up per server, the servers in a fixed order within each round "
        f"({', '.join(settings['servers'])}); each run started once the CPUs were under "
        f"{harness.QUIET_BUSY_SHARE:.0%} busy or after {settings['quiet_wait_s']:g} s of waiting for that. "
        "All servers run at once, pinned to one core, idle but for the one loaded.\n\n" + servers,
        table(data),
        f"Ratios are keyed / {BASELINE} req/s within a round; below 1 is the cost of authentication. CPU µs/req is "
        "the server's CPU time (all threads, from /proc, 10 ms ticks) per request. Server CPU share and errors "
        f"are per server in the order {' / '.join(settings['servers'])}; errors count socket errors, timeouts and "
        "non-2xx answers (a key refused would show there).",
        "\n".join(ratio_lines),
        report.load_warning(run["load_cpu_share"] for r in data["rounds"] for run in r["runs"].values()),
        "In-process, without HTTP (`auth_path_us`: the identify, authorize, admit and release calls of one keyed "
        "request, best of 7 x 20,000): "
        + "; ".join(
            f"{label} {us:.2f} µs, {_fmt(data['auth_calls_share_of_no_keys_cpu'][label], '.1%')} of the median "
            f"no-keys CPU per request ({data['medians']['cpu_us_per_request'][BASELINE]:.1f} µs)"
            for label, us in data["auth_calls_in_process_us_per_request"].items()
        )
        + ". This leaves out parsing the extra header, so it is a lower bound of the cost, which "
        "neighbours disturb less than the req/s of the servers.",
    ]
    if len(keyed) > 1:
        parts.insert(-1, _MANY_KEYS_NOTE)
    return "\n\n".join(parts) + "\n"


def _git_head() -> str:
    completed = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30, check=False
    )
    return completed.stdout.strip() or "?"


def _src_state() -> str:
    """``clean`` or the changed files under ``src/``: the installed asyncserve is this working tree's."""
    completed = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return "clean" if not completed.stdout.strip() else "changed: " + " ".join(completed.stdout.split())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.auth_overhead", description=(__doc__ or "").split("\n\n")[0]
    )
    measure.add_arguments(parser, (CONCURRENCY,))
    parser.add_argument(
        "--other-keys",
        type=int,
        default=OTHER_KEYS,
        help=f"other clients' keys in the third server's file (default {OTHER_KEYS}; 0: no third server)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.repeats is None and not args.quick:
        args.repeats = ROUNDS
    settings = measure.resolve(args, (CONCURRENCY,), (CONCURRENCY,))
    if len(settings.concurrencies) != 1:
        print("give one --concurrency", file=sys.stderr)
        return 2
    facts = report.machine_facts(settings.server_cpu, settings.load_cpu)
    facts["git_head"] = _git_head()
    facts["src_at_start"] = _src_state()
    try:
        chosen, runs, exit_codes = run_benchmark(settings, args.other_keys)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    report.record_end(facts)
    facts["src_at_end"] = _src_state()
    in_process_us = {variant.label: auth_path_us(variant.key_count) for variant in chosen if variant.token}
    data = results(chosen, runs, in_process_us, exit_codes, settings, facts)
    text = markdown(data)
    paths = report.write_results(NAME, data, text, settings.output_dir)
    print(report.relative_paths(text))
    print("written: " + report.relative_paths(", ".join(str(path) for path in paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
