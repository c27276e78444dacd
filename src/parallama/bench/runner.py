"""Running a benchmark: requests sent, answers timed, setups interleaved.

Closed loop (`concurrency`): N clients, each sending its next request when its answer is done.
Open loop (`rate`): requests start on a schedule (Poisson or evenly spaced arrivals) whether or
not earlier ones have finished, as real users arrive. Replay (`replay`): the workload's trace,
each request at its time (divided by the level, the speed), answered or not. Sessions
(`sessions`): coding-agent conversations starting on the arrival schedule at the level's rate,
each sending its next turn, its history grown, when the last is answered.

Setups are never measured one after another: every level is split into rounds, and each round
runs a slice of every setup in turn (the order reversed every other round), so that whatever the
shared machine does meanwhile falls on all of them alike.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import aiohttp

from parallama.bench.sessions import Conversation, conversations
from parallama.bench.stats import Sample, Summary, summarize
from parallama.bench.workload import AnswerReader, Workload

Mode = Literal["concurrency", "rate", "replay", "sessions"]
Arrivals = Literal["poisson", "constant"]
MAX_OUTSTANDING = 10_000  # an open loop past what the target can take stops adding more
_JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Setup:
    """One thing measured: a target URL, and how the client connects to it."""

    label: str
    url: str
    fresh_connections: bool = False  # a new TCP connection for every request (no keep-alive)


@dataclass(frozen=True)
class Plan:
    setups: tuple[Setup, ...]
    workload: Workload
    mode: Mode
    levels: tuple[float, ...]
    requests: int | None = None  # per setup and level
    duration: float | None = None  # seconds per setup and level
    rounds: int = 1
    arrivals: Arrivals = "poisson"
    timeout: float = 300.0
    warmup: int = 0  # requests per setup before measuring, not counted
    seed: int = 0
    api_key: str | None = field(default=None, repr=False)  # sent as a bearer; never reported
    salt: str = ""  # sessions: starts every prompt of the run (no cache of an earlier run helps)


@dataclass
class Slice:
    setup: str
    level: float
    round: int
    started: float  # on the run's clock
    seconds: float
    requests: int


@dataclass
class Result:
    plan: Plan
    samples: list[Sample] = field(default_factory=list)
    slices: list[Slice] = field(default_factory=list)
    summarized: list[Summary] | None = None  # the summaries, once the samples are let go

    def summaries(self) -> list[Summary]:
        """Per level, per setup in the order given: over all of its samples."""
        if self.summarized is not None:
            return self.summarized
        out = []
        for level in self.plan.levels:
            for setup in self.plan.setups:
                mine = [s for s in self.samples if s.setup == setup.label and s.level == level]
                seconds = sum(
                    s.seconds for s in self.slices if s.setup == setup.label and s.level == level
                )
                out.append(summarize(setup.label, level, mine, seconds))
        return out


def arrival_gaps(rate: float, arrivals: Arrivals, rng: random.Random) -> Iterator[float]:
    """Seconds between consecutive request starts at `rate` per second."""
    while True:
        yield rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate


def round_shares(total: int, rounds: int) -> list[int]:
    """`total` requests split over `rounds` as evenly as whole numbers allow."""
    return [total // rounds + (1 if r < total % rounds else 0) for r in range(rounds)]


class Send(Protocol):
    async def __call__(
        self, setup: Setup, n: int, sample: Sample, conversation: Conversation | None = None
    ) -> None:
        """Send the workload's n-th request (or the conversation's next turn) to `setup` and
        fill in `sample` from the answer (errors, token times, counts); the runner times the
        whole."""


class Runner:
    def __init__(
        self,
        plan: Plan,
        send: Send,
        *,
        on_request: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`send` reaches the targets (over HTTP, or a simulation); `on_request` is told when
        each request ends (for a progress bar); `clock` times everything."""
        self.plan = plan
        self._send = send
        self._on_request = on_request or (lambda: None)
        self._clock = clock
        self._clock0 = clock()
        self._next_prompt: dict[str, int] = {}
        self._rng = random.Random(plan.seed)

    async def run(self) -> Result:
        result = Result(self.plan)
        for setup in self.plan.setups:
            if self.plan.warmup:
                await self._closed(setup, self.plan.warmup, None, min(self.plan.warmup, 4), 0)
        for level in self.plan.levels:
            for round_ in range(self.plan.rounds):
                order = self.plan.setups if round_ % 2 == 0 else self.plan.setups[::-1]
                for setup in order:
                    result.slices.append(await self._slice(setup, level, round_, result))
        return result

    async def _slice(self, setup: Setup, level: float, round_: int, result: Result) -> Slice:
        plan = self.plan
        count = None if plan.requests is None else round_shares(plan.requests, plan.rounds)[round_]
        seconds = None if plan.duration is None else plan.duration / plan.rounds
        started = self._clock()
        if plan.mode == "concurrency":
            samples = await self._closed(setup, count, seconds, int(level), level)
        elif plan.mode == "replay":
            samples = await self._replay(setup, level)
        elif plan.mode == "sessions":
            samples = await self._sessions(setup, level, round_)
        else:
            samples = await self._open(setup, count, seconds, level)
        took = self._clock() - started
        result.samples += samples
        return Slice(setup.label, level, round_, started - self._clock0, took, len(samples))

    async def _closed(
        self, setup: Setup, count: int | None, seconds: float | None, clients: int, level: float
    ) -> list[Sample]:
        """`clients` at once, each sending its next request when its answer is done, until
        `count` requests were sent or `seconds` passed."""
        samples: list[Sample] = []
        deadline = None if seconds is None else self._clock() + seconds
        sent = 0

        def more() -> bool:
            nonlocal sent
            if (count is not None and sent >= count) or (
                deadline is not None and self._clock() >= deadline
            ):
                return False
            sent += 1
            return True

        async def client() -> None:
            while more():
                samples.append(await self._request(setup, level))

        await asyncio.gather(*(client() for _ in range(max(clients, 1))))
        return samples

    async def _open(
        self, setup: Setup, count: int | None, seconds: float | None, rate: float
    ) -> list[Sample]:
        """Requests started on the arrival schedule, answered or not, until `count` were sent
        or `seconds` passed; then the ones in flight are waited for."""
        samples: list[Sample] = []
        tasks: set[asyncio.Task[None]] = set()
        start = due = self._clock()
        gaps = arrival_gaps(rate, self.plan.arrivals, self._rng)
        sent = 0
        while count is None or sent < count:
            due += next(gaps)
            if seconds is not None and due - start >= seconds:
                break
            await asyncio.sleep(max(due - self._clock(), 0))
            self._start(setup, rate, None, tasks, samples)
            sent += 1
        await asyncio.gather(*tasks)
        return samples

    async def _replay(self, setup: Setup, speed: float) -> list[Sample]:
        """The trace's requests, each at its time over `speed`, answered or not; then the ones
        in flight are waited for."""
        samples: list[Sample] = []
        tasks: set[asyncio.Task[None]] = set()
        start = self._clock()
        for n, traced in enumerate(self.plan.workload.trace):
            await asyncio.sleep(max(start + traced.time / speed - self._clock(), 0))
            self._start(setup, speed, n, tasks, samples)
        await asyncio.gather(*tasks)
        return samples

    async def _sessions(self, setup: Setup, rate: float, round_: int) -> list[Sample]:
        """This slice's share of the sessions, starting on the arrival schedule at `rate` per
        second, each turn sent when the last is answered; a session whose turn failed ends
        there. Each slice's prompts are its own (its salt), its sessions' system prompt shared."""
        shape = self.plan.workload.sessions
        assert shape is not None
        count = round_shares(shape.count, self.plan.rounds)[round_]
        index = self.plan.setups.index(setup)
        talks = conversations(shape, count, f"{self.plan.salt}s{index}r{round_}")
        samples: list[Sample] = []
        gaps = arrival_gaps(rate, self.plan.arrivals, self._rng)

        async def session(conversation: Conversation, delay: float) -> None:
            await asyncio.sleep(delay)
            while not conversation.done:
                sample = await self._request(setup, rate, conversation=conversation)
                samples.append(sample)
                if not sample.ok:
                    return

        delays, due = [], 0.0
        for _ in talks:
            delays.append(due)
            due += next(gaps)
        await asyncio.gather(*(session(c, d) for c, d in zip(talks, delays, strict=True)))
        return samples

    def _start(
        self,
        setup: Setup,
        level: float,
        n: int | None,
        tasks: set[asyncio.Task[None]],
        samples: list[Sample],
    ) -> None:
        """An open loop's next request, sent now unless `MAX_OUTSTANDING` are: then counted as
        not sent (never silently skipped: the target is that far behind)."""
        if len(tasks) >= MAX_OUTSTANDING:
            skipped = Sample(setup.label, level, self._clock() - self._clock0)
            skipped.error = "not sent: too many outstanding"
            samples.append(skipped)
            return

        async def one() -> None:
            samples.append(await self._request(setup, level, n))

        task = asyncio.get_running_loop().create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _request(
        self,
        setup: Setup,
        level: float,
        n: int | None = None,
        conversation: Conversation | None = None,
    ) -> Sample:
        """One request (the n-th, else the setup's next; or a conversation's next turn), timed
        from the client's side."""
        if n is None:
            n = self._next_prompt.get(setup.label, 0)
            self._next_prompt[setup.label] = n + 1
        started = self._clock()
        sample = Sample(setup.label, level, started - self._clock0)
        await self._send(setup, n, sample, conversation)
        sample.latency = self._clock() - started
        self._on_request()
        return sample


class HttpClient:
    """The targets over HTTP: a connection pool per setup (or a new connection per request, for
    a setup that asks), answers read as they stream."""

    def __init__(self, plan: Plan) -> None:
        self._workload = plan.workload
        self._timeout = plan.timeout
        self._api_key = plan.api_key
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    async def send(
        self, setup: Setup, n: int, sample: Sample, conversation: Conversation | None = None
    ) -> None:
        workload = self._workload
        session = self._sessions.get(setup.label)
        if session is None:
            session = self._sessions[setup.label] = _session(setup, self._timeout, self._api_key)
        reader = AnswerReader(workload, sample, keep_text=conversation is not None)
        if conversation is None:
            body = workload.body(n)
        else:
            body = workload.turn_body(**conversation.request())
        started = time.perf_counter()
        try:
            async with await self._post(session, setup.url + workload.path, body) as answer:
                sample.queue_wait = _milliseconds(answer.headers.get("X-Queue-Wait-Ms"))
                if answer.status != 200:
                    await answer.read()
                    sample.error = str(answer.status)
                elif workload.streams:
                    async for line in answer.content:
                        reader.line(line, time.perf_counter() - started)
                else:
                    reader.whole(await answer.read())
        except TimeoutError:
            sample.error = "timeout"
        except (aiohttp.ClientError, OSError):
            sample.error = "connection"
        if conversation is not None and sample.ok:
            conversation.answered(reader.text)

    @staticmethod
    async def _post(
        session: aiohttp.ClientSession, url: str, body: bytes
    ) -> aiohttp.ClientResponse:
        """The answer's head. A kept connection the server closed as the request went out
        (llama-server closes one after every streamed answer, though it says `Keep-Alive`) is
        no failure of the server: the request goes once more, on another connection."""
        try:
            return await session.post(url, data=body, headers=_JSON)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            return await session.post(url, data=body, headers=_JSON)

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()


async def run_http(plan: Plan, on_request: Callable[[], None] | None = None) -> Result:
    """The plan against real targets."""
    client = HttpClient(plan)
    try:
        return await Runner(plan, client.send, on_request=on_request).run()
    finally:
        await client.close()


async def fixed_tokens(plan: Plan) -> int | None:
    """What the plan's first target counts for a replayed prompt of no words (its chat
    template, the request's number), so that replayed prompts count as many tokens there as
    traced; None if it did not answer with a count."""
    workload = plan.workload
    empty = replace(workload.trace[0], prompt_tokens=1, generated_tokens=1)
    probe = replace(plan, workload=replace(workload, trace=(empty,), stream=False, fixed_tokens=1))
    client = HttpClient(probe)
    sample = Sample("probe", 0, 0)
    try:
        await client.send(plan.setups[0], 0, sample)
    finally:
        await client.close()
    return sample.prompt_tokens if sample.ok and sample.prompt_tokens else None


def _milliseconds(header: str | None) -> float | None:
    """Seconds, from a header of whole milliseconds."""
    if header is None or not (header.isascii() and header.isdigit()):
        return None
    return int(header) / 1000


def authorization(api_key: str | None) -> dict[str, str]:
    return {} if api_key is None else {"Authorization": f"Bearer {api_key}"}


def _session(setup: Setup, timeout: float, api_key: str | None) -> aiohttp.ClientSession:
    # limit=0: the benchmark's concurrency, not the pool, bounds the connections. Idle ones are
    # kept 4 s, not aiohttp's 15: llama-server and uvicorn close them silently after 5 s.
    if setup.fresh_connections:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
    else:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0)
    return aiohttp.ClientSession(
        connector=connector,
        headers=authorization(api_key),
        timeout=aiohttp.ClientTimeout(total=timeout),
        read_bufsize=1 << 20,  # a long streamed line must still fit
    )


def describe(plan: Plan) -> dict[str, Any]:
    """The plan as JSON: what was run, for the report."""
    w = plan.workload
    return {
        "setups": [s.__dict__ for s in plan.setups],
        "api": w.api,
        "kind": w.kind,
        "model": w.model,
        "stream": w.streams,
        "max_tokens": w.max_tokens,
        "prompts": len(w.prompts),
        "mode": plan.mode,
        "levels": list(plan.levels),
        "requests": plan.requests,
        "duration": plan.duration,
        "rounds": plan.rounds,
        "arrivals": plan.arrivals if plan.mode == "rate" else None,
        "trace": len(w.trace) or None,
    }
