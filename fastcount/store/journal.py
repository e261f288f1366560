"""The crash journal: what a worker answered 202 to but has not flushed yet, in memory that outlives the worker.

The master creates one memfd per worker and keeps it; the worker maps it and appends every accepted request body
before answering. If the worker dies without flushing (SIGKILL, OOM, a crash), the master hands the journal to the
slot's next worker, which writes the dead worker's batches under the dead worker's own ledger identity (writer, seq),
so a batch that had in fact committed is not counted twice, and recovering twice is harmless.

Layout: a 4 KiB header, then three regions of equal size. At any time one region is *active* (appends go there), at
most one is *in flight* (a batch the flusher took and has not had acknowledged), and the third is spare (zeroed).
Records are request bodies (valid JSON, so never a NUL byte) each followed by one NUL; the first double NUL ends a
region. Header fields are single aligned words written in an order that leaves every crash point recoverable:
see `take` and `acknowledge`.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

MAGIC = b"FCJ1"
HEADER_BYTES = 4096
REGIONS = 3
WRITER_BYTES = 512
NO_REGION = -1

# Header fields: (offset, format)
_MAGIC = (0, "4s")
_ACTIVE = (8, "<i")
_IN_FLIGHT = (12, "<i")
_IN_FLIGHT_SEQ = (16, "<q")
_NEXT_SEQ = (24, "<q")
_REGION_BYTES = (32, "<q")
_WRITER = (64, f"{WRITER_BYTES}s")


def journal_size(region_bytes: int) -> int:
    return HEADER_BYTES + REGIONS * region_bytes


def _read(mm: mmap.mmap, field: tuple[int, str]) -> object:
    return struct.unpack_from(field[1], mm, field[0])[0]


def _write(mm: mmap.mmap, field: tuple[int, str], value: object) -> None:
    struct.pack_into(field[1], mm, field[0], value)


class Journal:
    """A worker's own journal. `mm`, `pos` and `end` are public for the request path, which appends inline."""

    __slots__ = ("active", "end", "in_flight", "mm", "pos", "region_bytes")

    def __init__(self, fd: int, writer: str) -> None:
        self.region_bytes = (os.fstat(fd).st_size - HEADER_BYTES) // REGIONS
        self.mm = mmap.mmap(fd, journal_size(self.region_bytes))
        _write(self.mm, _REGION_BYTES, self.region_bytes)
        _write(self.mm, _WRITER, writer.encode()[:WRITER_BYTES])
        _write(self.mm, _IN_FLIGHT, NO_REGION)
        _write(self.mm, _NEXT_SEQ, 1)
        _write(self.mm, _ACTIVE, 0)
        _write(self.mm, _MAGIC, MAGIC)
        self.active = 0
        self.in_flight = NO_REGION
        self.pos = HEADER_BYTES
        self.end = HEADER_BYTES + self.region_bytes - 1  # keep the last byte zero: it ends a full region

    def _start(self, region: int) -> int:
        return HEADER_BYTES + region * self.region_bytes

    def _spare(self) -> int:
        return min({0, 1, 2} - {self.active, self.in_flight})

    def _activate(self, region: int) -> None:
        self.active = region
        self.pos = self._start(region)
        self.end = self.pos + self.region_bytes - 1

    def used_bytes(self) -> int:
        """How much of the active region is taken (it is compacted, or requests get 503, when full)."""
        return self.pos - self._start(self.active)

    def append(self, record: bytes) -> bool:
        """The slow-path append (the request path inlines the common case). False when the region is full."""
        end = self.pos + len(record)
        if end >= self.end:
            return False
        self.mm[self.pos : end] = record
        self.pos = end + 1
        return True

    def compact(self, snapshot: bytes) -> bool:
        """Replace the active region by one record that sums it up (the pending counts), written to the spare region
        first so that a crash at any point leaves one complete version. False if even that does not fit."""
        if len(snapshot) >= self.region_bytes - 1:
            return False
        old = self.active
        spare = self._spare()
        start = self._start(spare)
        self.mm[start : start + len(snapshot)] = snapshot
        _write(self.mm, _ACTIVE, spare)
        self._activate(spare)
        self.pos = start + len(snapshot) + 1
        self._zero(old)
        return True

    def take(self, seq: int) -> None:
        """The flusher takes what the active region holds as batch `seq`; appends move to the spare region."""
        taken = self.active
        spare = self._spare()
        _write(self.mm, _IN_FLIGHT_SEQ, seq)
        _write(self.mm, _IN_FLIGHT, taken)  # from here recovery treats `taken` as the batch in flight
        _write(self.mm, _ACTIVE, spare)
        _write(self.mm, _NEXT_SEQ, seq + 1)
        self.in_flight = taken
        self._activate(spare)

    def acknowledge(self) -> None:
        """The batch in flight is committed: forget it (zeroed first, then unmarked; a crash between is harmless)."""
        if self.in_flight != NO_REGION:
            self._zero(self.in_flight)
            _write(self.mm, _IN_FLIGHT, NO_REGION)
            self.in_flight = NO_REGION

    def _zero(self, region: int) -> None:
        # Punching a hole zeroes the pages and gives their memory back.
        self.mm.madvise(mmap.MADV_REMOVE, self._start(region), self.region_bytes)


@dataclass(frozen=True)
class RecoveredBatch:
    writer: str
    seq: int
    records: list[bytes]


def recover(fd: int) -> list[RecoveredBatch]:
    """The batches a dead worker left: the one in flight (if any) under its own seq, then its pending records under
    the seq its next batch would have had. Both keep the dead worker's writer identity for the ledger."""
    size = os.fstat(fd).st_size
    if size < HEADER_BYTES:
        return []
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
        if _read(mm, _MAGIC) != MAGIC:
            return []  # the worker died before it initialised its journal: nothing was accepted
        region_bytes = int(_read(mm, _REGION_BYTES))  # type: ignore[call-overload]
        writer = bytes(_read(mm, _WRITER)).rstrip(b"\0").decode()  # type: ignore[call-overload]
        active = int(_read(mm, _ACTIVE))  # type: ignore[call-overload]
        in_flight = int(_read(mm, _IN_FLIGHT))  # type: ignore[call-overload]
        in_flight_seq = int(_read(mm, _IN_FLIGHT_SEQ))  # type: ignore[call-overload]
        next_seq = int(_read(mm, _NEXT_SEQ))  # type: ignore[call-overload]

        def records(region: int) -> list[bytes]:
            start = HEADER_BYTES + region * region_bytes
            data = mm[start : start + region_bytes]
            end = data.find(b"\0\0")
            data = data[: end if end != -1 else len(data)].strip(b"\0")
            return [record for record in data.split(b"\0") if record]

        batches = []
        if in_flight != NO_REGION:
            batches.append(RecoveredBatch(writer, in_flight_seq, records(in_flight)))
            next_seq = max(next_seq, in_flight_seq + 1)
        if active != in_flight:
            batches.append(RecoveredBatch(writer, next_seq, records(active)))
    return [batch for batch in batches if batch.records]
