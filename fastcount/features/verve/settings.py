"""The verve feature's settings: windows, reports, retention, callbacks and the Kafka outbox (one frozen dataclass of
knobs, read with the core's and checked at start)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fastcount.settings import SettingError, braced, check_knobs, knob

CALLBACK_METHODS = ("get", "post")


@dataclass(frozen=True)
class AllowList:
    """--verve-callback-allow parsed: host names (lower case) and networks. Empty allows every target not refused."""

    hosts: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @property
    def empty(self) -> bool:
        return not self.hosts and not self.networks


def parse_allow_list(raw: str) -> AllowList:
    hosts: set[str] = set()
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            if "/" in item or any(char.isspace() for char in item):
                raise ValueError(f"{item!r} is neither a host name nor a CIDR") from None
            hosts.add(item.lower().rstrip("."))
    return AllowList(frozenset(hosts), tuple(networks))


DEFAULT_WINDOW = 60


@dataclass(frozen=True)
class VerveSettings:
    verve_window: int = knob(
        DEFAULT_WINDOW,
        "seconds per unique-id window (windows are aligned to the Unix epoch); the same for every instance sharing"
        " the database, which keeps the one it was first started with",
        minimum=1,
        restart=True,
    )
    verve_grace: float = knob(
        0.0, "seconds after a window closes before it is reported; 0: twice --flush-interval plus one second", minimum=0
    )
    verve_lease: float = knob(
        10.0, "seconds a report or Kafka claim is held before another process may take it over", minimum=0.5
    )
    verve_max_endpoints: int = knob(1_000, "distinct callback endpoints kept per window per worker", minimum=0)
    verve_log: str = knob("", "file of the per-window report lines; empty: verve.log under --data-dir")
    verve_retention: float = knob(3600.0, "seconds a reported window's ids are kept", minimum=1)
    verve_report_retention: float = knob(7 * 86400.0, "seconds window reports and callback results are kept", minimum=1)
    verve_callback_method: str = knob("get", "get (count=N added to the query) or post (a JSON body)")
    verve_callback_allow: str = knob(
        "",
        "comma-separated hosts or CIDRs callbacks may reach; empty: any, loopback and private included "
        "(unspecified, link-local and metadata addresses are always refused)",
    )
    verve_callback_timeout: float = knob(5.0, "seconds one callback may take", minimum=0.1)
    verve_callback_concurrency: int = knob(16, "callbacks in progress at once per worker", minimum=1)
    kafka_bootstrap: str = knob(
        "",
        "Kafka bootstrap servers for window reports; empty: no Kafka (a restart, not a reload, turns it on or off: the"
        " start checks the topic)",
        restart=True,
    )
    kafka_topic: str = knob(
        "fastcount.verve.unique_ids",
        "Kafka topic of window reports; the database keeps the first one used (another is refused at start, a reload"
        " keeps it)",
        restart=True,
    )

    def __post_init__(self) -> None:
        check_knobs(self)
        # Messages name each setting as {0}, {1}: the caller names the flag or variable it came from.
        if self.verve_callback_method.lower() not in CALLBACK_METHODS:
            raise SettingError(
                f"{{0}} must be get or post, got {braced(repr(self.verve_callback_method))}", "verve_callback_method"
            )
        try:
            parse_allow_list(self.verve_callback_allow)
        except ValueError as problem:
            raise SettingError(f"{{0}}: {braced(str(problem))}", "verve_callback_allow") from None
        if self.kafka_bootstrap and not self.kafka_topic:
            raise SettingError("{0} must not be empty when {1} is set", "kafka_topic", "kafka_bootstrap")

    def grace(self, flush_interval: float) -> float:
        return self.verve_grace or 2 * flush_interval + 1.0

    @property
    def allow_list(self) -> AllowList:
        return parse_allow_list(self.verve_callback_allow)
