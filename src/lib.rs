//! nexus-analytics: consumes Nexus Core user events from Kafka and stores every event exactly
//! once in PostgreSQL (`analytics.events`), with dead letters, Prometheus metrics and health
//! endpoints.
//!
//! Reading order: [`config`] → [`event`] (pure decoding) → [`batch`] (pure policy) →
//! [`storage`] → [`dead_letter`] → [`pipeline`] (how a batch becomes durable) → [`consumer`]
//! (the Kafka loop) → [`startup`] (wiring). Telemetry lives in [`telemetry`], probes in
//! [`health`] and [`http`]. The Kubernetes operator is in [`operator`], Kafka group
//! administration (partition counts, offset resets for replays) in [`kafka_admin`].
#![warn(missing_docs)]

pub mod api;
pub mod batch;
pub mod batch_policy;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod dead_letter;
pub mod demo;
pub mod event;
pub mod health;
pub mod http;
pub mod kafka_admin;
pub mod lag;
pub mod maintenance;
pub mod operator;
pub mod pipeline;
pub mod routing;
pub mod startup;
pub mod storage;
pub mod telemetry;
