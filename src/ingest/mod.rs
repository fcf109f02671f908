//! The data path: consume → decode → route → batch → write → dead-letter → commit.
//!
//! [`consumer`] is the Kafka group member and its loop (back-pressure), [`rebalance`] its
//! callbacks (flush before revocation, readiness and lag from statistics); [`event`] decodes one record (pure); [`routing`] decides where it goes (pure);
//! [`batch`] holds what each record became and [`batch_policy`] says when it is written (pure);
//! [`pipeline`] makes a batch durable — rows, then routed copies and [`dead_letter`]s, then
//! offsets, strictly in order; [`lag`] is the lag arithmetic (pure).

pub(crate) mod batch;
pub(crate) mod batch_policy;
pub(crate) mod consumer;
pub(crate) mod dead_letter;
pub mod event;
pub(crate) mod lag;
pub(crate) mod pipeline;
pub(crate) mod rebalance;
pub(crate) mod routing;
