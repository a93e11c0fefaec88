"""Services the end-to-end tests start with the real CLI, as `tests.services:<name>`."""

from __future__ import annotations

from asyncserve import Service
from tests.models import Adder, Busy, Cached, Echo, FailsFirst, Faulty, OwnProcess, Pid, Sleeper, Spinner

service = Service(Adder(), Sleeper(), Spinner(), Busy(), name="e2e")

cached = Service(Cached(), name="cached")

jobs = Service(Pid(), FailsFirst(), Adder(), Faulty(), name="jobs")
"""For the jobs tests: who ran each job (pid), retries (fails_first), rows that fail (faulty)."""

own_process = Service(OwnProcess(), Adder(), name="own-process")
"""A model in a process of its own beside one on the shared threads."""

mixed = Service(Adder(), Busy(), Pid(), Echo(), name="mixed")
"""Three sync models and an async one (Echo): the start-up log counts all four."""
