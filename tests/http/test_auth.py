"""API keys through a real server: every route with no key, a wrong key, a key of the wrong scope and
the right one; limits; rotation of the keys file; the protected mode."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest

from asyncserve import ConfigurationError, Service, Settings
from asyncserve.http.auth import ApiKey, Authenticator, new_key, parse_keys, with_limits
from asyncserve.server import serve
from tests.conftest import RunningServer, serving
from tests.models import Adder, Sleeper
from tests.test_shedding import connect, read_response, request

KEYS = {scope: new_key(f"key-{scope}", [scope]) for scope in ("infer", "jobs", "admin", "metrics")}
LIMITED_KEY, LIMITED = new_key("limited", ["infer"])
LIMITED = with_limits(LIMITED, rate_per_s=2.0, burst=2, concurrency=None)
KEYS_TEXT = "\n".join([*(known.line() for _, known in KEYS.values()), LIMITED.line()])

SERVICE = Service(Adder(), Sleeper(), name="auth")
SETTINGS = Settings(executor_workers=2, jobs="memory://", loop_lag_interval_s=0.01, api_keys=KEYS_TEXT)

ROW = {"a": [1.0, 2.0, 3.0], "b": [1.0, 1.0, 1.0]}
V2_ROW = {"inputs": [{"name": n, "shape": [1, 3], "datatype": "FP32", "data": v} for n, v in ROW.items()]}


def bearer(scope: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[scope][0]}"}


def example_path(pattern: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: {"model": "adder", "version": "1"}.get(m.group(1), "0" * 32), pattern)


def routes(running: RunningServer) -> list[tuple[str, str, str | None]]:
    return [(r.method, example_path(r.pattern.pattern.strip("^$").replace("(?P<", "{").replace(">[^/]+)", "}")),
             r.scope) for r in running.app.http.router.routes]  # fmt: skip


async def test_every_route_needs_a_key_with_its_scope_and_health_stays_open(running: RunningServer) -> None:
    checked = 0
    async with running.client() as client:
        for method, path, scope in routes(running):
            anonymous = await client.request(method, path)
            if scope is None:
                assert anonymous.status_code not in (401, 403), (method, path)
                continue
            assert (anonymous.status_code, anonymous.json()["code"]) == (401, "unauthorized"), (method, path)
            assert anonymous.headers["www-authenticate"] == 'Bearer realm="asyncserve"'
            wrong = await client.request(method, path, headers={"Authorization": "Bearer as_not-a-key"})
            assert wrong.status_code == 401, (method, path)
            other = next(s for s in KEYS if s != scope and not (s == "admin" and scope == "jobs"))
            forbidden = await client.request(method, path, headers=bearer(other))
            assert (forbidden.status_code, forbidden.json()["code"]) == (403, "forbidden"), (method, path)
            assert scope in forbidden.json()["error"]
            allowed = await client.request(method, path, headers=bearer(scope))
            assert allowed.status_code not in (401, 403), (method, path, allowed.text)
            checked += 1
        reloaded = await client.post("/v2/repository/models/adder/load", headers=bearer("admin"))  # it was unloaded
        assert reloaded.status_code == 200
    assert checked >= 15


async def test_a_key_in_x_api_key_works_too_and_the_answer_is_the_usual_one(running: RunningServer) -> None:
    async with running.client() as client:
        answer = await client.post("/v2/models/adder/infer", json=V2_ROW, headers={"X-API-Key": KEYS["infer"][0]})
    assert answer.status_code == 200
    assert answer.json()["outputs"][0]["data"] == [2.0, 3.0, 4.0]


async def test_a_request_without_a_key_is_refused_before_its_body_is_read(running: RunningServer) -> None:
    reader, writer = await connect(running)
    try:
        big = orjson.dumps({**ROW, "padding": "x" * 100_000})
        writer.write(request("/v1/models/adder/predict", big))
        status, _, body = await read_response(reader)
        assert (status, orjson.loads(body)["code"]) == (401, "unauthorized")
        writer.write(
            request("/v1/models/adder/predict", orjson.dumps(ROW), f"Authorization: Bearer {KEYS['infer'][0]}")
        )
        assert (await read_response(reader))[0] == 200  # the same connection goes on
    finally:
        writer.close()


async def test_a_key_over_its_rate_gets_429_with_retry_after(running: RunningServer) -> None:
    headers = {"Authorization": f"Bearer {LIMITED_KEY}"}
    async with running.client() as client:
        answers = [await client.post("/v1/models/adder/predict", json=ROW, headers=headers) for _ in range(4)]
    statuses = [a.status_code for a in answers]
    assert statuses[:2] == [200, 200]  # the burst
    assert 429 in statuses[2:]
    limited = next(a for a in answers if a.status_code == 429)
    assert limited.json()["code"] == "rate_limited"
    assert limited.headers["retry-after"] == "1"


async def test_a_key_over_its_concurrency_gets_429_and_its_requests_count_down() -> None:
    key, known = new_key("narrow", ["infer"])
    known = with_limits(known, rate_per_s=None, burst=None, concurrency=1)
    sleeper = Sleeper()
    settings = Settings(executor_workers=2, jobs="", api_keys=known.line())
    headers = {"Authorization": f"Bearer {key}"}
    async with serving(Service(sleeper, name="narrow"), settings) as running, running.client() as client:
        sleeper.started.clear()
        first = asyncio.create_task(client.post("/v1/models/sleeper/predict", json={"seconds": 0.3}, headers=headers))
        await asyncio.to_thread(sleeper.started.wait, 5)
        second = await client.post("/v1/models/sleeper/predict", json={"seconds": 0}, headers=headers)
        assert (second.status_code, second.json()["code"]) == (429, "rate_limited")
        assert (await first).status_code == 200
        third = await client.post("/v1/models/sleeper/predict", json={"seconds": 0}, headers=headers)
        assert third.status_code == 200  # the first one's slot was given back


async def test_admin_actions_are_audited(running: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    async with running.client() as client:
        with caplog.at_level(logging.INFO, logger="asyncserve.audit"):
            unloaded = await client.post("/v2/repository/models/sleeper/unload", headers=bearer("admin"))
            loaded = await client.post("/v2/repository/models/sleeper/load", headers=bearer("admin"))
    assert (unloaded.status_code, loaded.status_code) == (200, 200)
    lines = [r.getMessage() for r in caplog.records if r.name == "asyncserve.audit"]
    assert "key-admin POST /v2/repository/models/sleeper/unload -> 200" in lines
    assert "key-admin POST /v2/repository/models/sleeper/load -> 200" in lines


async def test_keys_rotate_without_a_restart(tmp_path: Path) -> None:
    old_key, old = new_key("rotating", ["infer"])
    new_key_text, new = new_key("rotating", ["infer"])
    keys_file = tmp_path / "keys.txt"
    await asyncio.to_thread(keys_file.write_text, old.line() + "\n")
    settings = Settings(executor_workers=1, jobs="", api_keys_file=str(keys_file))
    async with serving(Service(Adder(), name="rotation"), settings) as running, running.client() as client:
        old_headers = {"Authorization": f"Bearer {old_key}"}
        assert (await client.post("/v1/models/adder/predict", json=ROW, headers=old_headers)).status_code == 200
        await asyncio.to_thread(keys_file.write_text, new.line() + "\n# rotated\n")
        new_headers = {"Authorization": f"Bearer {new_key_text}"}
        async with asyncio.timeout(10):  # the server reads the file again within a second or so
            while (await client.post("/v1/models/adder/predict", json=ROW, headers=new_headers)).status_code != 200:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert (await client.post("/v1/models/adder/predict", json=ROW, headers=old_headers)).status_code == 401


def test_keys_are_parsed_with_clear_errors() -> None:
    _, known = new_key("alice", ["infer", "jobs"])
    (parsed,) = parse_keys(known.line() + "  # a comment", "keys.txt")
    assert parsed == known
    with pytest.raises(ConfigurationError, match=r"keys\.txt line 1: expected 'name=NAME scopes="):
        parse_keys("alice infer", "keys.txt")
    with pytest.raises(ConfigurationError, match="sha256 must be 64 hex digits"):
        parse_keys("name=a scopes=infer sha256=as_plaintextkey", "keys.txt")
    with pytest.raises(ConfigurationError, match="scopes must be some of infer, jobs, admin, metrics"):
        parse_keys(f"name=a scopes=root sha256={'0' * 64}", "keys.txt")
    with pytest.raises(ConfigurationError, match=r"key name\(s\) \['a'\] appear twice"):
        parse_keys(f"name=a scopes=infer sha256={'0' * 64}\nname=a scopes=jobs sha256={'1' * 64}", "keys.txt")
    assert not Authenticator([]).enabled
    assert Authenticator([ApiKey("a", frozenset({"infer"}), "0" * 64)]).enabled


def test_serving_beyond_loopback_without_keys_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="without API keys: make keys"):
        serve(SERVICE, Settings(host="0.0.0.0", port=0))
    command = [
        sys.executable,
        "-m",
        "asyncserve",
        "serve",
        "tests.services:service",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("asyncserve: error: --host 0.0.0.0 would serve every route to anyone")
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_keys_command_makes_a_key_the_server_knows(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    command = [
        sys.executable,
        "-m",
        "asyncserve",
        "keys",
        "new",
        "carol",
        "--scopes",
        "infer,jobs",
        "--file",
        str(keys_file),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    key = result.stdout.splitlines()[1]
    (known,) = parse_keys(keys_file.read_text(), str(keys_file))
    assert Authenticator([known]).identify({"authorization": f"Bearer {key}"}) == known
    assert key not in keys_file.read_text()
    assert keys_file.stat().st_mode & 0o777 == 0o600


async def test_without_keys_every_route_is_open_on_loopback() -> None:
    settings = Settings(executor_workers=1, jobs="")
    async with serving(Service(Adder(), name="open"), settings) as running, running.client() as client:
        assert (await client.post("/v1/models/adder/predict", json=ROW)).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


async def test_an_unknown_route_is_404_with_or_without_a_key(running: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=running.url) as client:
        assert (await client.get("/nope")).status_code == 404


async def test_one_client_can_neither_see_nor_touch_another_clients_jobs() -> None:
    alice_key, alice = new_key("alice", ["jobs"])
    bob_key, bob = new_key("bob", ["jobs"])
    admin_key, admin = new_key("ops", ["admin"])
    keys = "\n".join(k.line() for k in (alice, bob, admin))
    settings = Settings(executor_workers=1, jobs="memory://", job_workers=0, api_keys=keys)
    as_alice, as_bob = {"Authorization": f"Bearer {alice_key}"}, {"Authorization": f"Bearer {bob_key}"}
    as_admin = {"Authorization": f"Bearer {admin_key}"}
    job = {"model": "adder", "inputs": ROW}
    async with serving(Service(Adder(), name="owners"), settings) as running, running.client() as client:
        mine = await client.post("/v1/jobs", json=job, headers={**as_alice, "Idempotency-Key": "order-1"})
        assert mine.status_code == 202
        job_id = mine.json()["id"]
        for method, path in [("GET", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/events"),
                             ("DELETE", f"/v1/jobs/{job_id}")]:  # fmt: skip
            answer = await client.request(method, path, headers=as_bob)
            assert (answer.status_code, answer.json()["code"]) == (404, "not_found"), (method, path)
        assert (await client.get("/v1/jobs", headers=as_bob)).json()["jobs"] == []
        # The same idempotency key is bob's own: a new job, not alice's.
        theirs = await client.post("/v1/jobs", json=job, headers={**as_bob, "Idempotency-Key": "order-1"})
        assert theirs.status_code == 202
        assert theirs.json()["id"] != job_id
        again = await client.post("/v1/jobs", json=job, headers={**as_alice, "Idempotency-Key": "order-1"})
        assert (again.status_code, again.json()["id"]) == (200, job_id)
        listed = await client.get("/v1/jobs", headers=as_alice)
        assert [j["id"] for j in listed.json()["jobs"]] == [job_id]
        everyone = await client.get("/v1/jobs", headers=as_admin)
        assert {j["id"] for j in everyone.json()["jobs"]} == {job_id, theirs.json()["id"]}
        assert (await client.get(f"/v1/jobs/{job_id}", headers=as_alice)).json()["owner"] == "alice"
        assert (await client.delete(f"/v1/jobs/{job_id}", headers=as_alice)).status_code == 200
