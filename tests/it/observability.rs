//! Observability with real clients: a real Prometheus server scrapes the service, promtool
//! checks the exposition, lag is exact against Apache Kafka's watermarks, and spans reach an
//! OTLP/HTTP endpoint with links to the producers' traces.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;

fn tool(env: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("/usr/bin/{name}")));
    assert!(
        path.exists(),
        "{name} not found at {} (run scripts/install-tools prometheus)",
        path.display()
    );
    path
}

struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn scraping(target_port: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: nexus-analytics\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .expect("config");
        let port = free_port();
        let child = Command::new(tool("PROMETHEUS_BIN", "prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start prometheus");
        Self { child, port, _dir: dir }
    }

    /// Runs an instant query; returns the `result` array as JSON.
    fn query(&self, promql: &str) -> Option<serde_json::Value> {
        let encoded: String = url::form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let (code, body) = http_get(self.port, &format!("/api/v1/query?query={encoded}"))?;
        if code != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json.pointer("/data/result").cloned()
    }

    fn first_value(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql)?;
        result.pointer("/0/value/1")?.as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_prometheus_scrapes_rates_lag_and_stored_total() {
    let Fixture { broker, db, topic, .. } = Fixture::new("events", 3);
    let svc = Service::consuming(&broker.bootstrap(), &topic, &db.url, &[]);
    svc.wait_ready(Duration::from_secs(30));
    let prom = Prometheus::scraping(svc.port);
    let produced = produce_demo(&broker.bootstrap(), &topic, 3000, 1000, 11) as i64;
    assert!(wait_until(Duration::from_secs(60), || db.rows() >= produced), "rows {}", db.rows());

    let rate = wait_until(Duration::from_secs(30), || {
        prom.query("rate(analytics_events_processed_total[1m])")
            .is_some_and(|r| r.as_array().is_some_and(|a| !a.is_empty()))
    });
    assert!(rate, "no rate() data: {:?}", prom.query("rate(analytics_events_processed_total[1m])"));
    let lag = wait_until(Duration::from_secs(30), || {
        prom.query("analytics_consumer_lag")
            .is_some_and(|r| r.as_array().is_some_and(|a| a.len() == 3))
    });
    assert!(lag, "lag series per partition: {:?}", prom.query("analytics_consumer_lag"));
    let matches = wait_until(Duration::from_secs(30), || {
        prom.first_value("analytics_events_stored_total") == Some(db.rows() as f64)
    });
    assert!(
        matches,
        "stored_total {:?} vs rows {}",
        prom.first_value("analytics_events_stored_total"),
        db.rows()
    );
    assert_eq!(prom.first_value("up{job=\"nexus-analytics\"}"), Some(1.0));
    eprintln!(
        "prometheus: rate={:?} stored_total={:?} rows={} lag_sum={:?}",
        prom.query("sum(rate(analytics_events_processed_total[1m]))"),
        prom.first_value("analytics_events_stored_total"),
        db.rows(),
        prom.first_value("analytics_consumer_instance_lag")
    );
}

#[test]
fn promtool_accepts_the_live_exposition() {
    let broker = Broker::start();
    let topic = unique("events");
    broker.create_topic(&topic, 2);
    let db = TestDb::create();
    let svc = Service::consuming(&broker.bootstrap(), &topic, &db.url, &[]);
    svc.wait_ready(Duration::from_secs(30));
    produce_demo(&broker.bootstrap(), &topic, 200, 0, 12);
    assert!(wait_until(Duration::from_secs(30), || db.rows() >= 200));
    let (code, body) = svc.get("/metrics").expect("scrape");
    assert_eq!(code, 200);
    let mut promtool = Command::new(tool("PROMTOOL_BIN", "promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    promtool.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("write");
    let out = promtool.wait_with_output().expect("promtool output");
    let report =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check metrics failed:\n{report}");
    assert!(!report.contains("analytics_"), "promtool complains about our metrics:\n{report}");
}

#[test]
fn lag_equals_unconsumed_events_and_drains_to_zero() {
    // Kafka's watermarks (ListOffsets and Fetch) and committed offsets are exact.
    let broker = Broker::start();
    let topic = unique("events");
    broker.create_topic(&topic, 3);
    broker.create_topic(&format!("{topic}.dlq"), 1);
    let bootstrap = broker.bootstrap();
    let produced = produce_demo(&bootstrap, &topic, 3000, 0, 13) as i64;

    // Hide the table: writes fail, the consumer pauses, nothing is committed.
    let db = TestDb::create();
    run_sql(&db.url, "ALTER TABLE analytics.events RENAME TO events_hidden");
    let svc = Service::consuming(&bootstrap, &topic, &db.url, &[]);
    let full = wait_until(Duration::from_secs(40), || {
        svc.metric("analytics_consumer_instance_lag") == Some(produced as f64)
    });
    assert!(
        full,
        "lag_sum {:?}, want {produced}\n{}",
        svc.metric("analytics_consumer_instance_lag"),
        svc.log_text()
    );
    let (_, metrics) = svc.get("/metrics").expect("scrape");
    let per_partition: f64 = (0..3)
        .map(|p| {
            parse_metric(
                &metrics,
                &format!("analytics_consumer_lag{{partition=\"{p}\",topic=\"{topic}\"}}"),
            )
            .unwrap_or(-1.0)
        })
        .sum();
    assert_eq!(per_partition, produced as f64, "per-partition lag adds up");
    assert!(wait_until(Duration::from_secs(10), || svc.metric("analytics_consumer_paused")
        == Some(1.0)));
    // Polled: under load a database ping may time out too, and readiness is sampled.
    let not_ready = wait_until(
        Duration::from_secs(10),
        || matches!(svc.get("/readyz"), Some((503, body)) if body.contains("writes failing")),
    );
    assert!(not_ready, "/readyz {:?}", svc.get("/readyz"));

    // Records produced while fetching is paused count too: the backlog an SRE sees grows.
    let during = produce_demo(&bootstrap, &topic, 500, 0, 14) as i64;
    let produced = produced + during;
    let grew = wait_until(Duration::from_secs(30), || {
        svc.metric("analytics_consumer_instance_lag") == Some(produced as f64)
    });
    assert!(
        grew,
        "lag {:?} while paused, want {produced}",
        svc.metric("analytics_consumer_instance_lag")
    );
    assert_eq!(svc.metric("analytics_consumer_paused"), Some(1.0), "still paused");

    run_sql(&db.url, "ALTER TABLE analytics.events_hidden RENAME TO events");
    let drained = wait_until(Duration::from_secs(30), || {
        svc.metric("analytics_consumer_instance_lag") == Some(0.0)
    });
    assert!(
        drained,
        "lag_sum {:?} after catching up",
        svc.metric("analytics_consumer_instance_lag")
    );
    assert_eq!(db.rows(), produced);
    assert_eq!(svc.metric("analytics_consumer_paused"), Some(0.0));
}

/// Requests an OTLP receiver saw: (path, body).
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A minimal OTLP/HTTP receiver: records request paths and bodies, answers 200.
fn otlp_receiver() -> (u16, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let store = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            loop {
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                    break;
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or_default().to_string();
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).is_err() {
                    break;
                }
                store.lock().expect("lock").push((path, body));
                let response = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                if reader.get_mut().write_all(response.as_bytes()).is_err() {
                    break;
                }
            }
        }
    });
    (port, seen)
}

#[test]
fn batch_spans_are_exported_with_links_to_producer_traces() {
    let broker = Broker::start();
    let topic = unique("events");
    broker.create_topic(&topic, 1);
    let db = TestDb::create();
    let (otlp_port, seen) = otlp_receiver();
    let endpoint = format!("http://127.0.0.1:{otlp_port}");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let records: Vec<RawRecord> = (0..20)
        .map(|i| RawRecord {
            key: None,
            value: Some(
                format!(
                    r#"{{"event_type":"user.login","user_id":"u{i}","service":"auth-service"}}"#
                )
                .into_bytes(),
            ),
            headers: vec![(
                "traceparent".into(),
                format!("00-{trace_id}-00f067aa0ba902b7-01").into_bytes(),
            )],
            partition: Some(0),
        })
        .collect();
    produce_raw(&broker.bootstrap(), &topic, &records);
    let svc = Service::consuming(
        &broker.bootstrap(),
        &topic,
        &db.url,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)],
    );
    assert!(wait_until(Duration::from_secs(30), || db.rows() >= 20));
    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    let exported = wait_until(Duration::from_secs(30), || {
        seen.lock().expect("lock").iter().any(|(path, body)| {
            path == "/v1/traces"
                && body.windows(5).any(|w| w == b"batch")
                && body.windows(16).any(|w| w == trace_bytes.as_slice())
        })
    });
    let paths: Vec<String> = seen
        .lock()
        .expect("lock")
        .iter()
        .map(|(p, b)| format!("{p} ({} bytes)", b.len()))
        .collect();
    assert!(
        exported,
        "no batch span linked to the producer trace; requests: {paths:?}\n{}",
        svc.log_text()
    );
}
