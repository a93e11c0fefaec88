"""Services the end-to-end tests start with the real CLI, as `tests.services:<name>`."""

from __future__ import annotations

from asyncserve import Service
from tests.models import Adder, Busy, Cached, Sleeper, Spinner

service = Service(Adder(), Sleeper(), Spinner(), Busy(), name="e2e")

cached = Service(Cached(), name="cached")
