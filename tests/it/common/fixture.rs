//! The fixture most tests start from: the shared broker, a topic of their own with its
//! dead-letter topic, a database of their own and a group name nobody else uses.

use std::time::Duration;

use super::{Broker, Service, TestDb, unique, wait_until};

/// A topic (`partitions` partitions) with `<topic>.dlq`, a fresh database and a unique group.
pub struct Fixture {
    /// The shared Apache Kafka.
    pub broker: Broker,
    /// Its bootstrap address.
    pub bootstrap: String,
    /// The test's database, migrated by the service it starts.
    pub db: TestDb,
    /// The topic the service consumes.
    pub topic: String,
    /// Its dead-letter topic (one partition).
    pub dlq: String,
    /// A consumer group of the test's own.
    pub group: String,
}

impl Fixture {
    /// `prefix` names the topic (made unique), which gets `partitions` partitions.
    pub fn new(prefix: &str, partitions: u32) -> Self {
        let broker = Broker::start();
        let topic = unique(prefix);
        let dlq = format!("{topic}.dlq");
        broker.create_topic(&topic, partitions);
        broker.create_topic(&dlq, 1);
        let bootstrap = broker.bootstrap();
        Self { broker, bootstrap, db: TestDb::create(), topic, dlq, group: unique("group") }
    }

    /// The service's environment for this fixture.
    pub fn env(&self) -> Vec<(&str, &str)> {
        vec![
            ("KAFKA_BROKERS", &self.bootstrap),
            ("KAFKA_TOPICS", &self.topic),
            ("KAFKA_DLQ_TOPIC", &self.dlq),
            ("KAFKA_GROUP_ID", &self.group),
            ("DATABASE_URL", &self.db.url),
        ]
    }

    /// A service consuming the fixture's topic into its database.
    pub fn service(&self) -> Service {
        Service::start(&self.env())
    }

    /// Waits until the database holds at least `n` rows.
    pub fn wait_rows(&self, n: i64, timeout: Duration) -> bool {
        wait_until(timeout, || self.db.rows() >= n)
    }

    /// Exactly `n` rows, `n` distinct Kafka coordinates, and aggregates that agree with them.
    pub fn assert_exactly(&self, n: i64) {
        assert_eq!(self.db.rows(), n, "rows");
        assert_eq!(self.db.distinct_coordinates(), n, "distinct coordinates");
        assert_eq!(
            self.db.aggregate_mismatches(),
            0,
            "event_counts equal COUNT(*) per minute/type/service"
        );
        assert_eq!(
            self.db.scalar("SELECT coalesce(sum(count), 0)::bigint FROM analytics.event_counts"),
            n
        );
    }
}
