"""A TCP proxy that breaks the connection to a real server on command (fault injection).

    proxy = FaultProxy("127.0.0.1", moto_port)        # listens on 127.0.0.1:proxy.port
    proxy.mode = "refuse"      # connections refused (nothing listens on the port)
    proxy.mode = "blackhole"   # requests read, never answered: every connection open meanwhile
                               # stays silent for good (half-open), new ones after it work
    proxy.mode = "latency"     # every chunk of the answer delayed by proxy.delay seconds
    proxy.mode = "cut"         # each answer cut off after proxy.cut_after bytes, then the socket closed
    proxy.mode = "stall"       # each answer stops after proxy.cut_after bytes, the socket left open
    proxy.mode = "pass"        # a plain proxy again
    with proxy.outage(seconds, "refuse"): ...   # a timed outage in the background
    proxy.lose_answer_to = "POST .*uploadId="   # once: the answer to the first request whose
                               # request line matches is lost (the server did the work), the
                               # connection closed
    proxy.answer_next = (pattern, raw_answer)   # once: the next request whose request line
                               # matches is not forwarded; the client gets raw_answer instead
    proxy.requests             # the head (request line and headers) of every request seen

Threads only, no dependencies: one accept loop, two pump threads per connection. Refusing is
real: the listening socket is closed and re-bound to the same port afterwards.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from typing import List, Optional, Tuple

_REQUEST_HEAD = re.compile(rb"(?:GET|PUT|POST|HEAD|DELETE) \S+ HTTP/1\.1\r\n.*?\r\n\r\n", re.S)


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.host = host
        self.mode = "pass"
        self.delay = 0.5
        self.cut_after = 200
        self.connections = 0
        self.requests: List[str] = []
        self.lose_answer_to: Optional[str] = None
        self.answer_next: Optional[Tuple[str, bytes]] = None
        self._lock = threading.Lock()
        self._open: List[socket.socket] = []
        self._stop = threading.Event()
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, port))
        s.listen(64)
        s.settimeout(0.2)
        return s

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if self.mode == "refuse":
                if self._listener is not None:
                    self._listener.close()
                    self._listener = None
                    self._drop_all()
                time.sleep(0.05)
                continue
            if self._listener is None:
                self._listener = self._listen(self.port)
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._open.extend(socks)

    def _drop_all(self) -> None:
        with self._lock:
            socks, self._open = self._open, []
        for s in socks:  # shutdown first: close() alone does not wake a thread blocked in recv()
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _serve(self, client: socket.socket) -> None:
        if self.mode == "blackhole":
            self._track(client)  # read and never answer: a dead connection, until the proxy closes
            client.settimeout(0.2)
            while not self._stop.is_set():
                with contextlib.suppress(socket.timeout, OSError):
                    if client.recv(65536) == b"":
                        break
            with contextlib.suppress(OSError):
                client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        self._track(client, upstream)
        connection = {"lose": False, "requests": 0, "answer": None}
        threading.Thread(target=self._pump, args=(client, upstream, False, connection), daemon=True).start()
        self._pump(upstream, client, True, connection)

    def _saw_request(self, data: bytes, connection: dict) -> None:
        for head in _REQUEST_HEAD.findall(data):  # heads arrive whole in practice (one small write)
            text = head.decode("latin-1")
            with self._lock:
                connection["requests"] += 1
                self.requests.append(text)
                if self.lose_answer_to and re.match(self.lose_answer_to, text):
                    self.lose_answer_to, connection["lose"] = None, True
                elif self.answer_next and re.match(self.answer_next[0], text):
                    connection["answer"], self.answer_next = self.answer_next[1], None

    def _pump(self, src: socket.socket, dst: socket.socket, answer: bool, connection: dict) -> None:
        sent, dead, request, stalled = 0, False, 0, False
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if answer and connection["requests"] != request:  # the answer to the next request
                    sent, request = 0, connection["requests"]
                if not answer:
                    self._saw_request(data, connection)
                    if connection["answer"] is not None:  # answered here, never forwarded
                        src.sendall(connection["answer"])
                        break
                if answer and connection["lose"]:
                    break  # the answer is lost on the way: the client sees the connection close
                if answer and (dead or self.mode == "blackhole"):
                    dead = True  # answers lost on the way, from now on
                    continue
                if answer and self.mode == "latency":
                    time.sleep(self.delay)
                if answer and self.mode == "stall" and sent + len(data) > self.cut_after:
                    dst.sendall(data[:max(0, self.cut_after - sent)])
                    sent, dead, stalled = self.cut_after, True, True
                    continue
                if answer and self.mode == "cut":
                    room = max(0, self.cut_after - sent)
                    if room < len(data):
                        dst.sendall(data[:room])
                        break
                dst.sendall(data)
                sent += len(data)
            if stalled:  # the server is done, the client must not know: silence until it gives up
                self._stop.wait(30)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    @contextlib.contextmanager
    def outage(self, seconds: float, mode: str = "refuse", after: float = 0.0):
        """`mode` for `seconds`, starting `after` seconds from now, in the background; the block
        runs meanwhile. On leaving, waits for the outage to be over."""
        def run():
            time.sleep(after)
            self.mode = mode
            time.sleep(seconds)
            self.mode = "pass"

        t = threading.Thread(target=run, daemon=True)
        t.start()
        try:
            yield self
        finally:
            t.join()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self._listener is not None:
            self._listener.close()
        self._drop_all()
