"""A fast OpenAI-compatible server that plays the teacher-side roles for scale benchmarks.

    python benchmarks/role_server.py [--port 0] [--port-file F] [--words-from real_instructions.jsonl]

A real HTTP server in its own process (raw asyncio HTTP/1.1 with keep-alive), so a benchmark
measures lion-local rather than a tiny teacher. It answers POST /v1/chat/completions by the
request's `model`:

- teacher: an answer of 12 to 60 words drawn from the instruction's own words and a vocabulary;
- referee: a one- or two-sentence explanation, then the two lines the explain_first prompt asks
  for ("Score of Assistant 1: <score>"); each answer's score is fixed by its text (3 to 9), and
  one review in five gives Assistant 1 a point more, so both orders sometimes disagree;
- generator: a new instruction of 5 to 11 words; one reply in 25 is too short and one in 50
  holds a banned word, so the generation filters reject some.

Every reply is a pure function of the request (its messages, seed and max_tokens), so a re-run
gets the same replies; replies longer than max_tokens words are cut with finish_reason
"length". GET /health and GET /v1/models answer too. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import signal
from collections.abc import Callable
from pathlib import Path

MODELS = ("teacher", "referee", "generator")
_FALLBACK_WORDS = (
    "data model system energy water market design history music city health network language "
    "science policy report process signal story method table value garden planet memory"
).split()
_WORD = re.compile(r"[A-Za-z]{3,}")
_QUESTION = re.compile(r"\[Question\]\n(.*?)\n\n\[Answer of Assistant 1\]", re.DOTALL)
_ANSWERS = re.compile(
    r"\[Answer of Assistant 1\]\n(.*?)\n\[End of Answer of Assistant 1\].*?"
    r"\[Answer of Assistant 2\]\n(.*?)\n\[End of Answer of Assistant 2\]",
    re.DOTALL,
)
_VERBS = ("Describe", "Explain", "Compare", "Summarize", "List", "Write", "Suggest", "Classify", "Outline", "Rewrite")


def vocabulary(words_from: Path | None) -> list[str]:
    """Distinct lowercase words of an instruction file (JSONL with "instruction"), else a short list."""
    if words_from is None:
        return list(_FALLBACK_WORDS)
    words: dict[str, None] = {}
    with open(words_from, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                words.update(dict.fromkeys(w.lower() for w in _WORD.findall(json.loads(line).get("instruction", ""))))
    words.pop("instruction", None)  # a banned word of the generation filters
    return sorted(words) or list(_FALLBACK_WORDS)


class Roles:
    """The replies of each role, a pure function of the request."""

    def __init__(self, words: list[str]) -> None:
        self.words = words

    def reply(self, request: dict) -> tuple[str, int, str]:
        """(text, completion words, finish_reason) for a chat completion request."""
        messages = request.get("messages") or []
        prompt = "\n".join(str(m.get("content", "")) for m in messages)
        draw = random.Random(hashlib.sha256(f"{request.get('seed')}|{prompt}".encode()).digest())
        model = request.get("model")
        if model == "teacher":
            text = self._teacher(prompt, draw)
        elif model == "referee":
            text = self._referee(prompt, draw)
        else:
            text = self._generator(draw)
        words = text.split(" ")
        limit = int(request.get("max_tokens") or 1 << 30)
        if len(words) > limit:
            return " ".join(words[:limit]), limit, "length"
        return text, len(words), "stop"

    def _teacher(self, prompt: str, draw: random.Random) -> str:
        own = [w.lower() for w in _WORD.findall(prompt.rsplit("\n", 1)[-1])] or self.words
        words = [draw.choice(own) if draw.random() < 0.3 else draw.choice(self.words) for _ in range(draw.randint(12, 60))]
        return (" ".join(words).capitalize() + ".").replace(" .", ".")

    def _referee(self, prompt: str, draw: random.Random) -> str:
        found = _ANSWERS.search(prompt)
        first, second = found.groups() if found else ("", "")
        scores = [3 + int(hashlib.sha256(answer.encode()).hexdigest(), 16) % 7 for answer in (first, second)]
        if draw.random() < 0.2:
            scores[0] = min(10, scores[0] + 1)
        question = _QUESTION.search(prompt)
        topic = " ".join(_WORD.findall(question.group(1))[:4]) if question else "the question"
        explanation = f"Both answers address {topic.lower() or 'the question'}."
        if draw.random() < 0.5:
            explanation += f" Assistant {1 if scores[0] >= scores[1] else 2} is more {draw.choice(('precise', 'complete', 'relevant', 'helpful'))}."
        return f"{explanation}\nScore of Assistant 1: {scores[0]}\nScore of Assistant 2: {scores[1]}"

    def _generator(self, draw: random.Random) -> str:
        roll = draw.random()
        if roll < 0.04:
            return f"{draw.choice(_VERBS)} {draw.choice(self.words)}."
        words = [draw.choice(self.words) for _ in range(draw.randint(4, 10))]
        if roll < 0.06:
            words[0] = "instruction"
        return f"{draw.choice(_VERBS)} {' '.join(words)}."


def _response(status: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


def next_request(buffer: bytearray) -> tuple[str, bytes] | None:
    """Take one complete HTTP/1.1 request (head and Content-Length body) off the front of
    `buffer`: (request line, body); None while it is incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    length = next((int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:")), 0)
    if len(buffer) < end + 4 + length:
        return None
    body = bytes(buffer[end + 4 : end + 4 + length])
    del buffer[: end + 4 + length]
    return lines[0], body


class RequestProtocol(asyncio.Protocol):
    """Minimal keep-alive HTTP/1.1 server side: each complete request goes to
    handle(transport, request line, body), which writes the reply now or later."""

    def __init__(self, handle: Callable[[asyncio.Transport, str, bytes], None]) -> None:
        self.handle = handle
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (request := next_request(self.buffer)) is not None:
            assert self.transport is not None
            self.handle(self.transport, *request)


class _Replies:
    """The role server's reply to each request, written at once."""

    def __init__(self, roles: Roles) -> None:
        self.roles = roles

    def handle(self, transport: asyncio.Transport, request_line: str, body: bytes) -> None:
        transport.write(self._answer(request_line, body))

    def _answer(self, request_line: str, body: bytes) -> bytes:
        method, _, rest = request_line.partition(" ")
        path = rest.split(" ", 1)[0]
        if method == "GET" and path == "/health":
            return _response("200 OK", b"{}")
        if method == "GET" and path == "/v1/models":
            return _response("200 OK", json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in MODELS]}).encode())
        if method != "POST" or not path.endswith("/chat/completions"):
            return _response("404 Not Found", b'{"error": {"message": "not found"}}')
        try:
            request = json.loads(body)
        except ValueError:
            return _response("400 Bad Request", b'{"error": {"message": "body is not JSON"}}')
        if request.get("model") not in MODELS:
            return _response("404 Not Found", json.dumps({"error": {"message": f"no model {request.get('model')!r}"}}).encode())
        text, completion_tokens, finish_reason = self.roles.reply(request)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in request.get("messages") or [])
        reply = {
            "id": "chatcmpl-roles", "object": "chat.completion", "created": 0, "model": request["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        return _response("200 OK", json.dumps(reply).encode())


async def serve(port: int, port_file: Path | None, roles: Roles) -> None:
    loop = asyncio.get_running_loop()
    replies = _Replies(roles)
    server = await loop.create_server(lambda: RequestProtocol(replies.handle), "127.0.0.1", port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    if port_file is not None:
        temporary = port_file.with_name(port_file.name + ".tmp")
        temporary.write_text(f"{bound}\n", encoding="utf-8")
        temporary.replace(port_file)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here (atomically) once listening")
    parser.add_argument("--words-from", type=Path, help="JSONL of instructions whose words make the vocabulary")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.port_file, Roles(vocabulary(args.words_from))))


if __name__ == "__main__":
    main()
