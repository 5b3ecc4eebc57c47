"""Completion webhooks for jobs submitted with ``callback_url``.

When a job ends (success, failure or cancellation), its job object (the body GET /v1/inference/{id} returns) is
POSTed to the URL, signed like Stripe's: ``Flopex-Signature: t=<unix>,v1=<hex HMAC-SHA256 of
"<t>.<body>">`` with the account's webhook secret (``GET /v1/webhook_secret``). Delivery is at
least once (retried with exponential backoff on errors and non-2xx answers, ~37 minutes in all);
receivers dedupe on ``Flopex-Delivery`` or the job id. Redirects are not followed: a 3xx is a
failed attempt (following one could lead the signed POST into a private network).

The secret is derived from FLOPEX_WEBHOOK_SECRET and the account id, so nothing secret is stored
per account (rotating the deployment secret rotates every account's).

URLs resolving to private, loopback or link-local addresses are refused (an exchange must not be
a way into its own network) unless FLOPEX_WEBHOOK_ALLOW_PRIVATE is set (development and tests).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import certifi
import urllib3

from app import task_names
from app.logs import task_headers

MAX_URL_LENGTH = 2048
MAX_RETRIES = 11
# A countdown longer than the broker's visibility timeout (an hour) would be delivered twice.
MAX_COUNTDOWN_S = 600


def webhook_secret(master: str, account_id: uuid.UUID) -> str:
    digest = hmac.new(master.encode(), f"webhook:{account_id}".encode(), hashlib.sha256).hexdigest()
    return f"whsec_{digest}"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(
    secret: str, header: str, body: bytes, tolerance_s: int = 300, now: float | None = None
) -> bool:
    """What a receiver does (documented and tested here)."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now or time.time()) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def valid_url(url: str) -> bool:
    """An absolute http(s) URL with a host; no control characters or spaces (not URL characters:
    a NUL cannot be stored, a CR/LF could forge headers)."""
    if len(url) > MAX_URL_LENGTH or any(c <= " " or c == "\x7f" for c in url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port out of range or not a number)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket, a netloc that NFKC-normalizes to "#"
        return False


def destination(url: str) -> tuple[str | None, list[str]]:
    """(problem, addresses). problem: ``private`` when the host resolves to any address inside a
    private network (never sent), ``unresolved`` when its name does not resolve now (a DNS
    failure may pass: retried), else None, with the public addresses to connect to, in the
    resolver's order: the POST goes to those addresses (``post``), so a name that resolves
    elsewhere a moment later (DNS rebinding) cannot lead it inward."""
    host = urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return "unresolved", []
    addresses: list[str] = []
    for info in infos:
        if _inward(ipaddress.ip_address(info[4][0])):
            return "private", []
        if str(info[4][0]) not in addresses:
            addresses.append(str(info[4][0]))
    if not addresses:
        return "unresolved", []
    return None, _few_per_family(addresses)


# Addresses tried per family in one attempt: enough to get past one that is down, while a name
# with hundreds of unreachable records cannot hold a worker for minutes (3 s each to connect).
_ADDRESSES_PER_FAMILY = 2


def _few_per_family(addresses: list[str]) -> list[str]:
    kept: list[str] = []
    for version in (6, 4):
        family = [a for a in addresses if ipaddress.ip_address(a).version == version]
        kept += family[:_ADDRESSES_PER_FAMILY]
    return sorted(kept, key=addresses.index)  # the resolver's order


def _inward(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Anything not on the public internet: private, loopback, link-local, shared (CGNAT's
    100.64.0.0/10, where some clouds keep their metadata service), reserved, documentation and
    unspecified ranges (``not is_global``), and multicast; an IPv4 address written as IPv6
    (``::ffff:10.0.0.1``) is judged as the IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


def names_private_host(url: str) -> bool:
    """The URL's host is, on its face, never public: an IP literal inside a private network, or
    ``localhost``. Refused at submission (no DNS lookup on the request path: a name is checked
    when the webhook is sent, ``destination``), so the customer learns at once instead of from
    a delivery that never comes."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return _inward(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        # The IPv4 shorthands the resolver also accepts (127.1, 0x7f000001, 2130706433).
        return _inward(ipaddress.IPv4Address(socket.inet_aton(host)))
    except OSError:  # a name
        return False


def post(
    url: str,
    body: bytes,
    headers: dict[str, Any],
    *,
    addresses: Sequence[str] | None,
    timeout: tuple[float, float],
    ca_certs: str | None = None,
) -> int:
    """POSTs ``body`` and returns the answer's status; never follows a redirect. With
    ``addresses``, the connection goes to those IPs whatever the name resolves to now, while the
    name still gives the Host header, the TLS server name (SNI) and the certificate check. An
    address that cannot be connected to (an unreachable IPv6 beside a working IPv4, one host of
    several down) passes to the next; once a connection is made, its answer (or failure) is the
    attempt's: the POST is never sent twice in one attempt."""
    if addresses is not None and not addresses:
        raise ValueError("no address to post to")
    targets: Sequence[str | None] = [None] if addresses is None else addresses
    for i, address in enumerate(targets):
        try:
            return _post_to(url, body, headers, address, timeout, ca_certs)
        except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError):
            if i == len(targets) - 1:
                raise
    raise AssertionError("unreachable")


def _post_to(
    url: str,
    body: bytes,
    headers: dict[str, Any],
    address: str | None,
    timeout: tuple[float, float],
    ca_certs: str | None,
) -> int:
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    pool_kwargs: dict[str, Any] = {
        "timeout": urllib3.Timeout(connect=timeout[0], read=timeout[1]),
        "retries": False,
    }
    if https:
        pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
            address or host,
            port,
            cert_reqs="CERT_REQUIRED",
            ca_certs=ca_certs or certifi.where(),
            server_hostname=host,
            assert_hostname=host,
            **pool_kwargs,
        )
    else:
        pool = urllib3.HTTPConnectionPool(address or host, port, **pool_kwargs)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        response = pool.urlopen(
            "POST",
            path,
            body=body,
            headers={**headers, "Host": parts.netloc.rsplit("@", 1)[-1]},
            redirect=False,
        )
        return response.status
    finally:
        pool.close()


def delivery_id(job_id: Any) -> str:
    """One event per job (its end), so one delivery id per job: a redelivered task, every retry
    and a delivery the sweeper queued again all send the same Flopex-Delivery."""
    return uuid.uuid5(_DELIVERY_NAMESPACE, str(job_id)).hex


_DELIVERY_NAMESPACE = uuid.UUID("5f0c8e2a-6b1d-4c57-9a43-0d4c1f7e2b90")


def send(celery: Any, job: Any) -> None:
    """Queue the delivery of a finished job's webhook, if it has a callback_url."""
    if (job.request or {}).get("callback_url"):
        queue_delivery(celery, job.id, job.request_id)


def queue_delivery(celery: Any, job_id: Any, request_id: str | None) -> None:
    """One flopex.webhook message for the job (its worker, or the sweeper's outbox pass)."""
    celery.send_task(
        task_names.WEBHOOK,
        args=[str(job_id), delivery_id(job_id)],
        queue="economy",
        headers=task_headers(str(job_id), request_id),
    )


def headers_for(secret: str, body: bytes, event: str, delivery_id: str) -> dict[str, Any]:
    return {
        "Content-Type": "application/json",
        "User-Agent": "Flopex-Webhooks/1",
        "Flopex-Event": event,
        "Flopex-Delivery": delivery_id,
        "Flopex-Signature": sign(secret, int(time.time()), body),
    }
