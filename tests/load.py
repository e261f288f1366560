"""A small load generator for tests: keep-alive clients in threads that remember what the server accepted."""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter


class Load:
    """Clients POST /increment over `keys` keys until stopped; `accepted` holds the sums the server answered 202 to."""

    def __init__(self, port: int, prefix: str, keys: int = 50, clients: int = 4, pause: float = 0.0) -> None:
        self.port = port
        self.prefix = prefix
        self.keys = keys
        self.clients = clients
        self.pause = pause
        self.accepted: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        self.answered = 0  # answers so far, any status (a progress count to wait on; exact totals come at stop)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(seed,), daemon=True) for seed in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def wait_for_answers(self, more: int, timeout: float = 60.0) -> None:
        """Wait until `more` answers beyond those counted so far have come back (the load is really flowing)."""
        target = self.answered + more
        deadline = time.monotonic() + timeout
        while self.answered < target:
            assert time.monotonic() < deadline, f"only {self.answered} of {target} answers after {timeout}s"
            assert any(thread.is_alive() for thread in self._threads), "every client stopped"
            time.sleep(0.02)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        accepted: Counter[str] = Counter()
        statuses: Counter[int] = Counter()
        while not self._stop.is_set():
            key = f"{self.prefix}{rng.randrange(self.keys)}"
            value = rng.randint(1, 5)
            try:
                conn.request("POST", "/increment", body=json.dumps({"key": key, "value": value}).encode())
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as error:
                with self._lock:
                    self.errors.append(f"{type(error).__name__}: {error}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                time.sleep(0.01)
                continue
            statuses[response.status] += 1
            with self._lock:
                self.answered += 1
            if response.status == 202:
                accepted[key] += value
            if response.will_close:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            if self.pause:
                time.sleep(self.pause)
        conn.close()
        with self._lock:
            self.accepted.update(accepted)
            self.statuses.update(statuses)
