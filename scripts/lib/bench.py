"""End-to-end benchmark of nexus-analytics against the physical limit and two baselines.

Run through `scripts/bench` (which picks the .tools/venv Python); see `scripts/bench --help`
and docs/benchmark.md. Every phase uses a fresh topic on a private Apache Kafka broker (KRaft,
`scripts/kafka node` on ports of its own; `--tansu` for the old stand-in) and a fresh database
in a private PostgreSQL cluster, and all numbers come from the same run on the same machine, so
the ratios mean something even on a shared, noisy host.

Phases
  preload     `nexus-analytics produce --rate 0` writes N events to a fresh topic
  service     the release binary drains the topic into a fresh database: N / (start -> N rows)
  copy        the identical rows (dumped from the service's table) loaded with one COPY
  broker      librdkafka consumer counting the topic's records (no decode, no database)
  naive       the original design: one INSERT + commit per event (Rust, capped in time)
  python      a batched Python consumer (confluent-kafka + psycopg, executemany and COPY)
  connect     Kafka Connect (standalone) + a JDBC sink, when its jars resolve from Maven Central
  latency     fixed offered rate (default 10,000/s); produce -> commit percentiles, RSS
  outage      same rate, the service's PostgreSQL stopped for a while; RSS and recovery
  kill        kill -9 of the service mid-stream, restarted: rows stored vs produced

The last line printed is the machine-readable RESULT line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Modules beside this one (peer_connect, bench_api) `import bench`: run as a script, this is it.
sys.modules.setdefault("bench", sys.modules[__name__])
from waiting import free_port, port_open, wait_until  # noqa: E402,F401  (scripts/lib/waiting.py; bench_api uses them as b.*)

ROOT = Path(__file__).resolve().parents[2]

# Service settings the benchmark runs with unless --service-defaults (each is documented in
# docs/benchmark.md). Batches of up to 10,000 events amortise the per-transaction cost under a
# backlog; a 10 ms linger keeps latency low at moderate rates.
BENCH_PROFILE = {
    "BATCH_MAX_EVENTS": "10000",
    "BATCH_LINGER_MS": "10",
}
# Only with --tansu: tansu answers a Fetch only when fetch.wait.max.ms expires if the partition
# was empty when the request arrived (Kafka answers as soon as data arrives): with librdkafka's
# default of 500 ms every event waits ~250 ms at the broker.
TANSU_PROFILE = {"KAFKA_PROPERTY_FETCH_WAIT_MAX_MS": "50"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
EVENT_COLUMNS = (
    'event_type, user_id, service, "timestamp", data, kafka_topic, kafka_partition, kafka_offset'
)
# Rows, and distinct source records, in a phase's analytics.events: every path (the service and
# its peers) is checked with the same two counts.
ROWS_SQL = "SELECT count(*) FROM analytics.events"
DISTINCT_SQL = ("SELECT count(DISTINCT (kafka_topic, kafka_partition, kafka_offset)) "
                "FROM analytics.events")
# Percentiles of a per-row latency expression {x} (ms) over the rows whose event time is at least
# %s seconds after the first one (the warm-up excluded); count, [p50, p95, p99], max.
LATENCY_SQL = (
    "SELECT count(*), "
    "percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY {x}), max({x}) "
    "FROM analytics.events WHERE \"timestamp\" >= "
    "(SELECT min(\"timestamp\") FROM analytics.events) + make_interval(secs => %s)"
)
# Event time -> the commit of the row's transaction (track_commit_timestamp=on), in ms.
COMMIT_MS = "1000 * extract(epoch FROM pg_xact_commit_timestamp(xmin) - \"timestamp\")"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def die(msg: str) -> None:
    log(f"ERROR: {msg}")
    sys.exit(1)


# ------------------------------------------------------------------------------ processes


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler:
    """Samples VmRSS of one process every `interval` seconds; VmHWM is read at stop()."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self.hwm_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = proc_status_kib(self.pid, "VmRSS")
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
                self.hwm_kib = max(self.hwm_kib, proc_status_kib(self.pid, "VmHWM") or 0)
            self._stop.wait(0.1)

    def peak_mib(self, start: float | None = None, end: float | None = None) -> float:
        vals = [
            r
            for t, r in self.samples
            if (start is None or t >= start) and (end is None or t <= end)
        ]
        return max(vals) / 1024 if vals else 0.0

    def stop(self, csv: Path | None = None) -> None:
        self.hwm_kib = max(self.hwm_kib, proc_status_kib(self.pid, "VmHWM") or 0)
        self._stop.set()
        self._thread.join(timeout=2)
        if csv is not None and self.samples:
            t0 = self.samples[0][0]
            csv.write_text("seconds,rss_kib\n" + "".join(
                f"{t - t0:.2f},{r}\n" for t, r in self.samples))


def cpu_snapshot() -> dict[int, tuple[str, int, int, int]]:
    """pid -> (comm, ppid, utime+stime ticks, start time) for every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry)] = (comm, int(fields[1]), int(fields[11]) + int(fields[12]),
                           int(fields[19]))
    return out


class CpuTracker:
    """CPU time of every process between start and stop(), including processes that start and
    exit in between (sampled every `interval` s, so a short-lived one loses at most that much):
    PostgreSQL backends, psql, a worker that exits when done."""

    def __init__(self, interval: float = 0.5):
        self.before = cpu_snapshot()
        self.last = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.last.update(cpu_snapshot())

    def stop(self) -> "CpuTracker":
        self._stop.set()
        self._thread.join(timeout=5)
        self.last.update(cpu_snapshot())
        return self

    def breakdown(self, roles: dict[int, str], postmaster: int | None) -> dict[str, float]:
        """CPU seconds per role: `roles` names pids; the children of `postmaster` (the private
        cluster) are "postgres"; every other process is "other" (or "bench driver")."""
        total: dict[str, float] = {}
        for pid, (comm, ppid, ticks, start) in self.last.items():
            before = self.before.get(pid)
            # The same process (not a reused pid) counts from its ticks at the start.
            delta = ticks - (before[2] if before and before[3] == start else 0)
            if delta <= 0:
                continue
            if pid in roles:
                role = roles[pid]
            elif ppid in roles and roles[ppid] != "bench driver":
                role = roles[ppid]
            elif postmaster is not None and (pid == postmaster or ppid == postmaster):
                role = "postgres"
            elif postmaster is None and comm.startswith("postgres"):
                role = "postgres"
            elif pid == os.getpid():
                role = "bench driver"
            else:
                role = "other"
            total[role] = total.get(role, 0.0) + delta / CLK_TCK
        return total


def pipeline_cpu(cpu: dict[str, float]) -> float:
    """CPU seconds of the path under test: everything but other processes and the driver."""
    return sum(v for k, v in cpu.items() if k not in ("other", "bench driver"))


def cpu_parts(cpu: dict[str, float], wall: float) -> str:
    return ", ".join(f"{k} {v / wall:.2f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])
                     if v > 0.05)


class Child:
    """A child process with its output in a log file; stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, argv: list[str], env: dict, logdir: Path, cwd: Path):
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 30) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# ------------------------------------------------------------------------------ the bench


@dataclass
class Results:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # path -> {"eps", "steady", "p99", "rss", "cpu", "kill", "note"} for the side-by-side table
    peers: dict[str, dict] = field(default_factory=dict)

    def add(self, phase: str, metric: str, value: str, detail: str = "") -> None:
        self.rows.append((phase, metric, value, detail))
        log(f"{phase}: {metric} = {value} {detail}")

    def rate(self, key: str, phase: str, metric: str, eps: float, detail: str) -> None:
        """A throughput: kept under `key` for the RESULT line and shown as a row."""
        self.values[key] = eps
        self.add(phase, metric, f"{fmt_int(eps)}/s", detail)


def fmt_int(x: float) -> str:
    return f"{x:,.0f}"


class Bench:
    def __init__(self, args):
        self.args = args
        self.res = Results()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.id = f"{stamp.replace('-', '_')}_{os.getpid()}"
        self.logdir = Path(args.log_dir or ROOT / "target" / "bench" / stamp)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="na-bench-"))
        self.children: list[Child] = []
        self.databases: list[tuple[str, str]] = []  # (admin url, name)
        self.private_pg: PrivatePostgres | None = None
        self.broker: Child | None = None
        self.broker_kind = "external"
        self.bin = Path(args.bin)
        self.clients_bin = Path(args.clients_bin)
        self.admin_url = args.admin_url  # None: the private cluster (set in run())
        self.clean_env = self._clean_env()

    # -- environment ------------------------------------------------------------------

    def _clean_env(self) -> dict:
        """The caller's environment without any setting the service would read."""
        names = set()
        try:
            out = subprocess.run(
                [str(self.bin), "env-vars"], capture_output=True, text=True, timeout=30
            ).stdout
            names = {n.strip() for n in out.splitlines() if n.strip() and not n.endswith("*")}
        except OSError:
            pass
        names |= {"DATABASE_URL", "KAFKA_BROKERS", "KAFKA_TOPICS", "CONFIG_FILE", "RUST_LOG"}
        return {
            k: v
            for k, v in os.environ.items()
            if k not in names and not k.startswith("KAFKA_PROPERTY_")
        }

    def service_env(self, **extra) -> dict:
        env = dict(self.clean_env)
        env.update(
            {
                "KAFKA_SESSION_TIMEOUT_MS": str(self.args.session_timeout_ms),
                "LOG_LEVEL": "info",
                "METRICS_PORT": str(free_port()),
                "API_PORT": str(free_port()),
                "SHUTDOWN_TIMEOUT_SECS": "20",
            }
        )
        env.update(self.settings())
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def settings(self) -> dict:
        """What the benchmark sets on top of the service's defaults."""
        out = {"KAFKA_SESSION_TIMEOUT_MS": str(self.args.session_timeout_ms)}
        if not self.args.service_defaults:
            out.update(BENCH_PROFILE)
            if self.args.tansu:
                out.update(TANSU_PROFILE)
        for kv in self.args.service_env:
            k, _, v = kv.partition("=")
            out[k] = v
        return out

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> Child:
        child = Child(name, [str(a) for a in argv], env or dict(self.clean_env), self.logdir,
                      self.workdir)
        self.children.append(child)
        return child

    # -- broker -------------------------------------------------------------------------

    def start_broker(self) -> None:
        if self.args.brokers:
            self.brokers = self.args.brokers
            self.broker_kind = "external"
            log(f"broker: using {self.brokers} (--brokers)")
            return
        if self.args.tansu:
            self.start_tansu()
        else:
            self.start_kafka()

    def start_kafka(self) -> None:
        """A private single-node Apache Kafka (KRaft) through `scripts/kafka node`, so the
        broker's settings are the tests' and run-local's; data in the work dir, deleted after."""
        port, cport = free_port(), free_port()
        argv = [ROOT / "scripts" / "kafka", "node", "--dir", self.workdir / "kafka",
                "--port", port, "--controller-port", cport]
        for kv in self.args.kafka_set:
            argv += ["--set", kv]
        env = dict(self.clean_env)
        env.setdefault("KAFKA_HEAP", self.args.kafka_heap)
        self.broker = self.spawn("kafka", argv, env)
        started = time.monotonic()

        def serving() -> bool:
            if not self.broker.alive():
                die(f"Kafka exited during start-up: {self.broker.tail(30)}")
            return port_open(port) and "Kafka Server started" in self.broker.tail(400)

        if not wait_until(180, serving, 0.2):
            die(f"Kafka did not serve on {port} within 180s: {self.broker.tail(30)}")
        self.brokers = f"127.0.0.1:{port}"
        self.broker_kind = "kafka"
        log(f"broker: private Apache Kafka on {self.brokers} (pid {self.broker.pid}, heap "
            f"{env['KAFKA_HEAP']}), serving after {time.monotonic() - started:.1f}s")

    def start_tansu(self) -> None:
        port = free_port()
        url = f"tcp://127.0.0.1:{port}"
        self.broker = self.spawn(
            "tansu",
            [self.args.tansu_bin, "broker", "--listener-url", url, "--advertised-listener-url",
             url, "--storage-engine", "memory://tansu/"],
        )
        if not wait_until(15, lambda: port_open(port)):
            die(f"tansu did not listen on {port}: {self.broker.tail()}")
        self.brokers = f"127.0.0.1:{port}"
        self.broker_kind = "tansu"
        log(f"broker: private tansu (memory storage) on {self.brokers}, pid {self.broker.pid}")

    def broker_roles(self) -> dict[int, str]:
        return {self.broker.pid: self.broker_kind} if self.broker is not None else {}

    def create_topic(self, name: str) -> str:
        topic = f"bench-{name}-{self.id}"
        if self.broker_kind == "tansu":
            r = subprocess.run(
                [self.args.tansu_bin, "topic", "create", "--broker", f"tcp://{self.brokers}",
                 "--partitions", str(self.args.partitions), topic],
                capture_output=True, text=True, timeout=60,
            )
            if r.returncode != 0:
                die(f"cannot create topic {topic}: {r.stderr.strip()}")
            return topic
        # Kafka (auto.create.topics.enable=false in scripts/kafka): create it and wait until
        # every partition has a leader.
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.brokers})
        fut = admin.create_topics([NewTopic(topic, self.args.partitions, 1)],
                                  operation_timeout=30)[topic]
        try:
            fut.result(timeout=60)
        except Exception as e:  # noqa: BLE001 - reported and fatal
            die(f"cannot create topic {topic}: {e}")

        def led() -> bool:
            md = admin.list_topics(topic, timeout=10).topics.get(topic)
            return (md is not None and md.error is None
                    and len(md.partitions) == self.args.partitions
                    and all(p.leader >= 0 for p in md.partitions.values()))

        if not wait_until(30, led, 0.2):
            die(f"topic {topic} has no leader for every partition after 30s")
        return topic

    def produce(self, topic: str, count: int, rate: int, seed: int = 42, name: str = "produce",
                background: bool = False):
        env = dict(self.clean_env, KAFKA_BROKERS=self.brokers, LOG_LEVEL="warn")
        argv = [self.bin, "produce", "--count", count, "--rate", rate, "--topic", topic,
                "--seed", seed, "--users", self.args.users]
        child = self.spawn(name, argv, env)
        if background:
            return child
        started = time.monotonic()
        rc = child.proc.wait()
        elapsed = time.monotonic() - started
        child.stop()
        if rc != 0:
            die(f"produce failed (exit {rc}): {child.tail()}")
        return elapsed

    def run_client(self, what: str, name: str, argv: list, env: dict | None = None,
                   timeout: float | None = None) -> tuple[Child, dict]:
        """Runs a benchmark client to the end; returns it and the JSON summary line it printed,
        or dies naming `what`."""
        child = self.spawn(name, argv, env)
        rc = child.proc.wait(timeout=timeout)
        child.stop()
        out = parse_json_line(child)
        if rc != 0 or not out:
            die(f"{what} failed: {child.tail()}")
        return child, out

    # -- databases ------------------------------------------------------------------------

    def connect(self, url: str, autocommit: bool = True):
        import psycopg

        return psycopg.connect(url, autocommit=autocommit, connect_timeout=10)

    def fresh_db(self, phase: str, admin_url: str | None = None, migrate: bool = True) -> str:
        admin = admin_url or self.admin_url
        name = f"na_bench_{phase}_{self.id}"
        with self.connect(admin) as c:
            c.execute(f"CREATE DATABASE {name}")
        if self.private_pg is None or admin != self.private_pg.admin_url:
            self.databases.append((admin, name))  # the private cluster is deleted whole
        url = with_database(admin, name)
        if migrate:
            env = dict(self.clean_env, DATABASE_URL=url, LOG_LEVEL="warn")
            r = subprocess.run([str(self.bin), "migrate"], env=env, cwd=self.workdir,
                               capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                die(f"nexus-analytics migrate failed: {r.stderr.strip()}")
        return url

    def drop_databases(self) -> None:
        for admin, name in reversed(self.databases):
            try:
                with self.connect(admin) as c:
                    c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            except Exception as e:  # noqa: BLE001 - best effort cleanup
                log(f"could not drop {name}: {e}")
        self.databases.clear()

    def scalar(self, url: str, sql: str):
        with self.connect(url) as c:
            return c.execute(sql).fetchone()[0]

    # -- the service ----------------------------------------------------------------------

    def start_service(self, name: str, url: str, topic: str, **extra) -> tuple[Child, int]:
        env = self.service_env(
            DATABASE_URL=url, KAFKA_BROKERS=self.brokers, KAFKA_TOPICS=topic,
            KAFKA_GROUP_ID=f"g-{topic}", KAFKA_DLQ_TOPIC=f"{topic}.dlq", **extra,
        )
        port = int(env["METRICS_PORT"])
        child = self.spawn(name, [self.bin, "run"], env)
        return child, port

    @staticmethod
    def metric(port: int, name: str) -> float | None:
        """Sum of all series of one metric, or None when /metrics does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                body = r.read().decode()
        except OSError:
            return None
        total, seen = 0.0, False
        pat = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+|NaN)$")
        for line in body.splitlines():
            m = pat.match(line)
            if m and m.group(1) != "NaN":
                total += float(m.group(1))
                seen = True
        return total if seen else 0.0

    @staticmethod
    def histogram(port: int, name: str) -> tuple[float, float]:
        """(sum, count) of a histogram."""
        return (Bench.metric(port, f"{name}_sum") or 0.0, Bench.metric(port, f"{name}_count") or 0.0)

    def wait_stored(self, svc: Child, port: int, n: int, timeout: float,
                    interval: float = 0.05) -> float | None:
        """Waits until the service reports n rows stored; returns the monotonic time seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not svc.alive():
                die(f"the service exited: {svc.tail()}")
            v = self.metric(port, "analytics_events_stored_total")
            if v is not None and v >= n:
                return time.monotonic()
            time.sleep(interval)
        return None

    def wait_assigned(self, svc: Child, port: int, timeout: float = 60) -> None:
        def ready():
            if not svc.alive():
                die(f"the service exited: {svc.tail()}")
            v = self.metric(port, "analytics_assigned_partitions")
            return v is not None and v >= self.args.partitions

        if not wait_until(timeout, ready, 0.1):
            die(f"the service did not get its partitions within {timeout}s: {svc.tail()}")

    # -- phases ---------------------------------------------------------------------------

    def phase_preload(self) -> None:
        n = self.args.events
        self.topic = self.create_topic("load")
        elapsed = self.produce(self.topic, n, 0, seed=42, name="preload")
        self.res.add("preload", "produce rate", f"{fmt_int(n / elapsed)}/s",
                     f"{fmt_int(n)} events, {self.args.partitions} partitions, {elapsed:.1f}s")

    def phase_service(self) -> None:
        n = self.args.events
        url = self.fresh_db("svc")
        self.svc_url = url
        tracker = CpuTracker()
        svc, port = self.start_service("service-throughput", url, self.topic)
        rss = RssSampler(svc.pid)
        first = None

        def progress():
            nonlocal first
            if not svc.alive():
                die(f"the service exited: {svc.tail()}")
            v = self.metric(port, "analytics_events_stored_total")
            if v and first is None:
                first = time.monotonic()
            return v is not None and v >= n

        perf = self.start_perf() if self.args.profile else None
        ok = wait_until(self.args.timeout, progress, 0.05)
        done = time.monotonic()
        tracker.stop()
        if perf:
            self.stop_perf(perf)
        write_sum, batches = self.histogram(port, "analytics_db_write_duration_seconds")
        rss.stop(self.logdir / "rss-service.csv")
        svc.stop()
        if not ok:
            die(f"the service stored fewer than {n} rows within {self.args.timeout}s")
        rows = self.scalar(url, ROWS_SQL)
        distinct = self.scalar(url, DISTINCT_SQL)
        if rows != n or distinct != n:
            die(f"service stored {rows} rows ({distinct} distinct), expected {n}")
        total = done - svc.started
        eps = n / total
        steady = n / (done - first) if first and done > first else eps
        self.res.values["service_rss_mib"] = rss.hwm_kib / 1024
        self.res.values["service_steady_eps"] = steady
        self.res.rate("service_eps", "service", "throughput", eps,
                      f"{fmt_int(n)} rows in {total:.2f}s from process start "
                      f"(first row after {first - svc.started:.2f}s; {fmt_int(steady)}/s after it)")
        self.res.add("service", "throughput after first row", f"{fmt_int(steady)}/s",
                     "the steady state: the group join excluded (most of a --quick run)")
        wall = done - svc.started
        startup = (first or done) - svc.started
        self.res.add("service", "time budget",
                     f"{startup:.1f} + {write_sum:.1f} + {max(wall - startup - write_sum, 0):.1f} s",
                     "start-up to first row (group join) + database writes + consume/decode/commit")
        self.res.add("service", "batches", f"{n / max(batches, 1):.0f} events/batch",
                     f"{batches:.0f} writes, mean {1000 * write_sum / max(batches, 1):.1f} ms "
                     f"({1e6 * write_sum / n:.1f} µs/row)")
        self.res.add("service", "peak RSS", f"{rss.hwm_kib / 1024:.1f} MiB", "VmHWM")
        roles = {svc.pid: "service", **self.broker_roles()}
        cpu = tracker.breakdown(roles, self.postmaster())
        self.cpu_row("service", n, wall, cpu, "service_cpu_s_per_m")

    def postmaster(self) -> int | None:
        """The pid of the private cluster's postmaster when the phases' database is there."""
        pg = self.private_pg
        if pg is None or self.admin_url != pg.admin_url:
            return None
        return pg.postmaster_pid()

    def cpu_row(self, phase: str, n: int, wall: float, cpu: dict[str, float], key: str) -> None:
        """CPU (cores) by process, and CPU-seconds per million events of the path under test
        (its own process, the broker and PostgreSQL; other processes excluded)."""
        per_m = 1e6 * pipeline_cpu(cpu) / max(n, 1)
        self.res.values[key] = per_m
        self.res.add(phase, "CPU (cores)", f"{sum(cpu.values()) / wall:.2f} of {os.cpu_count()}",
                     cpu_parts(cpu, wall))
        self.res.add(phase, "CPU-s per 1M events", f"{per_m:.1f}",
                     "every process of the path (" + ", ".join(
                         k for k in sorted(cpu) if k not in ("other", "bench driver"))
                     + f"); others used {cpu.get('other', 0) / wall:.2f} cores meanwhile")

    def phase_copy(self) -> None:
        n = self.args.events
        dump = self.workdir / "rows.copy"
        with self.connect(self.svc_url) as c, open(dump, "wb") as f:
            with c.cursor().copy(
                f"COPY (SELECT {EVENT_COLUMNS} FROM analytics.events ORDER BY id) TO STDOUT"
            ) as cp:
                for chunk in cp:
                    f.write(chunk)
            bounds = c.execute(
                "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                "JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'analytics.events'::regclass"
            ).fetchall()
        # The ceiling is the best of 1, 2 and 4 parallel COPY streams (one backend each; the
        # machine has two cores and the service writes on two connections), each into a fresh
        # copy of the same table; the single stream is reported beside it.
        lines = dump.read_bytes().splitlines(keepends=True)
        size = dump.stat().st_size
        dump.unlink()
        rates = {}
        for streams in (1, 2, 4):
            rates[streams] = self.copy_streams(lines, bounds, streams)
        best = max(rates, key=rates.get)
        self.res.values["copy1_eps"] = rates[1]
        self.res.rate("copy_eps", "limit", "COPY (best of 1/2/4 streams)", rates[best],
                      f"same {fmt_int(n)} rows ({size / 2**20:.0f} MiB text), same table and "
                      f"indexes; {best} stream(s) best")
        for streams, eps in rates.items():
            self.res.add("limit", f"  COPY, {streams} parallel stream(s)", f"{fmt_int(eps)}/s",
                         "rows dealt round-robin, one psql \\copy each, wall time of the slowest")

    def copy_streams(self, lines: list[bytes], bounds, streams: int) -> float:
        """Loads `lines` into a fresh migrated database with `streams` concurrent COPYs."""
        n = len(lines)
        url = self.fresh_db(f"copy{streams}")
        with self.connect(url) as c:
            existing = {r[0] for r in c.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'analytics.events'::regclass").fetchall()}
            for name, bound in bounds:
                if name not in existing:
                    c.execute(f"CREATE TABLE analytics.{name} PARTITION OF analytics.events {bound}")
        files = []
        for i in range(streams):
            f = self.workdir / f"rows-{streams}-{i}.copy"
            f.write_bytes(b"".join(lines[i::streams]))
            files.append(f)
        # psql's \copy streams each file over the same TCP connection type the service uses.
        started = time.monotonic()
        procs = [subprocess.Popen(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", url, "-c",
             f"\\copy analytics.events ({EVENT_COLUMNS}) FROM '{f}'"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for f in files]
        errors = [p.communicate()[1].strip() for p in procs]
        elapsed = time.monotonic() - started
        for f in files:
            f.unlink()
        if any(p.returncode != 0 for p in procs):
            die(f"COPY ({streams} streams) failed: {[e for e in errors if e]}")
        rows = self.scalar(url, "SELECT count(*) FROM analytics.events")
        if rows != n:
            die(f"COPY ({streams} streams) loaded {rows} rows, expected {n}")
        return n / elapsed

    def phase_broker(self) -> None:
        n = self.args.events
        child, out = self.run_client("broker drain", "broker-drain",
                                     [self.clients_bin, "drain", self.brokers, self.topic, n])
        if out["records"] < n:
            die(f"broker drain failed: {child.tail()}")
        eps = n / out["elapsed_s"]
        self.res.rate("broker_eps", "limit", "broker consume", eps,
                      f"librdkafka consumer counting records, {out['elapsed_s']:.2f}s "
                      f"(first record after {out['first_s']:.2f}s)")

    def phase_naive(self) -> None:
        n = self.args.events
        url = self.fresh_db("naive")
        _, out = self.run_client("naive baseline", "naive",
                                 [self.clients_bin, "naive", self.brokers, self.topic, url, n,
                                  self.args.naive_secs])
        rows = self.scalar(url, "SELECT count(*) FROM analytics.events")
        span = max(out["last_s"] - out["first_s"], 1e-9)
        eps = rows / span
        self.res.rate("naive_eps", "baseline", "naive (1 INSERT+commit/event)", eps,
                      f"Rust, one connection, {fmt_int(rows)} rows in {span:.1f}s "
                      f"(capped at {self.args.naive_secs}s), {1000 * span / max(rows, 1):.2f} ms/event")

    def phase_python(self) -> None:
        n = self.args.events
        best = 0.0
        modes = ["executemany", "copy"] if self.args.python_mode == "both" else [self.args.python_mode]
        for mode in modes:
            url = self.fresh_db(f"py_{mode}")
            env = dict(self.clean_env)
            argv = [sys.executable, Path(__file__).resolve(), "--python-worker", mode,
                    self.brokers, self.topic, url, str(n), str(self.args.session_timeout_ms)]
            tracker = CpuTracker()
            child = self.spawn(f"python-{mode}", argv, env)
            rss = RssSampler(child.pid)
            rc = child.proc.wait(timeout=self.args.timeout)
            tracker.stop()
            rss.stop()
            child.stop()
            out = parse_json_line(child)
            if rc != 0 or not out:
                die(f"python baseline ({mode}) failed: {child.tail()}")
            total = out["done_wall"] - child.started_wall
            cpu = tracker.breakdown({child.pid: "python", **self.broker_roles()},
                                    self.postmaster())
            per_m = 1e6 * pipeline_cpu(cpu) / n
            rows = self.scalar(url, "SELECT count(*) FROM analytics.events")
            if rows != n:
                die(f"python baseline ({mode}) stored {rows} rows, expected {n}")
            eps = n / total
            best = max(best, eps)
            steady = n / max(out["done_s"] - out["first_s"], 1e-9)
            self.res.peers[f"python ({mode})"] = {
                "eps": eps, "steady": steady, "rss": rss.hwm_kib / 1024, "cpu": per_m}
            self.res.add("baseline", f"python batched ({mode})", f"{fmt_int(eps)}/s",
                         f"confluent-kafka + psycopg, batches of {out['batch']}, {total:.2f}s from "
                         f"start ({fmt_int(n / max(out['done_s'] - out['first_s'], 1e-9))}/s after "
                         f"first batch); {per_m:.1f} CPU-s per 1M events "
                         f"(python, broker, postgres)")
        self.res.values["python_eps"] = best

    def phase_connect(self) -> None:
        """Kafka Connect (standalone) + Debezium's JDBC sink: the peer a platform team would
        pick (scripts/lib/peer_connect.py says how it is set up and why).

        `scripts/install-tools connect` resolves the worker and the sink plugin from Maven
        Central; when the registry refused the sink (recorded in sink.refused) the peer is
        reported as blocked, with what was refused, and the worker alone is started on the
        same broker to show what the JVM costs before it does any work."""
        import peer_connect

        home = Path(self.args.connect_home).resolve()
        refused = home / "sink.refused"
        if not (home / "worker").is_dir():
            self.res.add("peer", "Kafka Connect + JDBC sink", "not installed",
                         f"no worker jars in {home} (scripts/install-tools connect)")
            return
        if not (home / "sink.installed").exists():
            text = refused.read_text() if refused.exists() else ""
            why = (text.splitlines()[1:2] or ["no sink plugin resolved"])[0]
            m = re.search(r"([\w.-]+:[\w.-]+:jar:[\w.-]+)[^:]*?(?:was not found|in central)", why)
            what = m.group(1) if m else why[:160]
            self.res.add("peer", "Kafka Connect + JDBC sink", "blocked",
                         f"Maven Central refused {what}: not measured (the other sinks "
                         "tried: docs/benchmark.md, Peers)")
            self.connect_idle(home)
            return
        peer_connect.throughput(self, home)
        if "kill" not in self.args.skip:
            peer_connect.kill(self, home)
        if "latency" not in self.args.skip:
            peer_connect.latency(self)

    def connect_worker_props(self, home: Path, rest_port: int, tag: str = "idle",
                             extra: str = "") -> Path:
        """A standalone Connect worker's properties on the benchmark's broker; `extra` lines
        (a peer's consumer tuning) are appended."""
        props = self.workdir / f"connect-worker-{tag}.properties"
        props.write_text(
            f"bootstrap.servers={self.brokers}\n"
            "key.converter=org.apache.kafka.connect.storage.StringConverter\n"
            "value.converter=org.apache.kafka.connect.json.JsonConverter\n"
            "value.converter.schemas.enable=true\n"
            f"offset.storage.file.filename={self.workdir / f'connect-{tag}.offsets'}\n"
            # A sink's offsets are committed to its consumer group at this interval.
            "offset.flush.interval.ms=1000\n"
            f"plugin.path={home / 'sink'}\n"
            f"listeners=http://127.0.0.1:{rest_port}\n" + extra)
        return props

    @staticmethod
    def connect_argv(home: Path, *props: Path) -> list:
        """ConnectStandalone with connect-standalone.sh's heap (-Xms256M -Xmx2G) and the
        broker's log4j2 layout."""
        return ["java", "-Xms256m", "-Xmx2g", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={ROOT / 'scripts/lib/kafka/log4j2.properties'}",
                "-cp", f"{home / 'worker'}/*", "org.apache.kafka.connect.cli.ConnectStandalone",
                *props]

    def connect_idle(self, home: Path) -> None:
        """The worker with no connector on the benchmark's broker: start-up time and RSS."""
        rest = free_port()
        props = self.connect_worker_props(home, rest)
        worker = self.spawn("connect-worker-idle", self.connect_argv(home, props))
        rss = RssSampler(worker.pid)

        def up() -> bool:
            if not worker.alive():
                return True
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{rest}/", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        ok = wait_until(120, up, 0.2)
        ready = time.monotonic() - worker.started
        if not ok or not worker.alive():
            rss.stop()
            worker.stop()
            self.res.add("peer", "  Connect worker alone", "did not start",
                         f"log {worker.log_path}: {worker.tail(3)}")
            return
        time.sleep(5)
        rss.stop(self.logdir / "rss-connect-idle.csv")
        worker.stop()
        self.res.values["connect_idle_rss_mib"] = rss.hwm_kib / 1024
        self.res.add("peer", "  Connect worker alone", f"{rss.hwm_kib / 1024:.1f} MiB RSS",
                     f"connect-runtime {self.args.kafka_version} standalone, no connector, "
                     f"REST up after {ready:.1f}s, 5 s idle (VmHWM; -Xms256m -Xmx2g as "
                     "connect-standalone.sh); not a throughput figure")

    def phase_kill(self) -> None:
        """kill -9 of the service mid-stream, restarted at once: rows vs produced."""
        rate, secs = self.args.rate, self.args.kill_secs
        count = rate * secs
        url = self.fresh_db("kill")
        topic = self.create_topic("kill")
        svc, port = self.start_service("service-kill-1", url, topic)
        self.wait_assigned(svc, port)
        producer = self.produce(topic, count, rate, seed=11, name="produce-kill", background=True)
        time.sleep(secs * 0.4)
        stored_before = self.metric(port, "analytics_events_stored_total") or 0
        os.kill(svc.pid, signal.SIGKILL)
        svc.proc.wait()
        killed = time.monotonic()
        log(f"kill: SIGKILL of the service after {stored_before:.0f} rows stored; restarting")
        svc2, port2 = self.start_service("service-kill-2", url, topic)

        def distinct() -> int:
            return self.scalar(url, DISTINCT_SQL)

        if producer.proc.wait(timeout=secs + 120) != 0:
            die(f"kill producer failed: {producer.tail()}")
        producer.stop()
        ok = wait_until(120, lambda: svc2.alive() and distinct() >= count, 0.5)
        caught = time.monotonic() - killed
        redelivered = self.metric(port2, "analytics_events_duplicates_total") or 0
        svc2.stop()
        rows = self.scalar(url, "SELECT count(*) FROM analytics.events")
        dist = distinct()
        lost, dup = count - dist, rows - dist
        self.res.values["kill_lost"] = lost
        self.res.values["kill_duplicated"] = dup
        self.res.add("kill -9", f"service @{fmt_int(rate)}/s", f"lost {lost}, duplicated {dup}",
                     f"{fmt_int(count)} produced, {fmt_int(rows)} rows, {fmt_int(dist)} distinct; "
                     f"killed after {fmt_int(stored_before)} stored, restarted at once; "
                     f"{redelivered:.0f} redelivered records skipped; all stored "
                     f"{caught:.1f}s after the kill" + ("" if ok else " (NOT all within 120 s)"))

    def phase_latency(self) -> None:
        rate, secs, warm = self.args.rate, self.args.latency_secs, self.args.latency_warm_secs
        count = rate * (warm + secs)
        pg = self.ensure_private_pg()
        url = self.fresh_db("latency", admin_url=pg.admin_url)
        topic = self.create_topic("latency")
        svc, port = self.start_service("service-latency", url, topic)
        self.wait_assigned(svc, port)
        rss = RssSampler(svc.pid)
        # The broker's own delivery latency on the same topic at the same time: a plain
        # librdkafka consumer with the service's fetch settings, no database.
        probe_env = dict(self.clean_env)
        probe_env.update({k: v for k, v in self.settings().items() if k.startswith("KAFKA_PROPERTY_")})
        probe = self.spawn("broker-latency", [self.clients_bin, "latency", self.brokers, topic,
                                              count, warm], probe_env)
        tracker = CpuTracker()
        started = time.monotonic()
        self.produce(topic, count, rate, seed=7, name="produce-latency")
        produce_s = time.monotonic() - started
        ok = self.wait_stored(svc, port, count, timeout=120)
        wall = time.monotonic() - started
        tracker.stop()
        write_sum, batches = self.histogram(port, "analytics_db_write_duration_seconds")
        rss.stop(self.logdir / "rss-latency.csv")
        svc.stop()
        if ok is None:
            die(f"latency phase: fewer than {count} rows stored")
        q, commit = LATENCY_SQL, COMMIT_MS
        start = "1000 * extract(epoch FROM created_at - \"timestamp\")"
        with self.connect(url) as c:
            total = c.execute("SELECT count(*) FROM analytics.events").fetchone()[0]
            rows, pc, pc_max = c.execute(q.format(x=commit), [warm]).fetchone()
            _, ps, ps_max = c.execute(q.format(x=start), [warm]).fetchone()
            _, pw, pw_max = c.execute(q.format(x=commit), [0]).fetchone()
            _, pd, pd_max = c.execute(q.format(
                x="1000 * extract(epoch FROM pg_xact_commit_timestamp(xmin) - created_at)"),
                [warm]).fetchone()
        if total != count:
            die(f"latency phase stored {total} rows, expected {count}")
        try:
            probe.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        probe.stop()
        broker = parse_json_line(probe)
        p50, p95, p99 = (float(x) for x in pc)
        self.res.values["p99_ms"] = p99
        self.res.values["rss_mib"] = rss.hwm_kib / 1024
        self.res.add("latency", f"produce->commit @{fmt_int(rate)}/s",
                     f"p50 {p50:.1f} / p95 {p95:.1f} / p99 {p99:.1f} ms",
                     f"max {float(pc_max):.1f} ms; {fmt_int(rows)} events after a {warm}s warm-up "
                     f"(excluded); commit time = pg_xact_commit_timestamp")
        self.res.add("latency", "  including warm-up", f"p99 {float(pw[2]):.1f} ms",
                     f"max {float(pw_max):.1f} ms; all {fmt_int(count)} events over {produce_s:.1f}s")
        self.res.add("latency", "produce->created_at",
                     f"p50 {float(ps[0]):.1f} / p95 {float(ps[1]):.1f} / p99 {float(ps[2]):.1f} ms",
                     "created_at = now() = transaction start (commit is later)")
        if broker and broker.get("measured"):
            self.res.add("latency", "  broker alone (same topic)",
                         f"p50 {broker['p50_ms']:.1f} / p95 {broker['p95_ms']:.1f} / "
                         f"p99 {broker['p99_ms']:.1f} ms",
                         f"max {broker['max_ms']:.1f} ms; produce -> received by a plain consumer "
                         "(the floor for the service)")
        self.res.add("latency", "  of which in the database",
                     f"p50 {float(pd[0]):.1f} / p95 {float(pd[1]):.1f} / p99 {float(pd[2]):.1f} ms",
                     "transaction start -> commit")
        self.res.add("latency", "batches", f"{n_per(count, batches)} events/batch",
                     f"{batches:.0f} writes, mean {1000 * write_sum / max(batches, 1):.1f} ms")
        roles = {svc.pid: "service", **self.broker_roles()}
        cpu = tracker.breakdown(roles, self.postmaster())
        self.res.add("latency", "CPU (cores)", f"{sum(cpu.values()) / wall:.2f} of {os.cpu_count()}",
                     cpu_parts(cpu, wall) + " (other: the producer and the probe included)")
        self.res.add("latency", "peak RSS", f"{rss.hwm_kib / 1024:.1f} MiB", "VmHWM")

    def phase_outage(self) -> None:
        rate, down = self.args.rate, self.args.down_secs
        warm, after = self.args.outage_warm_secs, self.args.outage_after_secs
        count = rate * (warm + down + after)
        pg = self.ensure_private_pg()
        url = self.fresh_db("outage", admin_url=pg.admin_url)
        topic = self.create_topic("outage")
        svc, port = self.start_service("service-outage", url, topic)
        self.wait_assigned(svc, port)
        rss = RssSampler(svc.pid)
        producer = self.produce(topic, count, rate, seed=9, name="produce-outage", background=True)
        t0 = time.monotonic()
        time.sleep(warm)
        pg.stop()
        t_down = time.monotonic()
        log(f"outage: PostgreSQL stopped for {down}s under {fmt_int(rate)}/s")
        time.sleep(down)
        pg.start()
        t_up = time.monotonic()
        backlog = rate * (t_up - t0)
        caught = None

        def handled() -> float:
            # Rows stored + redeliveries skipped (a batch in flight at the crash may have
            # committed without the service knowing; it is written again and skipped).
            return ((self.metric(port, "analytics_events_stored_total") or 0)
                    + (self.metric(port, "analytics_events_duplicates_total") or 0))

        while time.monotonic() - t_up < 120:
            if not svc.alive():
                die(f"the service exited: {svc.tail()}")
            if handled() >= backlog:
                caught = time.monotonic()
                break
            time.sleep(0.05)
        if producer.proc.wait(timeout=120) != 0:
            die(f"outage producer failed: {producer.tail()}")
        producer.stop()
        ok = wait_until(120, lambda: handled() >= count, 0.1)
        duplicates = self.metric(port, "analytics_events_duplicates_total") or 0
        rss.stop(self.logdir / "rss-outage.csv")
        paused_peak = rss.peak_mib(t_down, t_up)
        svc.stop()
        rows = self.scalar(url, ROWS_SQL)
        distinct = self.scalar(url, DISTINCT_SQL)
        if not ok or rows != count or distinct != count:
            die(f"outage phase: {rows} rows ({distinct} distinct), expected {count}")
        self.res.values["outage_rss_mib"] = rss.hwm_kib / 1024
        self.res.add("outage", f"DB down {down}s @{fmt_int(rate)}/s",
                     f"peak RSS {paused_peak:.1f} MiB while down",
                     f"{rss.hwm_kib / 1024:.1f} MiB VmHWM over the phase (incl. catch-up); all "
                     f"{fmt_int(count)} events stored once ({duplicates:.0f} redelivered, skipped)")
        if caught:
            self.res.add("outage", "catch-up", f"{caught - t_up:.1f}s",
                         f"{fmt_int(rate * down)}-event backlog drained after PostgreSQL came back")

    # -- private PostgreSQL (latency and outage phases) ------------------------------------

    def ensure_private_pg(self) -> "PrivatePostgres":
        if self.private_pg is None:
            self.private_pg = PrivatePostgres(self.workdir / "pg", self.logdir)
            log(f"postgres: private cluster on port {self.private_pg.port} "
                f"(track_commit_timestamp=on)")
        return self.private_pg

    # -- profiling ------------------------------------------------------------------------

    def start_perf(self):
        if not shutil.which("perf"):
            log("perf not found; --profile ignored")
            return None
        out = self.logdir / "perf.data"
        return subprocess.Popen(
            ["perf", "record", "-a", "-g", "-F", "199", "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def stop_perf(self, perf) -> None:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=60)
        out = self.logdir / "perf.data"
        report = self.logdir / "perf-report.txt"
        with open(report, "w") as f:
            subprocess.run(["perf", "report", "-i", str(out), "--no-children", "--sort",
                            "comm,dso", "-g", "none", "--stdio"], stdout=f,
                           stderr=subprocess.DEVNULL)
        with open(self.logdir / "perf-symbols.txt", "w") as f:
            subprocess.run(["perf", "report", "-i", str(out), "--no-children", "--sort",
                            "comm,dso,sym", "-g", "none", "--stdio"], stdout=f,
                           stderr=subprocess.DEVNULL)
        log(f"profile: {report} (by process and library), perf-symbols.txt (by symbol)")

    # -- driver -----------------------------------------------------------------------------

    def run(self) -> int:
        started = time.monotonic()
        phases = [p for p in PHASES if p not in self.args.skip]
        try:
            self.start_broker()
            if self.admin_url is None:
                self.admin_url = self.ensure_private_pg().admin_url
            for p in phases:
                t = time.monotonic()
                log(f"--- phase {p}")
                getattr(self, f"phase_{p}")()
                self.res.rows.append(("", "", "", ""))  # spacer
                log(f"--- phase {p} took {time.monotonic() - t:.1f}s")
        finally:
            self.cleanup()
        self.print_table(time.monotonic() - started)
        return 0

    def cleanup(self) -> None:
        for child in reversed(self.children):
            if child.alive():
                child.stop(grace=30)
        if self.private_pg is not None:
            if self.args.keep:
                log(f"kept private PostgreSQL: {self.private_pg.admin_url} (data {self.private_pg.data})")
            else:
                self.private_pg.destroy()
        if not self.args.keep:
            self.drop_databases()
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def print_table(self, wall: float) -> None:
        v = self.res.values
        limit = min(v.get("copy_eps", 0) or float("inf"), v.get("broker_eps", 0) or float("inf"))
        if limit == float("inf"):
            limit = 0
        svc = v.get("service_eps", 0)
        r_limit = svc / limit if limit else 0
        r_naive = svc / v["naive_eps"] if v.get("naive_eps") else 0
        r_python = svc / v["python_eps"] if v.get("python_eps") else 0
        rows = [r for r in self.res.rows]
        while rows and rows[-1] == ("", "", "", ""):
            rows.pop()
        rows += [("", "", "", ""),
                 ("ratio", "service / limit", f"{r_limit:.2f}",
                  f"limit = min(COPY, broker) = {fmt_int(limit)}/s (target >= 0.5)"),
                 ("ratio", "service / naive", f"{r_naive:.1f}", "target >= 20"),
                 ("ratio", "service / python", f"{r_python:.1f}", "target >= 3")]
        w = [max(len(r[i]) for r in rows + [("phase", "metric", "value", "")]) for i in range(3)]
        print()
        print(f"nexus-analytics benchmark ({'quick' if self.args.quick else 'full'}: "
              f"{fmt_int(self.args.events)} events, {self.args.partitions} partitions, "
              f"{os.cpu_count()} CPUs, {wall:.0f}s wall)")
        print(f"{'phase':<{w[0]}}  {'metric':<{w[1]}}  {'value':>{w[2]}}  detail")
        print("-" * (w[0] + w[1] + w[2] + 40))
        for p, m, val, d in rows:
            if (p, m, val, d) == ("", "", "", ""):
                print()
                continue
            print(f"{p:<{w[0]}}  {m:<{w[1]}}  {val:>{w[2]}}  {d}")
        self.print_peers()
        print("\nservice settings: " + " ".join(f"{k}={v}" for k, v in self.settings().items())
              + " (others: the service's defaults)")
        print(f"broker: {self.broker_kind} {self.brokers}; database: "
              + ("private cluster" if self.args.admin_url is None
                 else "the server of --admin-url"))
        print(f"logs: {self.logdir}")

        def num(key: str, fmt: str = ".0f") -> str:
            return format(v[key], fmt) if key in v else "na"

        connect = v.get("connect_eps")
        r_connect = f"{svc / connect:.2f}" if connect else "na"
        c_steady = v.get("connect_steady_eps")
        r_connect_steady = (f"{v['service_steady_eps'] / c_steady:.2f}"
                            if c_steady and "service_steady_eps" in v else "na")
        print(
            f"RESULT service_eps={svc:.0f} copy_eps={v.get('copy_eps', 0):.0f} "
            f"broker_eps={v.get('broker_eps', 0):.0f} naive_eps={v.get('naive_eps', 0):.0f} "
            f"python_eps={v.get('python_eps', 0):.0f} copy1_eps={v.get('copy1_eps', 0):.0f} "
            f"service_steady_eps={v.get('service_steady_eps', 0):.0f} ratio_vs_limit={r_limit:.2f} "
            f"ratio_vs_naive={r_naive:.1f} ratio_vs_python={r_python:.1f} "
            f"p99_ms={v.get('p99_ms', 0):.1f} rss_mib={v.get('rss_mib', 0):.1f} "
            f"connect_eps={num('connect_eps')} rpconnect_eps=na ratio_vs_connect={r_connect} "
            f"ratio_vs_rpconnect=na connect_rss_mib={num('connect_rss_mib', '.1f')} "
            f"rpconnect_rss_mib=na cpu_s_per_m={num('service_cpu_s_per_m', '.1f')} "
            f"service_rss_mib={num('service_rss_mib', '.1f')} "
            f"kill_lost={num('kill_lost')} kill_duplicated={num('kill_duplicated')} "
            f"connect_steady_eps={num('connect_steady_eps')} "
            f"ratio_vs_connect_steady={r_connect_steady} connect_p99_ms={num('connect_p99_ms', '.1f')} "
            f"connect_cpu_s_per_m={num('connect_cpu_s_per_m', '.1f')} "
            f"connect_kill_lost={num('connect_kill_lost')} "
            f"connect_kill_duplicated={num('connect_kill_duplicated')} "
            f"broker={self.broker_kind}",
            flush=True,
        )

    def print_peers(self) -> None:
        """The side-by-side table: the service and every peer/baseline on the same topic,
        database server and machine in this run."""
        v = self.res.values
        rows = []
        if "service_eps" in v:
            rows.append(("nexus-analytics", v["service_eps"], v.get("service_steady_eps"),
                         v.get("p99_ms"), v.get("service_rss_mib"), v.get("service_cpu_s_per_m"),
                         (f"lost {v['kill_lost']:.0f} / dup {v['kill_duplicated']:.0f}"
                          if "kill_lost" in v else "-"), ""))
        connect = next((r for r in self.res.rows if r[0] == "peer" and r[1].startswith("Kafka")),
                       None)
        if connect is not None:
            idle = v.get("connect_idle_rss_mib")
            kill = (f"lost {v['connect_kill_lost']:.0f} / dup {v['connect_kill_duplicated']:.0f}"
                    if "connect_kill_lost" in v else "-")
            note = ("Debezium JDBC sink, upsert" if "connect_eps" in v
                    else connect[2] + (f" (worker alone: {idle:.0f} MiB RSS)" if idle else ""))
            rows.append(("Kafka Connect + JDBC sink", v.get("connect_eps"),
                         v.get("connect_steady_eps"), v.get("connect_p99_ms"),
                         v.get("connect_rss_mib"), v.get("connect_cpu_s_per_m"), kill, note))
        rows.append(("Redpanda Connect", None, None, None, None, None, "-",
                     "not built: the Go proxy marks its module not-to-use (licence); "
                     "benthos core has no kafka/sql components"))
        for name, p in self.res.peers.items():
            rows.append((name, p["eps"], p["steady"], None, p["rss"], p["cpu"], "-", ""))
        if "naive_eps" in v:
            rows.append(("naive (INSERT+commit/event)", v["naive_eps"], None, None, None, None,
                         "-", "time-capped"))

        def f(x, fmt):
            return "-" if x is None else format(x, fmt)

        head = ("path", "events/s", "after 1st row", "p99 ms", "peak RSS MiB", "CPU-s/1M",
                "kill -9", "note")
        table = [head] + [(r[0], f(r[1], ",.0f"), f(r[2], ",.0f"), f(r[3], ".1f"),
                           f(r[4], ".1f"), f(r[5], ".1f"), r[6], r[7]) for r in rows]
        w = [max(len(t[i]) for t in table) for i in range(7)]
        print("\nside by side (same broker, same database server, same machine, this run; "
              "p99 at the fixed rate, RSS of the path's own process)")
        for t in table:
            print("  ".join(t[i].ljust(w[i]) if i == 0 else t[i].rjust(w[i]) for i in range(7))
                  + ("  " + t[7] if t[7] else ""))


PHASES = ["preload", "service", "copy", "broker", "naive", "python", "connect", "kill", "latency",
          "outage"]


def n_per(rows: float, batches: float) -> str:
    return f"{rows / batches:.0f}" if batches else "-"


def parse_json_line(child: Child) -> dict | None:
    try:
        lines = child.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(url)
    return urlunsplit((u.scheme, u.netloc, f"/{name}", u.query, u.fragment))


class PrivatePostgres:
    """initdb + pg_ctl cluster on a free port (as the postgres OS user when run as root)."""

    def __init__(self, base: Path, logdir: Path):
        self.bin = pg_bin_dir()
        self.base = base
        self.data = base / "data"
        self.log = logdir / "private-postgres.log"
        self.port = free_port()
        base.mkdir(parents=True, exist_ok=True)
        self._chown(base.parent)
        self._chown(base)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")

    def _run(self, prog: str, *args: str) -> None:
        argv = [str(self.bin / prog), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            die(f"{prog} failed: {r.stderr.strip() or r.stdout.strip()}")

    @property
    def admin_url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        if os.geteuid() == 0 and not self.log.exists():
            self.log.touch()
            shutil.chown(self.log, "postgres", "postgres")
        # Same durability as the system cluster (fsync and synchronous_commit on); commit
        # timestamps on, so latency is measured to the real commit.
        opts = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
                f"-c track_commit_timestamp=on {os.environ.get('BENCH_PG_OPTS', '')}")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "start")

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stops immediately, like a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        argv = [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, capture_output=True, timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)


def pg_bin_dir() -> Path:
    if os.environ.get("PG_BIN_DIR"):
        return Path(os.environ["PG_BIN_DIR"])
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not versions:
        die("no PostgreSQL server binaries (set PG_BIN_DIR)")
    return versions[-1].parent


# ------------------------------------------------------------------- the Python baseline


def python_worker(mode: str, brokers: str, topic: str, url: str, n: int, session_ms: int) -> None:
    """What a team would write: a batched consumer with confluent-kafka and psycopg.

    Poll up to BATCH records, decode JSON, insert them in one transaction (executemany with
    ON CONFLICT DO NOTHING, or COPY into a temporary table then INSERT ... SELECT ON CONFLICT),
    commit, then commit the Kafka offsets. Same delivery guarantee as the service (the offsets
    follow the database commit; redeliveries are skipped by the unique key).
    """
    import psycopg
    from confluent_kafka import Consumer

    batch = 5000
    consumer = Consumer({
        "bootstrap.servers": brokers,
        "group.id": f"py-{mode}-{topic}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": session_ms,
    })
    consumer.subscribe([topic])
    conn = psycopg.connect(url)
    insert = (f"INSERT INTO analytics.events ({EVENT_COLUMNS}) "
              "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING")
    if mode == "copy":
        conn.execute("CREATE TEMP TABLE staging (event_type text, user_id text, service text, "
                     "\"timestamp\" timestamptz, data jsonb, kafka_topic text, kafka_partition int, "
                     "kafka_offset bigint) ON COMMIT DELETE ROWS")
        conn.commit()
    stored, first = 0, None
    dumps = json.dumps
    while stored < n:
        msgs = consumer.consume(num_messages=batch, timeout=0.2)
        if not msgs:
            continue
        if first is None:
            first = time.time()
        rows = []
        for m in msgs:
            if m.error():
                continue
            try:
                e = json.loads(m.value())
                data = e.get("data")
                rows.append((e["event_type"], e["user_id"], e["service"], e["timestamp"],
                             None if data is None else dumps(data), m.topic(), m.partition(),
                             m.offset()))
            except (ValueError, KeyError):
                continue  # a real consumer would dead-letter it
        with conn.cursor() as cur:
            if mode == "executemany":
                cur.executemany(insert, rows)
            else:
                with cur.copy(f"COPY staging ({EVENT_COLUMNS}) FROM STDIN") as cp:
                    for r in rows:
                        cp.write_row(r)
                cur.execute(f"INSERT INTO analytics.events ({EVENT_COLUMNS}) "
                            f"SELECT {EVENT_COLUMNS} FROM staging ON CONFLICT DO NOTHING")
        conn.commit()
        consumer.commit(asynchronous=False)
        stored += len(rows)
    done = time.time()
    consumer.close()
    print(json.dumps({"mode": mode, "records": stored, "batch": batch,
                      "first_s": first or done, "done_s": done, "done_wall": done}), flush=True)


# ----------------------------------------------------------------------------------- main


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--python-worker":
        mode, brokers, topic, url, n, session_ms = sys.argv[2:8]
        python_worker(mode, brokers, topic, url, int(n), int(session_ms))
        return 0
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="End-to-end benchmark: service vs COPY/broker limit vs naive and Python "
                    "baselines, latency at a fixed rate, memory, DB outage. Prints a table and "
                    "a RESULT line last.",
    )
    p.add_argument("--quick", action="store_true",
                   help="CI-sized run: 100k events, latency 15s, outage 10s, naive 10s")
    p.add_argument("--events", type=int, help="events to pre-load (default 1,000,000)")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--rate", type=int, default=10_000, help="offered rate of latency/outage")
    p.add_argument("--latency-secs", type=int, help="default 60 (quick: 15)")
    p.add_argument("--down-secs", type=int, help="PostgreSQL outage (default 30, quick: 10)")
    p.add_argument("--naive-secs", type=float, help="time cap of the naive baseline (20/10)")
    p.add_argument("--kill-secs", type=int, help="kill -9 phase: seconds of stream at --rate, "
                                                 "the kill at 40 %% (default 30, quick: 10)")
    p.add_argument("--python-mode", choices=["both", "executemany", "copy"], default="both")
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--session-timeout-ms", type=int, default=6000,
                   help="group session timeout of the service and Python consumer")
    p.add_argument("--service-defaults", action="store_true",
                   help="run the service with its own defaults instead of the benchmark profile "
                        f"({' '.join(f'{k}={v}' for k, v in BENCH_PROFILE.items())})")
    p.add_argument("--service-env", action="append", default=[], metavar="K=V",
                   help="extra environment for the service (repeatable), e.g. BATCH_MAX_EVENTS=5000")
    p.add_argument("--skip", action="append", default=[], choices=PHASES,
                   help="skip a phase (repeatable)")
    p.add_argument("--profile", action="store_true",
                   help="perf record -a during the service phase (reports in the log dir)")
    p.add_argument("--bin", default=os.environ.get("NEXUS_BIN",
                                                   str(ROOT / "target/release/nexus-analytics")))
    p.add_argument("--clients-bin", default=os.environ.get(
        "BENCH_CLIENTS_BIN", str(ROOT / "target/release/examples/bench_clients")))
    p.add_argument("--tansu", action="store_true",
                   help="run a private tansu (memory storage) instead of Apache Kafka, with "
                        f"{' '.join(f'{k}={v}' for k, v in TANSU_PROFILE.items())}")
    p.add_argument("--tansu-bin", default=os.environ.get("TANSU_BIN",
                                                         str(ROOT / ".tools/bin/tansu")))
    p.add_argument("--kafka-heap", default=os.environ.get("BENCH_KAFKA_HEAP", "512m"),
                   help="heap of the private Kafka broker (default 512m)")
    p.add_argument("--kafka-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra setting of the private Kafka broker (repeatable)")
    p.add_argument("--brokers", help="use this broker instead of a private one (topics are "
                                     "created on it: unique names, left behind)")
    p.add_argument("--admin-url", default=os.environ.get("BENCH_DATABASE_URL"),
                   help="admin URL of an existing PostgreSQL for the throughput phases (default: "
                        "the private cluster the benchmark starts; CPU per process is then exact)")
    p.add_argument("--connect-home", default=os.environ.get(
        "BENCH_CONNECT_HOME", str(ROOT / ".tools/connect")),
        help="Kafka Connect worker + sink plugin folder (scripts/install-tools connect)")
    p.add_argument("--kafka-version", default=os.environ.get("KAFKA_VERSION", "4.1.1"),
                   help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=900, help="per-phase timeout (s)")
    p.add_argument("--keep", action="store_true", help="keep the databases")
    p.add_argument("--log-dir")
    args = p.parse_args()
    q = args.quick
    args.events = args.events or (100_000 if q else 1_000_000)
    args.latency_secs = args.latency_secs or (15 if q else 60)
    args.down_secs = args.down_secs or (10 if q else 30)
    args.naive_secs = args.naive_secs or (10 if q else 20)
    args.kill_secs = args.kill_secs or (10 if q else 30)
    args.outage_warm_secs = 3 if q else 5
    args.latency_warm_secs = 3 if q else 5
    args.outage_after_secs = 3 if q else 5
    for path, what in ((args.bin, "nexus-analytics"), (args.clients_bin, "bench_clients"),
                       (args.tansu_bin, "tansu")):
        if not Path(path).exists() and not (what == "tansu" and not args.tansu):
            die(f"{what} not found at {path}")
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
