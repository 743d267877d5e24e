"""A pass-through HTTP proxy that records every request it forwards, and can inject faults.

    python tests/recording_proxy.py --upstream http://127.0.0.1:PORT --port P --log FILE
        [--delay-generator-s S] [--fault-every N --hang-s H] [--outage-after N --outage-s S]

Each request becomes one JSON line in FILE once it is over: {"arrived", "delivered", "path",
"status", "body", "fault"} (body parsed as JSON when it is JSON; status -1 when the client had
gone away before the response could be sent; fault null or the fault injected). The optional
delay holds generator requests (those asking for a "#New Instruction#") before forwarding them,
so that a test can reliably interrupt the short generation stage.

Faults, on completion requests only (health checks always pass):
- --fault-every N: every Nth completion request is faulted; the faults cycle through "500" and
  "503" (an error reply, never forwarded),
  "hang" (no reply for --hang-s seconds, then the connection is dropped; never forwarded) and
  "reset" (forwarded, the server does the work, then the connection is reset (RST) instead of
  the reply being sent).
- --outage-after N --outage-s S: once N requests have been forwarded, the proxy stops listening
  for S seconds (new connections are refused) and resets every request arriving on an already
  open connection, then listens again on the same port. The outage is logged as
  {"outage": [start, end]}.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import socket
import struct
import time

import aiohttp
from aiohttp import web

FAULTS = ("500", "503", "hang", "reset")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--delay-generator-s", type=float, default=0.0)
    parser.add_argument("--fault-every", type=int, default=0)
    parser.add_argument("--hang-s", type=float, default=10.0)
    parser.add_argument("--outage-after", type=int, default=0)
    parser.add_argument("--outage-s", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(Proxy(args).serve())


def _reset(request: web.Request) -> None:
    """Drop the client's connection with a TCP RST, as a crashed server or a middlebox would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Proxy:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.log = open(args.log, "a", encoding="utf-8")
        self.completions = 0
        self.kinds = itertools.cycle(FAULTS)
        self.forwarded = 0
        self.outage_until = 0.0
        self.session: aiohttp.ClientSession | None = None
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None

    async def serve(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await self._listen()
        await asyncio.Event().wait()  # until the test stops the process

    async def _listen(self) -> None:
        self.site = web.TCPSite(self.runner, "127.0.0.1", self.args.port, reuse_address=True)
        await self.site.start()

    async def _outage(self) -> None:
        started = time.time()
        self.outage_until = time.monotonic() + self.args.outage_s
        await self.site.stop()  # new connections are refused from here on
        await asyncio.sleep(self.args.outage_s)
        await self._listen()
        self._write({"outage": [started, time.time()]})

    def _write(self, record: dict) -> None:
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        arrived = time.time()
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        record = {"arrived": arrived, "path": request.path, "body": body, "fault": None}
        completion = request.path.endswith("completions")

        self.completions += completion
        if completion and time.monotonic() < self.outage_until:
            record["fault"] = "outage"
        elif completion and self.args.fault_every and self.completions % self.args.fault_every == 0:
            record["fault"] = next(self.kinds)
        fault = record["fault"]
        if fault in ("500", "503"):
            response = web.json_response({"error": f"injected fault: HTTP {fault}"}, status=int(fault))
            return await self._send(request, response, record)
        if fault == "hang":
            await asyncio.sleep(self.args.hang_s)
        if fault in ("hang", "outage"):
            _reset(request)
            self._write({**record, "delivered": time.time(), "status": -1})
            raise asyncio.CancelledError  # the connection is gone: nothing to send

        if self.args.delay_generator_s and "#New Instruction#" in raw.decode("utf-8", "replace"):
            await asyncio.sleep(self.args.delay_generator_s)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
        async with self.session.request(request.method, self.args.upstream + request.path_qs, data=raw, headers=headers) as upstream:
            payload = await upstream.read()
            response = web.Response(body=payload, status=upstream.status, content_type=upstream.content_type or "application/json")
        if completion:
            self.forwarded += 1
            if self.forwarded == self.args.outage_after:
                asyncio.get_running_loop().create_task(self._outage())
        if fault == "reset":
            _reset(request)
            self._write({**record, "delivered": time.time(), "status": -1})
            raise asyncio.CancelledError
        return await self._send(request, response, record)

    async def _send(self, request: web.Request, response: web.Response, record: dict) -> web.StreamResponse:
        try:
            await response.prepare(request)
            await response.write_eof()
            status = response.status
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            status = -1  # the client went away (a killed run): nothing was delivered
        self._write({**record, "delivered": time.time(), "status": status})
        return response


if __name__ == "__main__":
    main()
