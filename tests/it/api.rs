//! The query API against a real database: the router runs in-process on a random port, rows are
//! inserted with SQL, requests go over TCP.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use nexus_analytics::api::{self, ApiLimits, ApiState};
use secrecy::SecretString;
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;

use crate::common::{HttpResponse, TestDb, http};

/// 250 events on 2026-03-01 (four share each timestamp, 17 minutes apart, 3 types, 7 users,
/// 2 services) and 10 on 2026-03-03 (the first without data); event_counts filled from them.
const SEED: &str = r#"
INSERT INTO analytics.events
    (event_type, user_id, service, "timestamp", data, kafka_topic, kafka_partition, kafka_offset)
SELECT (ARRAY['user.registered', 'user.activated', 'user.login'])[1 + i % 3],
       'user-' || (i % 7),
       (ARRAY['auth', 'billing'])[1 + i % 2],
       timestamptz '2026-03-01 00:00:00+00' + (i / 4) * interval '17 minutes',
       jsonb_build_object('i', i, 'nested', jsonb_build_object('ok', true)),
       'user-events', i % 6, i
FROM generate_series(0, 249) AS i;
INSERT INTO analytics.events
    (event_type, user_id, service, "timestamp", data, kafka_topic, kafka_partition, kafka_offset)
SELECT 'user.deactivated', 'user-late', 'auth',
       timestamptz '2026-03-03 10:00:00+00' + i * interval '1 second',
       CASE WHEN i = 0 THEN NULL ELSE jsonb_build_object('i', i) END,
       'user-events', 0, 1000 + i
FROM generate_series(0, 9) AS i;
INSERT INTO analytics.event_counts (bucket, event_type, service, count)
SELECT date_trunc('minute', "timestamp", 'UTC'), event_type, service, count(*)
FROM analytics.events
GROUP BY 1, 2, 3
ON CONFLICT (bucket, event_type, service) DO UPDATE SET count = EXCLUDED.count;
"#;

const TOTAL: usize = 260;

/// The API router served on a random loopback port by its own runtime.
struct ApiServer {
    port: u16,
    rt: tokio::runtime::Runtime,
}

impl ApiServer {
    fn start(url: &str, token: Option<&str>) -> Self {
        Self::start_with(url, token, None)
    }

    fn start_with(url: &str, token: Option<&str>, statement_timeout: Option<Duration>) -> Self {
        let mut limits = ApiLimits::default();
        if let Some(t) = statement_timeout {
            limits.statement_timeout = t;
        }
        Self::start_limited(url, token, limits)
    }

    fn start_limited(url: &str, token: Option<&str>, limits: ApiLimits) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let port = rt.block_on(async {
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(2))
                .connect_lazy(url)
                .expect("pool");
            let state = ApiState::new(pool, token.map(SecretString::from)).with_limits(limits);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let port = listener.local_addr().expect("addr").port();
            tokio::spawn(async move {
                axum::serve(listener, api::router(state)).await.expect("serve");
            });
            port
        });
        Self { port, rt }
    }

    fn get(&self, path: &str) -> Response {
        request(self.port, "GET", path, &[])
    }

    fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        request(self.port, "GET", path, headers)
    }

    /// GET that must answer 200 with JSON.
    fn ok(&self, path: &str) -> Value {
        let r = self.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.json()
    }

    /// GET that must answer 400 naming `parameter`.
    fn bad(&self, path: &str, parameter: &str) {
        let r = self.get(path);
        assert_eq!(r.status, 400, "GET {path}: {}", r.body);
        let body = r.json();
        assert_eq!(body["error"]["code"], "bad_request", "GET {path}: {body}");
        assert_eq!(body["error"]["parameter"], parameter, "GET {path}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    }
}

type Response = HttpResponse;

trait Answer {
    fn json(&self) -> Value;
    fn header(&self, name: &str) -> Option<String>;
}

impl Answer for Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    }
}

/// A request with extra headers; the API must answer.
fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    http(port, method, path, headers).unwrap_or_else(|| panic!("{method} {path}: no answer"))
}

fn seeded() -> TestDb {
    let db = TestDb::create();
    crate::common::run_sql(&db.url, SEED);
    assert_eq!(db.rows(), TOTAL as i64);
    db
}

fn time(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().expect("time string")).expect("RFC 3339").to_utc()
}

/// Follows next_cursor from `first` (a path with a query) until the last page; returns every
/// event in order and the number of pages.
fn walk(api: &ApiServer, first: &str) -> (Vec<Value>, usize) {
    let mut out = Vec::new();
    let mut pages = 0;
    let mut path = first.to_string();
    loop {
        let page = api.ok(&path);
        pages += 1;
        out.extend(page["events"].as_array().expect("events").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(cursor) => {
                assert!(
                    !page["events"].as_array().unwrap().is_empty(),
                    "a cursor after an empty page"
                );
                path = format!("{first}&cursor={cursor}");
            }
            None => {
                assert!(page["next_cursor"].is_null());
                break;
            }
        }
        assert!(pages <= TOTAL + 1, "pagination does not end");
    }
    (out, pages)
}

/// Strictly newest first by (timestamp, id), each id once.
fn assert_ordered_unique(events: &[Value]) {
    let mut seen = HashSet::new();
    for pair in events.windows(2) {
        let (a, b) = (
            (time(&pair[0]["timestamp"]), pair[0]["id"].as_i64().unwrap()),
            (time(&pair[1]["timestamp"]), pair[1]["id"].as_i64().unwrap()),
        );
        assert!(a > b, "not newest first: {a:?} then {b:?}");
    }
    for e in events {
        assert!(seen.insert(e["id"].as_i64().unwrap()), "id {} twice", e["id"]);
    }
}

#[test]
fn pagination_walks_every_row_exactly_once() {
    let db = seeded();
    let api = ApiServer::start(&db.url, None);

    // limit 3 puts page boundaries inside groups of four identical timestamps.
    let (events, pages) = walk(&api, "/api/v1/events?limit=3");
    assert_eq!(events.len(), TOTAL);
    assert_eq!(pages, TOTAL.div_ceil(3));
    assert_ordered_unique(&events);
    let id_sum: i64 = events.iter().map(|e| e["id"].as_i64().unwrap()).sum();
    assert_eq!(id_sum, db.scalar("SELECT sum(id)::bigint FROM analytics.events"));

    // Same with filters: every matching row once, nothing else.
    let (events, _) = walk(&api, "/api/v1/events?event_type=user.login&service=auth&limit=7");
    let expected = db.scalar(
        "SELECT count(*) FROM analytics.events WHERE event_type = 'user.login' AND service = 'auth'",
    );
    assert!(expected > 7);
    assert_eq!(events.len() as i64, expected);
    assert_ordered_unique(&events);
    assert!(events.iter().all(|e| e["event_type"] == "user.login" && e["service"] == "auth"));

    // A page size that divides the total exactly still ends with next_cursor null.
    let (events, pages) = walk(&api, "/api/v1/events?limit=130");
    assert_eq!((events.len(), pages), (TOTAL, 2));
}

#[test]
fn filters_fields_and_limits() {
    let db = seeded();
    let api = ApiServer::start(&db.url, None);

    // Default page: 100 newest, with a cursor.
    let page = api.ok("/api/v1/events");
    assert_eq!(page["events"].as_array().unwrap().len(), 100);
    assert!(page["next_cursor"].is_string());
    let newest = &page["events"][0];
    assert_eq!(newest["event_type"], "user.deactivated");
    assert_eq!(newest["user_id"], "user-late");
    assert_eq!(newest["service"], "auth");
    assert_eq!(time(&newest["timestamp"]), time(&"2026-03-03T10:00:09Z".into()));
    assert_eq!(newest["data"], serde_json::json!({"i": 9}));
    assert!(newest["id"].is_i64());
    time(&newest["created_at"]);
    let keys: Vec<_> = newest.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys.len(),
        7,
        "fields id, event_type, user_id, service, timestamp, data, created_at: {keys:?}"
    );
    // The event without data has data: null.
    let late = api.ok("/api/v1/events?user_id=user-late&limit=1000");
    let events = late["events"].as_array().unwrap();
    assert_eq!(events.len(), 10);
    assert!(events.last().unwrap()["data"].is_null());
    assert!(events.last().unwrap().as_object().unwrap().contains_key("data"));
    assert!(late["next_cursor"].is_null());

    // Limits: 1000 returns everything, bounds are enforced and named.
    let all = api.ok("/api/v1/events?limit=1000");
    assert_eq!(all["events"].as_array().unwrap().len(), TOTAL);
    assert!(all["next_cursor"].is_null());
    assert_eq!(api.ok("/api/v1/events?limit=1")["events"].as_array().unwrap().len(), 1);
    for bad in ["0", "1001", "-1", "abc", "1.5", "99999999999999999999"] {
        api.bad(&format!("/api/v1/events?limit={bad}"), "limit");
    }

    // Time range: from inclusive, to exclusive; a `+hh:mm` offset works encoded or not.
    let ranged = api
        .ok("/api/v1/events?from=2026-03-01T01:00:00Z&to=2026-03-01T02:00:00%2B00:00&limit=1000");
    let expected = db.scalar(
        r#"SELECT count(*) FROM analytics.events
           WHERE "timestamp" >= '2026-03-01T01:00:00Z' AND "timestamp" < '2026-03-01T02:00:00Z'"#,
    );
    assert!(expected > 0);
    assert_eq!(ranged["events"].as_array().unwrap().len() as i64, expected);
    let unencoded = api.ok(
        "/api/v1/events?from=2026-03-01T02:00:00+01:00&to=2026-03-01T03:00:00+01:00&limit=1000",
    );
    assert_eq!(unencoded["events"], ranged["events"]);
    // Exactly on a timestamp: from includes it, to excludes it.
    let at = "2026-03-01T00:17:00Z";
    assert_eq!(
        api.ok(&format!("/api/v1/events?from={at}&to=2026-03-01T00:17:00.000001Z"))["events"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    let before = api.ok(&format!("/api/v1/events?from=2026-03-01T00:16:00Z&to={at}"));
    assert_eq!(before["events"], serde_json::json!([]));

    // Filters combine.
    let expected =
        db.scalar("SELECT count(*) FROM analytics.events WHERE user_id = 'user-3' AND event_type = 'user.activated'");
    let page = api.ok("/api/v1/events?user_id=user-3&event_type=user.activated&limit=1000");
    assert_eq!(page["events"].as_array().unwrap().len() as i64, expected);
    assert!(api.ok("/api/v1/events?event_type=nope")["events"].as_array().unwrap().is_empty());
}

#[test]
fn bad_parameters_name_the_parameter() {
    let db = seeded();
    let api = ApiServer::start(&db.url, None);

    api.bad("/api/v1/events?cursor=not-a-cursor", "cursor");
    api.bad("/api/v1/events?cursor=%00", "cursor");
    api.bad("/api/v1/events?from=yesterday", "from");
    api.bad("/api/v1/events?to=2026-13-01T00:00:00Z", "to");
    api.bad("/api/v1/events?from=2026-03-02T00:00:00Z&to=2026-03-01T00:00:00Z", "to");
    api.bad("/api/v1/events?event_type=a%00b", "event_type");
    api.bad("/api/v1/events?colour=red", "colour");
    api.bad("/api/v1/events?limit=5&limit=6", "limit");
    api.bad("/api/v1/events?service=", "service");
    api.bad("/api/v1/events?limit=10&cursor=", "cursor");
    api.bad("/api/v1/stats/counts?from=", "from");
    api.bad("/api/v1/users/user-1/timeline?event_type=x", "event_type");
    api.bad("/api/v1/users/user-1/timeline?limit=0", "limit");
    api.bad("/api/v1/users/a%00b/timeline", "user_id");
    api.bad("/api/v1/users/%FF/timeline", "user_id");
    api.bad("/api/v1/stats/counts?bucket=week", "bucket");
    api.bad("/api/v1/stats/counts?group_by=user_id", "group_by");
    api.bad("/api/v1/stats/counts?from=2026-03-01", "from");
    api.bad(
        "/api/v1/stats/counts?bucket=minute&from=2026-03-01T00:00:00Z&to=2026-03-08T00:00:01Z",
        "from",
    );
    api.bad(
        "/api/v1/stats/counts?bucket=hour&from=2026-01-01T00:00:00Z&to=2026-06-01T00:00:00Z",
        "from",
    );
    api.bad("/api/v1/stats/counts?from=2026-03-01T00:00:00Z&to=2026-03-01T00:00:00Z", "to");

    // Unknown routes and methods: JSON too.
    for path in ["/api/v1/nope", "/api/v2/events", "/api", "/", "/api/v1/events/"] {
        let r = api.get(path);
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.json()["error"]["code"], "not_found", "{path}");
    }
    let r = request(api.port, "POST", "/api/v1/events", &[]);
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
    assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
}

#[test]
fn counts_by_minute_hour_and_day() {
    let db = seeded();
    let api = ApiServer::start(&db.url, None);
    let points = |v: &Value| -> Vec<(DateTime<Utc>, String, i64)> {
        v["series"]
            .as_array()
            .expect("series")
            .iter()
            .map(|p| {
                (
                    time(&p["bucket"]),
                    p["key"].as_str().unwrap().to_string(),
                    p["count"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    let totals = |pts: &[(DateTime<Utc>, String, i64)]| {
        let mut m = BTreeMap::new();
        for (_, k, n) in pts {
            *m.entry(k.clone()).or_insert(0) += n;
        }
        m
    };

    // Minutes over day one, by event type: every stored event counted once, per type.
    let body = api
        .ok("/api/v1/stats/counts?bucket=minute&from=2026-03-01T00:00:00Z&to=2026-03-02T00:00:00Z");
    assert_eq!(body["bucket"], "minute");
    assert_eq!(body["group_by"], "event_type");
    let minute = points(&body);
    assert_eq!(minute.iter().map(|p| p.2).sum::<i64>(), 250);
    for (_, key, _) in &minute {
        let expected = db.scalar(&format!(
            "SELECT count(*) FROM analytics.events WHERE event_type = '{key}' AND \"timestamp\" < '2026-03-02Z'"
        ));
        assert_eq!(totals(&minute)[key], expected, "{key}");
    }
    assert!(minute.windows(2).all(|w| (w[0].0, &w[0].1) < (w[1].0, &w[1].1)), "ordered");
    // 4 events share each 17-minute timestamp: the first minute holds i = 0..3.
    assert_eq!(
        minute
            .iter()
            .filter(|p| p.0 == time(&"2026-03-01T00:00:00Z".into()))
            .map(|p| p.2)
            .sum::<i64>(),
        4
    );

    // Hours by service: buckets are whole hours and agree with a direct count.
    let hour = points(&api.ok(
        "/api/v1/stats/counts?bucket=hour&group_by=service&from=2026-03-01T00:00:00Z&to=2026-03-04T00:00:00Z",
    ));
    assert!(hour.iter().all(|p| p.0.timestamp() % 3600 == 0));
    let h5_auth = hour
        .iter()
        .find(|p| p.0 == time(&"2026-03-01T05:00:00Z".into()) && p.1 == "auth")
        .expect("05:00 auth")
        .2;
    assert_eq!(
        h5_auth,
        db.scalar(
            "SELECT count(*) FROM analytics.events WHERE service = 'auth'
             AND \"timestamp\" >= '2026-03-01T05:00:00Z' AND \"timestamp\" < '2026-03-01T06:00:00Z'"
        )
    );
    let by_service = totals(&hour);
    assert_eq!(
        by_service["auth"],
        db.scalar("SELECT count(*) FROM analytics.events WHERE service = 'auth'")
    );
    assert_eq!(by_service["billing"], 125);

    // Days: two days with events, the second one 10 deactivations.
    let day =
        points(&api.ok(
            "/api/v1/stats/counts?bucket=day&from=2026-02-01T00:00:00Z&to=2026-04-01T00:00:00Z",
        ));
    let days: BTreeMap<_, i64> = day.iter().fold(BTreeMap::new(), |mut m, p| {
        *m.entry(p.0).or_insert(0) += p.2;
        m
    });
    assert_eq!(
        days.into_iter().collect::<Vec<_>>(),
        vec![
            (time(&"2026-03-01T00:00:00Z".into()), 250),
            (time(&"2026-03-03T00:00:00Z".into()), 10)
        ]
    );
    assert!(day.contains(&(time(&"2026-03-03T00:00:00Z".into()), "user.deactivated".into(), 10)));

    // Filters narrow the counts; an empty range is an empty series.
    let filtered = points(&api.ok(
        "/api/v1/stats/counts?bucket=day&group_by=service&event_type=user.login&from=2026-03-01T00:00:00Z&to=2026-03-02T00:00:00Z",
    ));
    assert_eq!(
        filtered.iter().map(|p| p.2).sum::<i64>(),
        db.scalar("SELECT count(*) FROM analytics.events WHERE event_type = 'user.login'")
    );
    let empty = api.ok("/api/v1/stats/counts?from=2020-01-01T00:00:00Z&to=2020-01-02T00:00:00Z");
    assert_eq!(empty["series"], serde_json::json!([]));
    // Defaults: hour buckets over the last day, by event type.
    let default = api.ok("/api/v1/stats/counts");
    assert_eq!(
        (default["bucket"].as_str(), default["group_by"].as_str()),
        (Some("hour"), Some("event_type"))
    );
    assert_eq!((time(&default["to"]) - time(&default["from"])).num_hours(), 24);
}

#[test]
fn user_timeline_pages_newest_first() {
    let db = seeded();
    let api = ApiServer::start(&db.url, None);
    let expected = db.scalar("SELECT count(*) FROM analytics.events WHERE user_id = 'user-3'");
    assert!(expected > 5);

    let first = api.ok("/api/v1/users/user-3/timeline?limit=5");
    assert_eq!(first["user_id"], "user-3");
    assert_eq!(first["events"].as_array().unwrap().len(), 5);
    let (events, pages) = walk(&api, "/api/v1/users/user-3/timeline?limit=5");
    assert_eq!(events.len() as i64, expected);
    assert_eq!(pages, (expected as usize).div_ceil(5));
    assert_ordered_unique(&events);
    assert!(events.iter().all(|e| e["user_id"] == "user-3"));

    let unknown = api.ok("/api/v1/users/nobody%20here/timeline");
    assert_eq!(unknown["user_id"], "nobody here");
    assert_eq!(unknown["events"], serde_json::json!([]));
    assert!(unknown["next_cursor"].is_null());
}

#[test]
fn bearer_token_is_required_when_configured() {
    let db = seeded();
    let token = "t0ken-for-tests";
    let api = ApiServer::start(&db.url, Some(token));

    for path in ["/api/v1/events", "/api/v1/stats/counts", "/api/v1/users/user-1/timeline"] {
        for headers in [
            vec![],
            vec![("Authorization", "Bearer wrong")],
            vec![("Authorization", "Bearer t0ken-for-test")],
            vec![("Authorization", "Basic dDBrZW4tZm9yLXRlc3Rz")],
            vec![("Authorization", token)],
        ] {
            let r = api.get_with(path, &headers);
            assert_eq!(r.status, 401, "{path} {headers:?}");
            assert_eq!(r.json()["error"]["code"], "unauthorized");
            assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
            assert!(!r.body.contains(token));
        }
        let auth = format!("Bearer {token}");
        let r = api.get_with(path, &[("Authorization", &auth)]);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        let r = api.get_with(path, &[("authorization", &format!("bearer {token}"))]);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    // Bad parameters are only reported to authenticated callers.
    assert_eq!(api.get("/api/v1/events?limit=0").status, 401);
    // The document stays open.
    assert_eq!(api.get("/api/v1/openapi.json").status, 200);
}

#[test]
fn openapi_document_describes_the_routes() {
    let db = seeded();
    let api = ApiServer::start(&db.url, None);
    let r = api.get("/api/v1/openapi.json");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{}", doc["openapi"]);
    let paths: Vec<&str> = doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/events",
            "/api/v1/openapi.json",
            "/api/v1/stats/counts",
            "/api/v1/users/{user_id}/timeline"
        ]
    );
    let params = |path: &str| -> Vec<String> {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        params("/api/v1/events"),
        ["event_type", "user_id", "service", "from", "to", "cursor", "limit"]
    );
    assert_eq!(
        params("/api/v1/stats/counts"),
        ["from", "to", "bucket", "group_by", "event_type", "service"]
    );
    assert_eq!(params("/api/v1/users/{user_id}/timeline"), ["user_id", "cursor", "limit"]);
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert_eq!(
        doc["components"]["schemas"]["ErrorCode"]["enum"],
        serde_json::json!([
            "bad_request",
            "unauthorized",
            "not_found",
            "method_not_allowed",
            "unavailable",
            "overloaded",
            "internal"
        ])
    );
    for (path, op) in doc["paths"].as_object().unwrap() {
        let responses = op["get"]["responses"].as_object().unwrap();
        assert!(responses.contains_key("200"), "{path}");
        if path != "/api/v1/openapi.json" {
            for code in ["400", "401", "500", "503"] {
                assert!(responses.contains_key(code), "{path} lacks {code}");
            }
            assert_eq!(op["get"]["security"], serde_json::json!([{"bearer": []}]), "{path}");
        }
        // Every documented path is served.
        let concrete = path.replace("{user_id}", "user-1");
        assert_eq!(api.get(&concrete).status, 200, "{concrete}");
    }
    // The document served is the one the code generates.
    assert_eq!(doc, serde_json::to_value(api::openapi()).unwrap());
}

#[test]
fn database_failures_are_503_without_details() {
    // Nothing listens on this port.
    let port = crate::common::free_port();
    let url = format!("postgres://someone:pa55word@127.0.0.1:{port}/nowhere");
    let api = ApiServer::start(&url, None);
    let started = Instant::now();
    for path in ["/api/v1/events", "/api/v1/stats/counts", "/api/v1/users/u/timeline"] {
        let r = api.get(path);
        assert_eq!(r.status, 503, "{path}: {}", r.body);
        let body = r.json();
        assert_eq!(body["error"]["code"], "unavailable");
        for secret in ["pa55word", "someone", &port.to_string(), "127.0.0.1", "nowhere"] {
            assert!(!r.body.contains(secret), "{secret} leaked: {}", r.body);
        }
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    // Parameter errors are still reported without touching the database.
    api.bad("/api/v1/events?limit=0", "limit");
}

#[test]
fn statement_timeout_stops_a_blocked_query() {
    let db = seeded();
    let api = ApiServer::start_with(&db.url, None, Some(Duration::from_millis(300)));
    // Another session holds an exclusive lock on the counts table, so the query waits until
    // its statement timeout fires.
    let url = db.url.clone();
    let locker = api.rt.block_on(async move {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        sqlx::raw_sql("BEGIN; LOCK TABLE analytics.event_counts IN ACCESS EXCLUSIVE MODE")
            .execute(&mut conn)
            .await
            .expect("lock");
        conn
    });
    let started = Instant::now();
    let r = api.get("/api/v1/stats/counts");
    let took = started.elapsed();
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "unavailable");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("300 ms"), "{}", r.body);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // Events are not blocked, and the pool is not left holding stuck connections.
    for _ in 0..6 {
        assert_eq!(api.get("/api/v1/events?limit=1").status, 200);
    }
    api.rt.block_on(async move {
        use sqlx::Connection;
        locker.close().await.expect("close");
    });
    assert_eq!(api.get("/api/v1/stats/counts").status, 200);
}

/// `n` events one second apart on 2026-04-01 whose `data` is about `kib` KiB of JSON (many small
/// fields, as real payloads have); event `big_at`, if any, gets `big_kib` instead.
fn seed_large(db: &TestDb, n: usize, kib: usize, big_at: Option<(usize, usize)>) {
    let (big_i, big_kib) = big_at.map_or((-1, 0), |(i, k)| (i as i64, k));
    crate::common::run_sql(
        &db.url,
        &format!(
            r#"INSERT INTO analytics.events
    (event_type, user_id, service, "timestamp", data, kafka_topic, kafka_partition, kafka_offset)
SELECT 'user.login', 'user-' || (i % 3), 'auth',
       timestamptz '2026-04-01 00:00:00+00' + (i / 2) * interval '1 second',
       (SELECT jsonb_object_agg('k' || j, md5(i::text || '/' || j::text))
          FROM generate_series(1, (CASE WHEN i = {big_i} THEN {big_kib} ELSE {kib} END) * 1024 / 44) AS j),
       'user-events', 0, i
FROM generate_series(0, {last}) AS i"#,
            last = n - 1
        ),
    );
}

/// Every page of a walk, with its body size.
fn walk_pages(api: &ApiServer, first: &str) -> Vec<(usize, Value)> {
    let mut pages = Vec::new();
    let mut path = first.to_string();
    loop {
        let r = api.get(&path);
        assert_eq!(r.status, 200, "GET {path}: {}", shorten(&r.body));
        let page = r.json();
        let cursor = page["next_cursor"].as_str().map(str::to_string);
        pages.push((r.body.len(), page));
        match cursor {
            Some(c) => path = format!("{first}&cursor={c}"),
            None => break,
        }
        assert!(pages.len() < 10_000, "pagination does not end");
    }
    pages
}

fn shorten(s: &str) -> &str {
    &s[..s.len().min(300)]
}

#[test]
fn byte_budget_cuts_pages_and_the_cursor_continues_without_gaps() {
    let db = TestDb::create();
    seed_large(&db, 120, 8, None);
    let budget = 64 * 1024;
    let limits = ApiLimits { max_page_bytes: budget, ..ApiLimits::default() };
    let api = ApiServer::start_limited(&db.url, None, limits);

    let pages = walk_pages(&api, "/api/v1/events?limit=1000");
    // ~8 KiB events in a 64 KiB budget: about 7 per page, never more than the budget.
    assert!(pages.len() >= 120 / 8, "{} pages", pages.len());
    for (i, (size, page)) in pages.iter().enumerate() {
        let n = page["events"].as_array().unwrap().len();
        assert!(*size <= budget, "page {i}: {size} bytes with {n} events");
        assert!(n >= 1, "page {i} is empty");
        if i + 1 < pages.len() {
            assert_eq!(page["truncated"], "byte_budget", "page {i}");
            assert!(page["next_cursor"].is_string());
        } else {
            assert!(page["truncated"].is_null() && page["next_cursor"].is_null());
        }
    }
    let events: Vec<Value> =
        pages.iter().flat_map(|(_, p)| p["events"].as_array().unwrap().clone()).collect();
    assert_eq!(events.len(), 120);
    assert_ordered_unique(&events);
    assert_eq!(
        events.iter().map(|e| e["id"].as_i64().unwrap()).sum::<i64>(),
        db.scalar("SELECT sum(id)::bigint FROM analytics.events")
    );
    // The payload comes back as stored.
    let first = &events[0];
    let stored = db.scalar(&format!(
        "SELECT count(*) FROM analytics.events WHERE id = {} AND data = '{}'::jsonb",
        first["id"],
        first["data"].to_string().replace('\'', "''")
    ));
    assert_eq!(stored, 1);

    // A limit below the budget still ends pages at the limit, without `truncated`.
    let page = api.ok("/api/v1/events?limit=3");
    assert_eq!(page["events"].as_array().unwrap().len(), 3);
    assert!(page["truncated"].is_null() && page["next_cursor"].is_string());

    // Timelines are bounded the same way: user-1's 40 events over several pages, each once.
    let pages = walk_pages(&api, "/api/v1/users/user-1/timeline?limit=1000");
    assert!(pages.len() > 1);
    let events: Vec<Value> =
        pages.iter().flat_map(|(_, p)| p["events"].as_array().unwrap().clone()).collect();
    assert_eq!(
        events.len() as i64,
        db.scalar("SELECT count(*) FROM analytics.events WHERE user_id = 'user-1'")
    );
    assert_ordered_unique(&events);
    assert!(pages.iter().all(|(size, p)| *size <= budget && p["user_id"] == "user-1"));
}

#[test]
fn an_event_larger_than_the_budget_comes_alone_on_its_page() {
    let db = TestDb::create();
    // Event 5 carries ~500 KiB (about MAX_EVENT_BYTES), the others 1 KiB; the budget is 32 KiB.
    seed_large(&db, 11, 1, Some((5, 500)));
    let budget = 32 * 1024;
    let limits = ApiLimits { max_page_bytes: budget, ..ApiLimits::default() };
    let api = ApiServer::start_limited(&db.url, None, limits);

    let pages = walk_pages(&api, "/api/v1/events?limit=100");
    let big: Vec<&(usize, Value)> = pages.iter().filter(|(size, _)| *size > budget).collect();
    assert_eq!(big.len(), 1, "one page holds the large event");
    let (size, page) = big[0];
    assert!(*size > 400 * 1024, "{size}");
    assert_eq!(page["events"].as_array().unwrap().len(), 1, "the large event is alone");
    assert_eq!(page["truncated"], "byte_budget");
    let events: Vec<Value> =
        pages.iter().flat_map(|(_, p)| p["events"].as_array().unwrap().clone()).collect();
    assert_eq!(events.len(), 11);
    assert_ordered_unique(&events);
}

#[test]
fn overload_is_answered_at_once_with_503_and_retry_after() {
    let db = seeded();
    let limits = ApiLimits {
        max_concurrent_requests: 1,
        statement_timeout: Duration::from_secs(10),
        ..ApiLimits::default()
    };
    let api = ApiServer::start_limited(&db.url, None, limits);
    // Another session locks the events table, so the first request waits inside its permit.
    let url = db.url.clone();
    let locker = api.rt.block_on(async move {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        sqlx::raw_sql("BEGIN; LOCK TABLE analytics.events IN ACCESS EXCLUSIVE MODE")
            .execute(&mut conn)
            .await
            .expect("lock");
        conn
    });
    let port = api.port;
    let blocked = std::thread::spawn(move || request(port, "GET", "/api/v1/events?limit=5", &[]));
    // Wait until that request holds the permit (its query waits for the lock).
    assert!(
        crate::common::wait_until(Duration::from_secs(10), || {
            db.scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'DECLARE api_page%'",
            ) == 1
        }),
        "the first request never waited for the lock"
    );

    for path in ["/api/v1/events", "/api/v1/stats/counts", "/api/v1/users/user-1/timeline"] {
        let started = Instant::now();
        let r = api.get(path);
        assert!(started.elapsed() < Duration::from_secs(2), "{path}: refused late");
        assert_eq!(r.status, 503, "{path}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "overloaded", "{path}");
        assert_eq!(r.header("retry-after").as_deref(), Some("1"), "{path}");
    }
    // The document and unknown routes take no permit.
    assert_eq!(api.get("/api/v1/openapi.json").status, 200);
    assert_eq!(api.get("/api/v1/nope").status, 404);

    api.rt.block_on(async move {
        use sqlx::Connection;
        locker.close().await.expect("close");
    });
    let first = blocked.join().expect("request thread");
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.json()["events"].as_array().unwrap().len(), 5);
    // The permit came back with the response.
    assert_eq!(api.get("/api/v1/events?limit=1").status, 200);
}
