"""Query API benchmark: does the API hurt ingestion, and how much memory does it take?

Run through `scripts/bench-api` (which builds the release binary and picks the .tools/venv
Python); see `scripts/bench-api --help`. It reuses scripts/lib/bench.py's broker, database
and process helpers, so it runs on whatever broker that uses (a private Apache Kafka by default,
tansu with --tansu, or --brokers).

Phases
  large-rows  a fresh database with N events of ~K KiB `data` each (SQL, no broker):
              `nexus-analytics run` with the API inside, RSS before and after one
              `GET /api/v1/events?limit=1000`, then with 4 such requests at once; the same
              against `nexus-analytics api` (skipped for a binary without it, e.g. an old one
              given with --bin to measure "before")
  load        ingest at a fixed rate (default 10,000 events/s) three times on fresh topics and
              databases: without API load (baseline), with the API inside the consumer process
              hammered, and with the API in its own process (`nexus-analytics api`) hammered.
              The hammer is a closed loop of --clients threads over keep-alive connections:
              recent-events pages (limit 100 and 1000), counts by minute and hour, user
              timelines, and pages over a band of large rows. Prints API requests/s, p50/p99
              latency by kind, status codes, ingest rate with and without API load, peak RSS
              of every process against the chart's memory limits.

The last line printed is the machine-readable RESULT line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as b  # noqa: E402  (scripts/lib/bench.py)

ROOT = b.ROOT
# The chart's memory limits (charts/nexus-analytics/values.yaml): consumer pods, API pods.
CONSUMER_LIMIT_MIB = 512
API_LIMIT_MIB = 192
LARGE_ROWS_SQL = """
INSERT INTO analytics.events
    (event_type, user_id, service, "timestamp", data, kafka_topic, kafka_partition, kafka_offset)
SELECT 'user.profile_updated', 'large-' || (i %% 50), 'user-service',
       %(start)s::timestamptz + i * interval '1 second',
       (SELECT jsonb_object_agg('field_' || j, md5(i::text || '/' || j::text))
          FROM generate_series(1, %(fields)s) AS j),
       'bench-large', 0, i
FROM generate_series(1, %(n)s) AS i
"""
# ~48 bytes of JSON per field: "field_1234": "<32 hex>",
BYTES_PER_FIELD = 48
LARGE_START = "2026-01-01T00:00:00Z"


def mib(kib: float) -> float:
    return kib / 1024


class Http:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:port."""

    def __init__(self, port: int, timeout: float = 60):
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def get(self, path: str) -> tuple[int, int, dict, bytes]:
        """(status, body size, headers, body); reconnects once on a dropped connection."""
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                self.conn.request("GET", path)
                r = self.conn.getresponse()
                body = r.read()
                return r.status, len(body), dict(r.getheaders()), body
            except (OSError, http.client.HTTPException):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise RuntimeError("unreachable")


def get_once(port: int, path: str) -> tuple[int, bytes]:
    status, _, _, body = Http(port, timeout=300).get(path)
    return status, body


class Hammer:
    """Closed-loop API load: `clients` threads, each sending the next request as soon as the
    previous answered. Records (kind, status, seconds) per request."""

    def __init__(self, port: int, clients: int, users: int, large_to: str, seed: int = 1):
        self.port, self.clients, self.users, self.large_to = port, clients, users, large_to
        self.stop = threading.Event()
        self.records: list[tuple[str, int, float]] = []
        self.errors = 0
        self.codes: dict[str, int] = {}  # error.code of the 503s: overloaded / unavailable
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(seed + i,), daemon=True)
                        for i in range(clients)]

    def request(self, rng: random.Random) -> tuple[str, str]:
        x = rng.random()
        if x < 0.30:
            return "events-100", "/api/v1/events?limit=100"
        if x < 0.40:
            return "events-1000", "/api/v1/events?limit=1000"
        if x < 0.55:
            return "counts-minute", "/api/v1/stats/counts?bucket=minute"
        if x < 0.65:
            return "counts-hour", "/api/v1/stats/counts?bucket=hour&group_by=service"
        if x < 0.85:
            user = f"00000000-0000-4000-8000-{rng.randrange(self.users):012d}"
            return "timeline", f"/api/v1/users/{user}/timeline?limit=50"
        return "large-rows", f"/api/v1/events?to={self.large_to}&limit=1000"

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        conn = Http(self.port)
        while not self.stop.is_set():
            kind, path = self.request(rng)
            t = time.monotonic()
            try:
                status, _, headers, body = conn.get(path)
            except Exception:  # noqa: BLE001 - counted, the loop goes on
                with self.lock:
                    self.errors += 1
                time.sleep(0.05)
                continue
            dt = time.monotonic() - t
            code = None
            if status >= 500:
                try:
                    code = json.loads(body)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "not-json"
            with self.lock:
                self.records.append((kind, status, dt))
                if code:
                    self.codes[code] = self.codes.get(code, 0) + 1
            if status == 503 and "Retry-After" in headers:
                # A well-behaved client: back off a little (not the full second: this is a
                # stress test).
                time.sleep(0.01)

    def start(self) -> None:
        self.started = time.monotonic()
        for t in self.threads:
            t.start()

    def finish(self) -> dict:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
        wall = time.monotonic() - self.started
        recs = list(self.records)
        ok = [r for r in recs if r[1] == 200]
        statuses: dict[int, int] = {}
        for _, s, _ in recs:
            statuses[s] = statuses.get(s, 0) + 1

        def pct(xs, q):
            xs = sorted(xs)
            return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

        kinds = {}
        for kind in sorted({r[0] for r in recs}):
            lat = [r[2] for r in ok if r[0] == kind]
            kinds[kind] = {"n": len(lat), "p50": pct(lat, 0.5), "p99": pct(lat, 0.99)}
        lat = [r[2] for r in ok]
        return {
            "requests": len(recs), "ok": len(ok), "rps": len(recs) / wall, "ok_rps": len(ok) / wall,
            "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "statuses": statuses, "kinds": kinds,
            "errors": self.errors, "wall": wall, "codes": dict(self.codes),
        }


def _tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _descendants(root: int, procs: dict[int, tuple]) -> set[int]:
    """Every process below `root` in `procs` (a `bench.cpu_snapshot()`: pid -> (comm, ppid, …))."""
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, *_rest) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


class CpuSplit:
    """--isolate: the API on hosts of its own, emulated on one machine by CPU affinity, applied
    to every thread every 0.5 s. The API side (the API process, its database backends when it
    has a pool of its own — a read replica's work — and this process, whose threads are the
    API clients) runs on `api_cpus`; everything else the benchmark started (consumer, broker,
    producer) and every other PostgreSQL process runs on `ingest_cpus`. Not emulated: a
    replica's WAL replay and the primary's WAL sender, and PostgreSQL's shared buffers and
    locks stay shared (which only makes the figure conservative)."""

    APP_NAME = "nexus-analytics-api"

    def __init__(self, admin_url: str, ingest_cpus: set[int], api_cpus: set[int]):
        import psycopg

        self.ingest, self.api = ingest_cpus, api_cpus
        self.all = ingest_cpus | api_cpus
        self.conn = psycopg.connect(admin_url, autocommit=True, connect_timeout=10)
        self.api_pids: set[int] = set()
        self.api_backends = False
        self.touched: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _pin(self, pid: int, cpus: set[int]) -> None:
        for tid in _tasks(pid):
            try:
                os.sched_setaffinity(tid, cpus)
                self.touched.add(tid)
            except OSError:
                pass

    def tick(self) -> None:
        me = os.getpid()
        api = set(self.api_pids)
        if self.api_backends:
            api |= {r[0] for r in self.conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (self.APP_NAME,))}
        procs = b.cpu_snapshot()
        postgres = {pid for pid, (comm, *_rest) in procs.items() if comm == "postgres"}
        for pid in (_descendants(me, procs) | postgres) - {me}:
            self._pin(pid, self.api if pid in api else self.ingest)
        self._pin(me, self.api)

    def start(self, api_pids: set[int], api_backends: bool) -> None:
        self.api_pids, self.api_backends = api_pids, api_backends
        self._stop.clear()
        self.tick()

        def run():
            while not self._stop.wait(0.5):
                try:
                    self.tick()
                except Exception as e:  # noqa: BLE001 - a vanished pid must not end the split
                    b.log(f"isolate: {e}")

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        for tid in self.touched:
            try:
                os.sched_setaffinity(tid, self.all)
            except OSError:
                pass
        self.touched.clear()


class ApiBench(b.Bench):
    def __init__(self, args):
        super().__init__(args)
        self.has_api_cmd = self._has_api_command()
        self.split = None
        if args.isolate:
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) < 2:
                b.die("--isolate needs at least 2 CPUs")
            half = len(cpus) // 2
            self.split = CpuSplit(args.admin_url, set(cpus[:half]), set(cpus[half:]))

    def _has_api_command(self) -> bool:
        import subprocess

        r = subprocess.run([str(self.bin), "--help"], capture_output=True, text=True, timeout=30)
        return any(line.split()[:1] == ["api"] for line in r.stdout.splitlines())

    def start_run(self, name: str, url: str, topic: str, **extra) -> tuple[b.Child, int, int]:
        """`nexus-analytics run`: (child, metrics port, API port)."""
        env = self.service_env(
            DATABASE_URL=url, KAFKA_BROKERS=self.brokers, KAFKA_TOPICS=topic,
            KAFKA_GROUP_ID=f"g-{topic}", KAFKA_DLQ_TOPIC=f"{topic}.dlq", **extra,
        )
        child = self.spawn(name, [self.bin, "run"], env)
        return child, int(env["METRICS_PORT"]), int(env["API_PORT"])

    def start_api(self, name: str, url: str, **extra) -> tuple[b.Child, int, int]:
        env = self.service_env(DATABASE_URL=url, **extra)
        child = self.spawn(name, [self.bin, "api"], env)
        api_port, metrics_port = int(env["API_PORT"]), int(env["METRICS_PORT"])
        if not b.wait_until(30, lambda: self._ready(metrics_port) or not child.alive(), 0.1) \
                or not child.alive():
            b.die(f"{name} did not become ready: {child.tail()}")
        return child, api_port, metrics_port

    @staticmethod
    def _ready(port: int) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_api(self, child: b.Child, port: int) -> None:
        def up():
            if not child.alive():
                b.die(f"{child.name} exited: {child.tail()}")
            try:
                return Http(port, timeout=5).get("/api/v1/openapi.json")[0] == 200
            except OSError:
                return False

        if not b.wait_until(60, up, 0.1):
            b.die(f"the API of {child.name} did not answer: {child.tail()}")

    def insert_large(self, url: str, n: int, kib: int) -> None:
        fields = max(1, kib * 1024 // BYTES_PER_FIELD)
        t = time.monotonic()
        with self.connect(url) as c:
            c.execute(LARGE_ROWS_SQL, {"start": LARGE_START, "fields": fields, "n": n})
            avg = c.execute("SELECT avg(octet_length(data::text)) FROM analytics.events "
                            "WHERE kafka_topic = 'bench-large'").fetchone()[0]
            c.execute("ANALYZE analytics.events")
        self.large_avg_kib = float(avg) / 1024
        log_line = f"{n} rows of {self.large_avg_kib:.0f} KiB data in {time.monotonic() - t:.1f}s"
        b.log(f"large rows: {log_line}")

    # -- phase: large rows ---------------------------------------------------------------

    def measure_large(self, label: str, child: b.Child, port: int) -> None:
        pid = child.pid
        rss0 = b.proc_status_kib(pid, "VmRSS") or 0
        sampler = b.RssSampler(pid, interval=0.02)
        t = time.monotonic()
        status, body = get_once(port, "/api/v1/events?limit=1000")
        dt = time.monotonic() - t
        time.sleep(0.3)
        one_peak = max([s for _, s in sampler.samples] or [0])
        n_events, truncated = "?", ""
        if status == 200:
            page = json.loads(body)
            n_events = len(page["events"])
            truncated = f", truncated={page.get('truncated')}" if "truncated" in page else ""
        # 4 at once
        results: list[tuple[int, int]] = []
        def one():
            s, bd = get_once(port, "/api/v1/events?limit=1000")
            results.append((s, len(bd)))
        threads = [threading.Thread(target=one) for _ in range(4)]
        t4 = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        dt4 = time.monotonic() - t4
        time.sleep(0.3)
        sampler.stop(self.logdir / f"rss-large-{label}.csv")
        peak4 = max([s for _, s in sampler.samples] or [0])
        hwm = sampler.hwm_kib
        self.res.add("large-rows", f"{label}: RSS idle", f"{mib(rss0):.1f} MiB", f"pid {pid}")
        self.res.add("large-rows", f"{label}: 1 x limit=1000",
                     f"peak {mib(one_peak):.1f} MiB",
                     f"HTTP {status}, {len(body) / 2**20:.1f} MiB body, {n_events} events{truncated}, {dt:.2f}s")
        self.res.add("large-rows", f"{label}: 4 at once",
                     f"peak {mib(peak4):.1f} MiB",
                     f"statuses {sorted(s for s, _ in results)}, bodies "
                     f"{'/'.join(f'{n / 2**20:.1f}' for _, n in results)} MiB, {dt4:.2f}s; VmHWM {mib(hwm):.1f} MiB")
        self.res.values[f"large_{label}_peak_mib"] = mib(max(one_peak, peak4, hwm))

    def phase_large(self) -> None:
        if self.args.large_db:
            url = self.args.large_db
            self.args.large_rows = self.scalar(url, "SELECT count(*) FROM analytics.events")
            b.log(f"large rows: using {self.args.large_rows} rows already in --large-db")
        else:
            url = self.fresh_db("large")
            self.insert_large(url, self.args.large_rows, self.args.large_kib)
        topic = self.create_topic("large")
        svc, _, api_port = self.start_run("service-large", url, topic)
        self.wait_api(svc, api_port)
        self.measure_large("run", svc, api_port)
        svc.stop()
        if self.has_api_cmd:
            api, api_port, _ = self.start_api("api-large", url)
            self.wait_api(api, api_port)
            self.measure_large("api", api, api_port)
            # Walk every page once: the budget holds the pages, nothing is lost.
            pages, events, biggest = 0, 0, 0
            path = "/api/v1/events?limit=1000"
            conn = Http(api_port, timeout=120)
            t = time.monotonic()
            while True:
                status, n, _, body = conn.get(path)
                if status != 200:
                    b.die(f"page walk: HTTP {status}")
                page = json.loads(body)
                pages, events, biggest = pages + 1, events + len(page["events"]), max(biggest, n)
                if not page["next_cursor"]:
                    break
                path = f"/api/v1/events?limit=1000&cursor={page['next_cursor']}"
            self.res.add("large-rows", "api: walk all pages",
                         f"{events} events in {pages} pages",
                         f"largest page {biggest / 2**20:.2f} MiB, {time.monotonic() - t:.1f}s")
            if events != self.args.large_rows:
                b.die(f"the page walk returned {events} events, {self.args.large_rows} stored")
            api.stop()
        else:
            b.log("large rows: this binary has no `api` subcommand; skipped the API-process run")

    # -- phase: load ---------------------------------------------------------------------

    def load_run(self, mode: str) -> dict:
        """mode: none (API off), inside (API in the consumer, hammered), own (API process)."""
        rate, secs = self.args.rate, self.args.load_secs
        count = rate * secs
        url = self.fresh_db(f"load_{mode}")
        self.insert_large(url, self.args.load_large_rows, self.args.large_kib)
        topic = self.create_topic(f"load-{mode}")
        extra = {} if mode == "inside" else {"API_PORT": "0"}
        svc, mport, inside_port = self.start_run(f"service-{mode}", url, topic, **extra)
        self.wait_assigned(svc, mport)
        samplers = {"consumer": b.RssSampler(svc.pid)}
        api_child, api_port = None, None
        if mode == "inside":
            api_port = inside_port
            self.wait_api(svc, api_port)
        elif mode == "own":
            api_child, api_port, _ = self.start_api("api-own", url)
            samplers["api"] = b.RssSampler(api_child.pid)
        if self.broker is not None:
            samplers.setdefault(self.broker_kind, b.RssSampler(self.broker.pid))
        if self.split:
            api_pids = {api_child.pid} if api_child else set()
            self.split.start(api_pids, api_backends=mode == "own")
        hammer = None
        if api_port:
            large_to = "2026-01-01T00:10:00Z"  # pages over the band of large rows
            hammer = Hammer(api_port, self.args.clients, self.args.users, large_to)
            hammer.start()
        cpu_tracker = b.CpuTracker()
        started = time.monotonic()
        producer = self.produce(topic, count, rate, seed=11, name=f"produce-{mode}", background=True)
        samplers["producer"] = b.RssSampler(producer.pid)
        stored_at_end = None
        rc = producer.proc.wait(timeout=secs * 3 + 120)
        produce_s = time.monotonic() - started
        stored_at_end = self.metric(mport, "analytics_events_stored_total") or 0
        done = self.wait_stored(svc, mport, count, timeout=120)
        wall = (done or time.monotonic()) - started
        api_stats = hammer.finish() if hammer else None
        roles = {svc.pid: "consumer", **self.broker_roles()}
        if api_child:
            roles[api_child.pid] = "api"
        cpu = cpu_tracker.stop().breakdown(roles, postmaster=None)
        if self.split:
            self.split.stop()
        for name, s in samplers.items():
            s.stop(self.logdir / f"rss-load-{mode}-{name}.csv")
        producer.stop()
        if api_child:
            api_child.stop()
        svc.stop()
        if rc != 0:
            b.die(f"produce failed in {mode}: {producer.tail()}")
        if done is None:
            b.die(f"load {mode}: fewer than {count} rows stored within 120 s of the producer's end")
        stored = self.scalar(url, "SELECT count(*) FROM analytics.events WHERE kafka_topic <> 'bench-large'")
        if stored != count:
            b.die(f"load {mode}: {stored} rows stored, {count} produced")
        return {
            "mode": mode, "ingest_eps": count / wall, "produce_s": produce_s, "wall": wall,
            "behind_at_end": count - stored_at_end, "api": api_stats,
            "rss": {n: mib(s.hwm_kib) for n, s in samplers.items()},
            "cpu": {k: v / wall for k, v in cpu.items()},
        }

    def phase_load(self) -> None:
        modes = ["none", "inside"] + (["own"] if self.has_api_cmd else [])
        runs = {}
        for m in modes:
            b.log(f"load: mode {m}")
            runs[m] = self.load_run(m)
        base = runs["none"]["ingest_eps"]
        self.res.values["ingest_eps"] = base
        if self.split:
            self.res.add("load", "isolation (--isolate)",
                         f"ingest CPUs {sorted(self.split.ingest)} | API CPUs {sorted(self.split.api)}",
                         "consumer, broker, producer, PostgreSQL | API process, its backends (own "
                         "mode: a read replica's work), the API clients")
        labels = {"none": "no API load", "inside": "API in the consumer process",
                  "own": "API in its own process"}
        for m, r in runs.items():
            ratio = r["ingest_eps"] / base
            self.res.values[f"ingest_{m}_ratio"] = ratio
            self.res.add("load", f"ingest, {labels[m]}", f"{b.fmt_int(r['ingest_eps'])}/s",
                         f"x{ratio:.2f} of no-API; offered {b.fmt_int(self.args.rate)}/s for "
                         f"{self.args.load_secs}s, produced at {b.fmt_int(self.args.rate * self.args.load_secs / r['produce_s'])}/s; "
                         f"{b.fmt_int(r['behind_at_end'])} not yet stored when the producer finished")
            a = r["api"]
            if a:
                five = {s: n for s, n in a["statuses"].items() if s >= 500}
                codes = a["codes"]
                self.res.values[f"api_{m}_rps"] = a["rps"]
                self.res.values[f"api_{m}_p99_ms"] = a["p99"]
                # 5xx other than the documented overload answer (503 overloaded + Retry-After).
                self.res.values[f"api_{m}_5xx_other"] = sum(five.values()) - codes.get("overloaded", 0)
                self.res.values[f"api_{m}_overloaded"] = codes.get("overloaded", 0)
                self.res.add("load", "  API requests", f"{a['rps']:.0f}/s ({a['ok_rps']:.0f}/s 200)",
                             f"{self.args.clients} clients; statuses {dict(sorted(a['statuses'].items()))}; "
                             f"{a['errors']} connection errors; 5xx by error.code {codes}")
                self.res.add("load", "  API latency (200s)", f"p50 {a['p50']:.1f} / p99 {a['p99']:.1f} ms",
                             "; ".join(f"{k} {v['n']}x p50 {v['p50']:.0f} p99 {v['p99']:.0f}"
                                       for k, v in a["kinds"].items()))
            limits = {"consumer": CONSUMER_LIMIT_MIB, "api": API_LIMIT_MIB}
            self.res.add("load", "  peak RSS", ", ".join(f"{n} {v:.1f} MiB" for n, v in r["rss"].items()),
                         "limits: " + ", ".join(f"{n} {limits[n]} MiB {'OK' if r['rss'][n] <= limits[n] else 'EXCEEDED'}"
                                                 for n in r["rss"] if n in limits))
            for n, v in r["rss"].items():
                self.res.values[f"rss_{m}_{n}_mib"] = v
            self.res.add("load", "  CPU (cores)", f"{sum(r['cpu'].values()):.2f}",
                         ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["cpu"].items(), key=lambda kv: -kv[1])
                                   if v > 0.05))

    def run(self) -> int:
        started = time.monotonic()
        try:
            self.start_broker()
            for p in self.args.phases:
                t = time.monotonic()
                b.log(f"--- phase {p}")
                {"large-rows": self.phase_large, "load": self.phase_load}[p]()
                self.res.rows.append(("", "", "", ""))
                b.log(f"--- phase {p} took {time.monotonic() - t:.1f}s")
        finally:
            self.cleanup()
        self.print_api_table(time.monotonic() - started)
        return 0

    def print_api_table(self, wall: float) -> None:
        rows = [r for r in self.res.rows]
        w = [max(len(r[i]) for r in rows + [("phase", "metric", "value", "")]) for i in range(3)]
        print()
        print(f"{'phase':<{w[0]}}  {'metric':<{w[1]}}  {'value':<{w[2]}}  detail")
        for r in rows:
            print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip())
        print(f"\nbinary {self.bin}; wall {wall:.0f}s; logs {self.logdir}")
        v = self.res.values
        keys = sorted(v)
        print("RESULT " + " ".join(f"{k}={v[k]:.2f}" if isinstance(v[k], float) else f"{k}={v[k]}" for k in keys))


def main() -> int:
    p = argparse.ArgumentParser(
        prog="scripts/bench-api",
        description="Query API benchmark: memory of large-row pages, and ingestion at a fixed rate "
                    "with and without API load (API inside the consumer, and in its own process). "
                    "Prints a table and a RESULT line last.")
    p.add_argument("--quick", action="store_true", help="small run: 300 large rows, 20 s of load")
    p.add_argument("--phase", dest="phases", action="append", choices=["large-rows", "load"],
                   help="run only this phase (repeatable; default both)")
    p.add_argument("--large-rows", type=int, help="rows of the large-row case (default 1500)")
    p.add_argument("--large-kib", type=int, default=400, help="KiB of data per large row")
    p.add_argument("--load-large-rows", type=int, default=100,
                   help="large rows in each load database (the hammer's large-row pages)")
    p.add_argument("--rate", type=int, default=10_000, help="offered ingest rate (events/s)")
    p.add_argument("--load-secs", type=int, help="seconds of produce per load run (default 60)")
    p.add_argument("--clients", type=int, default=8, help="concurrent API clients")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--session-timeout-ms", type=int, default=6000)
    p.add_argument("--service-defaults", action="store_true")
    p.add_argument("--service-env", action="append", default=[], metavar="K=V")
    p.add_argument("--bin", default=os.environ.get("NEXUS_BIN", str(ROOT / "target/release/nexus-analytics")))
    p.add_argument("--tansu", action="store_true",
                   help="a private tansu instead of Apache Kafka (fast extra, not the reference)")
    p.add_argument("--tansu-bin", default=os.environ.get("TANSU_BIN", str(ROOT / ".tools/bin/tansu")))
    p.add_argument("--kafka-heap", default=os.environ.get("BENCH_KAFKA_HEAP", "512m"))
    p.add_argument("--kafka-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--brokers", help="use this broker instead of a private Apache Kafka")
    p.add_argument("--admin-url", default=os.environ.get(
        "BENCH_DATABASE_URL", os.environ.get("TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")))
    p.add_argument("--large-db", help="database already holding the large rows (skip the insert)")
    p.add_argument("--keep", action="store_true", help="keep the databases")
    p.add_argument("--isolate", action="store_true",
                   help="emulate the API on hosts of its own: CPU affinity splits the machine "
                        "(API process, its database backends and the clients | everything else)")
    p.add_argument("--log-dir")
    args = p.parse_args()
    args.phases = args.phases or ["large-rows", "load"]
    args.large_rows = args.large_rows or (300 if args.quick else 1500)
    args.load_secs = args.load_secs or (20 if args.quick else 60)
    args.clients_bin = ""
    if not Path(args.bin).exists():
        b.die(f"nexus-analytics not found at {args.bin}")
    return ApiBench(args).run()


if __name__ == "__main__":
    sys.exit(main())
