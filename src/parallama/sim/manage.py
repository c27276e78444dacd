"""The emulator's model management, as Ollama answers it: `/api/pull` (a simulated download
with progress lines, after which the model is installed), `/api/delete`, `/api/copy`, blobs
(`HEAD`/`POST /api/blobs/:digest`: uploads checked against their digest as they stream, only
the digest and size kept) and `/api/create` from blobs (`files`) or a model (`from`). Any
well-formed name pulls: the emulated registry has every model (`catalog.spec_for` sizes it)."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web

from parallama.errors import ApiError, excerpt
from parallama.protocol import ollama
from parallama.protocol.ollama import normalize_name
from parallama.sim.catalog import spec_for
from parallama.sim.emulator import Emulator, json_response

_STEPS = 4  # progress lines of the simulated download
_STEP_SECONDS = 0.02


class ModelManagement:
    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator

    async def pull(self, request: web.Request) -> web.StreamResponse:
        body = await self.emulator.read_body(request, "PullRequest")
        name = body.model(old_field="name")
        if not name.strip():
            raise ApiError(400, "model is required")
        if (too_long := ollama.name_too_long(name.strip())) is not None:
            raise ApiError(400, f"invalid model name: {too_long}")
        spec = spec_for(normalize_name(name))
        digest = f"sha256:{spec.digest}"
        lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        lines += [
            {
                "status": f"pulling {spec.digest[:12]}",
                "digest": digest,
                "total": spec.size,
                "completed": spec.size * step // _STEPS,
            }
            for step in range(1, _STEPS + 1)
        ]
        lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}]
        if not body.get("stream", bool, True):
            await asyncio.sleep(_STEP_SECONDS * _STEPS)
            self.emulator.models[spec.name] = spec
            return json_response({"status": "success"})
        response = web.StreamResponse(headers={"Content-Type": ollama.NDJSON})
        await response.prepare(request)
        for line in lines:
            await response.write(orjson.dumps(line) + b"\n")
            await asyncio.sleep(_STEP_SECONDS)
        self.emulator.models[spec.name] = spec
        await response.write(b'{"status":"success"}\n')
        await response.write_eof()
        return response

    async def delete(self, request: web.Request) -> web.Response:
        body = await self.emulator.read_body(request, "DeleteRequest")
        spec = self.emulator.find_model(body.model(old_field="name"))
        del self.emulator.models[spec.name]
        return web.Response(status=200)

    async def copy(self, request: web.Request) -> web.Response:
        body = await self.emulator.read_body(request, "CopyRequest")
        source = self.emulator.find_model(body.get("source", str, ""))
        destination = normalize_name(body.get("destination", str, ""))
        if not destination.strip(":") or ollama.name_too_long(destination) is not None:
            raise ApiError(400, "invalid destination name")
        self.emulator.models[destination] = replace(source, name=destination)
        return web.Response(status=200)

    async def head_blob(self, request: web.Request) -> web.Response:
        digest = _digest(request)
        if digest not in self.emulator.blobs:
            raise ApiError(404, f'blob "{digest}" not found')
        return web.Response(status=200)

    async def create_blob(self, request: web.Request) -> web.Response:
        """201 once the body's SHA-256 is the digest named; 200 at once if it is here."""
        digest = _digest(request)
        if digest in self.emulator.blobs:
            return web.Response(status=200)
        hashed, size = hashlib.sha256(), 0
        async for piece in request.content.iter_any():
            hashed.update(piece)
            size += len(piece)
        got = f"sha256:{hashed.hexdigest()}"
        if got != digest:
            raise ApiError(400, f'digest mismatch, expected "{digest}", got "{got}"')
        self.emulator.blobs[digest] = size
        return web.Response(status=201)

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await self.emulator.read_body(request, "CreateRequest")
        name = normalize_name(body.model(old_field="name"))
        if not name.strip(":") or ollama.name_too_long(name) is not None:
            raise ApiError(400, "invalid model name")
        files = body.get("files", dict, {})
        source = body.get("from", str, "")
        if not files and not source:
            raise ApiError(400, "neither 'from' or 'files' was specified")
        if files:
            digests = [str(d).replace("-", ":", 1) for d in files.values()]
            missing = [d for d in digests if d not in self.emulator.blobs]
            if missing:
                raise ApiError(400, f'blob "{excerpt(missing[0], 80)}" not found')
            size = sum(self.emulator.blobs[d] for d in digests)
            spec = replace(spec_for(name), size=size)
            lines = [
                {"status": "parsing GGUF"},
                *({"status": f"using existing layer {d}"} for d in digests),
            ]
        else:
            spec = replace(self.emulator.find_model(source), name=name)
            lines = [{"status": "using existing layer sha256:" + spec.digest}]
        lines.append({"status": "writing manifest"})
        self.emulator.models[name] = spec
        if not body.get("stream", bool, True):
            return json_response({"status": "success"})
        response = web.StreamResponse(headers={"Content-Type": ollama.NDJSON})
        await response.prepare(request)
        for line in [*lines, {"status": "success"}]:
            await response.write(orjson.dumps(line) + b"\n")
        await response.write_eof()
        return response


def _digest(request: web.Request) -> str:
    digest = request.match_info["digest"]
    if not ollama.BLOB_DIGEST.fullmatch(digest):
        raise ApiError(400, ollama.INVALID_DIGEST)
    return digest.replace("-", ":", 1)
