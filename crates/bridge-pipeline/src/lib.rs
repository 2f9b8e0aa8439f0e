//! The Kafka edge of Bridge.
//!
//! This crate runs the four stage consumers (validator, withdrawal, deposit,
//! completion), the outbox relay and dead-lettering, and defines the
//! account-service traits with an in-process simulator behind them.
//!
//! Architecture invariants kept here:
//! - A stage never produces to Kafka. It writes outbox rows in the same
//!   database transaction as its state change; only the relay produces.
//! - A Kafka offset is stored for commit only once the message and every
//!   message before it in its partition are finished (their database
//!   transactions committed, or they were found to be duplicates, deferred
//!   or dead-lettered through the outbox), and only while the partition is
//!   still assigned; `offsets` is the one place that stores them.
//! - A message that cannot be decoded or processed is dead-lettered with its
//!   original bytes and never stalls its partition; transient failures
//!   (database or outside service unavailable) are retried in place, which
//!   preserves per-transfer ordering.

pub mod batches;
pub mod config;
pub mod consumer;
pub mod context;
pub mod dead_letters;
pub mod demo;
pub mod failpoint;
pub mod fund_terms;
pub mod group_commit;
pub mod http_services;
pub mod kafka;
pub mod lag;
pub mod message;
pub mod metrics;
pub mod offsets;
pub mod outcome;
pub mod reader;
pub mod relay;
pub mod runner;
pub mod schema_registry;
pub mod security;
pub mod services;
pub mod settlement;
pub mod sources;
pub mod stages;
pub mod upstream;

pub use config::{DeadlinePolicy, DeclineRetries, DeclineRetry, PipelineConfig, Topics};
pub use runner::{Pipeline, StageName};
