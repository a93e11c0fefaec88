"""Asynchronous jobs: submit now, collect later, from a family of interchangeable brokers.

Layout: ``broker`` is the contract (``Job``, ``JobStatus``, ``JobRequest``, ``Lease``, the
``Broker`` protocol and ``open_broker(url)``); ``base`` what the brokers share (lifecycle,
argument checks, ``events()``); ``keys`` every name that crosses a process boundary (table and
field names, the Redis key layout); ``memory``, ``sqlite`` (with ``sqlite_ops``) and ``redis``
(with ``redis_scripts``) are the brokers, the last importing redis only when built; ``webhooks``
(with ``webhook_http``) delivers finished jobs. This package imports only leaves
(``exceptions``) from asyncserve.

Example::

    from asyncserve.jobs import JobRequest, open_broker

    async with open_broker("sqlite:///var/jobs.db") as broker:
        job, created = await broker.enqueue(JobRequest(model="churn", inputs={"age": 42}))
        async for update in broker.events(job.id):
            print(update.status, update.result)
"""

from asyncserve.jobs.broker import Broker, Job, JobRequest, JobStatus, Lease, open_broker
from asyncserve.jobs.memory import MemoryBroker
from asyncserve.jobs.redis import RedisBroker
from asyncserve.jobs.sqlite import SQLiteBroker
from asyncserve.jobs.worker import Worker

__all__ = [
    "Broker",
    "Job",
    "JobRequest",
    "JobStatus",
    "Lease",
    "MemoryBroker",
    "RedisBroker",
    "SQLiteBroker",
    "Worker",
    "open_broker",
]
