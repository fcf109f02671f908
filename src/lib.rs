//! nexus-analytics library (operator branch: the Kubernetes operator and Kafka administration).

pub mod kafka_admin;
pub mod operator;
