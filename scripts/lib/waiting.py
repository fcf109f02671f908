"""Ports and polling shared by the benchmark, the soak and the end-to-end scenarios.

    free_port(), free_ports(n)   loopback ports nobody listens on (yet)
    port_open(port)              something accepts TCP on 127.0.0.1:port
    wait_until(timeout, cond)    poll a predicate; True once it holds, False at the deadline
    wait_for(what, fn, ...)      poll until fn returns something truthy and return it; raise
                                 naming what was awaited (and the last answer) at the deadline
"""

from __future__ import annotations

import socket
import time


def free_ports(n: int) -> list[int]:
    """n distinct free ports: all are held open together so none is handed out twice."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(timeout: float, cond, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# What a probe may raise while the thing awaited is not there yet.
NOT_YET = (AssertionError, KeyError, IndexError, TypeError, ValueError, OSError)


def wait_for(what: str, fn, timeout: float = 60, interval: float = 0.5,
             error: type[Exception] = AssertionError, tolerate: tuple = NOT_YET):
    """Polls fn until it returns a truthy value, which is returned. An exception in `tolerate`
    counts as "not yet"; at the deadline `error` is raised naming what was awaited."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except tolerate as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise error(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})"[:3000])
