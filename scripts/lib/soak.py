"""Soak test: a long stream through several replicas of the release binary on a real Apache
Kafka cluster while faults are injected on a schedule; ends with one SOAK line.

Run through scripts/soak (it installs the tools and builds the release binary). Everything it
starts is private: a three-node Kafka cluster on free ports (or one node with --brokers 1),
behind TCP proxies that the service connects through (network cuts), a PostgreSQL cluster of
its own (crash-restarts with pg_ctl -m immediate), and the service replicas.

Faults, one every --fault-every seconds on average (seeded, so a run can be repeated):
  replica-kill   SIGKILL a replica, start a replacement 2-5 s later
  scale-up       start a replica (up to 3)
  scale-down     SIGTERM a replica (down to 1), exit code recorded
  scale-to-one   SIGTERM two of three replicas within a second
  pg-crash       pg_ctl -m immediate stop, start again 3-8 s later
  broker-kill    SIGKILL a Kafka node, restart it on the same data dir 5-15 s later
  net-cut        close every service-to-Kafka connection through the proxies for 5-15 s
The producer writes directly (acks=all, idempotent), so "produced" is exact; faults stop when
it is done, then the soak waits for the backlog to drain and stops the replicas with SIGTERM.

Output: progress and fault lines on stderr, evidence files (group state, replica /readyz and
/metrics, broker log excerpts) in the work directory whenever rows stall for longer than
--evidence-after seconds with a backlog, and finally exactly one line on stdout:
SOAK produced=… rows=… distinct=… lost=… duplicated=… aggregates_ok=… sigterm_exit_nonzero=… max_stall_s=… max_partition_stall_s=…
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from waiting import free_ports, port_open, wait_until  # noqa: E402  (scripts/lib/waiting.py)

ROOT = Path(__file__).resolve().parents[2]
KAFKA_SCRIPT = ROOT / "scripts" / "kafka"
PARTITIONS = 6
EVENT_TYPES = [
    ("user.login", "auth-service"),
    ("user.logout", "auth-service"),
    ("user.registered", "auth-service"),
    ("user.password_changed", "auth-service"),
    ("user.profile_viewed", "user-service"),
    ("user.profile_updated", "user-service"),
    ("user.search_performed", "user-service"),
    ("user.deleted", "user-service"),
]
START = time.monotonic()


def log(msg: str) -> None:
    print(f"[soak {time.monotonic() - START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def die_with_parent() -> None:
    """Child processes die with the soak, even if it is killed (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def http_get(port: int, path: str) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError:
        return None


# ------------------------------------------------------------------------------ network cut
class Proxy:
    """A TCP forwarder on loopback that can be cut (listener closed, connections shut down)."""

    def __init__(self, listen: int, target: int):
        self.listen, self.target = listen, target
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.server: socket.socket | None = None
        self.resume()

    def resume(self) -> None:
        if self.server is not None:
            return
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.listen))
        srv.listen(128)
        self.server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.conns.clear()


# ------------------------------------------------------------------------------------ kafka
class KafkaNode:
    """One combined broker+controller, run by `scripts/kafka node` (which execs the JVM)."""

    def __init__(self, work: Path, node_id: int, port: int, controller: int, client: int,
                 proxy: int, voters: str | None, cluster_id: str):
        self.id, self.port, self.client, self.proxy_port = node_id, port, client, proxy
        self.dir = work / f"kafka-node{node_id}"
        self.log = work / f"kafka-node{node_id}.log"
        self.args = ["node", "--dir", str(self.dir), "--port", str(port),
                     "--controller-port", str(controller), "--node-id", str(node_id),
                     "--cluster-id", cluster_id, "--client-listener", f"{client}:{proxy}"]
        if voters:
            self.args += ["--voters", voters]
        self.proc: subprocess.Popen | None = None
        self.proxy = Proxy(proxy, client)

    def start(self) -> None:
        with open(self.log, "a") as f:
            f.write("\n==== soak: node start\n")
            f.flush()
            self.proc = subprocess.Popen([str(KAFKA_SCRIPT), *self.args], stdout=f, stderr=f,
                                         stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)

    def wait_serving(self, timeout: float = 180) -> None:
        def serving() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"Kafka node {self.id} exited; see {self.log}")
            text = self.log.read_text(errors="replace").rsplit("==== soak: node start", 1)[-1]
            return "Kafka Server started" in text and port_open(self.port, 0.5)
        if not wait_until(timeout, serving, 0.2):
            raise RuntimeError(f"Kafka node {self.id} not serving after {timeout}s; see {self.log}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


# ------------------------------------------------------------------------------- postgresql
def pg_bin_dir() -> Path:
    if os.environ.get("PG_BIN_DIR"):
        return Path(os.environ["PG_BIN_DIR"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries (scripts/install-tools postgres)")
    return found[-1].parent


class Postgres:
    """A private PostgreSQL cluster (never the system one) that the soak crash-restarts."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="na-soak-pg", dir="/tmp"))
        self.bin = pg_bin_dir()
        self.port = free_ports(1)[0]
        self.root = os.geteuid() == 0
        if self.root:
            subprocess.run(["chown", "-R", "postgres:postgres", str(self.dir)], check=True)
        self.run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()
        with psycopg.connect(self.url("postgres"), autocommit=True) as c:
            c.execute("CREATE DATABASE analytics")

    def run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self.root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd="/")

    def url(self, db: str = "analytics") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        # fsync=off: an immediate stop is a crash of the server process, not of the machine,
        # so WAL replay is exercised all the same.
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self.run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-o", opts, "-w", "start")

    def crash(self) -> None:
        self.run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.crash()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------- service
class Replica:
    seq = 0

    def __init__(self, binary: Path, work: Path, env: dict[str, str]):
        Replica.seq += 1
        self.name = f"replica-{Replica.seq}"
        self.port, api = free_ports(2)
        self.log = work / f"{self.name}.log"
        full = {"PATH": os.environ.get("PATH", ""), **env, "METRICS_PORT": str(self.port), "API_PORT": str(api)}
        with open(self.log, "a") as f:
            self.proc = subprocess.Popen([str(binary), "run"], env=full, stdout=f, stderr=f,
                                         stdin=subprocess.DEVNULL, cwd=str(work),
                                         preexec_fn=die_with_parent)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def sigterm(self, timeout: float) -> int | None:
        """SIGTERM and wait; the exit code, or None when it had to be SIGKILLed."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def metric(self, prefix: str) -> list[str]:
        r = http_get(self.port, "/metrics")
        return [l for l in (r[1].splitlines() if r else []) if l.startswith(prefix)]


# ------------------------------------------------------------------------------------- soak
class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.work = Path(args.work_dir or ROOT / "target" / "soak" / stamp).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.topic = f"soak-events-{stamp.lower()}"
        self.dlq = f"{self.topic}.dlq"
        self.group = f"soak-{stamp.lower()}"
        self.nodes: list[KafkaNode] = []
        self.replicas: list[Replica] = []
        self.replicas_lock = threading.Lock()
        self.produced = 0
        self.producing = True
        self.faulting = True
        self.sigterm_total = 0
        self.sigterm_nonzero = 0
        self.exit_codes: list[str] = []
        self.max_stall = 0.0
        # The longest time one partition's committed offset stood still below its high watermark.
        self.max_partition_stall = 0.0
        self.stalled_partition = -1
        self.stall_since: float | None = None
        self.evidence_taken_for: float | None = None
        self.faults: dict[str, int] = {}
        self.rows = 0
        self.backlog = 0

    # -------------------------------------------------------------- setup
    def start_kafka(self) -> None:
        n = self.args.brokers
        ports = free_ports(4 * n)
        voters = None
        if n > 1:
            voters = ",".join(f"{i + 1}@127.0.0.1:{ports[4 * i + 1]}" for i in range(n))
        cluster_id = "c29hay1uZXh1cy1hbmFseQ"
        for i in range(n):
            p = ports[4 * i: 4 * i + 4]
            self.nodes.append(KafkaNode(self.work, i + 1, p[0], p[1], p[2], p[3], voters, cluster_id))
        t = time.monotonic()
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_serving()
        log(f"kafka: {n} node(s) serving after {time.monotonic() - t:.1f}s")
        self.direct = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        self.proxied = ",".join(f"127.0.0.1:{node.proxy_port}" for node in self.nodes)
        admin = AdminClient({"bootstrap.servers": self.direct})
        rf = min(3, n)
        futures = admin.create_topics([NewTopic(self.topic, PARTITIONS, rf), NewTopic(self.dlq, 3, rf)])
        for f in futures.values():
            f.result(60)
        c = Consumer({"bootstrap.servers": self.direct, "group.id": "soak-admin"})
        ok = wait_until(60, lambda: all(
            p.leader >= 0 for p in c.list_topics(self.topic, timeout=5).topics[self.topic].partitions.values()
        ) and len(c.list_topics(self.topic, timeout=5).topics[self.topic].partitions) == PARTITIONS, 0.2)
        c.close()
        if not ok:
            raise RuntimeError(f"topic {self.topic} has partitions without a leader")

    def start_postgres(self) -> None:
        self.pg = Postgres()
        env = {"PATH": os.environ.get("PATH", ""), "DATABASE_URL": self.pg.url()}
        subprocess.run([str(self.args.bin), "migrate"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log(f"postgres: private cluster on port {self.pg.port} ({self.pg.dir}), migrated")

    def service_env(self) -> dict[str, str]:
        return {
            "KAFKA_BROKERS": self.proxied,
            "KAFKA_TOPICS": self.topic,
            "KAFKA_DLQ_TOPIC": self.dlq,
            "KAFKA_GROUP_ID": self.group,
            "DATABASE_URL": self.pg.url(),
            "LOG_LEVEL": "info",
        }

    def add_replica(self) -> Replica:
        r = Replica(self.args.bin, self.work, self.service_env())
        with self.replicas_lock:
            self.replicas.append(r)
        return r

    def live_replicas(self) -> list[Replica]:
        with self.replicas_lock:
            self.replicas = [r for r in self.replicas if r.alive()]
            return list(self.replicas)

    # -------------------------------------------------------------- producer
    def produce(self) -> None:
        delivered = [0]
        failed = [0]

        def on_delivery(err, _msg):
            if err is None:
                delivered[0] += 1
            else:
                failed[0] += 1

        p = Producer({"bootstrap.servers": self.direct, "acks": "all", "enable.idempotence": True,
                      "linger.ms": 20, "compression.type": "lz4", "queue.buffering.max.messages": 500000})
        count, rate = self.args.events, self.args.rate
        t0 = time.monotonic()
        users = 5000
        rng = random.Random(self.args.seed + 1)  # the fault thread has its own
        for i in range(count):
            due = t0 + i / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            et, svc = EVENT_TYPES[i % len(EVENT_TYPES)]
            user = f"00000000-0000-4000-8000-{rng.randrange(users):012x}"
            value = json.dumps({
                "event_type": et, "user_id": user, "service": svc,
                "timestamp": datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                "data": {"seq": i},
            })
            while True:
                try:
                    p.produce(self.topic, value=value.encode(), key=user.encode(), on_delivery=on_delivery)
                    break
                except BufferError:
                    p.poll(0.05)
            if i % 1000 == 0:
                p.poll(0)
                self.produced = delivered[0]
        remaining = p.flush(300)
        self.produced = delivered[0]
        if remaining or failed[0]:
            log(f"producer: {failed[0]} deliveries failed, {remaining} still queued")
        self.produce_failed = failed[0] + remaining
        log(f"producer: {self.produced} delivered in {time.monotonic() - t0:.0f}s")
        self.producing = False

    # -------------------------------------------------------------- monitor
    def high_watermarks(self, c: Consumer) -> list[int] | None:
        try:
            return [c.get_watermark_offsets(TopicPartition(self.topic, p), timeout=5)[1] for p in range(PARTITIONS)]
        except KafkaException:
            return None

    def committed(self, c: Consumer) -> list[int] | None:
        """The service group's committed offset per partition (-1 before its first commit)."""
        try:
            tps = c.committed([TopicPartition(self.topic, p) for p in range(PARTITIONS)], timeout=5)
            return [max(tp.offset, -1) for tp in tps]
        except KafkaException:
            return None

    def monitor(self) -> None:
        c = Consumer({"bootstrap.servers": self.direct, "group.id": "soak-monitor"})
        # Reads the service group's commits without joining it (committed() needs a group.id).
        g = Consumer({"bootstrap.servers": self.direct, "group.id": self.group})
        last_rows, last_growth = -1, time.monotonic()
        # Per partition: (committed offset, when it last moved). A partition nobody consumes
        # (an orphan after a rebalance) stalls while the others keep the row count growing, so
        # the stall is measured per partition, not on the total.
        moved: dict[int, tuple[int, float]] = {}
        last_report = 0.0
        while not self.finished:
            try:
                with psycopg.connect(self.pg.url(), connect_timeout=3) as db:
                    rows = db.execute("SELECT count(*) FROM analytics.events").fetchone()[0]
            except psycopg.Error:
                rows = None  # PostgreSQL is down (a fault): nothing can grow
            hw = self.high_watermarks(c)
            committed = self.committed(g) if hw is not None else None
            now = time.monotonic()
            if rows is not None:
                self.rows = rows
            if rows is not None and rows > last_rows:
                last_rows, last_growth = rows, now
            if hw is not None:
                self.backlog = sum(hw) - self.rows
            if hw is not None and committed is not None:
                for p, (high, off) in enumerate(zip(hw, committed)):
                    prev = moved.get(p)
                    if prev is None or off != prev[0] or off >= high:
                        if prev is not None and now - prev[1] > 20:
                            log(f"partition {p}: commits resumed after {now - prev[1]:.0f}s "
                                f"(stood at {prev[0]} from {prev[1] - START:.0f}s to {now - START:.0f}s)")
                        moved[p] = (off, now)
                    else:
                        stall = now - prev[1]
                        if stall > self.max_partition_stall:
                            self.max_partition_stall, self.stalled_partition = stall, p
                        if stall > self.args.evidence_after and self.evidence_taken_for != ("p", p, prev[1]):
                            self.evidence_taken_for = ("p", p, prev[1])
                            self.evidence(f"partition {p} commits stalled {stall:.0f}s at {off} (high {high})")
            if self.backlog > 0:
                stall = now - last_growth
                self.max_stall = max(self.max_stall, stall)
                if stall > self.args.evidence_after and self.evidence_taken_for != last_growth:
                    self.evidence_taken_for = last_growth
                    self.evidence(f"rows stalled {stall:.0f}s at {self.rows} with backlog {self.backlog}")
            else:
                last_growth = now
            if now - last_report >= 15:
                last_report = now
                reps = self.live_replicas()
                assigned = [sum(float(l.split()[-1]) for l in r.metric("analytics_assigned_partitions")) for r in reps]
                log(f"produced={self.produced} rows={self.rows} backlog={self.backlog} replicas={len(reps)} "
                    f"assigned={assigned} max_stall={self.max_stall:.1f}s")
            time.sleep(1)
        c.close()
        g.close()

    def evidence(self, why: str) -> None:
        path = self.work / f"evidence-{int(time.monotonic() - START)}s.txt"
        lines = [f"# {why}", f"# faults so far: {self.faults}"]
        for r in self.live_replicas():
            ready = http_get(r.port, "/readyz")
            lines.append(f"## {r.name} (pid {r.proc.pid}) /readyz: {ready}")
            lines += r.metric("analytics_assigned_partitions") + r.metric("analytics_consumer")
            try:
                tail = r.log.read_text(errors="replace").splitlines()[-40:]
            except OSError:
                tail = []
            lines += ["### last log lines"] + tail
        out = subprocess.run(
            [str(KAFKA_SCRIPT), "tool", "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
             "--bootstrap-server", self.direct, "--describe", "--group", self.group, "--members", "--verbose"],
            capture_output=True, text=True, timeout=60)
        lines += ["## group members (ConsumerGroupCommand --describe --members --verbose)", out.stdout, out.stderr]
        out = subprocess.run(
            [str(KAFKA_SCRIPT), "tool", "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
             "--bootstrap-server", self.direct, "--describe", "--group", self.group, "--state"],
            capture_output=True, text=True, timeout=60)
        lines += ["## group state", out.stdout, out.stderr]
        for node in self.nodes:
            try:
                hits = [l for l in node.log.read_text(errors="replace").splitlines() if self.group in l][-40:]
            except OSError:
                hits = []
            lines += [f"## kafka node {node.id} log lines naming the group"] + hits
        path.write_text("\n".join(lines) + "\n")
        log(f"EVIDENCE: {why}; written to {path}")

    # -------------------------------------------------------------- faults
    def sigterm(self, r: Replica) -> None:
        code = r.sigterm(self.args.sigterm_timeout)
        self.sigterm_total += 1
        self.exit_codes.append(f"{r.name}:{code}")
        if code != 0:
            self.sigterm_nonzero += 1
            log(f"SIGTERM {r.name}: exit {code} (nonzero)")

    def fault(self, name: str) -> None:
        reps = self.live_replicas()
        self.faults[name] = self.faults.get(name, 0) + 1
        if name == "replica-kill" and reps:
            r = self.rng.choice(reps)
            r.kill9()
            log(f"fault replica-kill: SIGKILL {r.name}")
            time.sleep(self.rng.uniform(2, 5))
            log(f"  replacement {self.add_replica().name}")
        elif name == "scale-up" and len(reps) < 3:
            log(f"fault scale-up: {len(reps)} -> {len(reps) + 1} ({self.add_replica().name})")
        elif name == "scale-down" and len(reps) > 1:
            r = self.rng.choice(reps)
            log(f"fault scale-down: {len(reps)} -> {len(reps) - 1} (SIGTERM {r.name})")
            self.sigterm(r)
        elif name == "scale-to-one" and len(reps) == 3:
            victims = self.rng.sample(reps, 2)
            log(f"fault scale-to-one: SIGTERM {victims[0].name} and {victims[1].name} within a second")
            threads = []
            for i, r in enumerate(victims):
                threads.append(threading.Thread(target=self.sigterm, args=(r,)))
                threads[-1].start()
                if i == 0:
                    time.sleep(self.rng.uniform(0.1, 0.9))
            for t in threads:
                t.join()
        elif name == "pg-crash":
            down = self.rng.uniform(3, 8)
            log(f"fault pg-crash: pg_ctl -m immediate stop, {down:.0f}s down")
            self.pg.crash()
            time.sleep(down)
            self.pg.start()
        elif name == "broker-kill":
            node = self.rng.choice(self.nodes)
            down = self.rng.uniform(5, 15)
            log(f"fault broker-kill: SIGKILL kafka node {node.id}, {down:.0f}s down")
            node.kill()
            time.sleep(down)
            node.start()
            node.wait_serving()
            log(f"  kafka node {node.id} serving again")
        elif name == "net-cut":
            down = self.rng.uniform(5, 15)
            log(f"fault net-cut: service <-> Kafka cut for {down:.0f}s")
            for node in self.nodes:
                node.proxy.cut()
            time.sleep(down)
            for node in self.nodes:
                node.proxy.resume()
        else:
            self.faults[name] -= 1
            return

    def inject(self) -> None:
        kinds = ["replica-kill", "scale-up", "scale-down", "scale-to-one", "pg-crash", "broker-kill", "net-cut"]
        weights = [3, 3, 2, 2, 2, 2, 2]
        # Every kind once first (in a seeded random order), so that even a short run meets each
        # fault; then weighted random picks.
        first = [k for k in kinds if k != "scale-up"]
        self.rng.shuffle(first)
        time.sleep(min(20, self.args.fault_every))
        while self.producing and self.faulting:
            reps = len(self.live_replicas())
            if reps < 3 and self.rng.random() < 0.3:
                kind = "scale-up"
            elif first:
                kind = first.pop()
            else:
                kind = self.rng.choices(kinds, weights)[0]
            try:
                self.fault(kind)
            except Exception as e:  # a fault that could not be injected is reported, not fatal
                log(f"fault {kind} failed: {e}")
            time.sleep(self.rng.uniform(0.5, 1.5) * self.args.fault_every)
        log(f"faults done: {self.faults}")

    # -------------------------------------------------------------- run
    def run(self) -> int:
        self.finished = False
        self.produce_failed = 0
        log(f"work dir {self.work}; {self.args.events} events at {self.args.rate}/s; "
            f"{self.args.brokers} Kafka node(s); seed {self.args.seed}")
        try:
            self.start_kafka()
            self.start_postgres()
            for _ in range(self.args.replicas):
                self.add_replica()
            monitor = threading.Thread(target=self.monitor, daemon=True)
            monitor.start()
            producer = threading.Thread(target=self.produce, daemon=True)
            producer.start()
            injector = threading.Thread(target=self.inject, daemon=True)
            if not self.args.no_faults:
                injector.start()
            producer.join()
            self.faulting = False
            if injector.is_alive():
                injector.join()
            if not self.live_replicas():
                self.add_replica()
            log("draining the backlog")
            drained = wait_until(self.args.drain_timeout, lambda: self.rows >= self.produced, 1)
            if not drained:
                log(f"backlog not drained after {self.args.drain_timeout}s: rows {self.rows} of {self.produced}")
                self.evidence(f"not drained after {self.args.drain_timeout}s")
            time.sleep(3)
            for r in self.live_replicas():
                self.sigterm(r)
            self.finished = True
            monitor.join(10)
            return self.report()
        finally:
            self.finished = True
            for r in self.live_replicas():
                r.kill9()
            for node in self.nodes:
                node.proxy.cut()
                node.stop()
            if hasattr(self, "pg"):
                self.pg.destroy()
            if not self.args.keep:
                for node in self.nodes:
                    shutil.rmtree(node.dir, ignore_errors=True)

    def report(self) -> int:
        with psycopg.connect(self.pg.url()) as db:
            rows = db.execute("SELECT count(*) FROM analytics.events").fetchone()[0]
            distinct = db.execute(
                "SELECT count(DISTINCT (kafka_topic, kafka_partition, kafka_offset)) FROM analytics.events"
            ).fetchone()[0]
            seqs = db.execute("SELECT count(DISTINCT (data->>'seq')) FROM analytics.events").fetchone()[0]
            mismatches = db.execute(
                """SELECT count(*) FROM (
                     SELECT date_trunc('minute', "timestamp", 'UTC') AS bucket, event_type, service, count(*) AS n
                     FROM analytics.events GROUP BY 1, 2, 3
                   ) e
                   FULL JOIN analytics.event_counts c USING (bucket, event_type, service)
                   WHERE e.n IS DISTINCT FROM c.count"""
            ).fetchone()[0]
        lost = self.produced - distinct
        duplicated = rows - distinct
        log(f"faults injected: {self.faults}; SIGTERM exits: {' '.join(self.exit_codes)}")
        log(f"distinct seq values {seqs} (a record produced twice by the producer would show here)")
        if self.produce_failed:
            log(f"WARNING: {self.produce_failed} deliveries failed (not counted as produced)")
        print(f"SOAK produced={self.produced} rows={rows} distinct={distinct} lost={lost} "
              f"duplicated={duplicated} aggregates_ok={str(mismatches == 0).lower()} "
              f"sigterm_exit_nonzero={self.sigterm_nonzero} max_stall_s={self.max_stall:.0f} "
              f"max_partition_stall_s={self.max_partition_stall:.0f}", flush=True)
        log(f"longest stall of one partition's commits: {self.max_partition_stall:.0f}s "
            f"(partition {self.stalled_partition}); of the total row count: {self.max_stall:.0f}s")
        ok = lost == 0 and duplicated == 0 and mismatches == 0 and self.sigterm_nonzero == 0
        return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000, help="events to produce (default 1,000,000)")
    ap.add_argument("--rate", type=float, default=2500, help="events per second (default 2500)")
    ap.add_argument("--duration", type=float, help="seconds of producing; sets --rate to events/duration")
    ap.add_argument("--brokers", type=int, choices=(1, 3), default=3, help="Kafka nodes (default 3)")
    ap.add_argument("--replicas", type=int, choices=(1, 2, 3), default=3, help="replicas at the start (default 3)")
    ap.add_argument("--fault-every", type=float, default=25, help="mean seconds between faults (default 25)")
    ap.add_argument("--no-faults", action="store_true", help="no fault injection (a baseline run)")
    ap.add_argument("--drain-timeout", type=float, default=600, help="seconds to wait for the backlog at the end")
    ap.add_argument("--sigterm-timeout", type=float, default=40, help="seconds a replica gets to exit on SIGTERM")
    ap.add_argument("--evidence-after", type=float, default=60, help="stall seconds after which evidence is saved")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "nexus-analytics")
    ap.add_argument("--work-dir", help="default target/soak/<time>")
    ap.add_argument("--keep", action="store_true", help="keep the Kafka data directories")
    args = ap.parse_args()
    if args.duration:
        args.rate = args.events / args.duration
    if not args.bin.exists():
        ap.error(f"{args.bin} not found (cargo build --release)")
    return Soak(args).run()


if __name__ == "__main__":
    sys.exit(main())
