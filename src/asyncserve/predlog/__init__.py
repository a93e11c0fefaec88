"""Prediction logging: every prediction can be recorded, off the request path, to a family of sinks.

Layout: ``logger`` is the core (buffer, writer, lifecycle); ``delivery`` writes a batch to the
sink within its time limit, retries, or spills it; ``spill`` is the spill file, shared safely by
processes; ``replay`` stores the spill file in the sink once it answers again; ``records`` says
what a record is (with its unique ``log_id``) and how it is encoded; ``sinks`` holds the
``LogSink`` contract and ``open_sink(url)``; ``metrics`` the Prometheus series; ``files``,
``sqlite``, ``postgres`` and ``redis`` are the backends, the last two importing their optional
dependency only when built. This package imports only leaves
(``exceptions``) from asyncserve, and nothing imports it but the composition and edge layers.

Example::

    from asyncserve.predlog import PredictionLogger, open_sink, prediction_record

    async with PredictionLogger(open_sink("var/predictions.jsonl")) as log:
        log.record(prediction_record(request_id="4f2a", model="churn", version="3",
                                     inputs={"age": 42}, outputs={"p": 0.91}))
"""

from asyncserve.predlog.files import JsonlSink
from asyncserve.predlog.logger import LoggerState, LogStatistics, OverflowPolicy, PredictionLogger
from asyncserve.predlog.postgres import PostgresSink
from asyncserve.predlog.records import InputPolicy, LogRecord, prediction_record
from asyncserve.predlog.redis import RedisStreamSink
from asyncserve.predlog.sinks import LogSink, open_sink
from asyncserve.predlog.sqlite import SQLiteSink

__all__ = [
    "InputPolicy",
    "JsonlSink",
    "LogRecord",
    "LogSink",
    "LogStatistics",
    "LoggerState",
    "OverflowPolicy",
    "PostgresSink",
    "PredictionLogger",
    "RedisStreamSink",
    "SQLiteSink",
    "open_sink",
    "prediction_record",
]
