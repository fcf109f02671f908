//! Kafka clients: the one client-config builder every client of the service starts from, and
//! group administration ([`admin`]) shared by the operator and the `replay` command.

use rdkafka::ClientConfig;

use secrecy::ExposeSecret;

use crate::config::KafkaSettings;

pub mod admin;

/// Client settings shared by every Kafka client of the service: brokers and pass-through
/// properties (TLS, SASL, tuning).
pub fn client_config(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    config.set("client.id", &kafka.client_id);
    // Reconnect within a second of a broker coming back (librdkafka backs off up to 10 s by
    // default), so readiness recovers promptly after an outage.
    config.set("reconnect.backoff.max.ms", "1000");
    for (key, value) in &kafka.properties {
        config.set(key, value.expose_secret());
    }
    config
}
