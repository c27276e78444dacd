"""Who holds a TCP port, so that `parallama up` neither starts an engine on a port another
server already listens on, nor takes a stranger answering there for its own engine.

Whether a port is free is asked of the kernel (a bind, with SO_REUSEADDR as servers set it).
Who listens is read from Linux's /proc: the listening sockets in /proc/net/tcp and tcp6 (state
0A, with their inode) and the processes whose /proc/<pid>/fd link to `socket:[inode]`. Where
/proc cannot tell, the answers say so (None) and callers fall back to what they can see.
"""

from __future__ import annotations

import errno
import ipaddress
import shlex
import socket
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column
UNSEEN = "a process this user cannot see"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def in_use(host: str, port: int) -> bool:
    """Whether a server already listens on host:port. Other failures to bind (a privileged
    port, an address not of this machine) are left for the engine itself to report."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def holder(host: str, port: int) -> str:
    """Who listens on host:port, for an error message: `pid 1234 (python -m http.server)`."""
    for pid in _holders(listening_sockets(host, port)):
        return f"pid {pid} ({command_line(pid) or 'its command line unreadable'})"
    return UNSEEN


def held_by_session(host: str, port: int, session: int) -> bool | None:
    """Whether what listens on host:port belongs to processes of `session` (an engine started
    in a session of its own: its pid). False if a process outside it holds a listening socket;
    None where /proc cannot tell: no listener shown, or one whose holder this user cannot see
    (say, the root-owned proxy of a container that the engine's command runs)."""
    sockets = listening_sockets(host, port)
    holders = _holders(sockets)
    if any(_session(pid) != session for pid in holders):
        return False
    seen = set[int]().union(*holders.values())
    return True if sockets and seen == sockets else None


def listening_sockets(host: str, port: int) -> set[int]:
    """The inodes of the sockets listening on `port` at `host` or at any address."""
    wanted = _address(host)
    inodes: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            text = (PROC / "net" / table).read_text()
        except OSError:
            continue
        inodes |= listeners(text, wanted, port)
    return inodes


def listeners(table: str, wanted: IPAddress | None, port: int) -> set[int]:
    """The inodes of a /proc/net/tcp(6) text's sockets listening on `port` at `wanted` (None:
    any address) or at a wildcard address."""
    inodes = set()
    for row in table.splitlines()[1:]:
        columns = row.split()
        if len(columns) < 10 or columns[3] != LISTEN:
            continue
        address, _, port_hex = columns[1].partition(":")
        if int(port_hex, 16) != port:
            continue
        if _covers(_unhex(address), wanted):
            inodes.add(int(columns[9]))
    return inodes


def _covers(listening: IPAddress, wanted: IPAddress | None) -> bool:
    """Whether a socket listening at `listening` takes connections to `wanted`."""
    if wanted is None or listening.is_unspecified or wanted.is_unspecified:
        return True
    return listening == wanted


def command_line(pid: int) -> str:
    """A process's command line as a shell would read it; "" if it cannot be read."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    return shlex.join(arg.decode(errors="replace") for arg in raw.rstrip(b"\0").split(b"\0"))


def _address(host: str) -> IPAddress | None:
    """The host as an address; None for a name, which may stand for any of them."""
    try:
        return _plain(ipaddress.ip_address(host))
    except ValueError:
        return None


def _unhex(text: str) -> IPAddress:
    """An address as /proc/net/tcp(6) writes it: 32-bit words, each in host (little-endian)
    order."""
    raw = bytes.fromhex(text)
    ordered = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return _plain(ipaddress.ip_address(ordered))


def _plain(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (a dual-stack socket's view of IPv4) as the IPv4 one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _holders(sockets: set[int]) -> dict[int, set[int]]:
    """The processes holding any of `sockets`, with those they hold (of the processes this
    user may look into)."""
    if not sockets:
        return {}
    holders = {pid: _sockets_of(pid) & sockets for pid in _pids()}
    return {pid: held for pid, held in holders.items() if held}


def _pids() -> Iterable[int]:
    try:
        return [int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()]
    except OSError:
        return []


def _sockets_of(pid: int) -> set[int]:
    """The socket inodes a process has open; none if it has gone or is not ours to look at."""
    inodes = set()
    try:
        for fd in (PROC / str(pid) / "fd").iterdir():
            try:
                target = fd.readlink().name
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def _session(pid: int) -> int | None:
    """The session id of a process: /proc/<pid>/stat's sixth field (after the command name,
    which may itself hold spaces and parentheses)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[3])
