//! The consume → process → store-offset loop every consumer runs: one reader
//! per consumer, one lane per partition, offsets stored only as `offsets`
//! allows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::context::{message_span, Backoff, Runtime};
use crate::kafka;
use crate::message::Inbound;
use crate::offsets::{Received, Ticket};
use crate::outcome::{Outcome, StageError};
use crate::schema_registry::SchemaRegistry;

/// What a consumer does with one message: process it to an outcome, or fail
/// transiently (the message is then retried in place).
pub type Handler =
    Arc<dyn for<'a> Fn(&'a Inbound) -> futures::future::BoxFuture<'a, Result<Outcome, StageError>> + Send + Sync>;

/// What a consumer may do with several queued messages of one partition at
/// once: apply as many of them as it can, set-based, and say which (one flag
/// per message, in order). The rest are then handled one by one in
/// partition order, so one message that cannot take the fast path does not
/// send its neighbours down the slow one.
pub type BatchHandler = Arc<dyn for<'a> Fn(&'a [Inbound]) -> futures::future::BoxFuture<'a, Vec<bool>> + Send + Sync>;

/// Messages a partition's lane may hold beyond the one in hand. Bounded, so
/// a partition that cannot make progress stops the reading (backpressure)
/// instead of filling memory.
const LANE_DEPTH: usize = 256;

/// How long a seek back to an assignment's start may take.
const REWIND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an assignment may receive nothing from its start before the
/// consumer reads it again from further back (see `offsets`).
const QUIET_ASSIGNMENT: Duration = Duration::from_secs(2);

/// The consume → process → store-offset loop every consumer runs.
///
/// One reader takes messages off the consumer and hands each to the lane of
/// its partition: a task that processes that partition's messages one after
/// another, in log order. Partitions proceed side by side (their
/// transactions commit together, and their calls to outside services
/// overlap), while each partition, and so each transfer, keeps its order. A
/// transient failure is retried in place with backoff, holding only its own
/// partition; the offset is stored only once the handler has finished with
/// the message.
pub async fn consume(
    ctx: &Runtime,
    name: &'static str,
    group: &str,
    topic: &str,
    handler: Handler,
    shutdown: CancellationToken,
) -> Result<()> {
    consume_batched(ctx, name, group, topic, handler, None, shutdown).await
}

/// Reads a partition again from `to`. librdkafka's seek waits until the
/// fetcher has let go of what it fetched from the old position, so nothing
/// from there follows.
fn rewind(name: &str, consumer: &StreamConsumer<kafka::ConsumerState>, topic: &str, partition: i32, to: i64) {
    if let Err(error) = consumer.seek(topic, partition, rdkafka::Offset::Offset(to), REWIND_TIMEOUT) {
        tracing::warn!(stage = name, error = %error, partition, "Could not read the partition again from further back; trying again later");
    }
}

/// Reads again from further back each assignment that has received
/// nothing from its start for a while (see `offsets`).
fn rewind_quiet_assignments(name: &str, consumer: &StreamConsumer<kafka::ConsumerState>) {
    let assignments = &consumer.context().assignments;
    for (topic, partition, to) in assignments.quiet(QUIET_ASSIGNMENT) {
        rewind(name, consumer, &topic, partition, to);
    }
}

/// `consume`, where a lane that finds several messages queued may first
/// offer them to `batch`.
pub async fn consume_batched(
    ctx: &Runtime,
    name: &'static str,
    group: &str,
    topic: &str,
    handler: Handler,
    batch: Option<BatchHandler>,
    shutdown: CancellationToken,
) -> Result<()> {
    let consumer = Arc::new(kafka::consumer(&ctx.config, name, group)?);
    consumer.subscribe(&[topic]).with_context(|| format!("Failed to subscribe to {topic}"))?;
    tracing::info!(stage = name, topic = %topic, "Consumer started");
    let mut lanes: HashMap<i32, tokio::sync::mpsc::Sender<(Inbound, Ticket)>> = HashMap::new();
    let mut lane_tasks = JoinSet::new();
    let mut quiet_check = tokio::time::interval(QUIET_ASSIGNMENT);
    quiet_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => break,
            received = consumer.recv() => received,
            _ = quiet_check.tick() => {
                rewind_quiet_assignments(name, &consumer);
                continue;
            }
        };
        let message = match received {
            Ok(message) => message,
            Err(error) => {
                // Broker errors are reported here and recovered by librdkafka;
                // we keep polling.
                tracing::warn!(stage = name, error = %error, "Kafka consumer error");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let inbound = Inbound::from_kafka(&message);
        drop(message);
        // In partition order, before any lane can finish it. A message
        // that is not this consumer's (its partition was revoked after
        // librdkafka fetched it, or it is finished) goes no further, and
        // one beyond its assignment's start sends the reading further back
        // (see `offsets`).
        let ticket = match consumer.context().assignments.receive(&inbound.topic, inbound.partition, inbound.offset) {
            Received::Ticket(ticket) => ticket,
            Received::Drop => continue,
            Received::Rewind { to } => {
                rewind(name, &consumer, &inbound.topic, inbound.partition, to);
                continue;
            }
        };
        if crate::failpoint::any() {
            crate::failpoint::hit(&format!("{name}.after_poll"));
            crate::failpoint::pause(&format!("{name}.pause_after_poll")).await;
        }
        let partition = inbound.partition;
        let lane = lanes.entry(partition).or_insert_with(|| {
            let (sender, receiver) = tokio::sync::mpsc::channel(LANE_DEPTH);
            let lane = Lane {
                group: group.into(),
                name,
                registry: ctx.registry.clone(),
                consumer: consumer.clone(),
                handler: handler.clone(),
                batch: batch.clone(),
                batch_size_max: ctx.config.batch_size_max,
                shutdown: shutdown.clone(),
                backoff_max_ms: ctx.config.retry_backoff_max_ms,
            };
            lane_tasks.spawn(lane.run(receiver));
            sender
        });
        tokio::select! {
            _ = shutdown.cancelled() => break,
            sent = lane.send((inbound, ticket)) => if sent.is_err() {
                // The lane stopped, which it does only on shutdown.
                break;
            }
        }
    }
    // Lanes finish the message in hand and leave the rest queued: they are
    // never finished, so no offset moves past them and the partitions' next
    // owner reads them again.
    drop(lanes);
    while lane_tasks.join_next().await.is_some() {}
    commit_on_exit(&consumer, name)
}

/// Processes one partition's messages in order.
struct Lane {
    name: &'static str,
    group: Arc<str>,
    registry: Option<Arc<SchemaRegistry>>,
    consumer: Arc<rdkafka::consumer::StreamConsumer<kafka::ConsumerState>>,
    handler: Handler,
    batch: Option<BatchHandler>,
    batch_size_max: usize,
    shutdown: CancellationToken,
    backoff_max_ms: u64,
}

impl Lane {
    async fn run(self, mut receiver: tokio::sync::mpsc::Receiver<(Inbound, Ticket)>) {
        use tracing::Instrument;
        while let Some(first) = receiver.recv().await {
            if self.shutdown.is_cancelled() {
                return;
            }
            // What is already queued behind it, never waiting for more: a
            // batch forms only under load, and adds no latency. Messages of
            // an assignment the group has since taken away are left to the
            // partition's next owner.
            let mut queued = Vec::new();
            queued.extend(Some(first).filter(|(_, ticket)| !ticket.revoked()));
            if self.batch.is_some() {
                while queued.len() < self.batch_size_max {
                    match receiver.try_recv() {
                        Ok(next) if next.1.revoked() => {}
                        Ok(next) => queued.push(next),
                        Err(_) => break,
                    }
                }
            }
            let (messages, tickets): (Vec<Inbound>, Vec<Ticket>) = queued.into_iter().unzip();
            // A lone message takes the batch path too: with no transaction of
            // its stage in flight it runs at once (a batch of one applies the
            // one-message statements), and otherwise it joins the stage's
            // next transaction with the other partitions' messages waiting,
            // instead of a transaction of its own beside the one in flight.
            let applied = if messages.is_empty() { Vec::new() } else { self.apply_batch(&messages).await };
            for (index, (inbound, ticket)) in messages.iter().zip(tickets).enumerate() {
                if applied.get(index).copied().unwrap_or(false) {
                    ticket.finish(&*self.consumer);
                    continue;
                }
                if ticket.revoked() {
                    continue;
                }
                let span = message_span(self.name, inbound);
                span.record("messaging.consumer.group.name", &*self.group);
                if self.process(inbound, &ticket).instrument(span).await {
                    ticket.finish(&*self.consumer);
                } else if self.shutdown.is_cancelled() {
                    return;
                }
            }
        }
    }

    /// Offers `queued` to the batch handler and returns which messages it
    /// applied (empty: none). Their tickets are the caller's to finish.
    async fn apply_batch(&self, queued: &[Inbound]) -> Vec<bool> {
        let Some(batch) = &self.batch else { return Vec::new() };
        for inbound in queued {
            if self.learn_writer(inbound).await.is_err() {
                return Vec::new();
            }
        }
        let started = std::time::Instant::now();
        let applied = batch(queued).await;
        let count = applied.iter().filter(|&&done| done).count();
        if count == 0 {
            return applied;
        }
        // The batch size metric counts whole transactions, which may hold
        // other partitions' messages too; it is recorded where they run.
        for _ in 0..count {
            crate::metrics::message_finished(self.name, Outcome::Applied.as_label(), started.elapsed());
        }
        if crate::failpoint::any() {
            crate::failpoint::hit(&format!("{}.after_commit", self.name));
        }
        applied
    }

    /// Processes one message until it is done (true), or until shutdown or
    /// the loss of its partition interrupts the retries (false; the message
    /// is then not done, and whoever owns the partition reads it again).
    async fn process(&self, inbound: &Inbound, ticket: &Ticket) -> bool {
        let name = self.name;
        let started = std::time::Instant::now();
        let mut backoff = Backoff::new(self.backoff_max_ms);
        loop {
            let result = match self.learn_writer(inbound).await {
                Ok(()) => (self.handler)(inbound).await,
                Err(error) => Err(error),
            };
            match result {
                Ok(outcome) => {
                    tracing::debug!(outcome = ?outcome, "Message processed");
                    crate::metrics::message_finished(name, outcome.as_label(), started.elapsed());
                    break;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "Transient failure; retrying the message");
                    crate::metrics::message_retried(name);
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    if ticket.revoked() {
                        tracing::info!("Partition revoked while retrying; its next owner takes the message");
                        return false;
                    }
                }
            }
        }
        if crate::failpoint::any() {
            crate::failpoint::hit(&format!("{name}.after_commit"));
        }
        true
    }

    /// With a registry, makes the writer schema of a Confluent-framed
    /// payload known before the handler decodes it. A registry that cannot
    /// be asked is a transient failure: the partition waits for it.
    async fn learn_writer(&self, inbound: &Inbound) -> Result<(), StageError> {
        let (Some(registry), Some(payload)) = (&self.registry, inbound.payload.as_deref()) else { return Ok(()) };
        registry.learn_writer(payload).await.map_err(|error| StageError::Transient(error.to_string()))
    }
}

fn commit_on_exit(consumer: &rdkafka::consumer::StreamConsumer<kafka::ConsumerState>, name: &str) -> Result<()> {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => tracing::warn!(stage = name, error = %error, "Final offset commit failed"),
    }
    tracing::info!(stage = name, "Consumer stopped");
    Ok(())
}
