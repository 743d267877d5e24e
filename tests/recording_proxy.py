"""A pass-through HTTP proxy that records every request it forwards, for counting from the server's side.

    python tests/recording_proxy.py --upstream http://127.0.0.1:PORT --port P --log FILE [--delay-generator-s S]

Each forwarded request becomes one JSON line in FILE once its response has been sent back:
{"arrived", "delivered", "path", "status", "body"} (body parsed as JSON when it is JSON; status
-1 when the client had gone away before the response could be sent). The
optional delay holds generator requests (those asking for a "#New Instruction#") before
forwarding them, so that a test can reliably interrupt the short generation stage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--delay-generator-s", type=float, default=0.0)
    args = parser.parse_args()
    log = open(args.log, "a", encoding="utf-8")
    session: aiohttp.ClientSession | None = None

    async def forward(request: web.Request) -> web.StreamResponse:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        arrived = time.time()
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        if args.delay_generator_s and "#New Instruction#" in raw.decode("utf-8", "replace"):
            await asyncio.sleep(args.delay_generator_s)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
        async with session.request(request.method, args.upstream + request.path_qs, data=raw, headers=headers) as upstream:
            payload = await upstream.read()
            response = web.Response(
                body=payload, status=upstream.status, content_type=upstream.content_type or "application/json"
            )
        try:
            await response.prepare(request)
            await response.write_eof()
            status = response.status
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            status = -1  # the client went away (a killed run): nothing was delivered
        record = {"arrived": arrived, "delivered": time.time(), "path": request.path, "status": status, "body": body}
        log.write(json.dumps(record) + "\n")
        log.flush()
        return response

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
