"""Connections, the core schema and how migrations run.

`fastcount_batches` is the flush ledger that makes a retried batch count once (`fastcount_parts` does it for the parts
of a batch committed in parts); `fastcount_dead_letters` keeps what PostgreSQL refused for good, with the error. Each
feature brings its own tables (fastcount/app.py gathers them). Migrations are idempotent and serialised by an advisory
lock, so every process may run them at start. Writing batches is the flusher's job (flusher.py), not this module's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

MIGRATION_LOCK = 0x66617374  # "fast": serialises concurrent migrations from many workers
# COPY options for lines of JSON texts (flushes send batches as JSON parts): CSV with a delimiter and a quote no JSON
# text holds (orjson and json escape every control character), so each JSON text goes in as it is, and backslashes
# mean nothing to COPY. Columns before the JSON one are plain numbers, separated by the same \x02.
COPY_JSON_LINES = "WITH (FORMAT csv, DELIMITER E'\\x02', QUOTE E'\\x01')"

CORE_SCHEMA = [
    # One row per flushed batch. Its primary key is what turns "retry after an unknown outcome" into exactly-once:
    # the retry carries the same (writer, seq), so a batch that did commit makes the retry fail as a duplicate.
    """
    CREATE TABLE IF NOT EXISTS fastcount_batches (
        writer text NOT NULL,
        seq bigint NOT NULL,
        keys integer NOT NULL,
        total numeric NOT NULL,
        committed_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (writer, seq)
    )
    """,
    # One row per committed part of a batch cut in parts (flusher.py, rule 6), but its last, which carries the batch's
    # row above instead. Keyed by the cut (a random token of one cut of the batch: one replayed from a dead worker's
    # journal is cut again, maybe differently), so a retry finds out whether its part committed from the database it
    # writes to, as for a whole batch. The last part's transaction deletes the batch's rows here.
    """
    CREATE TABLE IF NOT EXISTS fastcount_parts (
        writer text NOT NULL,
        seq bigint NOT NULL,
        cut text NOT NULL,
        part integer NOT NULL,
        committed_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (writer, seq, cut, part)
    )
    """,
    # Items PostgreSQL refused for good (a total past bigint, ...), committed in the same transaction as the rest of
    # their batch. `item` is JSON text (text, not jsonb: jsonb cannot hold every string a client may send).
    """
    CREATE TABLE IF NOT EXISTS fastcount_dead_letters (
        id bigserial PRIMARY KEY,
        feature text NOT NULL,
        writer text NOT NULL,
        seq bigint NOT NULL,
        item text NOT NULL,
        sqlstate text NOT NULL,
        error text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    # A refused item is parked once per batch, even when a part of its batch is written again (flusher.py, rule 6).
    "CREATE INDEX IF NOT EXISTS fastcount_dead_letters_batch ON fastcount_dead_letters (writer, seq)",
]

# A writer only ever retries its newest batch, so older rows of live writers are pruned by the writers themselves;
# this removes what dead writers (stopped or killed workers) left behind.
PRUNE_DEAD_WRITERS = [
    "DELETE FROM fastcount_batches WHERE committed_at < now() - interval '7 days'",
    "DELETE FROM fastcount_parts WHERE committed_at < now() - interval '7 days'",  # of batches no one finished
]

# TCP keepalives: a connection whose peer vanished (a half-open connection) is noticed in ~25 s, not hours.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


async def migrate_async(conn: psycopg.AsyncConnection[Any], schema: Sequence[str]) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        for statement in [*CORE_SCHEMA, *schema]:
            await conn.execute(statement)
        for statement in PRUNE_DEAD_WRITERS:
            await conn.execute(statement)


async def connect(dsn: str, statement_timeout: float | None = None) -> psycopg.AsyncConnection[Any]:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=5, **KEEPALIVES)  # type: ignore[arg-type]
    if statement_timeout:
        await bound_session(conn, statement_timeout)
    return conn


async def bound_session(conn: psycopg.AsyncConnection[Any], timeout: float) -> None:
    """A session's statements and idle transactions end after `timeout` seconds, and the server keeps the client's
    TCP keepalives: a transaction whose client vanished (a partition: no FIN, no RST) is ended after the timeout
    instead of sitting idle in transaction for the kernel's default keepalive (over 2 hours), holding its row locks
    and the rollups' lock, and leaving a part's outcome in doubt. SET, not `options=`: the DSN may carry its own."""
    milliseconds = f"{int(timeout * 1000)}"
    await conn.execute(
        "SELECT set_config('statement_timeout', %s, false), set_config('idle_in_transaction_session_timeout', %s,"
        " false), set_config('tcp_keepalives_idle', %s, false), set_config('tcp_keepalives_interval', %s, false),"
        " set_config('tcp_keepalives_count', %s, false)",
        (
            milliseconds,
            milliseconds,
            str(KEEPALIVES["keepalives_idle"]),
            str(KEEPALIVES["keepalives_interval"]),
            str(KEEPALIVES["keepalives_count"]),
        ),
    )


async def migrate_dsn(dsn: str, schema: Sequence[str]) -> None:
    async with await connect(dsn) as conn:
        await migrate_async(conn, schema)
