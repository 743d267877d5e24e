"""Throughput benchmark for lion_local.endpoints.client.EndpointClient.

Starts a loopback OpenAI-compatible stub server in a separate process that answers
every POST .../chat/completions after a fixed delay, then drives it with an
EndpointClient at max_concurrency=C. With C requests always in flight the ideal
throughput is C / delay; the last line prints achieved / ideal.

    python benchmarks/endpoint_throughput.py [--concurrency 256] [--delay 0.5] [--requests N]

The stub is raw asyncio HTTP/1.1 (keep-alive, Content-Length, timers instead of a
task per request) so that on a 2-core machine it is not the bottleneck; the CPU
time both processes used is printed to show which side is busier.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lion_local.endpoints.client import EndpointClient  # noqa: E402
from role_server import RequestProtocol  # noqa: E402  (this directory is the script's)

_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
    }
).encode()
_OK = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\n\r\n" % len(_BODY)
) + _BODY
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


class _Stats:
    in_flight = 0  # requests received and not yet answered, over all connections
    peak = 0


def _stub_handler(delay: float):
    """Reply after `delay`, on a timer rather than a task per request."""

    def handle(transport: asyncio.Transport, request_line: str, body: bytes) -> None:
        reply = _OK if request_line.endswith("/chat/completions HTTP/1.1") else _NOT_FOUND
        _Stats.in_flight += 1
        _Stats.peak = max(_Stats.peak, _Stats.in_flight)
        asyncio.get_running_loop().call_later(delay, _send, transport, reply)

    return handle


def _send(transport: asyncio.Transport, reply: bytes) -> None:
    _Stats.in_flight -= 1
    if not transport.is_closing():
        transport.write(reply)


def _serve(delay: float, conn) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        handle = _stub_handler(delay)
        server = await loop.create_server(
            lambda: RequestProtocol(handle), "127.0.0.1", 0, backlog=4096
        )
        conn.send(server.sockets[0].getsockname()[1])
        stop = asyncio.Event()
        loop.add_reader(conn.fileno(), stop.set)  # the parent writes once: "stop"
        await stop.wait()
        loop.remove_reader(conn.fileno())
        conn.recv()
        conn.send((time.process_time(), _Stats.peak))
        server.close()

    asyncio.run(main())


async def _drive(port: int, concurrency: int, requests: int) -> tuple[float, int, float]:
    client = EndpointClient(
        "bench",
        [f"http://127.0.0.1:{port}/v1"],
        "bench",
        max_concurrency=concurrency,
        request_timeout_s=60.0,
        failure_budget_s=30.0,
    )
    messages = [{"role": "user", "content": "Say ok."}]
    async with client:
        # One short warm-up round opens the keep-alive connections, as a long stage would.
        await asyncio.gather(*(client.chat("bench", messages) for _ in range(concurrency)))
        client.max_in_flight_seen = 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(
            *(client.chat("bench", messages, max_tokens=1) for _ in range(requests))
        )
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    return elapsed, client.max_in_flight_seen, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--delay", type=float, default=0.5, help="server delay in seconds")
    parser.add_argument("--requests", type=int, default=None, help="default: concurrency * 20")
    args = parser.parse_args()
    requests = args.requests or args.concurrency * 20

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(args.delay, child), daemon=True)
    server.start()
    try:
        port = parent.recv()
        elapsed, peak, client_cpu = asyncio.run(_drive(port, args.concurrency, requests))
        parent.send("stop")
        server_cpu, server_peak = parent.recv()
    finally:
        server.join(timeout=5)
        if server.is_alive():
            server.terminate()

    achieved = requests / elapsed
    ideal = args.concurrency / args.delay
    print(
        f"concurrency {args.concurrency}, server delay {args.delay} s, {requests} requests "
        f"(timed after a warm-up round of {args.concurrency})"
    )
    print(f"elapsed {elapsed:.2f} s; peak in flight: client {peak}, server {server_peak}")
    print(
        f"client CPU {client_cpu:.2f} s ({client_cpu / elapsed:.0%} of one core, "
        f"{client_cpu / requests * 1e6:.0f} us/request); server CPU (whole life) {server_cpu:.2f} s"
    )
    print(f"ideal {ideal:.1f} req/s = concurrency / delay")
    print(
        f"throughput ratio: {achieved / ideal:.3f} "
        f"(achieved {achieved:.1f} req/s / ideal {ideal:.1f} req/s)"
    )


if __name__ == "__main__":
    main()
