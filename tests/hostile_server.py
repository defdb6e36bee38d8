"""A loopback TCP server that answers every HTTP request with exactly the bytes it is told to send.

Unlike http.server, it can send anything: broken status lines, lying Content-Length, endless bodies, a
byte at a time. Each connection reads one request (recorded in ``log``), then plays the current ``plan``:

    b"..."                     send these bytes
    ("sleep", seconds)         wait
    ("drip", data, interval)   send ``data`` one byte at a time, ``interval`` seconds apart
    ("repeat", data, times)    send ``data`` ``times`` times (an endless body, as far as a client cares)
    ("hold",)                  keep the connection open until the client closes it or the server stops

and closes the connection. Every wait is bounded: the server stops all of it when its block ends.
"""

from __future__ import annotations

import socket
import threading
import time


class HostileServer:
    def __init__(self, *plan):
        self.plan = list(plan)
        self.log: list[bytes] = []
        self.closed_by_client: list[bool] = []
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() at once
        except OSError:
            pass
        self._thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _read_request(self, connection: socket.socket) -> bytes:
        data = b""
        connection.settimeout(2)
        while b"\r\n\r\n" not in data and len(data) < 1 << 20:
            piece = connection.recv(65536)
            if not piece:
                return data
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            piece = connection.recv(65536)
            if not piece:
                break
            body += piece
        return head + b"\r\n\r\n" + body

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            try:
                self.log.append(self._read_request(connection))
                for step in list(self.plan):
                    if self._stop.is_set():
                        return
                    if isinstance(step, bytes):
                        connection.sendall(step)
                    elif step[0] == "sleep":
                        self._stop.wait(step[1])
                    elif step[0] == "drip":
                        for byte in step[1]:
                            if self._stop.wait(step[2]):
                                return
                            connection.sendall(bytes([byte]))
                    elif step[0] == "repeat":
                        for _ in range(step[2]):
                            connection.sendall(step[1])
                    elif step[0] == "hold":
                        connection.settimeout(0.05)
                        while not self._stop.is_set():
                            try:
                                if connection.recv(1024) == b"":
                                    self.closed_by_client.append(True)
                                    return
                            except TimeoutError:
                                continue
                connection.shutdown(socket.SHUT_WR)
                time.sleep(0.01)  # let the client read before the close resets anything unread
            except OSError:
                self.closed_by_client.append(True)


def response(status: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """An HTTP/1.1 response with exactly these headers (nothing added)."""
    return (b"HTTP/1.1 " + status + b"\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            + b"\r\n" + body)


def chunked(body: bytes, sizes: list[int]) -> bytes:
    """``body`` in chunked transfer encoding, cut at ``sizes`` (cycled), with the terminating chunk."""
    out, start, i = b"", 0, 0
    while start < len(body):
        size = max(1, sizes[i % len(sizes)]) if sizes else len(body)
        out += b"%x\r\n" % len(body[start:start + size]) + body[start:start + size] + b"\r\n"
        start, i = start + size, i + 1
    return out + b"0\r\n\r\n"
