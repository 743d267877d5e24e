"""Tests for lion_local.endpoints.client against a scripted loopback OpenAI-compatible server.

No pass/fail here depends on the host's speed. Waits the client chooses (backoff, Retry-After,
fail-over) are read from the `sleeps` fixture, which records every asyncio.sleep the client
module asks for; elapsed wall time is only ever bounded from below by a wait the code itself
makes, or from above as a hang guard many times the expected time (each says so).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

import lion_local.endpoints.client as client_module
from lion_local.endpoints.client import Completion, EndpointClient, EndpointError, RoleUsage

KEY = "sk-test-SECRET-0123456789"


@dataclass
class Reply:
    """One scripted answer. status 200 without body means a normal completion."""

    status: int = 200
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float | None = None  # None: the server's default delay
    drop: bool = False  # close the connection instead of answering


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict


class FakeServer:
    """A tiny HTTP/1.1 keep-alive server speaking just enough of the OpenAI API.

    `script` holds replies for the first requests, in arrival order; once it is
    used up, every request gets a 200 completion after `delay` seconds. `hang_on`
    makes requests whose body contains that string hang (until the test ends). `hold`, an
    asyncio.Event, holds every reply back until it is set.
    """

    def __init__(
        self,
        *,
        delay: float = 0.0,
        script: list[Reply] | None = None,
        usage: dict | None = None,
        hang_on: str | None = None,
        close_after_reply: bool = False,
        hold: asyncio.Event | None = None,
    ) -> None:
        self.delay = delay
        self.hold = hold
        self.script = list(script or [])
        self.usage = {"prompt_tokens": 7, "completion_tokens": 3} if usage is None else usage
        self.hang_on = hang_on
        self.close_after_reply = close_after_reply  # like an expired keep-alive
        self.connections = 0
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.peak = 0
        self._tasks: set[asyncio.Task] = set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> FakeServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request_line, *header_lines = head.split("\r\n")
                headers = {}
                for line in header_lines:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                body = json.loads(raw) if raw else {}
                path = request_line.split(" ")[1]
                self.seen.append(Seen(path, headers, body))
                reply = self.script.pop(0) if self.script else Reply()
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
                try:
                    if self.hang_on and self.hang_on in raw.decode():
                        await asyncio.sleep(3600)
                    if self.hold is not None:
                        await self.hold.wait()
                    await asyncio.sleep(self.delay if reply.delay is None else reply.delay)
                finally:
                    self.in_flight -= 1
                if reply.drop:
                    return
                writer.write(self._response(path, reply))
                await writer.drain()
                if self.close_after_reply:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed the connection
        finally:
            writer.close()
            self._tasks.discard(task)

    def _response(self, path: str, reply: Reply) -> bytes:
        body = reply.body
        if body is None and reply.status == 200:
            if path.endswith("/chat/completions"):
                choice = {"message": {"role": "assistant", "content": "hello"}}
            else:
                choice = {"text": "world"}
            payload = {"choices": [{"index": 0, **choice, "finish_reason": "stop"}]}
            if self.usage:
                payload["usage"] = self.usage
            body = json.dumps(payload).encode()
        body = body or b""
        lines = [f"HTTP/1.1 {reply.status} X", f"content-length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in reply.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def dead_url() -> str:
    """A loopback URL with nothing listening (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def client_for(*base_urls: str, **kwargs) -> EndpointClient:
    settings = dict(
        max_concurrency=8,
        request_timeout_s=5.0,
        failure_budget_s=5.0,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    settings.update(kwargs)
    return EndpointClient("teacher", list(base_urls), "tiny-model", **settings)


MESSAGES = [{"role": "user", "content": "Hi"}]

# Upper bounds on wall time in this file are hang guards only: far above the expected time on
# any host (the expected times are well under a second), far below what a regression would take.
HANG_GUARD_S = 10.0


class RecordedSleeps:
    """Stands in for the client module's `asyncio`: every sleep the client asks for is recorded
    (per task too) and then really slept; everything else is asyncio's own."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.by_task: dict[asyncio.Task, list[float]] = defaultdict(list)

    def __getattr__(self, name: str):
        return getattr(asyncio, name)

    async def sleep(self, delay: float, result=None):
        self.delays.append(delay)
        self.by_task[asyncio.current_task()].append(delay)
        return await asyncio.sleep(delay, result)


@pytest.fixture
def sleeps(monkeypatch) -> RecordedSleeps:
    recorder = RecordedSleeps()
    monkeypatch.setattr(client_module, "asyncio", recorder)
    return recorder


# 1. chat and complete -------------------------------------------------------------


def test_chat_and_complete_return_text_and_tokens_and_send_only_given_fields():
    async def main():
        async with FakeServer() as server:
            async with client_for(server.base_url + "/") as client:
                chat = await client.chat("teacher", MESSAGES, temperature=0.2, max_tokens=5)
                done = await client.complete("generator", "Once", top_p=0.9, seed=3)
        return server, chat, done

    server, chat, done = asyncio.run(main())
    assert chat.text == "hello" and chat.finish_reason == "stop"
    assert (chat.prompt_tokens, chat.completion_tokens) == (7, 3)
    assert chat.seconds > 0 and chat.base_url.endswith("/v1")
    assert done.text == "world" and done.completion_tokens == 3
    assert [s.path for s in server.seen] == ["/v1/chat/completions", "/v1/completions"]
    assert server.seen[0].body == {
        "model": "tiny-model", "messages": MESSAGES, "temperature": 0.2, "max_tokens": 5
    }
    assert server.seen[1].body == {"model": "tiny-model", "prompt": "Once", "top_p": 0.9, "seed": 3}
    assert "authorization" not in server.seen[0].headers  # no key configured


def test_missing_usage_counts_zero_tokens():
    async def main():
        async with FakeServer(usage={}) as server, client_for(server.base_url) as client:
            return await client.chat("teacher", MESSAGES)

    result = asyncio.run(main())
    assert isinstance(result, Completion)
    assert (result.prompt_tokens, result.completion_tokens) == (0, 0)


def test_proxy_variables_are_ignored_unless_asked_for(monkeypatch):
    """Cluster endpoints must not be sent through a site proxy by accident."""
    proxy = dead_url().removesuffix("/v1")
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.setenv("http_proxy", proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    async def main(use_env_proxy: bool):
        async with FakeServer() as server:
            async with client_for(server.base_url, use_env_proxy=use_env_proxy, failure_budget_s=0.3) as client:
                return await client.chat("teacher", MESSAGES)

    assert asyncio.run(main(False)).text == "hello"
    with pytest.raises(EndpointError, match="failed for"):
        asyncio.run(main(True))  # through the (dead) proxy


# 2. concurrency bound ---------------------------------------------------------------


def test_in_flight_requests_are_bounded_and_the_bound_is_reached():
    async def main():
        async with FakeServer(delay=0.2) as server:
            async with client_for(server.base_url, max_concurrency=8) as client:
                await asyncio.gather(*(client.chat("teacher", MESSAGES) for _ in range(50)))
        return server, client

    server, client = asyncio.run(main())
    assert len(server.seen) == 50
    assert server.peak == 8
    assert client.max_in_flight_seen == 8 and client.in_flight == 0
    assert server.connections == 8  # keep-alive: connections are reused


def test_caller_cancellation_propagates_and_is_not_a_failure():
    async def main():
        script = [Reply(delay=5.0)]
        async with FakeServer(script=script) as server, client_for(server.base_url) as client:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.chat("teacher", MESSAGES), 0.2)
            assert client.in_flight == 0
            await client.chat("teacher", MESSAGES)  # the client is still usable
            return client.usage["teacher"]

    usage = asyncio.run(main())
    assert (usage.calls, usage.retries, usage.failures) == (1, 0, 0)


def test_connection_closed_by_server_between_requests_is_replaced_without_retry():
    async def main():
        async with FakeServer(close_after_reply=True) as server:
            async with client_for(server.base_url) as client:
                for _ in range(3):
                    await client.chat("teacher", MESSAGES)
                    await asyncio.sleep(0.05)  # the server's close reaches the client
        return server, client

    server, client = asyncio.run(main())
    assert server.connections == 3
    assert client.usage["teacher"].retries == 0


# 3. least-outstanding balancing -----------------------------------------------------


def test_faster_server_gets_more_requests():
    """The slow server holds its replies until the fast one has answered all the rest: least
    outstanding sends it only its share of the first four (ties alternate), then nothing while
    it has more requests outstanding than the fast one. Counts, not timings: the same on any host."""

    async def main():
        release = asyncio.Event()
        async with FakeServer(hold=release) as slow, FakeServer() as fast:
            async with client_for(slow.base_url, fast.base_url, max_concurrency=4) as client:
                calls = asyncio.gather(*(client.chat("teacher", MESSAGES) for _ in range(60)))
                waited = time.monotonic()
                # A hang guard only: with round-robin the fast server would never reach 58.
                while len(fast.seen) < 58 and time.monotonic() - waited < HANG_GUARD_S:
                    await asyncio.sleep(0.01)
                while_held = len(slow.seen), len(fast.seen)
                release.set()
                await calls
        return while_held, (len(slow.seen), len(fast.seen))

    while_held, final = asyncio.run(main())
    assert while_held == (2, 58)
    assert final == (2, 58)


def test_equal_servers_split_evenly():
    async def main(concurrency: int, requests: int):
        async with FakeServer(delay=0.05) as a, FakeServer(delay=0.05) as b:
            async with client_for(a.base_url, b.base_url, max_concurrency=concurrency) as client:
                for _ in range(requests // concurrency):
                    await asyncio.gather(
                        *(client.chat("teacher", MESSAGES) for _ in range(concurrency))
                    )
        return len(a.seen), len(b.seen)

    a, b = asyncio.run(main(concurrency=6, requests=60))
    assert a + b == 60 and abs(a - b) <= 6
    # One at a time every pick is a tie, so round-robin alternates exactly.
    assert asyncio.run(main(concurrency=1, requests=6)) == (3, 3)


# 4. retries -------------------------------------------------------------------------


def test_retries_500_503_429_and_dropped_connection_then_succeeds():
    script = [Reply(500, b"boom"), Reply(503, b"busy"), Reply(429, b"slow down"), Reply(drop=True)]

    async def main():
        async with FakeServer(script=script) as server, client_for(server.base_url) as client:
            result = await client.chat("teacher", MESSAGES)
        return server, client, result

    server, client, result = asyncio.run(main())
    assert result.text == "hello"
    assert len(server.seen) == 5
    usage = client.usage["teacher"]
    assert (usage.calls, usage.retries, usage.failures) == (1, 4, 0)


def test_time_a_retry_waits_for_a_free_slot_does_not_count_against_the_failure_budget():
    # One slot: the first call fails, then waits behind two slow calls (1.2 s, more than the
    # 0.5 s budget) before its retry, which fails once more; the call after that succeeds.
    script = [Reply(503, b"busy"), Reply(delay=0.6), Reply(delay=0.6), Reply(503, b"busy")]

    async def main():
        async with FakeServer(script=script) as server, client_for(
            server.base_url, max_concurrency=1, failure_budget_s=0.5
        ) as client:
            results = await asyncio.gather(*(client.chat("teacher", MESSAGES) for _ in range(3)))
        return server, client, results

    server, client, results = asyncio.run(main())
    assert [r.text for r in results] == ["hello"] * 3
    assert len(server.seen) == 5
    usage = client.usage["teacher"]
    assert (usage.calls, usage.retries, usage.failures) == (3, 2, 0)


def test_retry_after_is_honoured_and_capped(sleeps):
    async def one(retry_after: str, backoff_max_s: float) -> float:
        script = [Reply(429, b"wait", headers={"Retry-After": retry_after})]
        async with FakeServer(script=script) as server:
            async with client_for(server.base_url, backoff_max_s=backoff_max_s) as client:
                started = time.monotonic()
                await client.chat("teacher", MESSAGES)
                return time.monotonic() - started

    honoured = asyncio.run(one("1", backoff_max_s=5.0))
    capped = asyncio.run(one("120", backoff_max_s=0.2))
    # The one wait each asked for: the server's Retry-After, capped at backoff_max_s (jittered
    # backoff alone would be at most backoff_initial_s, 0.01 s).
    assert sleeps.delays == [1.0, 0.2]
    # ...and really waited: lower bounds that follow from the client's own sleep.
    assert honoured >= 1.0 and capped >= 0.2


# 5. timeout -------------------------------------------------------------------------


def test_hang_past_request_timeout_is_retried(caplog):
    caplog.set_level(logging.WARNING, logger=client_module.__name__)

    async def main():
        # The first reply is held for 60 s: had the client waited for it, it would have been answered.
        async with FakeServer(script=[Reply(delay=60.0)]) as server:
            async with client_for(server.base_url, request_timeout_s=0.5) as client:
                started = time.monotonic()
                result = await client.chat("teacher", MESSAGES)
                return result, client, time.monotonic() - started, len(server.seen)

    result, client, elapsed, requests = asyncio.run(main())
    assert result.text == "hello" and requests == 2
    assert client.usage["teacher"].retries == 1
    assert "TimeoutError: no reply within 0.5 s" in caplog.text  # cut by the client's own timeout
    assert 0.5 <= elapsed < HANG_GUARD_S  # the timeout's own wait; above: a hang guard (the held reply: 60 s)


# 6. one URL refuses connections -----------------------------------------------------


def test_refused_url_is_avoided_and_requests_succeed_on_the_other(sleeps):
    async def main():
        async with FakeServer(delay=0.01) as server:
            # A long backoff (5 s): a refused request must fail over at once, without it.
            async with client_for(
                dead_url(), server.base_url, max_concurrency=4, backoff_initial_s=5.0,
                backoff_max_s=5.0,
            ) as client:
                results = await asyncio.gather(
                    *(client.chat("teacher", MESSAGES) for _ in range(20))
                )
                return server, client, results

    server, client, results = asyncio.run(main())
    assert all(r.base_url == server.base_url for r in results)
    assert len(server.seen) == 20
    retries = client.usage["teacher"].retries
    # The first four picks alternate (two to the dead URL); after its refusal it is avoided, so
    # only requests already headed there are retried.
    assert 2 <= retries <= 4
    assert sleeps.delays == [0.0] * retries  # every fail-over immediate: no backoff slept


# 7. permanent outage ----------------------------------------------------------------


def test_permanent_outage_gives_up_within_budget_and_fails_everyone_fast(sleeps):
    budget = 0.5

    async def main():
        async with client_for(dead_url(), dead_url(), failure_budget_s=budget) as client:
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(client.chat("teacher", MESSAGES) for _ in range(5)), return_exceptions=True
            )
            elapsed = time.monotonic() - started
            slept_before = len(sleeps.delays)
            with pytest.raises(EndpointError) as again:
                await client.chat("referee", MESSAGES)
            return client, outcomes, elapsed, len(sleeps.delays) - slept_before, again.value

    client, outcomes, elapsed, slept_later, again = asyncio.run(main())
    assert all(isinstance(o, EndpointError) for o in outcomes)
    message = str(outcomes[0])
    # One request gave up; the other four got its error at once (their own would name other
    # durations and attempt counts), and so did a later request.
    assert {str(o) for o in outcomes} == {message} and str(again) == message
    assert "\n" not in message
    assert message.startswith("endpoint 'teacher' (http://127.0.0.1:")
    assert "attempts; last error: ClientConnectorError: Cannot connect to host" in message and "server may be down" in message
    # No request ever slept past the budget: its last attempt comes right at the budget's end.
    assert all(sum(delays) <= budget + 1e-6 for delays in sleeps.by_task.values())
    # The request that gave up made one attempt more than it slept.
    attempts = int(message.split(" attempts;")[0].rsplit(" ", 1)[1])
    assert attempts - 1 in {len(delays) for delays in sleeps.by_task.values()}
    # At least the budget, from the client's own accounting; above: a hang guard only.
    assert budget <= elapsed < budget + HANG_GUARD_S
    # The later request failed without an attempt: no retry, no sleep.
    assert slept_later == 0 and client.usage["referee"].retries == 0
    assert client.usage["teacher"].failures == 5 and client.usage["referee"].failures == 1


def test_dead_server_process_ends_the_requests_at_once_with_its_exit_report(sleeps):
    checks = []

    def server_check() -> str | None:
        checks.append(time.monotonic())
        return None if len(checks) < 3 else "the teacher server (pid 7) was killed by SIGKILL while in use"

    async def main():
        async with client_for(dead_url(), failure_budget_s=60.0, server_check=server_check) as client:
            started = time.monotonic()
            outcomes = await asyncio.gather(*(client.chat("teacher", MESSAGES) for _ in range(3)), return_exceptions=True)
            return outcomes, time.monotonic() - started

    outcomes, elapsed = asyncio.run(main())
    assert all(isinstance(o, EndpointError) for o in outcomes)
    message = str(outcomes[0])
    assert {str(o) for o in outcomes} == {message} and "\n" not in message
    assert "the teacher server (pid 7) was killed by SIGKILL while in use" in message
    assert "last error: ClientConnectorError" in message and "re-run the stage" in message
    # Three failed attempts, each followed by a check; the third check found the process gone.
    # The two before it slept one backoff each (at most backoff_max_s, 0.05 s): no more retries.
    assert len(checks) == 3
    assert len(sleeps.delays) == 2 and all(delay <= 0.05 for delay in sleeps.delays)
    # A hang guard that is the behaviour itself: retrying for the failure budget takes 60 s.
    assert elapsed < 30.0, "a dead server must not be retried for the whole failure budget"


def test_in_flight_requests_fail_fast_when_another_gives_up():
    async def main():
        async with FakeServer(hang_on="hang", script=[Reply(503, b"down")] * 1000) as server:
            # request_timeout_s is long: the hanging request must not wait for it.
            async with client_for(
                server.base_url, request_timeout_s=30.0, failure_budget_s=0.3
            ) as client:
                hanging = asyncio.ensure_future(
                    client.chat("teacher", [{"role": "user", "content": "hang"}])
                )

                def hanging_sent() -> int:
                    return sum("hang" in json.dumps(seen.body) for seen in server.seen)

                waited = time.monotonic()  # until the server holds it (a hang guard only above)
                while not hanging_sent() and time.monotonic() - waited < HANG_GUARD_S:
                    await asyncio.sleep(0.01)
                started = time.monotonic()
                failing = asyncio.ensure_future(client.chat("teacher", MESSAGES))
                outcomes = await asyncio.gather(hanging, failing, return_exceptions=True)
                return outcomes, time.monotonic() - started, client, hanging_sent()

    (hanging, failing), elapsed, client, hanging_sent = asyncio.run(main())
    assert isinstance(failing, EndpointError) and "HTTP 503: down" in str(failing)
    # The hanging request got the failing one's error (its own would come after its 30 s
    # timeout and a retry, and name its own attempts), after its one and only attempt.
    assert isinstance(hanging, EndpointError) and str(hanging) == str(failing)
    assert hanging_sent == 1
    # A hang guard that is the behaviour itself: waiting for the request timeout takes 30 s.
    assert elapsed < 15.0
    assert client.in_flight == 0


# 8. non-retryable statuses ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, b'{"error": "bad request"}', "bad request"),
        (422, b'{"detail": "Extra inputs are not permitted: foo"}', "Extra inputs"),
        (401, b"unauthorized", "check the API key environment variable"),
        (404, b"not found", "check the base URL and the served model name"),
        (200, b'{"object": "error"}', "without choices"),
    ],
)
def test_client_errors_are_not_retried(status, body, expected):
    async def main():
        script = [Reply(status, body + b"\n" + b"x" * 500)]
        async with FakeServer(script=script) as server, client_for(server.base_url) as client:
            with pytest.raises(EndpointError) as raised:
                await client.chat("teacher", MESSAGES, foo=1)
            # A rejected request does not mark the client failed.
            await client.chat("teacher", MESSAGES)
            return server, client, str(raised.value)

    server, client, message = asyncio.run(main())
    assert len(server.seen) == 2  # the rejected request was sent once, then the good one
    assert f"HTTP {status}" in message and expected in message
    assert message.startswith(f"endpoint 'teacher' ({server.base_url}/chat/completions)")
    assert "\n" not in message and "x" * 200 not in message  # body cut to 200 chars
    usage = client.usage["teacher"]
    assert (usage.calls, usage.retries, usage.failures) == (1, 0, 1)


# 9. per-role usage ------------------------------------------------------------------


def test_usage_is_accounted_per_role():
    async def main():
        usage = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
        async with FakeServer(usage=usage, script=[Reply(503)]) as server:
            async with client_for(server.base_url) as client:
                await asyncio.gather(
                    *(client.chat("teacher", MESSAGES) for _ in range(3)),
                    *(client.complete("referee", "x") for _ in range(2)),
                )
        return client.usage

    usage = asyncio.run(main())
    teacher, referee = usage["teacher"], usage["referee"]
    assert (teacher.calls + referee.calls, teacher.retries + referee.retries) == (5, 1)
    assert (teacher.calls, teacher.prompt_tokens, teacher.completion_tokens) == (3, 33, 15)
    assert (referee.calls, referee.prompt_tokens, referee.completion_tokens) == (2, 22, 10)
    assert teacher.seconds > 0 and referee.seconds > 0
    assert teacher.failures == referee.failures == 0
    assert set(usage) == {"teacher", "referee"}
    assert isinstance(teacher, RoleUsage)


# 10. the API key never leaks --------------------------------------------------------


def test_api_key_is_sent_but_never_logged_raised_or_repr(caplog):
    caplog.set_level(logging.DEBUG)
    echo = f"invalid key {KEY}".encode()  # a server that echoes the key back

    async def main():
        texts = []
        script = [Reply(503, echo), Reply(200), Reply(401, echo)]
        async with FakeServer(script=script) as server:
            async with client_for(server.base_url, api_key=KEY) as client:
                texts.append(repr(client))
                await client.chat("teacher", MESSAGES)  # retried once, then fine
                with pytest.raises(EndpointError) as rejected:
                    await client.chat("teacher", MESSAGES)
                texts += [str(rejected.value), repr(rejected.value)]
        async with client_for(dead_url(), api_key=KEY, failure_budget_s=0.2) as client:
            texts.append(repr(client))
            outcomes = await asyncio.gather(
                *(client.chat("teacher", MESSAGES) for _ in range(3)), return_exceptions=True
            )
        for outcome in outcomes:
            assert isinstance(outcome, EndpointError)
            texts += [str(outcome), repr(outcome), repr(outcome.__cause__)]
        return server, texts

    server, texts = asyncio.run(main())
    assert all(s.headers["authorization"] == f"Bearer {KEY}" for s in server.seen)
    assert "***" in texts[1]  # the echoed key was scrubbed from the 401 message
    for text in texts:
        assert KEY not in text
    assert caplog.records, "expected retry logs"
    for record in caplog.records:
        assert KEY not in record.getMessage()
    assert KEY not in caplog.text


def test_each_base_url_gets_its_own_key_and_every_key_is_scrubbed():
    """Published replicas each require their own key (serving/access.py): a request carries the
    key of the URL it goes to, and no error message shows any of them."""
    second_key = "sk-second-SECRET-9876543210"

    async def main():
        async with FakeServer() as first, FakeServer(script=[Reply(401, f"bad {second_key}".encode())]) as second:
            keys = {first.base_url: KEY, second.base_url + "/": second_key}  # a trailing slash is the same URL
            async with client_for(first.base_url, second.base_url, api_keys=keys) as client:
                outcomes = await asyncio.gather(
                    *(client.chat("teacher", MESSAGES) for _ in range(6)), return_exceptions=True
                )
        return first, second, outcomes

    first, second, outcomes = asyncio.run(main())
    assert first.seen and second.seen
    assert {s.headers["authorization"] for s in first.seen} == {f"Bearer {KEY}"}
    assert {s.headers["authorization"] for s in second.seen} == {f"Bearer {second_key}"}
    errors = [str(outcome) for outcome in outcomes if isinstance(outcome, EndpointError)]
    assert errors and all(second_key not in error and "***" in error for error in errors)
