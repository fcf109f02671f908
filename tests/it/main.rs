//! The integration tests, one binary: each module is one concern, all share `common` (a broker,
//! a database, the service as a child process). Linking one binary instead of thirteen saves
//! minutes of every cold build on two cores.

#![allow(clippy::unwrap_used)]

mod common;

mod api;
mod broker_faults;
mod codecs;
mod crd_schema;
mod dead_letters;
mod delivery;
mod group_liveness;
mod kafka_admin;
mod maintenance;
mod migrations;
mod observability;
mod routing_and_replay;
mod transactions;
