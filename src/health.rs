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
}

/// Lag of one assigned partition.
pub type LagMap = BTreeMap<(String, i32), i64>;

/// Shared runtime status. Cheap to update from hot paths (atomics) and read by probes.
#[derive(Debug)]
pub struct Status {
    started: Instant,
    heartbeat_ms: AtomicU64,
    consumer_stopped: AtomicBool,
    kafka: Mutex<Component>,
    database: Mutex<Component>,
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
            kafka: Mutex::new(Component::unknown()),
            database: Mutex::new(Component::unknown()),
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
        *lock(&self.kafka) = Component { up, detail: detail.into() };
    }

    /// Records PostgreSQL's state.
    pub fn set_database(&self, up: bool, detail: impl Into<String>) {
        *lock(&self.database) = Component { up, detail: detail.into() };
    }

    /// Kafka's last observed state.
    pub fn kafka(&self) -> Component {
        lock(&self.kafka).clone()
    }

    /// PostgreSQL's last observed state.
    pub fn database(&self) -> Component {
        lock(&self.database).clone()
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
        if database.up
            && let Some(error) = lock(&self.write_error).clone()
        {
            database = Component { up: false, detail: format!("writes failing: {error}") };
        }
        Readiness {
            ready: kafka.up && database.up && !self.consumer_stopped(),
            kafka,
            database,
            assigned_partitions: self.assigned_partitions(),
            paused: self.paused(),
        }
    }

    /// Liveness: the consume loop exists and turned within `stall`.
    pub fn liveness(&self, stall: Duration) -> Liveness {
        let since = self.since_last_beat();
        let stopped = self.consumer_stopped();
        Liveness {
            alive: !stopped && since < stall,
            last_loop_turn_ms_ago: since.as_millis() as u64,
            consumer_stopped: stopped,
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
    /// Pool ping.
    pub database: Component,
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(s.liveness(Duration::from_secs(60)).alive);
        assert!(!s.liveness(Duration::ZERO).alive);
        s.set_consumer_stopped();
        assert!(!s.liveness(Duration::from_secs(60)).alive);
    }
}
