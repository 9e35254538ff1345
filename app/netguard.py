"""Where a webhook may be sent: only to global addresses, unless an operator allow-lists a network.

Checked twice: at submit on the URL as written (an IP literal or `localhost`), and at send time
on every address the host name resolves to, so a name pointing at 169.254.169.254 or 127.0.0.1
(perhaps only later, by DNS rebinding) is refused too. The request then goes to the checked
address itself, with the original Host header and TLS server name.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class WebhookTargetRefused(ValueError):
    pass


def parse_networks(items: Iterable[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(item, strict=False) for item in items]


def address_allowed(address: IPAddress, allowed: list[IPNetwork]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    if any(address in network for network in allowed):
        return True
    # is_global excludes private, loopback, link-local (169.254/16, fe80::/10), CGNAT, reserved
    # and documentation ranges; multicast is global in the registry but never a webhook.
    return address.is_global and not address.is_multicast


def _refuse(host: str, address: str) -> WebhookTargetRefused:
    return WebhookTargetRefused(
        f"webhook host {host!r} is {address}, a private, loopback, link-local or reserved address; "
        "use a publicly routable receiver, or ask the operator to add its network to "
        "SLIMFORGE_WEBHOOK_ALLOWED_NETWORKS"
    )


def check_url_literal(url: str, allowed: list[IPNetwork]) -> None:
    """Submit-time check without DNS: refuse IP literals outside the global range and `localhost`."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        if not address_allowed(ipaddress.ip_address("127.0.0.1"), allowed):
            raise _refuse(host, "loopback")
        return
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return  # a name: resolved and checked at send time
    if not address_allowed(address, allowed):
        raise _refuse(host, str(address))


def resolve_checked(url: str, allowed: list[IPNetwork]) -> str:
    """Resolve the URL's host; every address must be allowed. Returns the address to connect to."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookTargetRefused(f"webhook host {host!r} does not resolve: {exc}") from exc
    addresses = {info[4][0] for info in infos}
    for text in sorted(addresses):
        if not address_allowed(ipaddress.ip_address(text.split("%")[0]), allowed):
            raise _refuse(host, text)
    return sorted(addresses)[0]


def pinned_url(url: str, address: str) -> str:
    """`url` with its host replaced by the checked address (IPv6 in brackets), port kept."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if parts.username is not None:
        userinfo = parts.username + (f":{parts.password}" if parts.password is not None else "")
        netloc = f"{userinfo}@{netloc}"
    return parts._replace(netloc=netloc).geturl()
