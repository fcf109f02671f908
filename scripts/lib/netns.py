#!/usr/bin/env python3
"""Network namespaces of the autoscaling test's own, so endpoint IPs are not loopback.

The API server refuses loopback addresses in Endpoints, and its aggregator and
Prometheus reach what a Service points at by the endpoint IP. So every process that
must be reached by IP (one per Pod, and the prometheus-adapter) runs in a network
namespace of its own, like a Pod's sandbox:

    netns  nxas-<tag>      lo + eth0 (veth), IP/32 on eth0, a route to GATEWAY only
    host   nxh-<tag>       the veth's other end, GATEWAY/32 on it, a route IP/32 to it

No default route in the namespace and no forwarding on the host: a process inside
reaches only the host end of its veth (and what is bridged in, below); the host
reaches the namespace's one IP. Addresses: the Pods' are those kwok assigns
(`--cidr 10.244.0.1/16` of scripts/cluster); the test's own services use
SERVICE_RANGE; the gateway is GATEWAY. None of them exists outside these namespaces.

A process inside still needs the host's loopback services (Kafka advertises
127.0.0.1:9092, PostgreSQL, the API server). `Bridge` listens on 127.0.0.1:<port>
inside a namespace (the listening socket is made after setns(2), then the thread
returns to the host's namespace) and forwards each connection to 127.0.0.1:<port> of
the host.

Teardown: `PodNet.down()` and `cleanup()` are idempotent; `cleanup()` removes every
namespace and host veth with the prefixes below (left by a killed run), and
`python3 scripts/lib/netns.py cleanup` does it from a shell trap.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
import socket
import subprocess
import sys
import threading

NS_PREFIX = "nxas-"
HOST_IF_PREFIX = "nxh-"
GATEWAY = "10.245.0.1"
SERVICE_RANGE = "10.245.0.0/24"  # .1 the gateway, .2.. the test's own services
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_setns_lock = threading.Lock()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p


def tag_for(name: str) -> str:
    """A short stable tag (interface names have at most 15 bytes)."""
    return hashlib.sha1(name.encode()).hexdigest()[:8]


class PodNet:
    """One namespace with one IP, reachable from the host through a veth pair."""

    def __init__(self, name: str, ip_addr: str) -> None:
        self.tag = tag_for(name)
        self.ns = NS_PREFIX + self.tag
        self.host_if = HOST_IF_PREFIX + self.tag
        self.ip = ip_addr

    def up(self) -> "PodNet":
        self.down()
        ip("netns", "add", self.ns)
        try:
            ip("link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
            ip("-n", self.ns, "link", "set", "lo", "up")
            ip("-n", self.ns, "addr", "add", f"{self.ip}/32", "dev", "eth0")
            ip("-n", self.ns, "link", "set", "eth0", "up")
            ip("-n", self.ns, "route", "add", f"{GATEWAY}/32", "dev", "eth0", "scope", "link")
            ip("addr", "add", f"{GATEWAY}/32", "dev", self.host_if)
            ip("link", "set", self.host_if, "up")
            ip("route", "replace", f"{self.ip}/32", "dev", self.host_if, "src", GATEWAY)
        except Exception:
            self.down()
            raise
        return self

    def down(self) -> None:
        # Deleting the namespace destroys eth0, hence its peer and the host route.
        ip("netns", "del", self.ns, check=False)
        ip("link", "del", self.host_if, check=False)

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]


def cleanup() -> int:
    """Removes every namespace and host veth of ours; returns how many namespaces."""
    n = 0
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(NS_PREFIX):
            ip("netns", "del", name, check=False)
            n += 1
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            ifname = parts[1].strip().split("@")[0]
            if ifname.startswith(HOST_IF_PREFIX):
                ip("link", "del", ifname, check=False)
    return n


class Bridge:
    """Forwards 127.0.0.1:<port> inside namespaces to 127.0.0.1:<port> of the host."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.host_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.servers: dict[str, list[asyncio.AbstractServer]] = {}
        self.thread = threading.Thread(target=self.loop.run_forever, name="netns-bridge", daemon=True)
        self.thread.start()

    def _listener(self, ns: str, port: int) -> socket.socket:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            with _setns_lock:
                _setns(fd)
                try:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("127.0.0.1", port))
                    s.listen(128)
                    s.setblocking(False)
                finally:
                    _setns(self.host_fd)
        finally:
            os.close(fd)
        return s

    def add(self, ns: str, port: int, target_port: int | None = None) -> None:
        sock = self._listener(ns, port)
        target = target_port or port

        async def serve() -> asyncio.AbstractServer:
            return await asyncio.start_server(lambda r, w: self._pipe(r, w, target), sock=sock)

        server = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)
        self.servers.setdefault(ns, []).append(server)

    async def _pipe(self, reader, writer, target: int) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return

        async def copy(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                try:
                    w.close()
                except OSError:
                    pass

        await asyncio.gather(copy(reader, up_w), copy(up_r, writer))

    def remove(self, ns: str) -> None:
        async def close(servers):
            for s in servers:
                s.close()

        servers = self.servers.pop(ns, [])
        if servers:
            asyncio.run_coroutine_threadsafe(close(servers), self.loop).result(10)


def main() -> int:
    if len(sys.argv) == 2 and sys.argv[1] == "cleanup":
        n = cleanup()
        print(f"netns: removed {n} namespace(s) {NS_PREFIX}*", file=sys.stderr)
        return 0
    print("usage: netns.py cleanup", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
