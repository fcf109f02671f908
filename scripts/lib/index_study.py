"""Index study for analytics.events (issue 13): ingest cost vs the analysts' queries.

Run through `scripts/bench-indexes` (the .tools/venv Python). For each index set it loads the
same N synthetic rows (in event-time order, as a live stream arrives) into a fresh, migrated
database in a private PostgreSQL cluster with one `COPY`, then runs the queries the API, the
dashboard and an analyst run against analytics.events, each several times (median, warm cache).
Prints one table and one line per variant: INDEXES variant=... copy_us_per_row=... q_*_ms=...

The idempotency key (kafka coordinates + "timestamp") and the primary key (id, "timestamp")
stay in every variant: the service's delivery contract and the API's keyset cursor need them.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (PrivatePostgres, log, die)

ROOT = Path(__file__).resolve().parents[2]
SECONDARY = ("events_timestamp_idx", "events_event_type_timestamp_idx",
             "events_user_id_timestamp_idx")

# variant -> index DDL on the partitioned parent (cascades to every partition), after the three
# secondary btrees of the migrations were dropped.
VARIANTS = {
    "current": [
        'CREATE INDEX events_timestamp_idx ON analytics.events ("timestamp" DESC)',
        'CREATE INDEX events_event_type_timestamp_idx ON analytics.events '
        '(event_type, "timestamp" DESC)',
        'CREATE INDEX events_user_id_timestamp_idx ON analytics.events (user_id, "timestamp" DESC)',
    ],
    "brin_time": [
        'CREATE INDEX events_timestamp_brin ON analytics.events USING brin ("timestamp") '
        'WITH (pages_per_range = 32)',
        'CREATE INDEX events_event_type_timestamp_idx ON analytics.events '
        '(event_type, "timestamp" DESC)',
        'CREATE INDEX events_user_id_timestamp_idx ON analytics.events (user_id, "timestamp" DESC)',
    ],
    "time_user": [
        'CREATE INDEX events_timestamp_idx ON analytics.events ("timestamp" DESC)',
        'CREATE INDEX events_user_id_timestamp_idx ON analytics.events (user_id, "timestamp" DESC)',
    ],
    "brin_user": [
        'CREATE INDEX events_timestamp_brin ON analytics.events USING brin ("timestamp") '
        'WITH (pages_per_range = 32)',
        'CREATE INDEX events_user_id_timestamp_idx ON analytics.events (user_id, "timestamp" DESC)',
    ],
    "keys_only": [],
}

COLS = 'event_type, user_id, service, "timestamp", data, kafka_topic, kafka_partition, kafka_offset'
TYPES = ["user.registered", "user.activated", "user.deactivated", "user.login", "user.logout",
         "user.updated", "user.password_reset", "user.deleted"]

# name -> (what, SQL). :t0 is the newest event time, :user a user with events.
QUERIES = {
    "recent": ("API /events, first page (newest 100)",
               f'SELECT id, {COLS} FROM analytics.events ORDER BY "timestamp" DESC, id DESC '
               "LIMIT 101"),
    "range_page": ("API /events?from&to (last hour, first page)",
                   f'SELECT id, {COLS} FROM analytics.events WHERE "timestamp" >= :t0 - '
                   "interval '1 hour' AND \"timestamp\" < :t0 ORDER BY \"timestamp\" DESC, id DESC "
                   "LIMIT 101"),
    "type_page": ("API /events?event_type&from&to (one type, last 6 h, first page)",
                  f"SELECT id, {COLS} FROM analytics.events WHERE event_type = 'user.deleted' AND "
                  "\"timestamp\" >= :t0 - interval '6 hours' AND \"timestamp\" < :t0 "
                  'ORDER BY "timestamp" DESC, id DESC LIMIT 101'),
    "rare_type_page": ("API /events?event_type (a type with no events yet, no time bound)",
                       f"SELECT id, {COLS} FROM analytics.events WHERE event_type = 'user.never_seen' "
                       'ORDER BY "timestamp" DESC, id DESC LIMIT 101'),
    "type_count": ("analyst: count of one type over 6 h",
                   "SELECT count(*) FROM analytics.events WHERE event_type = 'user.deleted' AND "
                   "\"timestamp\" >= :t0 - interval '6 hours' AND \"timestamp\" < :t0"),
    "user_timeline": ("API /users/{id}/timeline (first page)",
                      f"SELECT id, {COLS} FROM analytics.events WHERE user_id = :user "
                      'ORDER BY "timestamp" DESC, id DESC LIMIT 101'),
    "active_users": ("dashboard: active users per day (whole range)",
                     "SELECT date_trunc('day', \"timestamp\", 'UTC'), count(DISTINCT user_id) "
                     "FROM analytics.events WHERE \"timestamp\" >= :t0 - interval '2 days' AND "
                     '"timestamp" < :t0 + interval \'1 second\' GROUP BY 1 ORDER BY 1'),
    "active_users_1h": ("dashboard: active users, last hour",
                        "SELECT count(DISTINCT user_id) FROM analytics.events WHERE \"timestamp\" "
                        ">= :t0 - interval '1 hour' AND \"timestamp\" < :t0"),
}


def psql(url: str, *args: str, check: bool = True) -> str:
    r = subprocess.run(["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", url, *args],
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        bench.die(f"psql {' '.join(args)[:120]}: {r.stderr.strip()}")
    return r.stdout.strip()


def migrate(url: str) -> None:
    for f in sorted((ROOT / "migrations").glob("*.sql")):
        psql(url, "-f", str(f))


def make_rows(url: str, path: Path, n: int, days: int, users: int) -> None:
    """N events in time order over `days` days ending now, 6 Kafka partitions, JSON data."""
    types = "ARRAY[" + ",".join(f"'{t}'" for t in TYPES) + "]"
    sql = (
        f"\\copy (SELECT ({types})[1 + (i * 7919) % 8], 'user-' || ((i * 104729) % {users}), "
        "CASE WHEN i % 3 = 0 THEN 'auth-service' ELSE 'user-service' END, "
        f"now() - make_interval(secs => ({n} - i) * {days * 86400.0 / n}), "
        "json_build_object('ip', '10.0.' || (i % 256) || '.' || (i % 7), 'agent', 'bench', "
        "'n', i)::text, 'user-events', i % 6, i / 6 FROM generate_series(1::bigint, "
        f"{n}) AS i) TO '{path}'"
    )
    psql(url, "-c", sql)


def partitions(url: str, days: int) -> None:
    """Daily partitions for the rows' range (what the maintenance task would have created)."""
    psql(url, "-c", f"""DO $$ DECLARE d date; BEGIN
      FOR d IN SELECT generate_series((now() - interval '{days + 1} days')::date,
                                      (now() + interval '1 day')::date, interval '1 day')::date
      LOOP EXECUTE format('CREATE TABLE analytics.%I PARTITION OF analytics.events
                           FOR VALUES FROM (%L) TO (%L)', 'events_p' || to_char(d, 'YYYYMMDD'),
                           d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC');
      END LOOP; END $$""")


def run_variant(admin: str, name: str, ddl: list[str], rows: Path, n: int, days: int,
                reps: int) -> dict:
    db = f"na_idx_{name}_{int(time.time())}"
    psql(admin, "-c", f"CREATE DATABASE {db}")
    url = bench.with_database(admin, db)
    try:
        migrate(url)
        for idx in SECONDARY:
            psql(url, "-c", f"DROP INDEX IF EXISTS analytics.{idx}")
        for stmt in ddl:
            psql(url, "-c", stmt)
        partitions(url, days)
        psql(url, "-c", "CHECKPOINT")
        started = time.monotonic()
        psql(url, "-c", f"\\copy analytics.events ({COLS}) FROM '{rows}'")
        copy_s = time.monotonic() - started
        got = int(psql(url, "-c", "SELECT count(*) FROM analytics.events"))
        if got != n:
            bench.die(f"{name}: loaded {got} rows, expected {n}")
        psql(url, "-c", "VACUUM ANALYZE analytics.events")
        idx_mib = float(psql(url, "-c", "SELECT sum(pg_relation_size(i.indexrelid)) / 1048576.0 "
                                        "FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
                                        "JOIN pg_namespace s ON s.oid = c.relnamespace "
                                        "WHERE s.nspname = 'analytics' AND c.relname LIKE 'events%'"))
        t0 = psql(url, "-c", "SELECT max(\"timestamp\") FROM analytics.events")
        user = psql(url, "-c", "SELECT user_id FROM analytics.events ORDER BY id DESC LIMIT 1")
        out = {"variant": name, "copy_s": copy_s, "us_per_row": 1e6 * copy_s / n,
               "index_mib": idx_mib}
        for q, (_, sql) in QUERIES.items():
            sql = sql.replace(":t0", f"'{t0}'::timestamptz").replace(":user", f"'{user}'")
            times = []
            for _ in range(reps):
                plan = psql(url, "-c", f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")
                times.append(json.loads(plan)[0]["Execution Time"])
            out[q] = statistics.median(times)
            out[q + "_plan"] = top_nodes(psql(url, "-c", f"EXPLAIN (FORMAT JSON) {sql}"))
        return out
    finally:
        psql(admin, "-c", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)", check=False)


def top_nodes(plan_json: str) -> str:
    """The scan nodes of a plan, deduplicated across partitions (e.g. 'Index Scan
    user_id_timestamp_idx')."""
    seen: list[str] = []

    def walk(node: dict) -> None:
        t = node["Node Type"]
        if "Scan" in t:
            idx = re.sub(r"^events_p\d+_", "", node.get("Index Name", ""))
            label = f"{t} {idx}".strip()
            if label not in seen:
                seen.append(label)
        for child in node.get("Plans", []):
            walk(child)

    walk(json.loads(plan_json)[0]["Plan"])
    return "; ".join(seen[:3])


def main() -> int:
    p = argparse.ArgumentParser(prog="scripts/bench-indexes", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=3, help="event-time span of the rows")
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=5, help="runs per query (median)")
    p.add_argument("--variant", action="append", choices=list(VARIANTS),
                   help="only these (repeatable; default all)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="na-idx-"))
    logdir = ROOT / "target" / "bench" / ("indexes-" + time.strftime("%Y%m%d-%H%M%S"))
    logdir.mkdir(parents=True, exist_ok=True)
    pg = bench.PrivatePostgres(work / "pg", logdir)
    results = []
    try:
        rows = work / "rows.copy"
        make_rows(pg.admin_url, rows, args.rows, args.days, args.users)
        bench.log(f"indexes: {args.rows:,} rows ({rows.stat().st_size / 2**20:.0f} MiB) over "
                  f"{args.days} days, private cluster on port {pg.port}")
        for name in args.variant or list(VARIANTS):
            bench.log(f"indexes: variant {name}")
            r = run_variant(pg.admin_url, name, VARIANTS[name], rows, args.rows, args.days,
                            args.reps)
            bench.log(f"indexes: {name}: COPY {r['us_per_row']:.1f} µs/row, indexes "
                      f"{r['index_mib']:.0f} MiB")
            results.append(r)
    finally:
        pg.destroy()
        bench.shutil.rmtree(work, ignore_errors=True)
    print(f"\nindex study: {args.rows:,} rows over {args.days} days, one COPY per variant, "
          f"queries median of {args.reps} (ms, warm)")
    head = ["variant", "COPY µs/row", "rows/s", "index MiB"] + list(QUERIES)
    table = [head] + [[r["variant"], f"{r['us_per_row']:.1f}", f"{1e6 / r['us_per_row']:,.0f}",
                       f"{r['index_mib']:.0f}"] + [f"{r[q]:.1f}" for q in QUERIES]
                      for r in results]
    w = [max(len(t[i]) for t in table) for i in range(len(head))]
    for t in table:
        print("  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(t)))
    print("\nqueries:")
    for q, (what, _) in QUERIES.items():
        print(f"  {q}: {what}")
        for r in results:
            print(f"      {r['variant']}: {r[q + '_plan']}")
    for r in results:
        print(f"INDEXES variant={r['variant']} rows={args.rows} "
              f"copy_us_per_row={r['us_per_row']:.2f} index_mib={r['index_mib']:.0f} "
              + " ".join(f"q_{q}_ms={r[q]:.2f}" for q in QUERIES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
