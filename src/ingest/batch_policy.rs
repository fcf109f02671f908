//! When a batch is written, and the offsets it may commit. Pure: no I/O, unit-tested.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What the consume loop does next with the batch in hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Keep consuming into it.
    Fill,
    /// Seal it and start its write.
    Dispatch,
    /// It is full and every write slot is taken: wait for the oldest write to finish.
    WaitOldest,
}

/// When a batch is written: whichever limit is reached first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Events per batch.
    pub max_events: usize,
    /// Payload bytes per batch.
    pub max_bytes: usize,
    /// How long the first event of a batch may wait.
    pub linger: Duration,
}

impl BatchPolicy {
    /// True when a batch of this size must be written now.
    pub fn is_full(&self, events: usize, bytes: usize) -> bool {
        events >= self.max_events || bytes >= self.max_bytes
    }

    /// True when the batch must be written: full, or its oldest event has lingered enough.
    pub fn is_due(
        &self,
        events: usize,
        bytes: usize,
        first_at: Option<Instant>,
        now: Instant,
    ) -> bool {
        match first_at {
            None => false,
            Some(first) => self.is_full(events, bytes) || now.duration_since(first) >= self.linger,
        }
    }

    /// The next step given the writes running. A due batch that finds every write slot taken
    /// keeps filling up to its limits, so under a backlog batches grow (fewer, cheaper
    /// statements) instead of the loop idling while the database works.
    pub fn next_step(
        &self,
        events: usize,
        bytes: usize,
        first_at: Option<Instant>,
        now: Instant,
        (in_flight, max_in_flight): (usize, usize),
    ) -> Step {
        if !self.is_due(events, bytes, first_at, now) {
            Step::Fill
        } else if in_flight < max_in_flight {
            Step::Dispatch
        } else if self.is_full(events, bytes) {
            Step::WaitOldest
        } else {
            Step::Fill
        }
    }

    /// How long the consumer may block in `poll` without overrunning the linger deadline.
    pub fn poll_timeout(
        &self,
        first_at: Option<Instant>,
        now: Instant,
        idle: Duration,
    ) -> Duration {
        match first_at {
            None => idle,
            Some(first) => (first + self.linger).saturating_duration_since(now).min(idle),
        }
    }
}

/// Per (topic, partition): the next offset to commit — one past the highest offset seen —
/// and how many records were seen. The counts are the batch's one length counter: a revoked
/// partition takes its records with it, so the length never drifts from what is in hand.
///
/// Kafka commits mean "resume here", so the value stored is `offset + 1`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OffsetTracker {
    next: BTreeMap<(String, i32), Seen>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    next: i64,
    records: usize,
}

impl OffsetTracker {
    /// Records that `offset` of `topic`/`partition` is part of the batch.
    pub fn observe(&mut self, topic: &str, partition: i32, offset: i64) {
        let next = offset + 1;
        match self.next.get_mut(&(topic.to_string(), partition)) {
            Some(seen) => {
                seen.next = seen.next.max(next);
                seen.records += 1;
            }
            None => {
                self.next.insert((topic.to_string(), partition), Seen { next, records: 1 });
            }
        }
    }

    /// Records observed, over the partitions kept.
    pub fn records(&self) -> usize {
        self.next.values().map(|s| s.records).sum()
    }

    /// The offsets to commit once the batch is durable.
    pub fn commits(&self) -> impl Iterator<Item = (&str, i32, i64)> {
        self.next.iter().map(|((t, p), s)| (t.as_str(), *p, s.next))
    }

    /// Forgets partitions that are no longer ours (after a revocation we could not flush).
    pub fn retain(&mut self, mut keep: impl FnMut(&str, i32) -> bool) {
        self.next.retain(|(t, p), _| keep(t, *p));
    }

    /// True when nothing was observed.
    pub fn is_empty(&self) -> bool {
        self.next.is_empty()
    }

    /// The distinct partitions in the batch, for log lines and spans.
    pub fn partitions(&self) -> Vec<String> {
        self.next.keys().map(|(t, p)| format!("{t}/{p}")).collect()
    }
}

/// Capped exponential backoff for database and dead-letter retries. The cap is low (seconds)
/// because the consumer keeps polling between attempts and should notice recovery quickly.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, current: initial }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.current;
        self.current = (self.current * 2).min(self.max);
        delay
    }

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: BatchPolicy =
        BatchPolicy { max_events: 3, max_bytes: 100, linger: Duration::from_millis(50) };

    #[test]
    fn due_by_count_bytes_or_linger() {
        let t0 = Instant::now();
        assert!(!POLICY.is_due(0, 0, None, t0));
        assert!(!POLICY.is_due(2, 10, Some(t0), t0));
        assert!(POLICY.is_due(3, 10, Some(t0), t0));
        assert!(POLICY.is_due(1, 100, Some(t0), t0));
        assert!(POLICY.is_due(1, 1, Some(t0), t0 + Duration::from_millis(50)));
    }

    #[test]
    fn a_due_batch_waits_for_a_write_slot_and_fills_meanwhile() {
        let t0 = Instant::now();
        let late = t0 + Duration::from_millis(60);
        assert_eq!(POLICY.next_step(1, 1, Some(t0), t0, (0, 2)), Step::Fill);
        assert_eq!(POLICY.next_step(1, 1, Some(t0), late, (1, 2)), Step::Dispatch);
        assert_eq!(POLICY.next_step(1, 1, Some(t0), late, (2, 2)), Step::Fill);
        assert_eq!(POLICY.next_step(3, 1, Some(t0), t0, (2, 2)), Step::WaitOldest);
        assert_eq!(POLICY.next_step(3, 1, Some(t0), t0, (1, 2)), Step::Dispatch);
        assert_eq!(POLICY.next_step(0, 0, None, late, (0, 2)), Step::Fill);
    }

    #[test]
    fn poll_timeout_respects_linger() {
        let t0 = Instant::now();
        let idle = Duration::from_millis(500);
        assert_eq!(POLICY.poll_timeout(None, t0, idle), idle);
        assert_eq!(
            POLICY.poll_timeout(Some(t0), t0 + Duration::from_millis(20), idle),
            Duration::from_millis(30)
        );
        assert_eq!(
            POLICY.poll_timeout(Some(t0), t0 + Duration::from_secs(1), idle),
            Duration::ZERO
        );
    }

    #[test]
    fn offsets_commit_one_past_the_highest() {
        let mut t = OffsetTracker::default();
        t.observe("a", 0, 5);
        t.observe("a", 0, 3);
        t.observe("a", 1, 9);
        t.observe("b", 0, 0);
        let commits: Vec<_> = t.commits().collect();
        assert_eq!(commits, vec![("a", 0, 6), ("a", 1, 10), ("b", 0, 1)]);
        assert_eq!(t.records(), 4);
        t.retain(|topic, p| !(topic == "a" && p == 1));
        assert_eq!(t.partitions(), vec!["a/0", "b/0"]);
        assert_eq!(t.records(), 3);
        t.retain(|_, _| false);
        assert!(t.is_empty());
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let steps: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(steps, vec![100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }
}
