"""fastcount: exact, durable counting ingestion over HTTP, aggregated per worker and flushed to PostgreSQL."""

__version__ = "0.1.0"
