//! Runs stages and the relay as tasks: consume, process, store the offset.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rand::Rng;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use bridge_domain::Step;

use crate::message::Inbound;
use crate::offsets::{Received, Ticket};
use crate::schema_registry::SchemaRegistry;
use crate::services::Services;
use crate::stages::{self, Outcome};
use crate::{kafka, relay, PipelineConfig, Topics};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StageName {
    Validator,
    Withdrawal,
    Deposit,
    Completion,
}

impl StageName {
    pub const ALL: [StageName; 4] = [Self::Validator, Self::Withdrawal, Self::Deposit, Self::Completion];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validator => "validator",
            Self::Withdrawal => "withdrawal",
            Self::Deposit => "deposit",
            Self::Completion => "completion",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|stage| stage.as_str() == name)
    }

    pub fn input_topic(self, topics: &Topics) -> String {
        match self {
            Self::Validator => topics.requested(),
            Self::Withdrawal => topics.validated(),
            Self::Deposit => topics.withdrawn(),
            Self::Completion => topics.deposited(),
        }
    }

    pub fn group_id(self, config: &PipelineConfig) -> String {
        format!("{}bridge-{}", config.group_prefix, self.as_str())
    }
}

/// What a stage needs to process a message.
pub struct StageContext {
    pub pool: PgPool,
    pub topics: Topics,
    pub services: Services,
    pub config: PipelineConfig,
    /// CloudEvents `source` prefix of events this process emits.
    pub source: String,
    /// The schema registry, when one is configured.
    pub registry: Option<Arc<SchemaRegistry>>,
    /// Wakes the relay after a commit that wrote outbox rows.
    pub relay_waker: relay::Waker,
    /// Each stage's shared set-based transactions.
    pub(crate) groups: stages::Groups,
}

impl StageContext {
    /// Encodes an event for `topic`: in Confluent's wire format under the
    /// registry's id when a registry is configured, else single-object.
    pub fn encode<T: bridge_codec::Event>(&self, topic: &str, event: &T) -> Result<Vec<u8>, stages::StageError> {
        let encoded = match &self.registry {
            None => bridge_codec::encode(event),
            Some(registry) => registry.encode(topic, event).ok_or_else(|| {
                stages::StageError::Transient(format!("no schema registered for {topic} yet (Pipeline::prepare)"))
            })?,
        };
        encoded.map_err(|error| stages::StageError::Permanent { class: "processing_error", message: error.to_string() })
    }
}

/// A part of the pipeline that can run in a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Stage(StageName),
    Relay,
    /// Asks outside services about steps they accepted as pending.
    Settlement,
}

impl Part {
    pub fn all() -> Vec<Part> {
        StageName::ALL.into_iter().map(Part::Stage).chain([Part::Relay, Part::Settlement]).collect()
    }
}

#[derive(Clone)]
pub struct Pipeline {
    ctx: Arc<StageContext>,
}

impl Pipeline {
    pub fn new(pool: PgPool, config: PipelineConfig, services: Services) -> Self {
        let topics = config.topics.clone();
        let registry = config
            .schema_registry_url
            .as_deref()
            .map(|url| Arc::new(SchemaRegistry::new(url, config.schema_registry_timeout_ms)));
        let relay_waker = relay::Waker::new(pool.clone());
        let groups = stages::Groups::new(&config);
        Self {
            ctx: Arc::new(StageContext {
                pool,
                topics,
                services,
                config,
                source: "/bridge".to_owned(),
                registry,
                relay_waker,
                groups,
            }),
        }
    }

    /// What must happen before the pipeline writes an event: registering
    /// its schemas when a registry is configured. `run` does it; a process
    /// that only serves the API calls it itself.
    pub async fn prepare(&self) -> Result<()> {
        if let Some(registry) = &self.ctx.registry {
            registry.register(&self.ctx.topics).await.context("Failed to register schemas")?;
        }
        Ok(())
    }

    pub fn context(&self) -> &Arc<StageContext> {
        &self.ctx
    }

    /// Runs `parts` until `shutdown` is cancelled or one of them fails. Each
    /// stage finishes the message in hand, stores its offset and commits
    /// offsets synchronously before returning.
    pub async fn run(&self, parts: &[Part], shutdown: CancellationToken) -> Result<()> {
        self.prepare().await?;
        let mut tasks = JoinSet::new();
        for part in parts {
            let ctx = self.ctx.clone();
            let token = shutdown.clone();
            match *part {
                Part::Stage(stage) => tasks.spawn(async move {
                    run_stage(ctx, stage, token).await.with_context(|| format!("Stage {} failed", stage.as_str()))
                }),
                Part::Relay => tasks.spawn(async move { relay::run(ctx, token).await.context("Relay failed") }),
                Part::Settlement => {
                    tasks.spawn(async move { run_settlement(ctx, token).await.context("Settlement runner failed") })
                }
            };
        }
        let mut first_error = None;
        while let Some(result) = tasks.join_next().await {
            let result = result.map_err(anyhow::Error::from).and_then(|inner| inner);
            if let Err(error) = result {
                tracing::error!(error = format!("{error:#}"), "Pipeline part stopped with an error");
                // One part down means the process is unhealthy: stop the rest
                // cleanly so a supervisor restarts the whole process.
                shutdown.cancel();
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
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

/// What a consumer does with one message: process it to an outcome, or fail
/// transiently (the message is then retried in place).
pub type Handler = Arc<
    dyn for<'a> Fn(&'a Inbound) -> futures::future::BoxFuture<'a, Result<Outcome, stages::StageError>> + Send + Sync,
>;

/// What a consumer may do with several queued messages of one partition at
/// once: apply as many of them as it can, set-based, and say which (one flag
/// per message, in order). The rest are then handled one by one in
/// partition order, so one message that cannot take the fast path does not
/// send its neighbours down the slow one.
pub type BatchHandler = Arc<dyn for<'a> Fn(&'a [Inbound]) -> futures::future::BoxFuture<'a, Vec<bool>> + Send + Sync>;

async fn run_stage(ctx: Arc<StageContext>, stage: StageName, shutdown: CancellationToken) -> Result<()> {
    let handler_ctx = ctx.clone();
    let handler: Handler = Arc::new(move |message| {
        let ctx = handler_ctx.clone();
        Box::pin(async move { stages::handle(&ctx, stage, message).await })
    });
    // Every stage applies a partition's queued messages set-based; the
    // money stages first ask their service about them concurrently.
    let batch = (ctx.config.batch_size_max > 1).then(|| {
        let batch_ctx = ctx.clone();
        let batch: BatchHandler = Arc::new(move |messages| {
            let ctx = batch_ctx.clone();
            Box::pin(async move {
                match stage {
                    StageName::Validator => stages::validate_batch(&ctx, messages).await,
                    StageName::Withdrawal => stages::withdraw_batch(&ctx, messages).await,
                    StageName::Deposit => stages::deposit_batch(&ctx, messages).await,
                    StageName::Completion => stages::complete_batch(&ctx, messages).await,
                }
            })
        });
        batch
    });
    let topic = stage.input_topic(&ctx.topics);
    consume_batched(&ctx, stage.as_str(), &stage.group_id(&ctx.config), &topic, handler, batch, shutdown).await
}

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
    ctx: &StageContext,
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
    ctx: &StageContext,
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
            let applied = if messages.len() > 1 { self.apply_batch(&messages).await } else { Vec::new() };
            for (index, (inbound, ticket)) in messages.iter().zip(tickets).enumerate() {
                if applied.get(index).copied().unwrap_or(false) {
                    ticket.finish(&*self.consumer);
                    continue;
                }
                if ticket.revoked() {
                    continue;
                }
                let span = message_span(self.name, inbound);
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
    async fn learn_writer(&self, inbound: &Inbound) -> Result<(), stages::StageError> {
        let (Some(registry), Some(payload)) = (&self.registry, inbound.payload.as_deref()) else { return Ok(()) };
        registry.learn_writer(payload).await.map_err(|error| stages::StageError::Transient(error.to_string()))
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

/// The span every log line about one message carries: where it came from,
/// the transfer (our keys are transfer ids) and the trace it belongs to.
pub(crate) fn message_span(stage: &'static str, inbound: &Inbound) -> tracing::Span {
    let transfer_id = inbound.key.as_deref().and_then(|key| std::str::from_utf8(key).ok()).unwrap_or("");
    let traceparent = inbound.header("traceparent");
    let trace_id = traceparent.and_then(|value| value.split('-').nth(1)).unwrap_or("");
    let span = tracing::info_span!(
        "message",
        stage,
        topic = %inbound.topic,
        partition = inbound.partition,
        offset = inbound.offset,
        transfer_id,
        trace_id
    );
    // With traces exported, the message's span continues the trace of the
    // span that wrote the message (no-op otherwise).
    if let Some(parent) = traceparent.and_then(crate::message::remote_parent) {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let _ = span.set_parent(parent);
    }
    span
}

/// How long a claim lasts before another runner may take the step over. A
/// step's work (at worst a deposit call, a refund call and their lookups,
/// each bounded by the service timeout) stays well inside it, so two runners
/// never work on the same step at once.
const SETTLEMENT_LEASE_MS: u64 = 60_000;
const SETTLEMENT_POLL_INTERVAL_MS: u64 = 250;
/// How often the runner looks for expired reservations and prunes old
/// callback receipts.
const SWEEP_INTERVAL_MS: u64 = 1_000;
/// Callback receipts are kept well past the signature tolerance window.
const CALLBACK_RECEIPTS_KEPT_SECS: i64 = 3_600;

/// The settlement runner: for every pending step whose time has come, asks
/// the service again (same idempotency key, so never a second movement) and
/// applies the step exactly as the stage would have, or asks again later;
/// past a step's deadline it follows the deadline policy. It also expires
/// reservations whose withdrawal never completed. Calls are bounded per
/// service; several runners may run, and leases keep them off each other's
/// steps.
async fn run_settlement(ctx: Arc<StageContext>, shutdown: CancellationToken) -> Result<()> {
    use bridge_store::pending;
    use tokio::sync::Semaphore;
    tracing::info!("Settlement runner started");
    let permits = ctx.config.settlement_concurrency_per_service.max(1);
    let limits: [(&'static str, Arc<Semaphore>); 2] =
        [Step::Withdrawal, Step::Deposit].map(|step| (step.as_str(), Arc::new(Semaphore::new(permits))));
    let mut tasks = JoinSet::new();
    let mut next_sweep = tokio::time::Instant::now();
    let mut next_terms = tokio::time::Instant::now();
    let terms_in_flight = Arc::new(std::sync::atomic::AtomicBool::new(false));
    while !shutdown.is_cancelled() {
        let mut started = 0;
        for (kind, limit) in &limits {
            let free = limit.available_permits();
            if free == 0 {
                continue;
            }
            let claimed = match ctx.pool.acquire().await {
                Ok(mut conn) => pending::claim_due(&mut conn, kind, free as i64, SETTLEMENT_LEASE_MS).await,
                Err(error) => Err(error.into()),
            };
            let due = claimed.unwrap_or_else(|error| {
                tracing::warn!(error = %error, "Could not claim pending steps; retrying");
                Vec::new()
            });
            for step in due {
                let permit = limit.clone().try_acquire_owned().expect("claimed no more than the free permits");
                let ctx = ctx.clone();
                started += 1;
                tasks.spawn(async move {
                    settle_one(&ctx, step).await;
                    drop(permit);
                });
            }
        }
        if tokio::time::Instant::now() >= next_sweep {
            next_sweep = tokio::time::Instant::now() + Duration::from_millis(SWEEP_INTERVAL_MS);
            started += expire_reservations(&ctx, &limits[0].1, &mut tasks).await;
        }
        let refresh_ms = ctx.config.fund_terms_refresh_ms;
        if refresh_ms > 0
            && tokio::time::Instant::now() >= next_terms
            && !terms_in_flight.swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            next_terms = tokio::time::Instant::now() + Duration::from_millis(refresh_ms);
            let (ctx, in_flight) = (ctx.clone(), terms_in_flight.clone());
            tasks.spawn(async move {
                if let Err(error) = crate::fund_terms::sync(&ctx).await {
                    tracing::warn!(error = format!("{error:#}"), "Could not read fund terms; trying again later");
                }
                in_flight.store(false, std::sync::atomic::Ordering::Release);
            });
        }
        while tasks.try_join_next().is_some() {}
        if started == 0 {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(SETTLEMENT_POLL_INTERVAL_MS)) => {}
            }
        }
    }
    // Calls in flight end within the service timeout; unfinished claims
    // would expire with their lease anyway.
    while tasks.join_next().await.is_some() {}
    tracing::info!("Settlement runner stopped");
    Ok(())
}

/// Asks about one claimed step and applies, defers or escalates it.
async fn settle_one(ctx: &StageContext, step: bridge_store::pending::DueStep) {
    use crate::config::DeadlinePolicy;
    use bridge_store::pending;
    use stages::Ask;
    let trace = crate::message::TraceContext::continue_or_start(None);
    let exhausted = step.attempts > ctx.config.pending_attempts_max;
    let escalate = step.overdue || exhausted;
    let reason =
        format!("{}_{}", step.step.to_uppercase(), if step.overdue { "DEADLINE_PASSED" } else { "ATTEMPTS_EXHAUSTED" });
    let ask = match ctx.config.pending_deadline_policy {
        DeadlinePolicy::Fail if escalate => Ask::Cancel { reason: &reason },
        _ => Ask::Perform,
    };
    let result = match step.step.parse::<Step>() {
        Err(error) => Err(stages::StageError::Permanent { class: "processing_error", message: error.to_string() }),
        Ok(kind) if escalate && ctx.config.pending_deadline_policy == DeadlinePolicy::ManualReview => {
            stages::hold_for_review(ctx, step.transfer_id, kind, &reason, &trace).await
        }
        Ok(kind) => stages::settle_step(ctx, step.transfer_id, kind, &trace, ask).await,
    };
    if escalate && ctx.config.pending_deadline_policy == DeadlinePolicy::KeepPolling {
        tracing::warn!(transfer_id = %step.transfer_id, step = %step.step, attempts = step.attempts, reason = %reason, "Step still pending past its deadline; still asking");
    }
    let (retry_after_ms, status) = match result {
        Ok(Outcome::Applied) => return,
        Ok(Outcome::Duplicate | Outcome::DeadLettered) => {
            if let Ok(mut conn) = ctx.pool.acquire().await {
                let _ = pending::finish(&mut conn, step.transfer_id, &step.step).await;
            }
            return;
        }
        Ok(Outcome::Deferred) => (stages::pending_retry_ms(step.attempts), "pending".to_owned()),
        Err(stages::StageError::Race { .. }) => (100, "lost a race".to_owned()),
        Err(stages::StageError::Transient(reason)) => {
            (stages::pending_retry_ms(step.attempts), format!("retrying: {reason}"))
        }
        Err(stages::StageError::Permanent { class, message }) => {
            tracing::error!(transfer_id = %step.transfer_id, step = %step.step, error_class = class, error = %message, "Pending step cannot be applied; it needs a person");
            (3_600_000, format!("{class}: {message}"))
        }
    };
    if let Ok(mut conn) = ctx.pool.acquire().await {
        if let Err(error) = pending::reschedule(&mut conn, step.transfer_id, &step.step, retry_after_ms, &status).await
        {
            tracing::warn!(error = %error, "Could not reschedule a pending step; its lease will expire");
        }
    }
}

/// Cancels the withdrawals of reservations older than their time to live,
/// within the withdrawal calls' limit, and prunes old callback receipts.
/// Returns how many cancellations it started.
async fn expire_reservations(
    ctx: &Arc<StageContext>,
    limit: &Arc<tokio::sync::Semaphore>,
    tasks: &mut JoinSet<()>,
) -> usize {
    let free = limit.available_permits();
    let expired = match ctx.pool.acquire().await {
        Ok(mut conn) => {
            if let Err(error) = bridge_store::callbacks::prune(&mut conn, CALLBACK_RECEIPTS_KEPT_SECS).await {
                tracing::warn!(error = %error, "Could not prune callback receipts");
            }
            if free == 0 {
                return 0;
            }
            bridge_store::transfers::validated_before(&mut conn, ctx.config.reservation_ttl_ms, free as i64).await
        }
        Err(error) => Err(error.into()),
    };
    let expired = expired.unwrap_or_else(|error| {
        tracing::warn!(error = %error, "Could not look for expired reservations");
        Vec::new()
    });
    let count = expired.len();
    for transfer_id in expired {
        let permit = limit.clone().try_acquire_owned().expect("took no more than the free permits");
        let ctx = ctx.clone();
        tasks.spawn(async move {
            let trace = crate::message::TraceContext::continue_or_start(None);
            let ask = stages::Ask::Cancel { reason: "RESERVATION_EXPIRED" };
            match stages::withdrawal_step(&ctx, transfer_id, None, &trace, ask).await {
                Ok(outcome) => tracing::info!(transfer_id = %transfer_id, outcome = ?outcome, "Reservation expired; withdrawal cancelled unless it had settled"),
                Err(error) => tracing::warn!(transfer_id = %transfer_id, error = %error, "Could not expire a reservation yet; trying again"),
            }
            drop(permit);
        });
    }
    count
}
