"""A small scripted OpenAI-compatible HTTP server on 127.0.0.1, for tests and benches.

It speaks `POST /v1/chat/completions` and `GET /v1/models` the way the openai client
expects, and counts on the server side what a client cannot fake: requests received,
requests answered, the most requests in flight at once. Faults are injected in arrival
order: "429:<seconds>" (rate limited, with Retry-After, answered at once), "500", "garbage" (a 200
whose body is not JSON). `respond(body) -> str` decides the assistant's content.

It also speaks the OpenAI Batch API: `POST /v1/files` (multipart, purpose batch), `POST /v1/batches`,
`GET /v1/batches/<id>` and `GET /v1/files/<id>/content`. A batch runs for `batch_delay_s` after it is
created, then answers each line with `respond`; `batch_outcome` ("completed", "expired", "failed")
and `batch_failed_lines` (the first N lines answer HTTP 500) script what goes wrong.
"""

from __future__ import annotations

import email.parser
import json
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client killed mid-request (the crash tests do this on purpose) is not an error here.
        pass


def usage(body: dict, content: str) -> dict:
    """Token counts as the stub reports them: about 4 characters a token."""
    prompt = sum(len(m.get("content") or "") for m in body.get("messages", [])) // 4 + 1
    completion = len(content) // 4 + 1
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def echo(body: dict) -> str:
    return json.dumps({"echo": body["messages"][-1]["content"][:40]})


class ScriptedServer:
    def __init__(
        self,
        respond: Callable[[dict], str] = echo,
        latency_s: float = 0.0,
        faults: list[str] | None = None,
        batch_delay_s: float = 0.0,
        batch_outcome: str = "completed",
        batch_failed_lines: int = 0,
    ):
        self.respond = respond
        self.batch_delay_s, self.batch_outcome, self.batch_failed_lines = (
            batch_delay_s,
            batch_outcome,
            batch_failed_lines,
        )
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}  # id: the batch object, plus "_created" (monotonic) while it runs
        self.batch_polls = 0
        self.batch_http_requests = 0  # files and batches requests received
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
                if self.path.startswith("/v1/batches/") or self.path.startswith("/v1/files/"):
                    time.sleep(server.latency_s)
                    return server.batch_get(self)
                if self.path.rstrip("/").endswith("/models"):
                    self._send(
                        200,
                        json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]}).encode(),
                    )
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.startswith("/v1/files") or self.path.startswith("/v1/batches"):
                    time.sleep(server.latency_s)
                    return server.batch_post(self, raw)
                body = json.loads(raw or b"{}")
                with server.lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    fault = server.faults.pop(0) if server.faults else None
                    entry = {
                        "body": body,
                        "authorization": self.headers.get("Authorization"),
                        "t": time.monotonic(),
                    }
                    server.log.append(entry)
                try:
                    if server.latency_s and not (fault or "").startswith("429"):
                        time.sleep(server.latency_s)
                    entry["status"] = self._answer(body, fault)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, body: dict, fault: str | None) -> int:
                if fault and fault.startswith("429"):  # at once: the cool-down tests time from it
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
                reply = {
                    "id": "chatcmpl-stub",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body.get("model", "stub"),
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "length" if fault == "length" else "stop",
                            "message": {"role": "assistant", "content": content},
                        }
                    ],
                    "usage": usage(body, content),
                }
                self._send(200, json.dumps(reply).encode())
                with server.lock:
                    server.answered += 1
                return 200

        return Handler

    # --- the Batch API ---------------------------------------------------------------------

    def batch_post(self, handler: BaseHTTPRequestHandler, raw: bytes) -> None:
        with self.lock:
            self.batch_http_requests += 1
        if handler.path.startswith("/v1/files"):
            message = email.parser.BytesParser().parsebytes(
                b"Content-Type: " + handler.headers["Content-Type"].encode() + b"\r\n\r\n" + raw
            )
            content = next(
                part.get_payload(decode=True)
                for part in message.get_payload()
                if part.get_param("name", header="content-disposition") == "file"
            )
            file_id = f"file-{uuid.uuid4().hex[:12]}"
            with self.lock:
                self.files[file_id] = content
            return handler._send(
                200,
                json.dumps(
                    {
                        "id": file_id,
                        "object": "file",
                        "bytes": len(content),
                        "created_at": 0,
                        "filename": "batch.jsonl",
                        "purpose": "batch",
                        "status": "processed",
                    }
                ).encode(),
            )
        body = json.loads(raw)
        batch_id = f"batch_{uuid.uuid4().hex[:12]}"
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body["endpoint"],
            "input_file_id": body["input_file_id"],
            "completion_window": body["completion_window"],
            "status": "in_progress",
            "created_at": 0,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "_created": time.monotonic(),
        }
        with self.lock:
            self.batches[batch_id] = batch
        handler._send(200, json.dumps({k: v for k, v in batch.items() if not k.startswith("_")}).encode())

    def batch_get(self, handler: BaseHTTPRequestHandler) -> None:
        parts = handler.path.strip("/").split("/")
        with self.lock:
            self.batch_http_requests += 1
        if parts[1] == "files":
            return handler._send(200, self.files[parts[2]])
        with self.lock:
            self.batch_polls += 1
            batch = self.batches[parts[2]]
            if (
                batch["status"] == "in_progress"
                and time.monotonic() - batch["_created"] >= self.batch_delay_s
            ):
                self._finish(batch)
        handler._send(200, json.dumps({k: v for k, v in batch.items() if not k.startswith("_")}).encode())

    def _finish(self, batch: dict) -> None:
        lines = [
            json.loads(line)
            for line in self.files[batch["input_file_id"]].decode().splitlines()
            if line.strip()
        ]
        if self.batch_outcome == "failed":
            batch.update(
                status="failed",
                errors={
                    "object": "list",
                    "data": [{"code": "invalid_request", "message": "the stub fails this batch", "line": 1}],
                },
            )
            return
        answered = lines[: len(lines) // 2] if self.batch_outcome == "expired" else lines
        out, err = [], []
        for n, line in enumerate(answered):
            if n < self.batch_failed_lines:
                err.append(
                    {
                        "id": f"req_{n}",
                        "custom_id": line["custom_id"],
                        "error": None,
                        "response": {
                            "status_code": 500,
                            "request_id": "r",
                            "body": {"error": {"message": "boom"}},
                        },
                    }
                )
                continue
            content = self.respond(line["body"])
            self.answered += 1
            completion = {
                "id": f"chatcmpl-b{n}",
                "object": "chat.completion",
                "created": 0,
                "model": line["body"]["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": content},
                    }
                ],
                "usage": usage(line["body"], content),
            }
            out.append(
                {
                    "id": f"req_{n}",
                    "custom_id": line["custom_id"],
                    "error": None,
                    "response": {"status_code": 200, "request_id": "r", "body": completion},
                }
            )
        for name, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                file_id = f"file-{uuid.uuid4().hex[:12]}"
                self.files[file_id] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                batch[name] = file_id
        batch.update(
            status="expired" if self.batch_outcome == "expired" else "completed",
            request_counts={"total": len(lines), "completed": len(out), "failed": len(err)},
        )

    def batch_requests(self) -> list[list[str]]:
        """The custom_ids of each batch created, in creation order."""
        return [
            [
                json.loads(line)["custom_id"]
                for line in self.files[b["input_file_id"]].decode().splitlines()
                if line
            ]
            for b in self.batches.values()
        ]
