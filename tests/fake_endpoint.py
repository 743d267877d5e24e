"""A fake OpenAI-compatible endpoint for running the stages without model servers.

The tiny real models never produce unreadable reviews, garbage generator replies or empty
answers; a fake endpoint does, on demand. `FakeEndpoint` is a small aiohttp app in a background
thread (the stages call asyncio.run themselves, so it lives outside their event loop) that
records every request body and answers each role from a Python callable the test sets in
`handlers`: the completions endpoint is the student; a chat whose last message holds
"[Answer of Assistant 1]" is the referee, one holding "#New Instruction#" the generator, any
other chat the teacher. A handler takes the request body and returns (text, finish_reason), or
(text, finish_reason, logprobs) with the OpenAI chat `logprobs.content` list (for the completions
endpoint: vLLM's `prompt_logprobs` list);
`latency_s` holds a role's replies back for a fixed time, as a busy server would.

`FakeServers` stands in for lion_local.endpoints.servers.ServerSet: its clients are real EndpointClients pointed at
the fake, so everything from the HTTP request to the journals is the stages' own code.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter
from collections.abc import Callable

from aiohttp import web

from lion_local.endpoints.client import EndpointClient

Reply = tuple[str, str | None] | tuple[str, str | None, list[dict]]
Handler = Callable[[dict], Reply]


class FakeEndpoint:
    """An OpenAI-compatible endpoint on 127.0.0.1 answering each role from a settable callable."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.latency_s: dict[str, float] = {}  # role -> seconds each of its replies is held back
        self.requests: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-endpoint", daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def start(self) -> None:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def reset(self) -> None:
        """Forget the requests recorded so far (a fresh recorder)."""
        with self._lock:
            self.requests.clear()

    def bodies(self, role: str) -> list[dict]:
        with self._lock:
            return [body for r, body in self.requests if r == role]

    def roles(self) -> Counter:
        with self._lock:
            return Counter(r for r, _ in self.requests)

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        content = body["messages"][-1]["content"]
        if "[Answer of Assistant 1]" in content:
            role = "referee"
        elif "#New Instruction#" in content:
            role = "generator"
        else:
            role = "teacher"
        await asyncio.sleep(self.latency_s.get(role, 0.0))
        return self._reply(role, body, chat=True)

    async def _completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(self.latency_s.get("student", 0.0))
        return self._reply("student", body, chat=False)

    def _reply(self, role: str, body: dict, chat: bool) -> web.Response:
        with self._lock:
            self.requests.append((role, body))
        handler = self.handlers.get(role)
        if handler is None:
            # 400 is not retried: the stage fails at once with this message.
            return web.json_response({"error": f"fake endpoint: no handler for the {role}"}, status=400)
        try:
            text, finish_reason, *logprobs = handler(body)
        except Exception as exc:  # noqa: BLE001 (a broken test handler must fail the stage fast, not hang it)
            return web.json_response({"error": f"fake {role} handler raised {exc!r}"}, status=400)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            if logprobs:
                choice["logprobs"] = {"content": logprobs[0]}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason}
            if logprobs:  # a completions handler's third element: vLLM's prompt_logprobs
                choice["prompt_logprobs"] = logprobs[0]
        usage = {"prompt_tokens": 11, "completion_tokens": len(text.split())}
        return web.json_response({"id": "fake", "model": body.get("model"), "choices": [choice], "usage": usage})


_STUDENT_INSTRUCTION = re.compile(r"### Instruction:\n(?P<instruction>.*?)\n\n### Response:", re.DOTALL)


def answering_endpoint() -> FakeEndpoint:
    """A started FakeEndpoint whose teacher answers "TEACHER: answer to <its prompt>" and whose student
    answers "STUDENT: answer to <the instruction>", so a referee handler can tell the two apart."""
    endpoint = FakeEndpoint()
    endpoint.start()
    endpoint.handlers["teacher"] = lambda body: ("TEACHER: answer to " + body["messages"][-1]["content"], "stop")
    endpoint.handlers["student"] = lambda body: (
        "STUDENT: answer to " + _STUDENT_INSTRUCTION.search(body["prompt"])["instruction"], "stop"
    )
    return endpoint


class FakeServers:
    """What the stages use of ServerSet: start, open_client(name, model), stop(name),
    stop_for_training(), stop_all(); `client` is the synchronous helper tests call directly."""

    def __init__(self, endpoint: FakeEndpoint) -> None:
        self.endpoint = endpoint
        self.clients: list[tuple[str, str | None]] = []
        self.stopped: list[str] = []
        self.running: set[str] = set()  # stop(name), as ServerSet's, stops only a running server
        self.requests_at_stop: dict[str, Counter] = {}  # name -> requests per role when it was stopped

    def client(self, name: str, model: str | None = None) -> EndpointClient:
        self.clients.append((name, model))
        return EndpointClient(
            name,
            [self.endpoint.url + "/v1"],
            "fake-model",
            max_concurrency=4,
            request_timeout_s=5,
            failure_budget_s=2,
            backoff_initial_s=0.05,
            backoff_max_s=0.1,
        )

    async def start(self, wanted: dict[str, str | None]) -> None:
        self.started = getattr(self, "started", []) + [dict(wanted)]
        self.running.update(wanted)

    async def open_client(self, name: str, model: str | None = None) -> EndpointClient:
        self.running.add(name)
        return self.client(name, model)

    async def stop(self, name: str) -> None:
        if name in self.running:
            self.running.discard(name)
            self.stopped.append(name)
            self.requests_at_stop[name] = self.endpoint.roles()

    async def stop_for_training(self) -> None:
        self.stopped.append("for training")

    async def stop_all(self) -> None:
        self.stopped.append("*")
