"""Ollama's DNS-rebinding guard: a server bound to loopback serves only local `Host` headers.

A web page on a name that its attacker points at 127.0.0.1 (DNS rebinding) could otherwise
reach a server that believes only local programs can. Ollama answers anything else 403 with an
empty body, so a proxy in front of it must send a local `Host`; the emulator enforces the
same, and the gateway keeps the guard for the Ollama it stands in front of (with its error in
the route's format, and `allowed_hosts` for names a user serves on purpose).
"""

from __future__ import annotations

import functools
import ipaddress
import socket

_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")


def _split_host(header: str) -> str:
    """The host part of a `Host` header: "[::1]:11434" -> "::1", "a:80" -> "a"."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") == 1:
        return header.partition(":")[0]
    return header


def host_of(header: str) -> str:
    """The host name of a `Host` header, without port or brackets, in lower case."""
    return _split_host(header).lower()


def _named(host: str, allowed: tuple[str, ...]) -> bool:
    """`allowed` holds names, `.domain` for it and its subdomains, or `*` for any."""
    return any(
        name in ("*", host) or (name.startswith(".") and f".{host}".endswith(name))
        for name in allowed
    )


def loopback_only(bound_host: str) -> bool:
    """Whether a server listening on `bound_host` can be reached from this machine only."""
    try:
        return ipaddress.ip_address(bound_host).is_loopback
    except ValueError:
        return bound_host == "localhost"


@functools.cache
def _machine_name() -> str:
    return socket.gethostname().lower()


def local_host(
    host_header: str, allowed: tuple[str, ...] = (), hostname: str | None = None
) -> bool:
    """Whether a `Host` header names this machine as Ollama counts it (localhost, a loopback,
    private or unspecified address, the machine's name, *.localhost, *.local, *.internal), or
    one of the `allowed` names."""
    host = host_of(host_header)
    if host in ("", "localhost") or host.endswith(_LOCAL_SUFFIXES) or _named(host, allowed):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == (hostname.lower() if hostname is not None else _machine_name())
    return address.is_loopback or address.is_unspecified or _private(address)


# Go's `netip.Addr.IsPrivate` (RFC 1918 and RFC 4193), which Ollama uses: narrower than Python's
# `is_private`, which also counts documentation, benchmarking and other reserved ranges.
_PRIVATE = tuple(
    ipaddress.ip_network(net)
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


def _private(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in _PRIVATE if net.version == address.version)


def host_allowed(bound_host: str, host_header: str, hostname: str | None = None) -> bool:
    """Whether Ollama, listening on `bound_host`, would serve a request with this `Host`."""
    return not loopback_only(bound_host) or local_host(host_header, hostname=hostname)
