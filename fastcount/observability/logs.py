"""Logging set-up: one line per event, key=value pairs, the process role and pid in every line."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str, role: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s level=%(levelname)s role={role} pid=%(process)d %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("psycopg").setLevel(max(logging.WARNING, root.level))
