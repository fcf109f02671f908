//! Runtime status shared by the consumer, the health checks and the metrics: whether Kafka
//! and PostgreSQL are usable, whether the consume loop still turns, and consumer lag.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// The state of one dependency as last observed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Component {
    /// True when the dependency is usable.
    pub up: bool,
    /// What was observed (an error message when down). Never contains secrets.
    pub detail: String,
}

impl Component {
    fn unknown() -> Self {
        Self { up: false, detail: "not checked yet".into() }
    }

    fn ok(detail: &str) -> Self {
        Self { up: true, detail: detail.into() }
    }
}

/// Consume errors younger than this make the `consume` component not ready. A partition the
/// client cannot decode errors again on every fetch retry (every `fetch.error.backoff.ms`,
/// 500 ms by default), so it stays not ready for as long as it is stuck.
pub const CONSUME_ERROR_WINDOW: Duration = Duration::from_secs(15);

/// The last errors the consumer handed us instead of records (`KafkaError::MessageConsumption`).
#[derive(Debug, Default)]
struct ConsumeErrors {
    last_at: Option<Instant>,
    last: String,
    total: u64,
}

/// Whether the consume path is healthy: no consume error within `window`. Pure.
pub fn consume_healthy(last_error_age: Option<Duration>, window: Duration) -> bool {
    last_error_age.is_none_or(|age| age >= window)
}

/// How the time outside a steady group evolves with each statistics report. Pure.
///
/// The clock runs only while a broker is reachable and the member is not `up`/`steady`: a
/// broker outage is a dependency failure (readiness), not something a restart fixes, so it
/// resets the clock.
pub fn next_unsteady_since(
    since: Option<Instant>,
    broker_reachable: bool,
    steady: bool,
    now: Instant,
) -> Option<Instant> {
    if steady || !broker_reachable { None } else { Some(since.unwrap_or(now)) }
}

/// The liveness rule, pure: the consume loop exists and turned within `stall`, and the member
/// has not been outside a steady group (with a broker reachable) for `unsteady_limit` or longer.
pub fn is_alive(
    consumer_stopped: bool,
    since_last_beat: Duration,
    stall: Duration,
    unsteady_for: Option<Duration>,
    unsteady_limit: Duration,
) -> bool {
    !consumer_stopped && since_last_beat < stall && unsteady_for.is_none_or(|d| d < unsteady_limit)
}

/// A Kafka observation older than this no longer counts as "up". The client reports through
/// callbacks served by the consume loop's `poll` (statistics every second), so silence means
/// the loop is blocked elsewhere: delivering dead letters to a broker that died (up to the
/// producer's `message.timeout.ms`), a synchronous commit waiting for a coordinator. The last
/// report said "up" and would otherwise stay on `/readyz` for that whole time.
pub const KAFKA_OBSERVATION_STALE_AFTER: Duration = Duration::from_secs(10);

/// Kafka's state as it may be reported `age` after it was observed. Pure.
pub fn kafka_as_of(observed: Component, age: Duration, stale_after: Duration) -> Component {
    if !observed.up || age < stale_after {
        return observed;
    }
    Component {
        up: false,
        detail: format!(
            "no report from the Kafka client for {}s (the consume loop is blocked, e.g. \
             delivering to an unreachable broker); last report: {}",
            age.as_secs(),
            observed.detail
        ),
    }
}

/// Lag of one assigned partition.
pub type LagMap = BTreeMap<(String, i32), i64>;

/// Shared runtime status. Cheap to update from hot paths (atomics) and read by probes.
#[derive(Debug)]
pub struct Status {
    started: Instant,
    heartbeat_ms: AtomicU64,
    consumer_stopped: AtomicBool,
    /// Kafka's last observed state and when it was observed.
    kafka: Mutex<(Component, Instant)>,
    database: Mutex<Component>,
    dead_letter: Mutex<Component>,
    forwarding: Mutex<Component>,
    consume_errors: Mutex<ConsumeErrors>,
    /// Since when a broker is reachable but the member is not in a steady group.
    unsteady_since: Mutex<Option<Instant>>,
    group_state: Mutex<String>,
    assigned_partitions: AtomicI64,
    paused: AtomicBool,
    write_error: Mutex<Option<String>>,
    lag: Mutex<LagMap>,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            consumer_stopped: AtomicBool::new(false),
            kafka: Mutex::new((Component::unknown(), Instant::now())),
            database: Mutex::new(Component::unknown()),
            dead_letter: Mutex::new(Component::ok("no delivery failed")),
            forwarding: Mutex::new(Component::ok("no delivery failed")),
            consume_errors: Mutex::new(ConsumeErrors::default()),
            unsteady_since: Mutex::new(None),
            group_state: Mutex::new("not joined yet".into()),
            assigned_partitions: AtomicI64::new(0),
            paused: AtomicBool::new(false),
            write_error: Mutex::new(None),
            lag: Mutex::new(LagMap::new()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Status {
    /// Called on every turn of the consume loop.
    pub fn beat(&self) {
        self.heartbeat_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the consume loop last turned.
    pub fn since_last_beat(&self) -> Duration {
        let last = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Marks the consume loop as gone (it returned or panicked): liveness fails from now on.
    pub fn set_consumer_stopped(&self) {
        self.consumer_stopped.store(true, Ordering::Relaxed);
    }

    /// True once the consume loop is gone.
    pub fn consumer_stopped(&self) -> bool {
        self.consumer_stopped.load(Ordering::Relaxed)
    }

    /// Records Kafka's state.
    pub fn set_kafka(&self, up: bool, detail: impl Into<String>) {
        *lock(&self.kafka) = (Component { up, detail: detail.into() }, Instant::now());
    }

    /// Records PostgreSQL's state.
    pub fn set_database(&self, up: bool, detail: impl Into<String>) {
        *lock(&self.database) = Component { up, detail: detail.into() };
    }

    /// Kafka's last observed state; not up once that observation is stale (see
    /// [`KAFKA_OBSERVATION_STALE_AFTER`]).
    pub fn kafka(&self) -> Component {
        let (observed, at) = lock(&self.kafka).clone();
        kafka_as_of(observed, at.elapsed(), KAFKA_OBSERVATION_STALE_AFTER)
    }

    /// PostgreSQL's last observed state.
    pub fn database(&self) -> Component {
        lock(&self.database).clone()
    }

    /// Records the dead-letter producer's state: down when a delivery failed, up again once
    /// the batch holding it was delivered. Kept apart from the database, which is not at fault.
    pub fn set_dead_letter(&self, up: bool, detail: impl Into<String>) {
        *lock(&self.dead_letter) = Component { up, detail: detail.into() };
    }

    /// The dead-letter topic's last observed state.
    pub fn dead_letter(&self) -> Component {
        lock(&self.dead_letter).clone()
    }

    /// Records whether routing copies (`forward` rules) can be delivered.
    pub fn set_forwarding(&self, up: bool, detail: impl Into<String>) {
        *lock(&self.forwarding) = Component { up, detail: detail.into() };
    }

    /// The routing destinations' last observed state.
    pub fn forwarding(&self) -> Component {
        lock(&self.forwarding).clone()
    }

    /// Records an error the consumer returned instead of a record (a batch it cannot
    /// decompress or parse, a missing topic, ...).
    pub fn record_consume_error(&self, error: impl Into<String>) {
        let mut e = lock(&self.consume_errors);
        e.last_at = Some(Instant::now());
        e.last = error.into();
        e.total += 1;
    }

    /// The consume path: down while consume errors keep arriving (see [`CONSUME_ERROR_WINDOW`]).
    pub fn consume(&self) -> Component {
        let e = lock(&self.consume_errors);
        let age = e.last_at.map(|t| t.elapsed());
        if consume_healthy(age, CONSUME_ERROR_WINDOW) {
            let detail = match age {
                None => "no consume error".to_string(),
                Some(age) => {
                    format!("{} consume error(s), the last {}s ago", e.total, age.as_secs())
                }
            };
            Component { up: true, detail }
        } else {
            Component {
                up: false,
                detail: format!(
                    "the consumer returns errors instead of records ({} so far, the last {} ms ago): {}",
                    e.total,
                    age.unwrap_or_default().as_millis(),
                    e.last
                ),
            }
        }
    }

    /// Updates the group clock from one statistics report (see [`next_unsteady_since`]).
    pub fn observe_group(&self, broker_reachable: bool, steady: bool, state: &str) {
        let mut since = lock(&self.unsteady_since);
        *since = next_unsteady_since(*since, broker_reachable, steady, Instant::now());
        *lock(&self.group_state) = state.to_string();
    }

    /// How long a broker has been reachable while the member was outside a steady group.
    pub fn unsteady_for(&self) -> Option<Duration> {
        lock(&self.unsteady_since).map(|t| t.elapsed())
    }

    /// The group state of the last statistics report, e.g. `up/steady` or `up/wait-join`.
    pub fn group_state(&self) -> String {
        lock(&self.group_state).clone()
    }

    /// Records how many partitions this instance owns.
    pub fn set_assigned_partitions(&self, n: i64) {
        self.assigned_partitions.store(n, Ordering::Relaxed);
    }

    /// Partitions this instance owns.
    pub fn assigned_partitions(&self) -> i64 {
        self.assigned_partitions.load(Ordering::Relaxed)
    }

    /// Records whether fetching is paused (database unavailable).
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// Whether fetching is paused.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Records the last batch write failure (`None` once writes succeed again). A database
    /// that answers pings but refuses writes (missing table, read-only) is not ready either.
    pub fn set_write_error(&self, error: Option<String>) {
        *lock(&self.write_error) = error;
    }

    /// Replaces the lag of all assigned partitions (revoked ones disappear).
    pub fn set_lag(&self, lag: LagMap) {
        *lock(&self.lag) = lag;
    }

    /// Lag per assigned partition.
    pub fn lag(&self) -> LagMap {
        lock(&self.lag).clone()
    }

    /// Readiness: both dependencies usable.
    pub fn readiness(&self) -> Readiness {
        let kafka = self.kafka();
        let mut database = self.database();
        if let Some(error) = lock(&self.write_error).clone() {
            // Both facts stay visible: a failed ping alone must not hide why writes fail.
            let detail = if database.up {
                format!("writes failing: {error}")
            } else {
                format!("{}; writes failing: {error}", database.detail)
            };
            database = Component { up: false, detail };
        }
        let (dead_letter, forwarding, consume) =
            (self.dead_letter(), self.forwarding(), self.consume());
        Readiness {
            ready: kafka.up
                && database.up
                && dead_letter.up
                && forwarding.up
                && consume.up
                && !self.consumer_stopped(),
            kafka,
            database,
            dead_letter,
            forwarding,
            consume,
            assigned_partitions: self.assigned_partitions(),
            paused: self.paused(),
        }
    }

    /// Liveness (see [`is_alive`]): the consume loop exists and turned within `stall`, and the
    /// member has not sat outside a steady group for `unsteady_limit` while a broker answers.
    pub fn liveness(&self, stall: Duration, unsteady_limit: Duration) -> Liveness {
        let since = self.since_last_beat();
        let stopped = self.consumer_stopped();
        let unsteady = self.unsteady_for();
        Liveness {
            alive: is_alive(stopped, since, stall, unsteady, unsteady_limit),
            last_loop_turn_ms_ago: since.as_millis() as u64,
            consumer_stopped: stopped,
            group_state: self.group_state(),
            group_unsteady_secs: unsteady.map_or(0, |d| d.as_secs()),
        }
    }
}

/// The body of `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    /// True when the instance should receive traffic / count as available.
    pub ready: bool,
    /// Broker connection and group membership.
    pub kafka: Component,
    /// Pool ping, and batch writes succeeding.
    pub database: Component,
    /// Dead letters being delivered to `KAFKA_DLQ_TOPIC`.
    pub dead_letter: Component,
    /// Routing copies being delivered to their topics.
    pub forwarding: Component,
    /// The consumer handing us records rather than errors.
    pub consume: Component,
    /// Partitions owned now.
    pub assigned_partitions: i64,
    /// Fetching paused because writes fail.
    pub paused: bool,
}

/// The body of `/livez`.
#[derive(Debug, Clone, Serialize)]
pub struct Liveness {
    /// False only when the process is stuck and a restart would help.
    pub alive: bool,
    /// Age of the consume loop's last turn.
    pub last_loop_turn_ms_ago: u64,
    /// The consume loop returned or panicked.
    pub consumer_stopped: bool,
    /// The consumer group state of the last statistics report.
    pub group_state: String,
    /// Seconds a broker has been reachable while the member was outside a steady group.
    pub group_unsteady_secs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_kafka_report_is_not_up_and_says_why() {
        let stale = Duration::from_secs(10);
        let up = Component::ok("1 broker(s) up, group up/steady");
        assert_eq!(kafka_as_of(up.clone(), Duration::from_secs(9), stale), up);
        let old = kafka_as_of(up, Duration::from_secs(12), stale);
        assert!(!old.up);
        assert!(
            old.detail.starts_with("no report from the Kafka client for 12s"),
            "{}",
            old.detail
        );
        assert!(old.detail.ends_with("last report: 1 broker(s) up, group up/steady"));
        let down = Component { up: false, detail: "all brokers down".into() };
        assert_eq!(kafka_as_of(down.clone(), Duration::from_secs(60), stale), down);
    }

    #[test]
    fn a_write_error_shows_beside_a_failed_ping() {
        let s = Status::default();
        s.set_kafka(true, "joined");
        s.set_database(false, "ping timed out");
        s.set_write_error(Some("relation missing".into()));
        let r = s.readiness();
        assert!(!r.ready);
        assert_eq!(r.database.detail, "ping timed out; writes failing: relation missing");
        s.set_database(true, "ping ok");
        assert_eq!(s.readiness().database.detail, "writes failing: relation missing");
    }

    #[test]
    fn ready_only_when_both_dependencies_are_up() {
        let s = Status::default();
        assert!(!s.readiness().ready);
        s.set_kafka(true, "joined");
        assert!(!s.readiness().ready);
        s.set_database(true, "ok");
        assert!(s.readiness().ready);
        s.set_database(false, "connection refused");
        let r = s.readiness();
        assert!(!r.ready);
        assert_eq!(r.database.detail, "connection refused");
        s.set_database(true, "ok");
        s.set_write_error(Some("relation does not exist".into()));
        assert!(!s.readiness().ready);
        s.set_write_error(None);
        assert!(s.readiness().ready);
    }

    #[test]
    fn liveness_ignores_dependencies_but_not_a_stopped_loop() {
        let s = Status::default();
        s.beat();
        s.set_kafka(false, "all brokers down");
        s.set_database(false, "down");
        let long = Duration::from_secs(300);
        assert!(s.liveness(Duration::from_secs(60), long).alive);
        assert!(!s.liveness(Duration::ZERO, long).alive);
        s.set_consumer_stopped();
        assert!(!s.liveness(Duration::from_secs(60), long).alive);
    }

    #[test]
    fn a_dead_letter_failure_is_its_own_component_not_the_database() {
        let s = Status::default();
        s.set_kafka(true, "joined");
        s.set_database(true, "ping ok");
        assert!(s.readiness().ready);
        s.set_dead_letter(false, "dead-letter delivery failed: Broker: Unknown topic or partition");
        let r = s.readiness();
        assert!(!r.ready);
        assert!(r.database.up, "the database is fine: {:?}", r.database);
        assert!(!r.dead_letter.up);
        s.set_dead_letter(true, "delivered");
        s.set_forwarding(false, "forwarding failed: x");
        let r = s.readiness();
        assert!(!r.ready && r.database.up && r.dead_letter.up && !r.forwarding.up);
    }

    #[test]
    fn consume_errors_make_the_consume_path_not_ready_while_they_last() {
        assert!(consume_healthy(None, CONSUME_ERROR_WINDOW));
        assert!(!consume_healthy(Some(Duration::from_millis(500)), CONSUME_ERROR_WINDOW));
        assert!(consume_healthy(Some(CONSUME_ERROR_WINDOW), CONSUME_ERROR_WINDOW));
        let s = Status::default();
        s.set_kafka(true, "joined");
        s.set_database(true, "ping ok");
        s.record_consume_error("Message consumption error: NotImplemented");
        let r = s.readiness();
        assert!(!r.ready && !r.consume.up, "{r:?}");
        assert!(r.consume.detail.contains("NotImplemented"), "{}", r.consume.detail);
    }

    #[test]
    fn the_group_clock_runs_only_while_a_broker_answers_and_the_member_is_not_steady() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(next_unsteady_since(None, true, false, t0), Some(t0), "joining starts it");
        assert_eq!(next_unsteady_since(Some(t0), true, false, t1), Some(t0), "keeps running");
        assert_eq!(next_unsteady_since(Some(t0), true, true, t1), None, "steady stops it");
        assert_eq!(
            next_unsteady_since(Some(t0), false, false, t1),
            None,
            "broker outage: readiness"
        );
        let limit = Duration::from_secs(300);
        let stall = Duration::from_secs(60);
        let beat = Duration::from_secs(1);
        assert!(is_alive(false, beat, stall, None, limit));
        assert!(is_alive(false, beat, stall, Some(Duration::from_secs(299)), limit));
        assert!(!is_alive(false, beat, stall, Some(limit), limit));
        assert!(!is_alive(false, stall, stall, None, limit));
        assert!(!is_alive(true, beat, stall, None, limit));
    }
}
