"""One model's waiting requests, in the order they are served: by priority then arrival
(fifo), or in turns over clients by their weight (fair)."""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Literal

from parallama.core.tickets import Ticket

Discipline = Literal["fifo", "fair"]


class _Client:
    """One client's waiting requests in a fair queue, and when its next turn falls."""

    __slots__ = ("heap", "turn")

    def __init__(self, turn: float) -> None:
        self.heap: list[tuple[int, int, Ticket]] = []  # (-priority, seq, ticket)
        self.turn = turn


class ModelQueue:
    """One model's waiting requests: by priority, then FIFO; or, fair, in turns over clients.

    Fair turns are stride scheduling: each client's next turn falls `1 / weight` after its
    last, on a virtual clock that is the turn last taken. A client of weight 2 so gets two
    turns for each of a weight-1 client, however many requests either sends; a client that
    starts waiting (new, or back after a pause) is placed one stride after the turn last
    taken, as if it had just had one: no credit saved up, and no turn ahead of those already
    due. (Placed at the turn last taken, a new client id with every request kept that turn
    from advancing: a client served once waited for as long as new ids came, and every id
    stayed remembered.) Within one client, X-Priority then arrival decide.
    """

    def __init__(self, discipline: Discipline) -> None:
        self.fair = discipline == "fair"
        self._heap: list[tuple[int, int, Ticket]] = []  # fifo: (-priority, seq, ticket)
        self._clients: dict[str, _Client] = {}  # fair: clients waiting, or owing turns
        self._turns: list[tuple[float, int, str]] = []  # fair: (turn, seq, client) if waiting
        self._now = 0.0  # fair: the turn last taken
        self._len = 0
        self.preferred = ""  # fair: the client whose turn it is by an order kept elsewhere

    def __len__(self) -> int:
        return self._len

    def peek(self) -> Ticket:
        """The ticket `pop` would return."""
        if not self.fair:
            return self._heap[0][2]
        return self._clients[self._next_client()].heap[0][2]

    def tickets(self) -> Iterator[Ticket]:
        """Every request waiting, in no order."""
        if not self.fair:
            return (ticket for _, _, ticket in self._heap)
        return (ticket for c in self._clients.values() for _, _, ticket in c.heap)

    def firsts(self, count: int) -> list[Ticket]:
        """FIFO: the first `count` in the order `pop` would return them."""
        return [ticket for _, _, ticket in heapq.nsmallest(count, self._heap)]

    def next_clients(self, count: int) -> list[Ticket]:
        """Fair: the next request of each of the first `count` clients in turn."""
        firsts = heapq.nsmallest(count, self._turns)
        return [self._clients[name].heap[0][2] for _, _, name in firsts]

    def _next_client(self) -> str:
        preferred = self._clients.get(self.preferred)
        if preferred is not None and preferred.heap:
            return self.preferred
        return self._turns[0][2]

    def push(self, ticket: Ticket) -> None:
        entry = (-ticket.priority, ticket.seq, ticket)
        self._len += 1
        if not self.fair:
            heapq.heappush(self._heap, entry)
            return
        client = self._clients.get(ticket.client)
        if client is None:
            client = self._clients[ticket.client] = _Client(self._now)
        if not client.heap:  # it waits again: its turn, or one stride on if that has passed
            client.turn = max(client.turn, self._now + 1.0 / ticket.weight)
            heapq.heappush(self._turns, (client.turn, ticket.seq, ticket.client))
        heapq.heappush(client.heap, entry)

    def pop(self) -> Ticket:
        self._len -= 1
        if not self.fair:
            return heapq.heappop(self._heap)[2]
        name = self._next_client()
        if name == self._turns[0][2]:
            turn = heapq.heappop(self._turns)[0]
        else:  # its turn by the shared order: taken out of the local one
            turn = max(self._clients[name].turn, self._now)
            self._turns = [t for t in self._turns if t[2] != name]
            heapq.heapify(self._turns)
        self.preferred = ""
        client = self._clients[name]
        ticket = heapq.heappop(client.heap)[2]
        self._now = turn
        client.turn = turn + 1.0 / ticket.weight
        if client.heap:
            heapq.heappush(self._turns, (client.turn, client.heap[0][1], name))
        else:
            self._forget_idle()
        return ticket

    def remove(self, ticket: Ticket) -> None:
        self._len -= 1
        entry = (-ticket.priority, ticket.seq, ticket)
        if not self.fair:
            self._heap.remove(entry)
            heapq.heapify(self._heap)
            return
        client = self._clients[ticket.client]
        heap = client.heap
        heap.remove(entry)
        heapq.heapify(heap)
        if not heap:  # no turn while it has nothing waiting
            # Nor one owed for what it gave up: it is placed anew when it waits again.
            client.turn = min(client.turn, self._now)
            self._turns = [t for t in self._turns if t[2] != ticket.client]
            heapq.heapify(self._turns)
            self._forget_idle()

    @property
    def clients(self) -> int:
        """Clients remembered: those waiting, and those whose next turn is still to come."""
        return len(self._clients)

    def _forget_idle(self) -> None:
        """Clients with nothing waiting whose next turn has come: they would start at the
        current turn anyway. Swept when they outnumber the waiting ones (two to one, past 64),
        so that clients that come and go cannot grow the queue, at a cost spread thin."""
        if len(self._clients) <= 2 * len(self._turns) + 64:
            return
        now = self._now
        self._clients = {n: c for n, c in self._clients.items() if c.heap or c.turn > now}
