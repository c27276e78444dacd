"""`parallama plan --calibrate URL`: a timing profile measured on a real engine, for the planner
and the emulator (`--profile FILE`), so that a plan predicts this hardware and this model rather
than a table's.

Three things are measured, each by requests of set lengths (a made-up prompt, an answer held to
its length with `min_tokens`/`ignore_eos` where the engine reads them), streamed, one engine
addressed directly:

- prefill speed: the time to the first token of long prompts against short ones, one at a time
  (256 and 64 tokens, the range of chat prompts: the per-token cost grows with the length); the
  difference cancels what both pay, and the line through both gives the tokens that no prompt
  pays for (`prefill_offset`: a chat template the engine keeps cached, less fixed costs);
- decode speed alone: tokens after the first over the time they took, one at a time;
- the batching curve: the same with 2, 3 ... requests at once, up to `--num-parallel`: how
  many times slower each sequence decodes (`TimingModel.batch_curve`).

`--calibrate-from BENCH.json` reads the same from a `parallama bench --json` report of one engine
at concurrency 1, 2 ... (less exactly: its prompts are whatever it asked, its prefill is taken
from level 1's time to first token less one token's decode).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from parallama.bench.main import BenchError, choose_model, listed_models
from parallama.bench.runner import Plan, Setup, fixed_tokens, run_http
from parallama.bench.stats import Summary
from parallama.bench.trace import TracedRequest
from parallama.bench.workload import Api, Workload
from parallama.runtime import run
from parallama.sim.profiles import profile_text
from parallama.sim.timing import TimingModel

SHORT_PROMPT = 64  # tokens
LONG_PROMPT = 256
PREFILL_ANSWER = 2  # tokens: the first comes after the prefill
DECODE_ANSWER = 64
REPEATS = 3  # requests per measurement and client


def _trace(model: str, count: int, prompt: int, answer: int) -> tuple[TracedRequest, ...]:
    return tuple(TracedRequest(0.0, model, prompt, answer) for _ in range(count))


@dataclass(frozen=True)
class Target:
    url: str
    api: Api
    model: str
    fixed_tokens: int = 0  # what it counts for a prompt of no words (0: not asked yet)

    async def probed(self) -> Target:
        """The engine, with what it counts for a prompt of no words: so that the prompts
        asked for count as many tokens there (streamed answers may not count them)."""
        plan = self._plan(1, 1, 1)
        fixed = await fixed_tokens(plan)
        if fixed is None:
            raise BenchError(f"{self.url} did not answer with a token count: check --api")
        return replace(self, fixed_tokens=fixed)

    def _plan(self, clients: int, prompt: int, answer: int) -> Plan:
        count = clients * REPEATS
        workload = Workload(
            self.api,
            "chat",
            self.model,
            trace=_trace(self.model, count + 1, prompt, answer),
            salt=secrets.token_hex(3),
            fixed_tokens=self.fixed_tokens,
        )
        return Plan(
            (Setup("engine", self.url),), workload, "concurrency", (clients,), count, warmup=1
        )

    async def load_seconds(self) -> float:
        """Ollama's: the model unloaded (`keep_alive: 0`), then loaded again by a request with
        no prompt, which Ollama answers once the model is loaded (`done_reason: load`)."""
        url = f"{self.url}/api/generate"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
                async with session.post(url, json={"model": self.model, "keep_alive": 0}) as off:
                    await off.read()
                started = time.perf_counter()
                async with session.post(url, json={"model": self.model}) as load:
                    answer = await load.read()
                took = time.perf_counter() - started
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise BenchError(f"{self.url}: loading {self.model} failed ({exc!r})") from None
        if load.status != 200 or b'"load"' not in answer:
            raise BenchError(f"{self.url} did not load {self.model} when asked ({load.status})")
        return took

    async def measure(self, clients: int, prompt: int, answer: int) -> Summary:
        """`clients` at once, each asking `REPEATS` times, streamed; their summary."""
        (summary,) = (await run_http(self._plan(clients, prompt, answer))).summaries()
        if summary.errors or not summary.ok:
            errors = ", ".join(f"{n}x {kind}" for kind, n in summary.errors.items())
            raise BenchError(f"{self.url} did not answer the calibration's requests ({errors})")
        return summary


async def measure(engine: Target, most: int, load_seconds: float | None) -> TimingModel:
    """`load_seconds`: None to measure it (Ollama's API only: the model is unloaded once)."""
    engine = await engine.probed()
    if load_seconds is None:
        load_seconds = await engine.load_seconds() if engine.api == "ollama" else 0.0
    speeds = []
    for clients in range(1, most + 1):
        summary = await engine.measure(clients, SHORT_PROMPT, DECODE_ANSWER)
        speeds.append(summary.request_tokens_per_second["p50"])
    if any(math.isnan(s) or s <= 0 for s in speeds):
        raise BenchError(f"{engine.url}: no streamed tokens to time (does it stream?)")
    short = (await engine.measure(1, SHORT_PROMPT, PREFILL_ANSWER)).first_token["p50"]
    long = (await engine.measure(1, LONG_PROMPT, PREFILL_ANSWER)).first_token["p50"]
    if not long > short:
        raise BenchError(f"{engine.url}: a long prompt was not slower to answer than a short one")
    prefill_tps = (LONG_PROMPT - SHORT_PROMPT) / (long - short)  # as it counts them (`probed`)
    # The line through both: the time to the first token is the prefill, then one token.
    offset = SHORT_PROMPT - (short - 1 / speeds[0]) * prefill_tps
    return TimingModel(
        prefill_tps=prefill_tps,
        prefill_offset=offset,
        decode_tps=speeds[0],
        load_seconds=load_seconds,
        batch_curve=tuple(speeds[0] / s for s in speeds),
    )


def from_report(path: Path, load_seconds: float) -> TimingModel:
    """The profile from a bench report's summaries at concurrency 1, 2, ..."""
    try:
        report: dict[str, Any] = orjson.loads(path.read_bytes())
        rows = sorted(report["summaries"], key=lambda r: float(r["level"]))
        levels = [float(r["level"]) for r in rows]
        one_engine = len({r["setup"] for r in rows}) == 1
        if report["plan"]["mode"] != "concurrency" or not one_engine:
            raise ValueError
        if levels != list(range(1, len(rows) + 1)) or not all(r["ok"] for r in rows):
            raise ValueError
        speeds = [float(r["request_tokens_per_second"]["p50"]) for r in rows]
        first = rows[0]
        prompt = first["prompt_tokens"] / first["ok"]
        ttft = float(first["first_token"]["p50"]) - 1 / speeds[0]
    except OSError as exc:
        raise BenchError(f"cannot read {path}: {exc.strerror}") from None
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, ZeroDivisionError):
        raise BenchError(
            f"{path}: expected a parallama bench --json report of one engine, streamed, at "
            "--concurrency 1,2,... (every level from 1 on, each with answers)"
        ) from None
    if ttft <= 0 or prompt <= 0:
        raise BenchError(f"{path}: its time to first token leaves no time for the prefill")
    return TimingModel(
        prefill_tps=prompt / ttft,
        decode_tps=speeds[0],
        load_seconds=load_seconds,
        batch_curve=tuple(speeds[0] / s for s in speeds),
    )


async def engines_behind(url: str) -> list[str]:
    """The engines to measure at `url`: a parallama gateway's serving backends (from its
    status), else the one engine there."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(f"{url}/parallama/status") as answer,
    ):
        if answer.status in (401, 403):
            raise BenchError(
                f"{url} is a parallama gateway whose status needs its admin token: "
                "calibrate its engines by their own URLs"
            )
        if answer.status != 200:
            return [url]
        with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
            status = orjson.loads(await answer.read())
            serving = [b for b in status["backends"] if b["online"] and b["healthy"]]
            return [b["url"] for b in serving if not b["draining"]]
    return [url]


async def calibrate(args: argparse.Namespace) -> list[tuple[str, str, TimingModel]]:
    """Each engine at `--calibrate`: its URL, the model measured, its timing."""
    url = args.calibrate.rstrip("/")
    try:
        engines = await engines_behind(url)
    except (aiohttp.ClientError, OSError, TimeoutError):
        raise BenchError(f"{url} did not answer: is an engine or a gateway there?") from None
    if not engines:
        raise BenchError(f"{url} is a gateway with no engine serving to calibrate")
    most = int(max(args.num_parallel))
    load_seconds = args.load_seconds
    if load_seconds is None and engines != [url]:
        load_seconds = 0.0  # not measured: unloading a model under a gateway's traffic hurts
        print("Behind a gateway the load time is not measured (--load-seconds sets it).")
    measured = []
    for engine_url in engines:
        model = args.model
        if model is None:
            listed = await listed_models(Setup(engine_url, engine_url), args.api, None)
            model = choose_model(listed, "chat", Setup(engine_url, engine_url))
        print(f"Calibrating on {engine_url} ({model}, up to {most} at once) ...", flush=True)
        timing = await measure(Target(engine_url, args.api, model), most, load_seconds)
        measured.append((engine_url, model, timing))
    return measured


def calibrate_command(args: argparse.Namespace) -> int:
    """One profile for an engine (`--out`), or one per engine behind a gateway (`--out` with
    the engine's number: profile-1.toml, profile-2.toml ...)."""
    today = datetime.date.today().isoformat()
    if args.calibrate_from:
        timing = from_report(Path(args.calibrate_from), args.load_seconds or 0.0)
        profiles = [(Path(args.out), timing, f"calibrated from {args.calibrate_from}, {today}")]
    else:
        measured = run(calibrate(args))
        out = Path(args.out)
        profiles = [
            (
                out if len(measured) == 1 else out.with_stem(f"{out.stem}-{n}"),
                timing,
                f"calibrated on {url} ({model}), {today}",
            )
            for n, (url, model, timing) in enumerate(measured, 1)
        ]
    for path, timing, comment in profiles:
        text = profile_text(timing, comment)
        path.write_text(text)
        print(text, end="")
        print(f"Written to {path}: parallama plan --profile {path} ...")
    return 0
