//! nexus-analytics: consumes Nexus Core user events from Kafka and stores every event exactly
//! once in PostgreSQL (`analytics.events`), with dead letters, Prometheus metrics and health
//! endpoints.
//!
//! Reading order: [`config`] → [`ingest`] (consume → decode → route → batch → write →
//! dead-letter → commit) → [`storage`] (the idempotent insert, partitions and retention) →
//! [`app`] (wiring and shutdown). [`observe`] holds logs, metrics and probes, [`api`] the query
//! API, [`kafka`] the client config and group administration, [`operator`] the Kubernetes
//! operator, [`cli`] the subcommands.
#![warn(missing_docs)]

pub mod api;
pub(crate) mod app;
pub mod cli;
pub mod config;
pub mod ingest;
pub mod kafka;
pub(crate) mod observe;
pub mod operator;
pub mod storage;
