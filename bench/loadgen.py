"""
The load generator: C connections to the daemon, each sending its next request
only after the answer to the previous one (as ejabberd's and Prosody's
connections do), over plain non-blocking sockets and one C{epoll} loop per
process.

It runs in its own process (L{worker}, started by L{bench.run} with
C{multiprocessing}); the parent tells it when the measured window starts and
ends (C{time.monotonic_ns}, which is the same clock in every process), and it
sends back the count, the latency of every answer that arrived in the window,
the errors and its own CPU time.
"""

from __future__ import annotations

import os
import select
import socket
import time
from array import array
from multiprocessing.connection import Connection
from typing import Any

#: An answer still missing this long after its request counts as an error
#: (the daemon promises an answer within its deadline, 4 s by default).
NO_ANSWER_NS = 5_000_000_000


def openConnections(
    host: str, port: int, count: int, probe: tuple[bytes, bytes] | None = None,
    batch: int = 50, timeout: float = 30.0,
) -> list[socket.socket]:
    """
    C{count} connected, non-blocking TCP sockets with Nagle off.

    With C{probe} (a request and its answer), after every C{batch} connections
    the last one sends the probe and waits for its answer: the daemon has then
    accepted the whole batch, so the listen backlog never overflows (which
    would make the kernel retry the handshakes a second and more later).
    """
    socks = []
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if probe is not None and (i % batch == batch - 1 or i == count - 1):
            s.sendall(probe[0])
            answer = b""
            while len(answer) < len(probe[1]):
                chunk = s.recv(len(probe[1]) - len(answer))
                if not chunk:
                    raise OSError("connection closed by the daemon")
                answer += chunk
        s.setblocking(False)
        socks.append(s)
    return socks


def closedLoop(
    socks: list[socket.socket],
    requests: list[tuple[bytes, bytes]],
    startNs: int,
    endNs: int,
    once: bool = False,
) -> dict[str, Any]:
    """
    Drive C{socks} in a closed loop with C{requests} (request bytes, expected
    answer bytes; true and false answers have the same length in every
    framing, so an answer is complete once it has that many bytes) until
    C{endNs}.  Only answers arriving in C{[startNs, endNs)} are measured.

    Each request goes to the next free connection, cycling through the list;
    with C{once}, every request is sent once and the loop ends when all are
    answered.
    """
    clock = time.monotonic_ns
    nreq = len(requests)
    size = max(s.fileno() for s in socks) + 1
    byFd: list[socket.socket | None] = [None] * size
    sentAt = [0] * size
    current = [0] * size
    buffers = [b""] * size
    ep = select.epoll(len(socks) + 1)
    latencies = array("q")
    record = latencies.append
    ok = 0
    errors = 0
    wrong = 0
    closed = 0
    cpuStart: float | None = None

    cursor = 0
    busy = 0
    for s in socks:
        fd = s.fileno()
        byFd[fd] = s
        ep.register(fd, select.EPOLLIN)
    for s in socks:
        if once and cursor == nreq:
            break
        fd = s.fileno()
        current[fd] = cursor % nreq
        cursor += 1
        busy += 1
        sentAt[fd] = clock()
        s.send(requests[current[fd]][0])

    poll = ep.poll
    while True:
        events = poll(0.1)
        now = clock()
        if now >= endNs or busy == 0:
            break
        if cpuStart is None and now >= startNs:
            t = os.times()
            cpuStart = t.user + t.system
        for fd, _ in events:
            s = byFd[fd]
            if s is None:
                continue
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                # The daemon closed the connection: an error, and one
                # connection less.
                ep.unregister(fd)
                byFd[fd] = None
                s.close()
                closed += 1
                errors += 1
                busy -= 1
                continue
            expected = requests[current[fd]][1]
            if buffers[fd]:
                data = buffers[fd] + data
            if len(data) < len(expected):
                buffers[fd] = data
                continue
            buffers[fd] = b""
            t = clock()
            sent = sentAt[fd]
            sentAt[fd] = 0
            if t >= startNs:
                record(t - sent)
                if data == expected:
                    ok += 1
                else:
                    wrong += 1
                    errors += 1
            if cursor == nreq:
                if once:
                    busy -= 1
                    continue
                cursor = 0
            current[fd] = cursor
            cursor += 1
            sentAt[fd] = clock()
            s.send(requests[current[fd]][0])

    t = os.times()
    cpu = t.user + t.system - (cpuStart if cpuStart is not None else t.user + t.system)
    end = clock()
    unanswered = sum(
        1
        for s in byFd
        if s is not None and sentAt[s.fileno()] and end - sentAt[s.fileno()] > NO_ANSWER_NS
    )
    ep.close()
    return {
        "ok": ok,
        "errors": errors + unanswered,
        "wrong": wrong,
        "closed": closed,
        "unanswered": unanswered,
        "cpu": cpu,
        "latencies": latencies.tobytes(),
    }


def worker(conn: Connection, spec: dict[str, Any]) -> None:
    """
    The body of one load generator process.

    Protocol with the parent over C{conn}: send C{("ready", n)} once connected
    (or C{("failed", message)}); receive C{(startNs, endNs)}; send the result
    of L{closedLoop}.  In C{idle} mode, hold the connections until the parent
    sends anything, then send C{("done", n)}.
    """
    try:
        socks = openConnections(spec["host"], spec["port"], spec["connections"],
                                spec.get("probe"))
    except OSError as e:
        conn.send(("failed", f"connecting: {e}"))
        return
    conn.send(("ready", len(socks)))
    if spec.get("idle"):
        conn.recv()
        for s in socks:
            s.close()
        conn.send(("done", len(socks)))
        return
    startNs, endNs = conn.recv()
    result = closedLoop(socks, spec["requests"], startNs, endNs, spec.get("once", False))
    for s in socks:
        s.close()
    conn.send(result)
