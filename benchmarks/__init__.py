"""Benchmarks for asyncserve, kept out of the test suite.

``python -m benchmarks.frameworks`` compares a bare ASGI app with Starlette and FastAPI under
uvicorn; ``python -m benchmarks.overhead`` compares asyncserve itself with the bare ASGI app.
Both report ratios measured in one run, since the absolute numbers of a shared machine drift.
"""
