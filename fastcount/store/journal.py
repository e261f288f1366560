"""The crash journal: what a worker answered but has not flushed yet, in memory that outlives the worker.

The master creates one memfd per worker and keeps it; the worker sizes and maps it, with one *section* per flush
buffer (each feature's pending work), and appends a record for every accepted request before answering. If the
worker dies without flushing (SIGKILL, OOM, a crash), the master has the journal recovered: each section's batches
are written under the dead worker's own ledger identity (writer, seq), so a batch that had in fact committed is not
counted twice, and recovering twice is harmless. What a record means is its buffer's business (its codec).

Layout: a 4 KiB directory page (magic, then one entry per section: name and offset), then the sections. A section is
a 4 KiB header and three regions of equal size. At any time one region is *active* (appends go there), at most one is
*in flight* (a batch the flusher took and has not had acknowledged), and the third is spare (zeroed).

Rules it keeps:
1. A record is a 4-byte little-endian length, then that many bytes. The body is written before its length, so a kill
   in the middle of an append leaves a zero length: the region ends there, and the torn record (never answered) is
   not read.
2. Header fields are single aligned words written in an order that leaves every crash point recoverable (see `take`
   and `acknowledge`); the directory's magic is written last, so a half-initialised journal reads as empty.
3. A section may have a *preamble*: a record every region it activates from then on starts with, so that the records
   that follow can be read in its context (verve: the window its ids belong to). Setting one appends it at once; if it
   does not fit, the region is sealed (takes no more records) until the next take, since a later record would be read
   in the old context. Its length word carries PREAMBLE: a region holding preambles alone holds nothing to recover
   (a dead worker that left only those needs no recovery, and its journal is not kept).
4. A region is zeroed (its pages given back) up to where it was used before it is used again. An acknowledged
   region (and the one a compaction left) is unmarked first (recovery never reads a spare region) and zeroed
   afterwards by a task, a step at a time with the event loop given back between steps: punching 4 MiB at once held
   the loop ~1.3 ms, 31 MiB ~7.7 ms (bench/loop_stalls.py). What is not done yet is done before the region's reuse.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DIRECTORY_MAGIC = b"FCJ2"
DIRECTORY_BYTES = 4096
NAME_BYTES = 64
HEADER_BYTES = 4096
REGIONS = 3
WRITER_BYTES = 512
NO_REGION = -1
LENGTH = struct.Struct("<I")
PREAMBLE = 1 << 31  # in a length word: the record is a preamble (rule 3)
PAGE = mmap.PAGESIZE
RELEASE_STEP = 1 << 20  # bytes of a used region zeroed per step of `release` (~0.3 ms here)

# Directory fields: magic at 0, section count at 8, entries of (name, offset) from 64.
_DIRECTORY_COUNT = (8, "<i")
_ENTRY = struct.Struct(f"<{NAME_BYTES}sq")
_ENTRIES_AT = 64

# Section header fields: (offset, format)
_ACTIVE = (8, "<i")
_IN_FLIGHT = (12, "<i")
_IN_FLIGHT_SEQ = (16, "<q")
_NEXT_SEQ = (24, "<q")
_REGION_BYTES = (32, "<q")
_WRITER = (64, f"{WRITER_BYTES}s")


def section_size(region_bytes: int) -> int:
    return HEADER_BYTES + REGIONS * region_bytes


def journal_size(region_bytes: int, sections: int = 1) -> int:
    return DIRECTORY_BYTES + sections * section_size(region_bytes)


def _read(mm: mmap.mmap, base: int, field: tuple[int, str]) -> int:
    return int(struct.unpack_from(field[1], mm, base + field[0])[0])


def _write(mm: mmap.mmap, base: int, field: tuple[int, str], value: object) -> None:
    struct.pack_into(field[1], mm, base + field[0], value)


class Journal:
    """One buffer's section of a worker's journal. Appends are the request path's; take and acknowledge are the
    flusher's."""

    __slots__ = (
        "active",
        "base",
        "compact_failed",
        "end",
        "in_flight",
        "mm",
        "pos",
        "preamble",
        "region_bytes",
        "releasing",
        "used_to",
    )

    def __init__(self, mm: mmap.mmap, base: int, region_bytes: int, writer: str) -> None:
        self.mm = mm
        self.base = base
        self.region_bytes = region_bytes
        _write(mm, base, _REGION_BYTES, region_bytes)
        _write(mm, base, _WRITER, writer.encode()[:WRITER_BYTES])
        _write(mm, base, _IN_FLIGHT, NO_REGION)
        _write(mm, base, _NEXT_SEQ, 1)
        _write(mm, base, _ACTIVE, 0)
        self.used_to = [self._start(region) for region in range(REGIONS)]  # how far each region was written
        self.active = 0
        self.in_flight = NO_REGION
        self.pos = self.end = 0
        self.releasing: asyncio.Task[None] | None = None
        # A snapshot that did not fit will not fit until a take: what is pending only grows until then. Without
        # this, every request while the region is full would serialise everything pending again (31-56 ms at
        # 0.5-1 M keys) before its 503.
        self.compact_failed = False
        self.preamble = b""
        self._activate(0)

    def _start(self, region: int) -> int:
        return self.base + HEADER_BYTES + region * self.region_bytes

    def _spare(self) -> int:
        """A region neither active nor in flight, a clean one if there is one; zeroed before it is returned."""
        free = sorted({0, 1, 2} - {self.active, self.in_flight}, key=lambda r: (self._dirty(r), r))
        self._zero(free[0])
        return free[0]

    def _dirty(self, region: int) -> bool:
        return self.used_to[region] > self._start(region)

    def _activate(self, region: int) -> None:
        self.active = region
        self.pos = self._start(region)
        self.end = self.pos + self.region_bytes - LENGTH.size  # room for the zero length that ends a full region
        if self.preamble:
            self._append_preamble()  # an empty region: it fits

    def used_bytes(self) -> int:
        """How much of the active region is taken (it is compacted, or requests get 503, when full)."""
        return self.pos - self._start(self.active)

    def refuses(self, size: int) -> bool:
        """True when a record of `size` bytes will be refused until the next take: it does not fit the active region
        and compacting it has already failed."""
        return self.compact_failed and self.pos + 4 + size > self.end

    def append(self, record: bytes) -> bool:
        """Add one record; False when the active region cannot hold it (compact, or refuse the request)."""
        pos = self.pos
        body_at = pos + 4
        end = body_at + len(record)
        if end > self.end:
            return False
        self.mm[body_at:end] = record
        LENGTH.pack_into(self.mm, pos, len(record))  # after the body: a torn append leaves a zero length
        self.pos = end
        return True

    def set_preamble(self, record: bytes, snapshot: Callable[[], bytes]) -> bool:
        """Rule 3: from now on every region starts with `record`, and it is appended now (or starts the region a
        compaction makes). False when neither fits: the region is then sealed until the next take (appends fail,
        requests get 503)."""
        self.preamble = record
        if self._append_preamble() or self.compact(snapshot):
            return True
        self.end = self.pos
        return False

    def _append_preamble(self) -> bool:
        """`append` of the preamble, its length word marked (rule 3)."""
        record = self.preamble
        pos = self.pos
        end = pos + 4 + len(record)
        if end > self.end:
            return False
        self.mm[pos + 4 : end] = record
        LENGTH.pack_into(self.mm, pos, len(record) | PREAMBLE)  # after the body (rule 1)
        self.pos = end
        return True

    def append_or_compact(self, record: bytes, snapshot: Callable[[], bytes]) -> bool:
        """Append; on a full region compact it and append again. False when there is no room even so, and then no
        compaction is tried again until the next take: what is pending only grows until then, so it would serialise
        it all again for nothing (and `refuses` answers for records of this size)."""
        if self.append(record):
            return True
        if self.compact(snapshot) and self.append(record):
            return True
        self.compact_failed = True
        return False

    def compact(self, snapshot: Callable[[], bytes]) -> bool:
        """Replace the active region by one record that sums it up (everything pending), written to the spare region
        first so that a crash at any point leaves one complete version. False if even that does not fit (and then,
        without calling `snapshot` again, until the next take)."""
        if self.compact_failed:
            return False
        record = snapshot()
        preamble_bytes = 4 + len(self.preamble) if self.preamble else 0
        if preamble_bytes + 4 + len(record) > self.region_bytes - LENGTH.size:
            self.compact_failed = True
            return False
        self._remember_use()
        self._activate(self._spare())  # the preamble first, then the snapshot
        self.append(record)
        _write(self.mm, self.base, _ACTIVE, self.active)
        self._release_soon()  # the old region, now spare
        return True

    def take(self, seq: int) -> None:
        """The flusher takes what the active region holds as batch `seq`; appends move to the spare region."""
        taken = self.active
        spare = self._spare()
        self._remember_use()
        _write(self.mm, self.base, _IN_FLIGHT_SEQ, seq)
        _write(self.mm, self.base, _IN_FLIGHT, taken)  # from here recovery treats `taken` as the batch in flight
        _write(self.mm, self.base, _ACTIVE, spare)
        _write(self.mm, self.base, _NEXT_SEQ, seq + 1)
        self.in_flight = taken
        self.compact_failed = False
        self._activate(spare)

    def acknowledge(self) -> None:
        """The batch in flight is committed: forget it. Its region becomes spare, to be zeroed by `release` (or
        before its next use): recovery reads only the active region and the one in flight."""
        if self.in_flight != NO_REGION:
            _write(self.mm, self.base, _IN_FLIGHT, NO_REGION)
            self.in_flight = NO_REGION
            self._release_soon()

    def _release_soon(self) -> None:
        if self.releasing is not None and not self.releasing.done():
            return  # the running task goes on to every spare region
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a tool, a test): at once
            for region in range(REGIONS):
                if region not in (self.active, self.in_flight):
                    self._zero(region)
            return
        self.releasing = loop.create_task(self.release())

    async def release(self, step: int = RELEASE_STEP) -> None:
        """Zero the spare regions `step` bytes at a time, giving the event loop back between steps."""
        for region in range(REGIONS):
            while region not in (self.active, self.in_flight) and self._dirty(region):
                self._zero(region, step)
                await asyncio.sleep(0)

    def _remember_use(self) -> None:
        self.used_to[self.active] = max(self.used_to[self.active], self.pos + LENGTH.size)

    def _zero(self, region: int, step: int | None = None) -> None:
        # Punching a hole zeroes the pages and gives their memory back; only the part that was written, so that
        # releasing a region costs what was used, not its whole size. With `step`, only the last `step` bytes of
        # that part (a multiple of the page size): the region stays zero from `used_to` on.
        start = self._start(region)
        used = self.used_to[region] - start
        if used <= 0:
            return
        end = start + min(self.region_bytes, -(-used // PAGE) * PAGE)
        cut = start if step is None else max(start, end - step)
        self.mm.madvise(mmap.MADV_REMOVE, cut, end - cut)
        self.used_to[region] = cut


class JournalFile:
    """A worker's whole journal: sizes the master's memfd for one section per buffer and lays out the directory."""

    def __init__(self, fd: int, region_bytes: int, names: Sequence[str], writer_of: Callable[[str], str]) -> None:
        size = journal_size(region_bytes, len(names))
        os.ftruncate(fd, size)
        self.mm = mmap.mmap(fd, size)
        self.sections: dict[str, Journal] = {}
        for index, name in enumerate(names):
            base = DIRECTORY_BYTES + index * section_size(region_bytes)
            self.sections[name] = Journal(self.mm, base, region_bytes, writer_of(name))
            _ENTRY.pack_into(self.mm, _ENTRIES_AT + index * _ENTRY.size, name.encode()[:NAME_BYTES], base)
        _write(self.mm, 0, _DIRECTORY_COUNT, len(names))
        self.mm[0:4] = DIRECTORY_MAGIC


@dataclass(frozen=True)
class RecoveredBatch:
    section: str  # the buffer whose codec reads the records
    writer: str
    seq: int
    records: list[bytes]


def _records(mm: mmap.mmap, start: int, region_bytes: int) -> tuple[list[bytes], bool]:
    """A region's records, and whether any is more than a preamble (rule 3)."""
    records = []
    content = False
    pos, end = start, start + region_bytes - LENGTH.size
    while pos + 4 <= end:
        (word,) = LENGTH.unpack_from(mm, pos)
        length = word & ~PREAMBLE
        if length == 0 or pos + 4 + length > end:
            break
        records.append(mm[pos + 4 : pos + 4 + length])
        content = content or not word & PREAMBLE
        pos += 4 + length
    return records, content


def _recover_section(mm: mmap.mmap, name: str, base: int) -> list[RecoveredBatch]:
    region_bytes = _read(mm, base, _REGION_BYTES)
    writer = bytes(struct.unpack_from(_WRITER[1], mm, base + _WRITER[0])[0]).rstrip(b"\0").decode()
    active = _read(mm, base, _ACTIVE)
    in_flight = _read(mm, base, _IN_FLIGHT)
    in_flight_seq = _read(mm, base, _IN_FLIGHT_SEQ)
    next_seq = _read(mm, base, _NEXT_SEQ)

    def region_records(region: int) -> list[bytes]:
        records, content = _records(mm, base + HEADER_BYTES + region * region_bytes, region_bytes)
        return records if content else []

    batches = []
    if in_flight != NO_REGION:
        batches.append(RecoveredBatch(name, writer, in_flight_seq, region_records(in_flight)))
        next_seq = max(next_seq, in_flight_seq + 1)
    if active != in_flight:
        batches.append(RecoveredBatch(name, writer, next_seq, region_records(active)))
    return batches


def recover(fd: int) -> list[RecoveredBatch]:
    """The batches a dead worker left, per section: the one in flight (if any) under its own seq, then its pending
    records under the seq its next batch would have had. Both keep the dead worker's writer identity for the ledger."""
    size = os.fstat(fd).st_size
    if size < DIRECTORY_BYTES:
        return []
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
        if mm[0:4] != DIRECTORY_MAGIC:
            return []  # the worker died before it initialised its journal: nothing was accepted
        batches = []
        for index in range(_read(mm, 0, _DIRECTORY_COUNT)):
            raw_name, base = _ENTRY.unpack_from(mm, _ENTRIES_AT + index * _ENTRY.size)
            batches += _recover_section(mm, raw_name.rstrip(b"\0").decode(), base)
    return [batch for batch in batches if batch.records]
