"""The verve tables and the statements that use them. Window starts are Unix seconds (bigint), aligned to
--verve-window; every instance sharing a database must use the same window length.

- verve_ids: one row per (window, id), written by the flusher with ON CONFLICT DO NOTHING: the cluster-wide dedup.
- verve_endpoints: one row per (window, endpoint), and the outcome of its one callback.
- verve_windows: one row per window due for a report: the report claim (a lease), the count, the Kafka outbox.
- verve_meta: first_start, the feature's first start in this database: windows are reported (0 when empty) from the
  window that contains it; window_seconds, the window size every instance sharing the database must use;
  kafka_topic (once an instance used Kafka), a key of the topic every report is published to.
"""

from __future__ import annotations

from fastcount.store.database import COPY_JSON_LINES

SCHEMA = [
    """
    CREATE TABLE IF NOT EXISTS verve_ids (
        window_start bigint NOT NULL,
        id bigint NOT NULL,
        PRIMARY KEY (window_start, id)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS verve_endpoints (
        window_start bigint NOT NULL,
        endpoint text NOT NULL,
        attempted_at timestamptz,
        caller text,
        outcome text,
        status integer,
        error text,
        finished_at timestamptz,
        PRIMARY KEY (window_start, endpoint)
    )
    """,
    "CREATE INDEX IF NOT EXISTS verve_endpoints_due ON verve_endpoints (window_start) WHERE attempted_at IS NULL",
    """
    CREATE TABLE IF NOT EXISTS verve_windows (
        window_start bigint PRIMARY KEY,
        window_seconds integer NOT NULL,
        claimed_by text,
        lease_until timestamptz,
        claims integer NOT NULL DEFAULT 0,
        unique_ids bigint,
        reported_by text,
        reported_at timestamptz,
        kafka_pending boolean NOT NULL DEFAULT false,
        publisher text,
        publish_lease_until timestamptz,
        published_at timestamptz
    )
    """,
    "CREATE INDEX IF NOT EXISTS verve_windows_unreported ON verve_windows (window_start) WHERE unique_ids IS NULL",
    """
    CREATE INDEX IF NOT EXISTS verve_windows_unpublished ON verve_windows (window_start)
    WHERE kafka_pending AND published_at IS NULL
    """,
    "CREATE TABLE IF NOT EXISTS verve_meta (name text PRIMARY KEY, value bigint NOT NULL)",
    """
    INSERT INTO verve_meta (name, value) VALUES ('first_start', floor(extract(epoch FROM now()))::bigint)
    ON CONFLICT (name) DO NOTHING
    """,
]

# -- the flusher: ids and endpoints, sorted so concurrent writers take index locks in one order ------------------------
# A batch's ids go as JSON arrays of ID_PART_SIZE ids, one line each of a COPY (as increments do: orjson writes 10,000
# ids in ~0.2 ms, the event loop given back between parts); passing a Python list of 50,000 ids as an int8[] parameter
# held the loop ~60 ms. Inserted in (window, id) order, so flushers of any number of workers never deadlock; the parts
# are deleted as they are merged (each half of a refused batch's bisection merges only its own).
ID_PART_SIZE = 10_000
CREATE_ID_PARTS = """
    CREATE TEMP TABLE IF NOT EXISTS fastcount_verve_id_parts (window_start bigint NOT NULL, part json NOT NULL)
    ON COMMIT DELETE ROWS
"""
COPY_ID_PARTS = f"COPY fastcount_verve_id_parts (window_start, part) FROM STDIN {COPY_JSON_LINES}"
INSERT_IDS_FROM_PARTS = """
    WITH parts AS (DELETE FROM fastcount_verve_id_parts RETURNING window_start, part)
    INSERT INTO verve_ids (window_start, id)
    SELECT parts.window_start, batch.id::int8 FROM parts, json_array_elements_text(parts.part) AS batch(id)
    ORDER BY 1, 2
    ON CONFLICT DO NOTHING
"""
INSERT_ENDPOINTS = """
    INSERT INTO verve_endpoints (window_start, endpoint)
    SELECT %s, endpoint FROM unnest(%s::text[]) AS batch(endpoint) ORDER BY endpoint COLLATE "C"
    ON CONFLICT DO NOTHING
"""

# -- reports ----------------------------------------------------------------------------------------------------------
DATABASE_NOW = "SELECT extract(epoch FROM now())::float8"  # the cluster's one clock: what is due is decided by it
FIRST_WINDOW_SOURCES = """
    SELECT (SELECT value FROM verve_meta WHERE name = 'first_start'),
           (SELECT min(window_start) FROM verve_ids),
           (SELECT max(window_start) FROM verve_windows)
"""
# The window size of this database's reports: the first start's (or, in a database from before it was kept, that of
# the newest window). Every instance sharing the database must use it (fastcount/features/verve/__init__.py).
KEEP_WINDOW_SECONDS = """
    INSERT INTO verve_meta (name, value)
    SELECT 'window_seconds', coalesce((SELECT window_seconds FROM verve_windows ORDER BY window_start DESC LIMIT 1), %s)
    ON CONFLICT (name) DO NOTHING
"""
WINDOW_SECONDS = "SELECT value FROM verve_meta WHERE name = 'window_seconds'"
# The Kafka topic of this database's reports, as 60 bits of its md5, kept by the first instance started with Kafka:
# from then on every report is to be published (also one made by an instance without Kafka), and an instance with
# another topic is refused at start.
_TOPIC_KEY = "('x' || substr(md5(%s), 1, 15))::bit(60)::bigint"
KEEP_KAFKA_TOPIC = f"""
    INSERT INTO verve_meta (name, value) VALUES ('kafka_topic', {_TOPIC_KEY}) ON CONFLICT (name) DO NOTHING
"""
KAFKA_TOPIC_KEPT = f"SELECT value = {_TOPIC_KEY} FROM verve_meta WHERE name = 'kafka_topic'"
ENSURE_WINDOWS = """
    INSERT INTO verve_windows (window_start, window_seconds)
    SELECT start, %(seconds)s FROM generate_series(%(first)s::bigint, %(last)s::bigint, %(seconds)s::bigint) AS start
    ON CONFLICT (window_start) DO NOTHING
"""
# SKIP LOCKED: processes claiming at the same moment take different windows (or nothing) instead of queueing.
CLAIM_WINDOW = """
    UPDATE verve_windows AS w
    SET claimed_by = %(me)s, lease_until = now() + make_interval(secs => %(lease)s), claims = w.claims + 1
    FROM (
        SELECT window_start FROM verve_windows
        WHERE unique_ids IS NULL AND window_start <= %(last)s AND (lease_until IS NULL OR lease_until < now())
        ORDER BY window_start LIMIT 1
        FOR UPDATE SKIP LOCKED
    ) AS due
    WHERE w.window_start = due.window_start
    RETURNING w.window_start, w.window_seconds, w.claims
"""
COUNT_IDS = "SELECT count(*) FROM verve_ids WHERE window_start = %s"
# The first claimer to finish records, once: a claimer whose lease expired while it counted (a count slower than the
# lease) still records if nobody did, so a slow window is not taken over again and again; a later recorder finds
# unique_ids set, records nothing and writes no line. Counts of a closed window agree: ids past the grace are late.
RECORD_REPORT = """
    UPDATE verve_windows
    SET unique_ids = %(count)s, reported_by = %(me)s, reported_at = now(), lease_until = NULL,
        kafka_pending = %(kafka)s OR EXISTS (SELECT 1 FROM verve_meta WHERE name = 'kafka_topic')
    WHERE window_start = %(window)s AND unique_ids IS NULL
    RETURNING window_start
"""

# -- the Kafka outbox -------------------------------------------------------------------------------------------------
CLAIM_UNPUBLISHED = """
    UPDATE verve_windows AS w
    SET publisher = %(me)s, publish_lease_until = now() + make_interval(secs => %(lease)s)
    FROM (
        SELECT window_start FROM verve_windows
        WHERE kafka_pending AND published_at IS NULL
          AND (publish_lease_until IS NULL OR publish_lease_until < now())
          AND window_start <> ALL(%(held)s::int8[])
        ORDER BY window_start LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS due
    WHERE w.window_start = due.window_start
    RETURNING w.window_start, w.window_seconds, w.unique_ids
"""
RENEW_PUBLISH_LEASE = """
    UPDATE verve_windows SET publish_lease_until = now() + make_interval(secs => %(lease)s)
    WHERE window_start = ANY(%(held)s::int8[]) AND publisher = %(me)s AND published_at IS NULL
"""
MARK_PUBLISHED = """
    UPDATE verve_windows SET published_at = now(), publish_lease_until = NULL
    WHERE window_start = ANY(%s::int8[]) AND published_at IS NULL
"""
RELEASE_UNPUBLISHED = """
    UPDATE verve_windows SET publish_lease_until = NULL
    WHERE window_start = ANY(%(windows)s::int8[]) AND publisher = %(me)s AND published_at IS NULL
"""
OLDEST_UNPUBLISHED = """
    SELECT coalesce(extract(epoch FROM now() - min(reported_at)), 0) FROM verve_windows
    WHERE kafka_pending AND published_at IS NULL
"""

# -- callbacks: one attempt per (window, endpoint); the claim is the attempt, so it is never repeated -----------------
CLAIM_CALLBACKS = """
    UPDATE verve_endpoints AS e SET attempted_at = now(), caller = %(me)s
    FROM (
        SELECT e2.window_start, e2.endpoint FROM verve_endpoints AS e2
        JOIN verve_windows AS w ON w.window_start = e2.window_start AND w.unique_ids IS NOT NULL
        WHERE e2.attempted_at IS NULL
        ORDER BY e2.window_start LIMIT %(limit)s
        FOR UPDATE OF e2 SKIP LOCKED
    ) AS due, verve_windows AS w
    WHERE e.window_start = due.window_start AND e.endpoint = due.endpoint AND w.window_start = e.window_start
    RETURNING e.window_start, e.endpoint, w.unique_ids
"""
RECORD_CALLBACK = """
    UPDATE verve_endpoints SET outcome = %s, status = %s, error = %s, finished_at = now()
    WHERE window_start = %s AND endpoint = %s
"""

# A claimed callback stopped before it began (at stop or reload): the attempt never happened, another process makes it.
RELEASE_CALLBACK = """
    UPDATE verve_endpoints SET attempted_at = NULL, caller = NULL
    WHERE window_start = %(window)s AND endpoint = %(endpoint)s AND caller = %(me)s AND outcome IS NULL
"""

# -- retention (one process at a time: an advisory lock, tried, not waited for) --------------------------------------
RETENTION_LOCK = 0x76657276  # "verv"
TRY_RETENTION_LOCK = "SELECT pg_try_advisory_xact_lock(%s)"
DELETE_OLD_IDS = """
    DELETE FROM verve_ids WHERE window_start < %(cutoff)s AND window_start IN (
        SELECT window_start FROM verve_windows WHERE unique_ids IS NOT NULL AND window_start < %(cutoff)s
    )
"""
DELETE_OLD_ENDPOINTS = "DELETE FROM verve_endpoints WHERE window_start < %s"
DELETE_OLD_REPORTS = "DELETE FROM verve_windows WHERE window_start < %s AND unique_ids IS NOT NULL"
