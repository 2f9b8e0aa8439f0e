//! What every part of a pipeline process shares: the stages' names, the
//! context a message is processed in, the relay's wake-up, backoff and the
//! span of a message. The bottom layer: it knows no stage, consumer loop or
//! relay.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use sqlx::PgPool;

use bridge_store::outbox;

use crate::batches::Groups;
pub use crate::config::StageName;
use crate::message::Inbound;
use crate::outcome::StageError;
use crate::schema_registry::SchemaRegistry;
use crate::services::Services;
use crate::{PipelineConfig, Topics};

/// What every consumer and the relay need: the database, the topics and
/// settings, the schema registry and the relay's wake-up. The notifier and
/// the event log's rebuild run on this alone.
pub struct Runtime {
    pub pool: PgPool,
    pub topics: Topics,
    pub config: PipelineConfig,
    /// CloudEvents `source` prefix of events this process emits.
    pub source: String,
    /// The schema registry, when one is configured.
    pub registry: Option<Arc<SchemaRegistry>>,
    /// Wakes the relay after a commit that wrote outbox rows.
    pub relay_waker: RelayWaker,
}

/// What a stage needs beyond the runtime to move money: the outside
/// services and its shared set-based transactions.
pub struct StageContext {
    pub runtime: Arc<Runtime>,
    pub services: Services,
    /// Each stage's shared set-based transactions.
    pub(crate) groups: Groups,
    /// What the money stages' batches heard from the services about steps
    /// they did not settle at once (see `stages::Answered`).
    pub(crate) answered: crate::stages::Answered,
    /// Set when requests must be signed by a registered source.
    pub request_verifier: Option<Arc<crate::sources::RequestVerifier>>,
    /// Opens investors' bank access for their withdrawals; without it
    /// withdrawals carry none.
    pub keyring: Option<Arc<bridge_secrets::Keyring>>,
}

impl std::ops::Deref for StageContext {
    type Target = Runtime;

    fn deref(&self) -> &Runtime {
        &self.runtime
    }
}

impl Runtime {
    /// Encodes an event for `topic`: in Confluent's wire format under the
    /// registry's id when a registry is configured, else single-object.
    pub fn encode<T: bridge_codec::Event>(&self, topic: &str, event: &T) -> Result<Vec<u8>, StageError> {
        let encoded = match &self.registry {
            None => bridge_codec::encode(event),
            Some(registry) => registry.encode(topic, event).ok_or_else(|| {
                StageError::Transient(format!("no schema registered for {topic} yet (Pipeline::prepare)"))
            })?,
        };
        encoded.map_err(|error| StageError::Permanent { class: "processing_error", message: error.to_string() })
    }
}

/// Wakes the relay after commits that wrote outbox rows: a NOTIFY sent in
/// a transaction of its own after the commit (see `outbox::wake_relay` for
/// why not inside it). One wake-up is in flight per process at a time, and
/// the commits made meanwhile share the next one, so under load a process
/// sends far fewer than one per commit. Best effort: the relay also polls.
pub struct RelayWaker {
    pool: sqlx::PgPool,
    signal: std::sync::OnceLock<Arc<tokio::sync::Notify>>,
}

impl RelayWaker {
    pub fn new(pool: sqlx::PgPool) -> Self {
        Self { pool, signal: std::sync::OnceLock::new() }
    }

    /// Asks for a wake-up; returns at once.
    pub fn wake(&self) {
        let signal = self.signal.get_or_init(|| {
            // Started on first use, from a task, so on the caller's runtime.
            let signal = Arc::new(tokio::sync::Notify::new());
            let (pending, pool) = (signal.clone(), self.pool.clone());
            tokio::spawn(async move {
                loop {
                    pending.notified().await;
                    let sent = match pool.acquire().await {
                        Ok(mut conn) => outbox::wake_relay(&mut conn).await,
                        Err(error) => Err(error.into()),
                    };
                    if let Err(error) = sent {
                        tracing::debug!(error = %error, "Could not wake the relay; it will find the rows when it polls");
                    }
                }
            });
            signal
        });
        signal.notify_one();
    }
}

/// Exponential backoff with full jitter.
pub(crate) struct Backoff {
    attempt: u32,
    max_ms: u64,
}

impl Backoff {
    pub(crate) fn new(max_ms: u64) -> Self {
        Self { attempt: 0, max_ms }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = (50u64 << self.attempt.min(16)).min(self.max_ms).max(1);
        self.attempt += 1;
        Duration::from_millis(rand::rng().random_range(ceiling / 2..=ceiling))
    }
}

/// The span every log line about one message carries: where it came from,
/// the transfer (our keys are transfer ids) and the trace it belongs to.
pub fn message_span(stage: &'static str, inbound: &Inbound) -> tracing::Span {
    let transfer_id = inbound.key.as_deref().and_then(|key| std::str::from_utf8(key).ok()).unwrap_or("");
    let traceparent = inbound.header("traceparent");
    let trace_id = traceparent.and_then(|value| value.split('-').nth(1)).unwrap_or("");
    // The `otel.kind` and `messaging.*` fields are OpenTelemetry's messaging
    // semantic conventions for processing a consumed message; the short
    // ones are what the log lines show.
    let span = tracing::info_span!(
        "message",
        stage,
        topic = %inbound.topic,
        partition = inbound.partition,
        offset = inbound.offset,
        transfer_id,
        trace_id,
        "otel.kind" = "consumer",
        "messaging.system" = "kafka",
        "messaging.operation.type" = "process",
        "messaging.destination.name" = %inbound.topic,
        "messaging.destination.partition.id" = %inbound.partition,
        "messaging.kafka.offset" = inbound.offset,
        "messaging.kafka.message.key" = transfer_id,
        // Known to the consumer's lane, which records it.
        "messaging.consumer.group.name" = tracing::field::Empty,
    );
    // With traces exported, the message's span continues the trace of the
    // span that wrote the message (no-op otherwise).
    if let Some(parent) = traceparent.and_then(crate::message::remote_parent) {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let _ = span.set_parent(parent);
    }
    span
}
