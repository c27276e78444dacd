"""Ollama's DNS-rebinding guard: a server bound to loopback serves only local `Host` headers.

Anything else gets 403 with an empty body. A proxy in front of Ollama must therefore send a
local `Host` (it matters for the gateway, which is why the emulator enforces it too).
"""

from __future__ import annotations

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


def host_allowed(bound_host: str, host_header: str, hostname: str | None = None) -> bool:
    """Whether Ollama, listening on `bound_host`, would serve a request with this `Host`."""
    try:
        if not ipaddress.ip_address(bound_host).is_loopback:
            return True
    except ValueError:
        if bound_host != "localhost":
            return True
    host = _split_host(host_header).lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return address.is_loopback or address.is_private or address.is_unspecified
    local_name = (hostname if hostname is not None else socket.gethostname()).lower()
    return host in ("", "localhost", local_name) or host.endswith(_LOCAL_SUFFIXES)
