"""A small scripted OpenAI-compatible HTTP server on 127.0.0.1, for tests and benches.

It speaks `POST /v1/chat/completions` and `GET /v1/models` the way the openai client
expects, and counts on the server side what a client cannot fake: requests received,
requests answered, the most requests in flight at once. Faults are injected in arrival
order: "429:<seconds>" (rate limited, with Retry-After), "500", "garbage" (a 200 whose body
is not JSON). `respond(body) -> str` decides the assistant's content.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client killed mid-request (the crash tests do this on purpose) is not an error here.
        pass


def echo(body: dict) -> str:
    return json.dumps({"echo": body["messages"][-1]["content"][:40]})


class ScriptedServer:
    def __init__(
        self,
        respond: Callable[[dict], str] = echo,
        latency_s: float = 0.0,
        faults: list[str] | None = None,
    ):
        self.respond = respond
        self.latency_s = latency_s
        self.faults = list(faults or [])
        self.lock = threading.Lock()
        self.requests = 0  # chat requests received, faults included
        self.answered = 0  # chat requests answered with a 200 and a completion
        self.in_flight = 0
        self.max_in_flight = 0
        self.log: list[dict] = []  # per request: body, authorization, status, arrival time
        self.httpd = _QuietServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "ScriptedServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset_counts(self) -> None:
        with self.lock:
            self.requests = self.answered = self.max_in_flight = 0
            self.log.clear()

    def bodies(self) -> list[dict]:
        return [entry["body"] for entry in self.log]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]}).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    fault = server.faults.pop(0) if server.faults else None
                    entry = {"body": body, "authorization": self.headers.get("Authorization"), "t": time.monotonic()}
                    server.log.append(entry)
                try:
                    if server.latency_s:
                        time.sleep(server.latency_s)
                    entry["status"] = self._answer(body, fault)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, body: dict, fault: str | None) -> int:
                if fault and fault.startswith("429"):
                    retry_after = fault.partition(":")[2] or "1"
                    self._send(429, b'{"error": {"message": "rate limited"}}', {"Retry-After": retry_after})
                    return 429
                if fault == "500":
                    self._send(500, b'{"error": {"message": "internal error"}}')
                    return 500
                if fault == "garbage":
                    self._send(200, b"<html>not json</html>")
                    return 200
                content = server.respond(body)
                prompt_chars = sum(len(m.get("content") or "") for m in body.get("messages", []))
                reply = {
                    "id": "chatcmpl-stub",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body.get("model", "stub"),
                    "choices": [
                        {"index": 0, "finish_reason": "length" if fault == "length" else "stop",
                         "message": {"role": "assistant", "content": content}}
                    ],
                    "usage": {
                        "prompt_tokens": prompt_chars // 4 + 1,
                        "completion_tokens": len(content) // 4 + 1,
                        "total_tokens": prompt_chars // 4 + len(content) // 4 + 2,
                    },
                }
                self._send(200, json.dumps(reply).encode())
                with server.lock:
                    server.answered += 1
                return 200

        return Handler
