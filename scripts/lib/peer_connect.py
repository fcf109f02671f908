"""The Kafka Connect peer of scripts/bench: Kafka Connect (standalone, the broker's version) with
Debezium's JDBC sink connector, writing the benchmark's events into the service's own table
(analytics.events of a freshly migrated database) on the same broker, database server and
machine, in the same run.

Why a topic of its own: Debezium's JDBC sink writes only records that carry a Connect schema
(it maps each field's schema to a column type). Kafka 4.1's JsonConverter cannot attach one to
schemaless JSON, and no transform shipped with Kafka infers one, so the peer reads the same
events, with the same keys in the same partitions, in JsonConverter's schema-bearing envelope
(`{"schema": ..., "payload": ...}`), which is what a team feeding this connector publishes.
The envelope names Debezium's logical types, so `timestamp` lands in a timestamptz column and
`data` in a jsonb column, as in analytics.events.

Its fastest correct settings: `insert.mode=upsert` keyed by the record's Kafka coordinates and
event time (the table's idempotency key), the only mode that survives a redelivery (plain `insert` stops the
task on the first duplicate key); `batch.size` and the consumer's `max.poll.records` at 10,000
(the service's batch size); `tasks.max` = partitions.

Used by bench.py's connect phase (throughput, kill, latency); nothing here runs on its own.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

import bench as B  # scripts/lib/bench.py (registered under this name when run as a script)
from waiting import free_port, wait_until

CONNECTOR = "nexus-jdbc-sink"

# The Connect schema of one event, in JsonConverter's envelope. Debezium's logical names pick
# the PostgreSQL types: ZonedTimestamp -> timestamptz, Json -> json(b).
SCHEMA = {
    "type": "struct", "name": "nexus.UserEvent", "optional": False,
    "fields": [
        {"field": "event_type", "type": "string", "optional": False},
        {"field": "user_id", "type": "string", "optional": False},
        {"field": "service", "type": "string", "optional": False},
        {"field": "timestamp", "type": "string", "optional": False,
         "name": "io.debezium.time.ZonedTimestamp"},
        {"field": "data", "type": "string", "optional": True, "name": "io.debezium.data.Json"},
    ],
}
ENVELOPE_HEAD = '{"schema":' + json.dumps(SCHEMA, separators=(",", ":")) + ',"payload":'

# Rows go into analytics.events of a freshly migrated database: the service's own table,
# partitions and indexes. InsertField adds the record's coordinates as the columns the service
# fills, and the upsert's conflict target is the table's idempotency key (coordinates +
# "timestamp"), so a redelivered record updates its first copy instead of failing the task.
# A digest of what was stored, by source position (partition, offset), for comparing the
# peer's rows with the service's rows of the same events (the topics' names differ).
DIGEST = ("SELECT sum(hashtextextended(concat_ws('|', kafka_partition, kafka_offset, event_type, "
          "user_id, service, \"timestamp\", data), 0)::numeric) FROM analytics.events")
# The identity's sequence (its name depends on the migrations' history).
SEQUENCE_NAME = "SELECT pg_get_serial_sequence('analytics.events', 'id')"


def wrap(payload: dict) -> bytes:
    """One event's fields (`data` as JSON text) in the schema envelope."""
    return (ENVELOPE_HEAD + json.dumps(payload, separators=(",", ":")) + "}").encode()


def envelope(value: bytes) -> bytes:
    """One plain event (as `nexus-analytics produce` writes it) in the schema envelope."""
    ev = json.loads(value)
    data = ev.get("data")
    return wrap({
        "event_type": ev["event_type"], "user_id": ev["user_id"], "service": ev["service"],
        "timestamp": ev["timestamp"],
        "data": None if data is None else json.dumps(data, separators=(",", ":")),
    })


def wrap_topic(b, src: str, n: int, name: str) -> tuple[str, float, float]:
    """Copies the first `n` records of `src` into a new topic in the schema envelope: same
    keys, same partitions, same order. Returns the topic and the mean sizes of the plain
    events and of their envelopes."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    dst = b.create_topic(name)
    consumer = Consumer({"bootstrap.servers": b.brokers, "group.id": f"wrap-{dst}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(src, p, OFFSET_BEGINNING)
                     for p in range(b.args.partitions)])
    producer = Producer({"bootstrap.servers": b.brokers, "acks": "all",
                         "enable.idempotence": True, "linger.ms": 20,
                         "queue.buffering.max.messages": 500_000})
    seen, size, plain = 0, 0, 0
    deadline = time.monotonic() + b.args.timeout
    while seen < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"[bench] wrapping {src}: only {seen} of {n} records read")
        for m in consumer.consume(10_000, 1.0):
            if m.error() or seen >= n:
                continue
            value = envelope(m.value())
            size += len(value)
            plain += len(m.value())
            while True:
                try:
                    producer.produce(dst, value=value, key=m.key(), partition=m.partition())
                    break
                except BufferError:
                    producer.poll(0.1)
            seen += 1
        producer.poll(0)
    left = producer.flush(120)
    consumer.close()
    if left:
        raise SystemExit(f"[bench] wrapping {src}: {left} records not delivered")
    return dst, plain / max(seen, 1), size / max(seen, 1)


class Worker:
    """One Kafka Connect standalone worker running the JDBC sink on one topic and database."""

    def __init__(self, b, home: Path, topic: str, url: str, name: str):
        self.rest = free_port()
        tag = name.replace("connect-", "")
        worker_props = b.connect_worker_props(
            home, self.rest, tag,
            "consumer.max.poll.records=10000\n"
            f"consumer.session.timeout.ms={b.args.session_timeout_ms}\n"
            "consumer.auto.offset.reset=earliest\n")
        u = urlsplit(url)
        connector_props = b.workdir / f"connect-sink-{tag}.properties"
        connector_props.write_text(
            f"name={CONNECTOR}\n"
            "connector.class=io.debezium.connector.jdbc.JdbcSinkConnector\n"
            f"tasks.max={b.args.partitions}\n"
            f"topics={topic}\n"
            f"connection.url=jdbc:postgresql://{u.hostname}:{u.port or 5432}{u.path}"
            # pgjdbc sends a batch as one multi-row INSERT (its fastest batch mode).
            "?reWriteBatchedInserts=true\n"
            f"connection.username={unquote(u.username or 'postgres')}\n"
            f"connection.password={unquote(u.password or '')}\n"
            "insert.mode=upsert\n"
            "primary.key.mode=record_value\n"
            "primary.key.fields=kafka_topic,kafka_partition,kafka_offset,timestamp\n"
            "delete.enabled=false\n"
            "schema.evolution=none\n"
            "quote.identifiers=true\n"
            "collection.name.format=analytics.events\n"
            "batch.size=10000\n"
            "transforms=coordinates\n"
            "transforms.coordinates.type=org.apache.kafka.connect.transforms.InsertField$Value\n"
            "transforms.coordinates.topic.field=kafka_topic\n"
            "transforms.coordinates.partition.field=kafka_partition\n"
            "transforms.coordinates.offset.field=kafka_offset\n")
        self.child = b.spawn(name, b.connect_argv(home, worker_props, connector_props))

    @property
    def pid(self) -> int:
        return self.child.pid

    def status(self) -> dict | None:
        """The connector's status from the worker's REST API; None while it does not answer."""
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.rest}/connectors/{CONNECTOR}/status", timeout=1) as r:
                return json.load(r)
        except (OSError, ValueError):
            return None

    def failed_tasks(self) -> str | None:
        """The first failed task's trace; None while none failed."""
        status = self.status() or {}
        for t in status.get("tasks", []) + [status.get("connector", {})]:
            if t.get("state") == "FAILED":
                return (t.get("trace") or "FAILED")[:600]
        return None

    def check(self) -> None:
        if not self.child.alive():
            raise SystemExit(f"[bench] the Connect worker exited: {self.child.tail(15)}")


class Inserted:
    """Rows attempted so far, from the identity sequence: cheap to poll every 50 ms, unlike
    count(*), but not transactional, so callers confirm with count(*). The sequence's name is
    looked up once."""

    def __init__(self, conn):
        self.conn = conn
        seq = conn.execute(SEQUENCE_NAME).fetchone()[0]
        self.sql = f"SELECT last_value, is_called FROM {seq}"

    def __call__(self) -> int:
        last, called = self.conn.execute(self.sql).fetchone()
        return int(last) if called else 0


def sink_version(home: Path) -> str:
    jars = sorted((home / "sink").glob("*/debezium-connector-jdbc-*.jar"))
    return jars[-1].name.removeprefix("debezium-connector-jdbc-").removesuffix(".jar") if jars else "?"


def wait_rows(w: Worker, n: int, timeout: float, conn) -> tuple[float | None, float | None]:
    """Polls until `n` rows are committed: (time of the first row, time of the n-th)."""
    first = None
    deadline = time.monotonic() + timeout
    last_check = 0.0
    inserted = Inserted(conn)
    while time.monotonic() < deadline:
        w.check()
        attempted = inserted()
        now = time.monotonic()
        if attempted and first is None:
            first = now
        if attempted >= n and conn.execute(B.ROWS_SQL).fetchone()[0] >= n:
            return first, time.monotonic()
        if now - last_check > 5:
            last_check = now
            trace = w.failed_tasks()
            if trace:
                raise SystemExit(f"[bench] a Connect task failed: {trace}")
        time.sleep(0.05)
    return first, None


def throughput(b, home: Path) -> None:
    """The backlog of the service's phase (same events), drained by the peer."""
    fmt_int = B.fmt_int
    n = b.args.events
    topic, plain, size = wrap_topic(b, b.topic, n, "connect")
    url = b.fresh_db("connect")
    tracker = B.CpuTracker()
    w = Worker(b, home, topic, url, "connect-throughput")
    rss = B.RssSampler(w.pid)
    with b.connect(url) as conn:
        first, done = wait_rows(w, n, b.args.timeout, conn)
    tracker.stop()
    rss.stop(b.logdir / "rss-connect.csv")
    if done is None:
        w.child.stop()
        raise SystemExit(f"[bench] Kafka Connect stored fewer than {n} rows within "
                         f"{b.args.timeout}s: {w.child.tail(10)}")
    w.child.stop()
    rows = b.scalar(url, B.ROWS_SQL)
    distinct = b.scalar(url, B.DISTINCT_SQL)
    if rows != n or distinct != n:
        raise SystemExit(f"[bench] Kafka Connect stored {rows} rows ({distinct} distinct), "
                         f"expected {n}")
    same = None
    if getattr(b, "svc_url", None):
        same = b.scalar(url, DIGEST) == b.scalar(b.svc_url, DIGEST)
        if not same:
            raise SystemExit("[bench] Kafka Connect's rows differ from the service's rows of "
                             "the same events")
    total = done - w.child.started
    eps, steady = n / total, n / max(done - first, 1e-9)
    cpu = tracker.breakdown({w.pid: "connect", **b.broker_roles()}, b.postmaster())
    per_m = 1e6 * B.pipeline_cpu(cpu) / n
    v = b.res.values
    v["connect_eps"], v["connect_steady_eps"] = eps, steady
    v["connect_rss_mib"], v["connect_cpu_s_per_m"] = rss.hwm_kib / 1024, per_m
    b.res.add("peer", "Kafka Connect + JDBC sink", f"{fmt_int(eps)}/s",
              f"connect-runtime {b.args.kafka_version} + Debezium JDBC sink "
              f"{sink_version(home)}, {b.args.partitions} tasks, upsert on the idempotency "
              f"key, batches of 10,000; {fmt_int(n)} rows in {total:.2f}s from JVM start "
              f"(first row after {first - w.child.started:.2f}s; {fmt_int(steady)}/s after it)")
    b.res.add("peer", "  its input", f"{size:.0f} B/event",
              f"the same events ({plain:.0f} B each), keys and partitions in JsonConverter's "
              "schema envelope (the sink needs a Connect schema)"
              + ("; rows identical to the service's (digest by partition and offset)"
                 if same else ""))
    b.res.add("peer", "  peak RSS", f"{rss.hwm_kib / 1024:.1f} MiB", "VmHWM of the worker JVM")
    b.cpu_row("peer", n, done - w.child.started, cpu, "connect_cpu_s_per_m")


def kill(b, home: Path) -> None:
    """kill -9 of the worker with part of a backlog stored, restarted at once: rows vs
    produced (upsert on the coordinates should hide the redelivered batches)."""
    fmt_int = B.fmt_int
    count = min(b.args.events, b.args.rate * b.args.kill_secs)
    topic, _, _ = wrap_topic(b, b.topic, count, "connect-kill")
    url = b.fresh_db("connect_kill")
    w = Worker(b, home, topic, url, "connect-kill-1")
    with b.connect(url) as conn:
        inserted = Inserted(conn)
        ok = wait_until(b.args.timeout, lambda: (w.check(), inserted())[1] >= 0.4 * count, 0.02)
        stored_before = conn.execute(B.ROWS_SQL).fetchone()[0]
    if not ok:
        raise SystemExit(f"[bench] Kafka Connect stored too little before the kill: {w.child.tail()}")
    os.kill(w.pid, signal.SIGKILL)
    w.child.proc.wait()
    w.child.stop()
    killed = time.monotonic()
    w2 = Worker(b, home, topic, url, "connect-kill-2")

    def distinct() -> int:
        w2.check()
        return b.scalar(url, B.DISTINCT_SQL)

    ok = wait_until(180, lambda: distinct() >= count, 0.5)
    caught = time.monotonic() - killed
    time.sleep(2)  # let a redelivered batch in flight land, so a duplicate would be counted
    w2.child.stop()
    rows = b.scalar(url, B.ROWS_SQL)
    dist = b.scalar(url, B.DISTINCT_SQL)
    lost, dup = count - dist, rows - dist
    with b.connect(url) as conn:
        attempted = Inserted(conn)()
    b.res.values["connect_kill_lost"], b.res.values["connect_kill_duplicated"] = lost, dup
    b.res.add("kill -9", "Kafka Connect + JDBC sink", f"lost {lost}, duplicated {dup}",
              f"{fmt_int(count)} produced (a backlog), {fmt_int(rows)} rows, {fmt_int(dist)} "
              f"distinct; killed after {fmt_int(stored_before)} stored, restarted at once; "
              f"{fmt_int(max(attempted - rows, 0))} redelivered rows upserted over their first "
              f"copy; all stored {caught:.1f}s after the kill"
              + ("" if ok else " (NOT all within 180 s)"))


def produce_paced(b, topic: str, rate: int, secs: float, seed: int) -> int:
    """Events in the schema envelope at `rate`/s for `secs` (timestamp = the time of produce),
    in 10 ms slices, like `nexus-analytics produce --rate`; returns how many."""
    import random
    from datetime import datetime, timezone

    from confluent_kafka import Producer

    rng = random.Random(seed)
    types = ["user.login", "user.logout", "user.profile_viewed", "user.search_performed"]
    producer = Producer({"bootstrap.servers": b.brokers, "acks": "all",
                         "enable.idempotence": True, "linger.ms": 5})
    total = int(rate * secs)
    start = time.monotonic()
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        while sent < due:
            user = f"00000000-0000-4000-8000-{rng.randrange(b.args.users):012x}"
            now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
            payload = {"event_type": rng.choice(types), "user_id": user,
                       "service": "auth-service", "timestamp": now.replace("+00:00", "Z"),
                       "data": '{"method":"password"}'}
            producer.produce(topic, key=user.encode(), value=wrap(payload))
            sent += 1
        producer.poll(0)
        time.sleep(0.01)
    producer.flush(60)
    return sent


def latency(b) -> None:
    """Produce -> row committed at the fixed offered rate, measured as for the service
    (pg_xact_commit_timestamp of the row minus its event time, warm-up excluded)."""
    home = Path(b.args.connect_home).resolve()
    rate, secs, warm = b.args.rate, b.args.latency_secs, b.args.latency_warm_secs
    pg = b.ensure_private_pg()
    url = b.fresh_db("connect_latency", admin_url=pg.admin_url)
    topic = b.create_topic("connect-latency")
    w = Worker(b, home, topic, url, "connect-latency")
    rss = B.RssSampler(w.pid)

    def running() -> bool:
        w.check()
        tasks = (w.status() or {}).get("tasks", [])
        return len(tasks) == b.args.partitions and all(t["state"] == "RUNNING" for t in tasks)

    if not wait_until(120, running, 0.2):
        raise SystemExit(f"[bench] the Connect tasks did not run within 120s: {w.child.tail()}")
    count = produce_paced(b, topic, rate, warm + secs, seed=7)
    with b.connect(url) as conn:
        _, done = wait_rows(w, count, 120, conn)
    rss.stop(b.logdir / "rss-connect-latency.csv")
    w.child.stop()
    if done is None:
        raise SystemExit(f"[bench] Connect latency phase: fewer than {count} rows stored")
    with b.connect(url) as c:
        rows, pc, pc_max = c.execute(B.LATENCY_SQL.format(x=B.COMMIT_MS), [warm]).fetchone()
    p50, p95, p99 = (float(x) for x in pc)
    b.res.values["connect_p99_ms"] = p99
    b.res.add("latency", f"Kafka Connect + JDBC sink @{B.fmt_int(rate)}/s",
              f"p50 {p50:.1f} / p95 {p95:.1f} / p99 {p99:.1f} ms",
              f"max {float(pc_max):.1f} ms; {B.fmt_int(rows)} events after a {warm}s warm-up; "
              f"peak RSS {rss.hwm_kib / 1024:.1f} MiB")
