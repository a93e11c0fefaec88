"""Server-Sent Events read from chunks of bytes as they arrive (the job events and the streaming models use them).

Example::

    parser = EventParser()
    for event in parser.feed(b"event: end\\ndata: {}\\n\\n"):
        print(event.name, event.data)  # end {}
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    """One event: its name (``message`` when the server gave none) and its data lines joined by newlines."""

    name: str
    data: str


class EventParser:
    """Splits a byte stream into events; a line or an event may span any number of chunks."""

    def __init__(self) -> None:
        self._pending = b""
        self._name = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[Event]:
        """The events that ``chunk`` completes, in order."""
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()  # the part after the last newline: an unfinished line
        events = []
        for line in lines:
            event = self._line(line.rstrip(b"\r").decode())
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Event | None:
        if not line:  # a blank line ends the event
            event = Event(self._name or "message", "\n".join(self._data)) if self._data or self._name else None
            self._name, self._data = "", []
            return event
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._name = value
        elif field == "data":
            self._data.append(value)
        return None  # comments (": ...") and the id and retry fields are of no use here


async def read_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[Event]:
    """Every event of a stream of chunks, as each completes."""
    parser = EventParser()
    async for chunk in chunks:
        for event in parser.feed(chunk):
            yield event
