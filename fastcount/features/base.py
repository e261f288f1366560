"""The seam every workload plugs into: a Feature (routes, settings, schema, buffers, metrics, readiness, background
work) and its FlushBuffers (pending work in memory, swapped out and written by the flusher, journaled by its codec).

A feature never touches sockets, processes or the flusher's retries; the server never knows what a feature counts.
`fastcount/app.py` lists the features; that list is the only place a new workload is registered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import psycopg

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from fastcount.observability.stats import WorkerStats
    from fastcount.server.routing import Route
    from fastcount.settings import Settings
    from fastcount.store.journal import Journal

SectionT = TypeVar("SectionT")


@dataclass(frozen=True)
class FeatureMetric:
    """One per-worker series a feature publishes on the worker's tick (never from the request path)."""

    name: str  # without the fastcount_ prefix; counters without _total
    kind: str  # "counter" (cumulative for this process) or "gauge"
    help: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


@dataclass
class FeatureContext:
    """What a worker hands each feature when it builds it."""

    settings: Settings
    read_pool: AsyncConnectionPool[Any]  # short reads on the request path (GET handlers, readiness)
    stats: WorkerStats
    slot: int
    dsn: str

    def section(self, cls: type[SectionT]) -> SectionT:
        return self.settings.section(cls)


class FlushBuffer(ABC):
    """A feature's pending work in memory.

    The request path adds to it (journal first, then memory); the flusher's lane for this buffer swaps it out with
    `take`, writes the batch with `write` inside a transaction that also records the batch in the ledger, and calls
    `acknowledge` once it committed. Until then the batch is retried verbatim; if PostgreSQL refuses part of it for
    good (a data error), the lane bisects it with `split` down to single items and parks those with `dead_letters`.

    An `idempotent` buffer's batch of more than `transaction_rows` rows is committed as `parts`, one transaction each,
    the ledger row with the last one (the flusher's rule 6). Whatever a buffer derives in memory from its writes (the
    events' duplicates counter, today) it applies in `transaction_ended`, once the lane knows how their transaction
    ended.
    """

    name: ClassVar[str]  # unique per worker: the ledger writer's suffix and the journal section's name
    # True only when writing an item again stores nothing twice (ON CONFLICT DO NOTHING on its key) and everything
    # else a write does is derived, in its own transaction, from the rows it actually inserted. Sums are not.
    idempotent: ClassVar[bool] = False
    transaction_rows = 0  # an idempotent buffer's most rows per transaction (0: a batch is one transaction)

    def __init__(self) -> None:
        self.journal: Journal | None = None  # set by the worker when the crash journal is on
        self.request_flush: Callable[[], None] = _nothing  # set by the flusher: wake this buffer's lane now

    # -- the request path -------------------------------------------------------------------------------------------

    def journal_append(self, record: bytes) -> bool:
        """Journal one accepted request before it is answered. On a full region, compact it into one snapshot
        record; False (answer 503) when even that does not fit."""
        journal = self.journal
        if journal is None or journal.append_or_compact(record, self.snapshot):
            return True
        self.request_flush()
        return False

    # -- the flusher ------------------------------------------------------------------------------------------------

    @abstractmethod
    def take(self) -> Any | None:
        """Swap out everything pending (O(1)) and return it as a batch, or None when there is nothing."""

    def acknowledge(self) -> None:  # noqa: B027 (optional hook)
        """The batch last taken is committed: release what was held for it."""

    @abstractmethod
    def describe(self, batch: Any) -> tuple[int, int]:
        """(rows, units) of a batch for the ledger: distinct keys and the sum of values, events and events, ..."""

    @abstractmethod
    async def write(self, conn: psycopg.AsyncConnection[Any], batch: Any) -> int:
        """Write the batch inside the caller's transaction; return rows written. Sort keys: flushers never deadlock."""

    def transaction_ended(self, committed: bool) -> None:  # noqa: B027 (optional hook)
        """The transaction of every `write` since the last call ended: committed, or rolled back. What the buffer
        derives from those writes is applied now, or forgotten. A COMMIT that got no answer is settled (either way)
        once its outcome is known, before anything else of the batch is written."""

    def parts(self, batch: Any, rows: int) -> Iterator[Any]:
        """An idempotent buffer's batch cut into parts of at most `rows` rows each (as `describe` counts them), every
        item in exactly one part, always in the same order for the same batch. Each is written in a transaction of
        its own (and takes that transaction's row locks in key order, as `write` always does)."""
        yield batch

    @abstractmethod
    def split(self, batch: Any) -> list[Any]:
        """The batch in two (or more) smaller batches; one item alone gives a list of one."""

    @abstractmethod
    def dead_letters(self, batch: Any) -> list[str]:
        """Each item of a batch PostgreSQL refused, as JSON text, for the dead-letter table."""

    def dead_letter_units(self, batch: Any) -> int:
        """How many accepted units (counts, ids, events) a dead-lettered batch held: the metric's increment."""
        return self.describe(batch)[1]

    # -- the crash journal's codec ----------------------------------------------------------------------------------

    @abstractmethod
    def snapshot(self) -> bytes:
        """One journal record that replays to everything pending now (used when a region fills up)."""

    @abstractmethod
    def replay(self, records: Sequence[bytes]) -> Any:
        """A batch from a dead worker's records. A record that does not decode is skipped: it was never answered."""

    # -- health -----------------------------------------------------------------------------------------------------

    def backlog_full(self) -> bool:
        """True while new work would be refused with 503 (readiness turns 503 too)."""
        return False


def part_size(total: int, rows: int) -> int:
    """The size of the parts `FlushBuffer.parts` cuts `total` rows into: as few parts of at most `rows` as possible,
    of equal size (the last one smaller), so a batch just past the bound is not cut into a full part and a crumb."""
    return -(-total // -(-total // rows))


def _nothing() -> None:
    pass


class Feature(ABC):
    """One workload. Subclasses set `name`, and optionally `settings_class` (a frozen dataclass of `knob`s whose
    names start with the feature's name) and `schema` (idempotent DDL, run at start under the migration lock)."""

    name: ClassVar[str]
    settings_class: ClassVar[type | None] = None
    schema: ClassVar[Sequence[str]] = ()

    def __init__(self, context: FeatureContext) -> None:
        self.context = context

    @abstractmethod
    def routes(self) -> list[Route]:
        """Method + path -> handler. Handlers answer from memory; only reads may await PostgreSQL."""

    def buffers(self) -> list[FlushBuffer]:
        return []

    def metrics(self) -> list[FeatureMetric]:
        """Read on the worker's tick."""
        return []

    def problems(self) -> list[str]:
        """Why this worker should not get traffic now (GET /readyz answers 503 naming them)."""
        return [f"{buffer.name} backlog is full" for buffer in self.buffers() if buffer.backlog_full()]

    def background(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        """Long-running jobs started once the worker serves (window reports, callbacks) and cancelled at stop."""
        return []

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Called after the last flush, before the worker exits."""

    @classmethod
    async def check_database(cls, conn: psycopg.AsyncConnection[Any], settings: Settings) -> str | None:
        """At `fastcount serve`'s start, once the schema is in place: why these settings cannot serve against this
        database (the start is refused with it, exit 2), or None."""
        return None
