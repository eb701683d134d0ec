"""A scripted OpenAI-compatible chat server for the judge's tests: ``POST
/v1/chat/completions`` in a thread (``http.server``), each request answered by the test's
``script(body, n)`` (``n``: how many requests with the same messages came before), every
request recorded (headers and JSON body)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    """status, the raw body, extra headers, and seconds to wait before answering."""

    status: int = 200
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def ok(content: str) -> Reply:
    """A chat completion whose message is ``content``."""
    body = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
    }
    return Reply(body=json.dumps(body))


def user_text(body: dict[str, Any]) -> str:
    """The user message of a recorded request."""
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


class ChatServer:
    """``with ChatServer(script) as s:`` serves on ``s.url`` (``http://127.0.0.1:PORT/v1``);
    ``s.requests``: ``(headers, body)`` of every request, in arrival order."""

    def __init__(self, script: Callable[[dict[str, Any], int], Reply]):
        self.script = script
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                with server._lock:
                    server.requests.append((dict(self.headers), body))
                    key = json.dumps(body["messages"])
                    n = server._seen.get(key, 0)
                    server._seen[key] = n + 1
                if self.path != "/v1/chat/completions":
                    reply = Reply(404, '{"error": "not found"}')
                else:
                    reply = server.script(body, n)
                time.sleep(reply.delay)
                try:
                    data = reply.body.encode()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the timeout case)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def bodies_for(self, needle: str) -> list[dict[str, Any]]:
        """The recorded bodies whose user message contains ``needle``."""
        return [b for _, b in self.requests if needle in user_text(b)]
