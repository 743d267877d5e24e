"""One async client for OpenAI-compatible endpoints (vLLM, ``transformers serve``, ...).

Every role (teacher, referee, generator, student) talks to its server through an
:class:`EndpointClient`. The client bounds concurrency, balances over several base
URLs, retries transient failures and keeps per-role token/time accounting.

Retry and failure-budget policy
-------------------------------
* Retryable: connection errors, timeouts, HTTP 408, 429 and 5xx. Before the next
  attempt the request sleeps ``uniform(0, min(backoff_max_s, backoff_initial_s *
  2**n))`` (exponential backoff with full jitter; ``n`` = retries so far), or the
  server's ``Retry-After`` seconds (capped at ``backoff_max_s``) when it sends one.
  A base URL that refused a connection is avoided for that backoff ceiling if
  another URL is available, and the request fails over to it without sleeping.
* Not retryable: any other non-2xx status (400, 401, 403, 404, 422, ...) and a 2xx
  reply without ``choices``. These raise :class:`EndpointError` at once; retrying a
  malformed request only wastes the budget.
* Failure budget: a request that keeps failing retryably for ``failure_budget_s``
  (counted from its first failure; the last attempt may add up to one
  ``request_timeout_s``) gives up with an :class:`EndpointError`. The server is then
  presumed down, so the client is marked failed and every pending and future
  request raises the same error at once: the stage stops early and can be re-run.
* A server process lion-local started itself is checked after every failed attempt
  (``server_check``); once it has exited, the client gives up at once with the exit
  code and the server's log instead of retrying a dead server for the whole budget.

The API key is sent only as a header; every message this module builds comes from
the status, URL and body, and is scrubbed of the key as a last line of defence.

HTTP goes through aiohttp: its connection pool costs a few tens of microseconds per request
at 256 connections, where httpx's pool rescans every connection on each request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from lion_local.errors import LionError

logger = logging.getLogger(__name__)

_HINTS = {
    401: "check the API key environment variable",
    403: "check the API key environment variable",
    404: "check the base URL and the served model name",
}


IDLE_CONNECTION_S = 4.0


class EndpointError(LionError):
    """A request to an endpoint failed for good; the message is one line."""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    base_url: str
    # Chat replies asked with logprobs: one {"token", "logprob", "top_logprobs"} per generated token.
    logprobs: list[dict] | None = None
    # Completions asked with vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {"logprob"}}.
    prompt_logprobs: list[dict | None] | None = None


@dataclass
class RoleUsage:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    retries: int = 0
    failures: int = 0


@dataclass
class _Retryable:
    """A failed attempt that is worth repeating."""

    base_url: str
    error: str
    retry_after: float | None = None
    refused: bool = False  # the connection itself failed: the URL may be down
    queued_s: float = 0.0  # time the attempt waited for a free slot before it was sent


class EndpointClient:
    """Client for one logical endpoint (one served model) behind one or more base URLs."""

    def __init__(
        self,
        name: str,
        base_urls: list[str],
        model: str,
        *,
        api_key: str | None = None,
        api_keys: Mapping[str, str] | None = None,
        max_concurrency: int = 64,
        request_timeout_s: float = 600.0,
        failure_budget_s: float = 300.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        use_env_proxy: bool = False,
        server_check: Callable[[], str | None] | None = None,
    ) -> None:
        if not base_urls:
            raise ValueError(f"endpoint {name!r} needs at least one base URL")
        if max_concurrency < 1:
            raise ValueError(f"endpoint {name!r}: max_concurrency must be >= 1")
        for url in base_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"endpoint {name!r}: base URL {url!r} needs http:// or https://")
        self.name = name
        self.base_urls = [url.rstrip("/") for url in base_urls]
        self.model = model
        self.max_concurrency = max_concurrency
        self.request_timeout_s = request_timeout_s
        self.failure_budget_s = failure_budget_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        # A key per base URL: `api_keys` names some (published replicas each have their own), api_key the rest.
        keys = {url.rstrip("/"): key for url, key in (api_keys or {}).items()}
        self._keys = {url: keys.get(url, api_key) for url in self.base_urls}
        self._server_check = server_check  # returns why the server process is gone, or None
        self.usage: dict[str, RoleUsage] = {}
        self.in_flight = 0
        self.max_in_flight_seen = 0

        self._headers = {url: {"Authorization": f"Bearer {key}"} if key else {} for url, key in self._keys.items()}
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s, connect=min(10.0, request_timeout_s))
        # One session per base URL, created in the running event loop, each sending its URL's key:
        # a header set per request costs a tenth more client CPU per call.
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        # Off by default: endpoints are usually on the cluster's own network, and reading the
        # proxy variables costs a thread-pool round trip per request in aiohttp.
        self._use_env_proxy = use_env_proxy
        self._slots = asyncio.Semaphore(max_concurrency)
        self._outstanding = {url: 0 for url in self.base_urls}
        self._avoid_until = {url: 0.0 for url in self.base_urls}
        self._next = 0  # round-robin start, so ties spread evenly over the URLs
        self._failure: str | None = None  # set once a request exhausts the failure budget
        self._waiting: set[asyncio.Task] = set()  # tasks inside chat()/complete()
        self._aborted: set[asyncio.Task] = set()  # those cancelled by _give_up
        self._degraded = False  # warn once per outage, not once per request

    def __repr__(self) -> str:
        return (
            f"EndpointClient(name={self.name!r}, base_urls={self.base_urls!r}, "
            f"model={self.model!r}, max_concurrency={self.max_concurrency})"
        )

    async def __aenter__(self) -> EndpointClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()

    def _http(self, base_url: str) -> aiohttp.ClientSession:
        session = self._sessions.get(base_url)
        if session is None:
            # The semaphore bounds connections in use; the pool just keeps them alive, for less
            # time than vLLM's server does (uvicorn closes an idle connection after 5 s): a
            # connection reused just as the server closes it fails as "Server disconnected".
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=IDLE_CONNECTION_S)
            session = self._sessions[base_url] = aiohttp.ClientSession(
                connector=connector, headers=self._headers[base_url], timeout=self._timeout, trust_env=self._use_env_proxy
            )
        return session

    async def chat(self, role: str, messages: list[dict], **params: Any) -> Completion:
        """POST /chat/completions; `params` (temperature, max_tokens, ...) go as given."""
        payload = {"model": self.model, "messages": messages, **params}
        return await self._request(role, "/chat/completions", payload)

    async def complete(self, role: str, prompt: str | list[int], **params: Any) -> Completion:
        """POST /completions (the prompt as text, or as token ids); `params` go into the body as given."""
        payload = {"model": self.model, "prompt": prompt, **params}
        return await self._request(role, "/completions", payload)

    async def _request(self, role: str, path: str, payload: dict) -> Completion:
        usage = self.usage.setdefault(role, RoleUsage())
        task = asyncio.current_task()
        self._waiting.add(task)
        try:
            try:
                if self._failure is not None:
                    raise EndpointError(self._failure)
                return await self._with_retries(usage, path, payload)
            except asyncio.CancelledError:
                # Cancelled by _give_up (not by our caller): report the outage instead.
                if task not in self._aborted:
                    raise
                if hasattr(task, "uncancel"):  # Python 3.11+: keep asyncio.timeout() sane
                    task.uncancel()
                raise EndpointError(self._failure) from None
        except EndpointError:
            usage.failures += 1
            raise
        finally:
            self._waiting.discard(task)
            self._aborted.discard(task)

    async def _with_retries(self, usage: RoleUsage, path: str, payload: dict) -> Completion:
        # The failure budget counts the time since the first failure less the time retries spent
        # queued for a slot: behind thousands of queued calls a retry may wait minutes for its
        # turn, which is no sign of an outage.
        failing_for = 0.0
        last_failure: float | None = None
        attempts = 0
        while True:
            attempts += 1
            outcome = await self._attempt(path, payload)
            if isinstance(outcome, Completion):
                self._degraded = False
                usage.calls += 1
                usage.prompt_tokens += outcome.prompt_tokens
                usage.completion_tokens += outcome.completion_tokens
                usage.seconds += outcome.seconds
                return outcome

            now = time.monotonic()
            if last_failure is not None:
                failing_for += max(0.0, now - last_failure - outcome.queued_s)
            last_failure = now
            url = outcome.base_url + path
            gone = self._server_check() if self._server_check is not None else None
            if gone is not None:
                self._give_up(url, failing_for, attempts, outcome.error, gone)
            if failing_for >= self.failure_budget_s:
                self._give_up(url, failing_for, attempts, outcome.error)

            ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(attempts - 1, 30))
            if outcome.retry_after is not None:
                delay = min(self.backoff_max_s, outcome.retry_after)
            else:
                delay = random.uniform(0.0, ceiling)
            if outcome.refused:
                self._avoid_until[outcome.base_url] = now + ceiling
                if any(until <= now for until in self._avoid_until.values()):
                    delay = 0.0  # another URL looks healthy: fail over at once
            # Never sleep past the budget: the last attempt happens right at its end.
            delay = min(delay, self.failure_budget_s - failing_for)

            usage.retries += 1
            if not self._degraded:
                self._degraded = True
                logger.warning(
                    "endpoint %r (%s): %s; retrying for up to %g s",
                    self.name, url, self._scrub(outcome.error), self.failure_budget_s,
                )
            logger.debug(
                "endpoint %r (%s): attempt %d failed: %s; sleeping %.3f s",
                self.name, url, attempts, self._scrub(outcome.error), delay,
            )
            await asyncio.sleep(delay)

    async def _attempt(self, path: str, payload: dict) -> Completion | _Retryable:
        waiting_since = time.monotonic()
        async with self._slots:
            queued_s = time.monotonic() - waiting_since
            base_url = self._pick_url()
            url = base_url + path
            self._outstanding[base_url] += 1
            self.in_flight += 1
            self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
            started = time.perf_counter()
            try:
                async with self._http(base_url).post(url, json=payload) as response:
                    status = response.status
                    body_text = await response.text(errors="replace")
                    retry_after = _retry_after(response.headers.get("Retry-After"))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                return _Retryable(base_url, _describe(exc, self.request_timeout_s), refused=_refused(exc), queued_s=queued_s)
            finally:
                self._outstanding[base_url] -= 1
                self.in_flight -= 1
            seconds = time.perf_counter() - started

        if status in (408, 429) or status >= 500:
            return _Retryable(base_url, f"HTTP {status}: {_snippet(body_text)}", retry_after=retry_after, queued_s=queued_s)
        if not 200 <= status < 300:
            hint = _HINTS.get(status, "the request was rejected and will not be retried")
            raise self._error(url, f"returned HTTP {status}: {_snippet(body_text)}; {hint}")
        try:
            body = json.loads(body_text)
            choice = body["choices"][0]
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            usage = body.get("usage") or {}
            completion = Completion(
                text=text or "",
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                seconds=seconds,
                base_url=base_url,
                logprobs=(choice.get("logprobs") or {}).get("content") if isinstance(message, dict) else None,
                prompt_logprobs=choice.get("prompt_logprobs"),
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise self._error(
                url,
                f"returned HTTP {status} without choices: {_snippet(body_text)}; "
                "is this an OpenAI-compatible server?",
            ) from None
        return completion

    def _pick_url(self) -> str:
        """Least outstanding requests; ties go round-robin; just-refused URLs last."""
        start, self._next = self._next, (self._next + 1) % len(self.base_urls)
        order = self.base_urls[start:] + self.base_urls[:start]
        now = time.monotonic()
        healthy = [url for url in order if self._avoid_until[url] <= now] or order
        return min(healthy, key=self._outstanding.__getitem__)

    def _give_up(self, url: str, failing_for: float, attempts: int, error: str, gone: str | None = None) -> None:
        if gone is not None:
            self._failure = self._scrub(
                f"endpoint '{self.name}' ({url}): {gone}; last error: {error}; fix the cause, then re-run the stage"
            )
        else:
            self._failure = self._scrub(
                f"endpoint '{self.name}' ({url}) failed for {failing_for:.1f} s over "
                f"{attempts} attempts; last error: {error}; the server may be down or "
                "overloaded: check it, then re-run the stage"
            )
        logger.error("%s", self._failure)
        # Fail fast: every other request of this client stops waiting on a dead server.
        current = asyncio.current_task()
        for task in self._waiting:
            if task is not current and not task.done():
                self._aborted.add(task)
                task.cancel()
        raise EndpointError(self._failure)

    def _error(self, url: str, detail: str) -> EndpointError:
        return EndpointError(self._scrub(f"endpoint '{self.name}' ({url}) {detail}"))

    def _scrub(self, message: str) -> str:
        message = " ".join(message.split())  # one line, whatever the server sent
        for key in self._keys.values():
            if key:
                message = message.replace(key, "***")
        return message


def _snippet(body: str) -> str:
    return " ".join(body[:200].split()) or "<empty body>"


def _retry_after(header: str | None) -> float | None:
    try:
        seconds = float(header or "")
    except ValueError:
        return None  # absent, or an HTTP date: fall back to jittered backoff
    return seconds if seconds >= 0 else None


def _refused(exc: BaseException) -> bool:
    """The connection itself could not be made: the URL may be down, try another one."""
    return isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, asyncio.TimeoutError) and not isinstance(exc, aiohttp.ClientError):
        return f"TimeoutError: no reply within {timeout_s:g} s"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
