"""Window callbacks: each distinct endpoint given during a window is called once, after the window's report, with
its count. One attempt per (window, endpoint): the claim in PostgreSQL is the attempt, so no process repeats it.
Calls run off the request path, at most --verve-callback-concurrency at once per worker, each with a timeout, never
following redirects. The host is resolved and every address checked before the connection (which then uses only the
checked addresses): unspecified, link-local and cloud-metadata addresses are always refused (also wrapped in IPv6:
IPv4-mapped, NAT64, 6to4, Teredo, IPv4-compatible); loopback and private addresses are allowed unless
--verve-callback-allow, which narrows the rest, leaves them out. Each outcome (HTTP status, error or refusal) is
recorded in verve_endpoints and logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psycopg
from aiohttp.abc import AbstractResolver, ResolveResult

from fastcount.features.verve.reporter import iso
from fastcount.features.verve.schema import CLAIM_CALLBACKS, RECORD_CALLBACK, RELEASE_CALLBACK
from fastcount.features.verve.settings import AllowList

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ALWAYS_REFUSED = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8",  # unspecified ("this network"): 0.0.0.0 reaches the local host
        "::/128",  # IPv6 unspecified
        "169.254.0.0/16",  # IPv4 link-local, and the metadata service of most clouds (169.254.169.254)
        "fe80::/10",  # IPv6 link-local
        "fd00:ec2::254/128",  # AWS metadata over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
    )
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address in the last 32 bits
CLAIM_LIMIT = 64
BODY_READ_LIMIT = 4096
OUTCOMES = ("1xx", "2xx", "3xx", "4xx", "5xx", "error", "refused", "cancelled")
_USERINFO = re.compile(r"^([a-z]+://)[^/?#@]*@", re.IGNORECASE)


def shown(endpoint: str) -> str:
    """An endpoint as logs show it: its first 200 characters, a password (or any user info) masked."""
    return _USERINFO.sub(r"\1***@", endpoint)[:200]


class TargetRefused(OSError):
    """The callback's host resolves to an address we never call."""


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address wraps (IPv4-mapped, NAT64 64:ff9b::/96, 6to4, Teredo, IPv4-compatible)."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if int(address) >> 32 == 0 and int(address) > 1:  # ::a.b.c.d (deprecated IPv4-compatible); not :: or ::1
        return ipaddress.IPv4Address(int(address))
    return None


def refusal(host: str, addresses: list[IPAddress], allow: AllowList) -> str | None:
    """Why a host with these addresses must not be called, or None. Every address must pass. Unspecified, link-local
    and cloud-metadata addresses are refused always, also wrapped in IPv6; loopback and private addresses pass unless
    --verve-callback-allow (not empty) leaves them out."""
    if not addresses:
        return "no address"
    for address in addresses:
        for candidate in (address, embedded_ipv4(address)):
            if candidate is not None and any(candidate in network for network in ALWAYS_REFUSED):
                return f"unspecified, link-local or cloud-metadata address {address}"
    if allow.empty or host.lower().rstrip(".") in allow.hosts:
        return None
    for address in addresses:
        if not any(address.version == network.version and address in network for network in allow.networks):
            return f"{address} is not in --verve-callback-allow"
    return None


class CheckedResolver(AbstractResolver):
    """Resolves a host and refuses it unless every address passes `refusal`: aiohttp then connects only to those."""

    def __init__(self, allow: AllowList) -> None:
        self.allow = allow

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        hosts = [str(info[4][0]) for info in infos]
        addresses = [ipaddress.ip_address(address.split("%")[0]) for address in hosts]
        reason = refusal(host, addresses, self.allow)
        if reason is not None:
            raise TargetRefused(reason)
        return [
            ResolveResult(hostname=host, host=address, port=port, family=info[0], proto=info[2],
                          flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
            for address, info in zip(hosts, infos, strict=True)
        ]  # fmt: skip

    async def close(self) -> None:
        pass


@dataclass(frozen=True)
class Outcome:
    outcome: str  # "2xx", "4xx", ..., "error", "refused" or "cancelled" (stopped while in progress)
    status: int | None
    error: str | None


def callback_url(endpoint: str, count: int) -> str:
    """The endpoint with count=N added to its existing query (a fragment is never sent)."""
    url = endpoint.split("#", 1)[0]
    separator = "&" if "?" in url else "?"
    if url.endswith(("?", "&")):
        separator = ""
    return f"{url}{separator}count={count}"


class Callbacks:
    def __init__(self, me: str, method: str, allow: AllowList, timeout: float, concurrency: int) -> None:
        self.me = me
        self.method = method.lower()
        self.allow = allow
        self.timeout = timeout
        self.concurrency = concurrency
        self.session: aiohttp.ClientSession | None = None
        self.running: set[asyncio.Task[None]] = set()
        self.finished: list[tuple[int, str, Outcome]] = []  # to record in PostgreSQL on the next step
        self.not_started: set[tuple[int, str]] = set()  # claimed, task not yet running
        self.unstarted: list[tuple[int, str]] = []  # claimed, stopped before the call began: release the claim
        self.by_outcome: dict[str, int] = dict.fromkeys(OUTCOMES, 0)  # metrics

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            connector = aiohttp.TCPConnector(resolver=CheckedResolver(self.allow), use_dns_cache=False, limit=0)
            self.session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout), trust_env=False
            )
        return self.session

    async def step(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await self.record(conn)
        room = self.concurrency - len(self.running)  # claim only what can start now: a claim is the one attempt
        if room <= 0:
            return
        rows = await (await conn.execute(CLAIM_CALLBACKS, {"me": self.me, "limit": min(room, CLAIM_LIMIT)})).fetchall()
        for window, endpoint, count in rows:
            self.not_started.add((int(window), str(endpoint)))
            task = asyncio.create_task(self._call(int(window), str(endpoint), int(count)))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def record(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while self.finished:
            window, endpoint, result = self.finished[0]
            await conn.execute(RECORD_CALLBACK, (result.outcome, result.status, result.error, window, endpoint))
            self.finished.pop(0)
        while self.unstarted:
            window, endpoint = self.unstarted[0]
            await conn.execute(RELEASE_CALLBACK, {"window": window, "endpoint": endpoint, "me": self.me})
            self.unstarted.pop(0)

    async def _call(self, window: int, endpoint: str, count: int) -> None:
        # A task cancelled before its first step never runs this line: its claim stays in `not_started` (released).
        self.not_started.discard((window, endpoint))
        try:
            result = await self.call(window, endpoint, count)
        except asyncio.CancelledError:
            result = Outcome("cancelled", None, "stopped before an answer")  # may have reached it: not repeated
            self.by_outcome[result.outcome] += 1
            self.finished.append((window, endpoint, result))
            raise
        except Exception as error:  # a bug must not lose the outcome (nor kill anything)
            log.exception("event=verve_callback_bug endpoint=%r", shown(endpoint))
            result = Outcome("error", None, f"{type(error).__name__}: {error}"[:500])
        self.by_outcome[result.outcome] += 1
        self.finished.append((window, endpoint, result))
        log.info(
            "event=verve_callback window_start=%s endpoint=%r outcome=%s status=%s error=%r",
            iso(window), shown(endpoint), result.outcome, result.status, result.error,
        )  # fmt: skip

    async def call(self, window: int, endpoint: str, count: int) -> Outcome:
        try:
            host = urlsplit(endpoint).hostname or ""
        except ValueError as error:  # stored before the request path checked hosts: an error, recorded
            return Outcome("error", None, f"bad endpoint: {error}"[:500])
        try:
            literal: IPAddress | None = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            literal = None
        if literal is not None:  # aiohttp connects to an address literal without asking the resolver
            reason = refusal(host, [literal], self.allow)
            if reason is not None:
                return Outcome("refused", None, reason)
        session = self._session()
        try:
            if self.method == "post":
                request = session.post(endpoint.split("#", 1)[0], json={"window_start": iso(window), "count": count},
                                       allow_redirects=False)  # fmt: skip
            else:
                request = session.get(callback_url(endpoint, count), allow_redirects=False)
            async with request as response:  # the status is the outcome: the body is read no further than a few KB
                await response.content.read(BODY_READ_LIMIT)
                return Outcome(f"{response.status // 100}xx", response.status, None)
        except aiohttp.ClientConnectorError as error:
            if isinstance(error.os_error, TargetRefused):
                return Outcome("refused", None, str(error.os_error))
            return Outcome("error", None, f"{type(error).__name__}: {error}"[:500])
        except TimeoutError:
            return Outcome("error", None, f"timeout after {self.timeout}s")
        except (aiohttp.ClientError, OSError, ValueError) as error:
            return Outcome("error", None, f"{type(error).__name__}: {error}"[:500])

    async def close(self) -> None:
        for task in list(self.running):
            task.cancel()
        await asyncio.gather(*self.running, return_exceptions=True)
        self.unstarted.extend(sorted(self.not_started))
        self.not_started.clear()
        if self.session is not None:
            await self.session.close()
