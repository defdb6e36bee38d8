"""A tiny loopback HTTP server that answers from a script, for exact tests of the HTTP client.

Each incoming request takes the next action of the script (the last one repeats):
    ("json", status, body, headers)   a JSON reply
    ("raw", status, bytes, headers)   a reply with this exact body
    ("drop",)                         close the connection without answering
    ("truncate", status, body)        announce the full length, send half, close
    ("stall", seconds)                wait, then answer with the next action
    ("sse", [events...])              a text/event-stream reply, one "data:" line per event
    ("choices", k)                    a chat completion with k choices (k=None: as many as `n` asked)
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(texts, usage=(7, 5)):
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                        for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                      "total_tokens": usage[0] + usage[1]}}


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client under test hung up mid-reply, as some tests make it do: not a server bug
        super().handle_error(request, client_address)


class ScriptedServer:
    def __init__(self, *actions, latency=0.0):
        self.script = list(actions) or [("choices", None)]
        self.latency = latency
        self.log: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()  # headers and body leave in two writes: without this, Nagle delays the second
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                with server._lock:
                    server.log.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                       "client_port": self.client_address[1]})
                    action = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                if server.latency:
                    time.sleep(server.latency)
                while action[0] == "stall":
                    time.sleep(action[1])
                    with server._lock:
                        action = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                self.act(action, body)

            def act(self, action, body):
                kind = action[0]
                if kind == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if kind == "choices":
                    k = action[1] if action[1] is not None else (body or {}).get("n", 1)
                    seed = (body or {}).get("seed")
                    return self.reply(200, json.dumps(completion([f"text {seed} {j}" for j in range(k)])).encode())
                if kind == "json":
                    _, status, payload, headers = action
                    return self.reply(status, json.dumps(payload).encode(), headers)
                if kind == "raw":
                    _, status, payload, headers = action
                    return self.reply(status, payload, headers)
                if kind == "truncate":
                    _, status, payload = action
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if kind == "sse":
                    data = b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
                                    for e in action[1])
                    return self.reply(200, data, {"Content-Type": "text/event-stream"})
                raise AssertionError(f"unknown action {action!r}")

            def reply(self, status, data, headers=None):
                self.send_response(status)
                headers = {"Content-Type": "application/json", **(headers or {})}
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            self.httpd.socket.shutdown(socket.SHUT_RD)  # wakes serve_forever now, not at its next poll (Linux)
        self.httpd.shutdown()
        self.httpd.server_close()

