"""Loopback network faults for e2e tests: a TCP forwarder that cuts connections after N bytes (seeded) or
throttles them, and a minimal HTTP CONNECT proxy that records the tunnels it opened."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field


def _hard_close(*socks: socket.socket) -> None:
    """Abort (SO_LINGER 0, so close sends RST) like a broken network path; shutdown first wakes a
    thread blocked in recv on the same socket (close alone would not)."""
    for s in socks:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()


@dataclass
class Stats:
    connections: int = 0
    cuts: int = 0
    cut_offsets: list[tuple[str, int]] = field(default_factory=list)  # (direction, byte offset in that direction)
    bytes_up: int = 0
    bytes_down: int = 0


class _Server:
    """Accept loop on 127.0.0.1:0 in a daemon thread; ``handle`` runs per connection in its own thread."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self) -> _Server:
        self._acceptor.start()
        return self

    def __enter__(self) -> _Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._acceptor.join(timeout=2)
        self.listener.close()
        with self._lock:
            socks = list(self._open)
        _hard_close(*socks)
        for t in self._threads:
            t.join(timeout=2)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._track(conn)
            t = threading.Thread(target=self._guarded, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._open.update(socks)

    def _guarded(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except OSError:
            _hard_close(conn)

    def handle(self, conn: socket.socket) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _pipe_pair(self, client: socket.socket, upstream: socket.socket, up_budget: int | None = None,
                   down_budget: int | None = None, rate_bps: float | None = None) -> None:
        """Forward both ways until either side closes; cut both sockets once a direction's budget is spent."""
        self._track(upstream)
        for s in (client, upstream):  # no Nagle delay: a forwarder must not add ~40 ms per request
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        done = threading.Event()
        t = threading.Thread(target=self._pipe, args=(upstream, client, "down", down_budget, None, done), daemon=True)
        t.start()
        self._pipe(client, upstream, "up", up_budget, rate_bps, done)
        t.join(timeout=5)

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str, budget: int | None,
              rate_bps: float | None, done: threading.Event) -> None:
        sent = 0
        t0 = time.monotonic()
        while True:
            try:
                data = src.recv(16384)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                if done.is_set():
                    _hard_close(src, dst)
                done.set()
                return
            if budget is not None and sent + len(data) >= budget:
                with contextlib.suppress(OSError):
                    dst.sendall(data[: budget - sent])
                self.on_cut(direction, budget)
                _hard_close(src, dst)
                done.set()
                return
            try:
                dst.sendall(data)
            except OSError:
                _hard_close(src, dst)
                done.set()
                return
            sent += len(data)
            self.on_bytes(direction, len(data))
            if rate_bps:
                ahead = sent / rate_bps - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)

    def on_cut(self, direction: str, offset: int) -> None:
        pass

    def on_bytes(self, direction: str, n: int) -> None:
        pass


class FlakyProxy(_Server):
    """TCP forwarder to ``target``. Each new connection is cut with probability ``p_cut`` after a random
    number of bytes: in [min_bytes, max_bytes] client->server with probability ``p_up``, else in
    [min_bytes, max_down_bytes] server->client (responses are small), drawn from ``random.Random(seed)``;
    ``rate_bps`` throttles client->server.
    ``max_cuts`` stops cutting after that many; ``enabled`` can be switched at run time."""

    def __init__(self, target: tuple[str, int], *, seed: int = 0, p_cut: float = 0.0, min_bytes: int = 1,
                 max_bytes: int = 65536, max_down_bytes: int = 4096, p_up: float = 0.75, rate_bps: float | None = None,
                 max_cuts: int | None = None) -> None:
        super().__init__()
        self.target = target
        self.rng = random.Random(seed)
        self.p_cut, self.min_bytes, self.max_bytes, self.p_up = p_cut, min_bytes, max_bytes, p_up
        self.max_down_bytes = max_down_bytes
        self.rate_bps, self.max_cuts = rate_bps, max_cuts
        self.enabled = True
        self.stats = Stats()

    def handle(self, conn: socket.socket) -> None:
        up_budget = down_budget = None
        with self._lock:
            self.stats.connections += 1
            cutting = self.enabled and (self.max_cuts is None or self.stats.cuts < self.max_cuts)
            if cutting and self.rng.random() < self.p_cut:
                if self.rng.random() < self.p_up:
                    up_budget = self.rng.randint(self.min_bytes, self.max_bytes)
                else:
                    down_budget = self.rng.randint(self.min_bytes, self.max_down_bytes)
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _hard_close(conn)
            return
        upstream.settimeout(None)
        self._pipe_pair(conn, upstream, up_budget, down_budget, self.rate_bps)

    def on_cut(self, direction: str, offset: int) -> None:
        with self._lock:
            self.stats.cuts += 1
            self.stats.cut_offsets.append((direction, offset))

    def on_bytes(self, direction: str, n: int) -> None:
        with self._lock:
            if direction == "up":
                self.stats.bytes_up += n
            else:
                self.stats.bytes_down += n


class ConnectProxy(_Server):
    """Minimal HTTP proxy: only ``CONNECT host:port`` to loopback, recorded in ``connects``; then a blind tunnel."""

    def __init__(self) -> None:
        super().__init__()
        self.connects: list[str] = []

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(4096)
            if not data or len(head) > 16384:
                _hard_close(conn)
                return
            head += data
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, rest = request_line.partition(" ")
        target = rest.partition(" ")[0]
        host, _, port = target.rpartition(":")
        if method != "CONNECT" or host.strip("[]") not in ("127.0.0.1", "localhost", "::1") or not port.isdigit():
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            _hard_close(conn)
            return
        with self._lock:
            self.connects.append(target)
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
        except OSError:
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            _hard_close(conn)
            return
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        conn.settimeout(None)
        upstream.settimeout(None)
        leftover = head.split(b"\r\n\r\n", 1)[1]
        if leftover:
            upstream.sendall(leftover)
        self._pipe_pair(conn, upstream)
