"""Load and liveness probes run as their own processes, so that the test process's GIL never skews them.

python -m tests.probe load URL SECONDS CONNECTIONS   # keeps a model busy; prints how many it served
python -m tests.probe live URL SECONDS               # GET /v2/health/live every 5 ms; prints latencies
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from urllib.parse import urlsplit


def _connection(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=10)


def load(url: str, seconds: float, connections: int, model: str = "busy", body: bytes = b'{"n": 2}') -> int:
    served = [0] * connections

    def worker(index: int) -> None:
        connection = _connection(url)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            connection.request(
                "POST", "/v1/models/busy/predict", body=b'{"n": 2}', headers={"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            response.read()
            served[index] += response.status == 200

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(served)


def live(url: str, seconds: float) -> list[float]:
    connection = _connection(url)
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        connection.request("GET", "/v2/health/live")
        connection.getresponse().read()
        latencies.append(time.perf_counter() - started)
        time.sleep(0.005)
    return latencies


if __name__ == "__main__":
    command, url, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if command == "load":
        model, body = (sys.argv[5], sys.argv[6].encode()) if len(sys.argv) > 6 else ("busy", b'{"n": 2}')
        result: object = load(url, seconds, int(sys.argv[4]), model, body)
    else:
        result = live(url, seconds)
    print(json.dumps(result))
