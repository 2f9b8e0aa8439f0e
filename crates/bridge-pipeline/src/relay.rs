//! The outbox relay: the only component that produces to Kafka.
//!
//! It claims unpublished rows (from a cursor; see `outbox::claim`), each the
//! messages one transaction wrote, hands all their messages to the
//! idempotent producer, waits for every delivery report, and deletes the
//! rows whose messages were all acknowledged: those of several claims in
//! one statement, at most `DELETE_DELAY` or `DELETE_ROWS_MAX` rows after
//! the first was acknowledged, and its claims meanwhile leave them out. So
//! at a low load, where each claim finds one stage's commit, a published
//! row does not cost a commit of its own. A relay that dies before the
//! delete leaves those rows to be published again by the next leader,
//! like any row it had sent. A row with a message whose
//! delivery failed or timed out stays unpublished and is sent again whole:
//! its messages may already be in their topics ("maybe published"), which
//! consumers absorb through their inbox.
//! Duplicates in a topic are allowed; duplicate effects are not.
//!
//! Several relays may run (one per `bridge run` process), but only one
//! publishes at a time: the holder of a Postgres advisory lock, taken on a
//! connection of its own. It claims and deletes on that same connection, so
//! a relay whose session ended (and with it its leadership) can neither
//! claim nor delete another row. The others wait as hot standbys and take
//! over when the leader's session ends (process exit, crash, lost
//! connection). One publisher is what keeps the status events of a transfer
//! in version order: two relays claiming neighbouring rows side by side
//! could publish version 2 before version 1.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::future::join_all;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use sqlx::postgres::PgListener;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use bridge_store::outbox::{self, OutboxMessage};

use crate::context::{Backoff, Runtime};
use crate::kafka;

/// Advisory lock key of the publishing relay ("bridge relay" in ASCII).
const LEADER_LOCK_KEY: i64 = 0x6272_6964_6765_726c;

/// How long an acknowledged row may wait for its delete, and how many may
/// wait: what a crashed leader's successor publishes again at most, and
/// how many ids each claim leaves out.
const DELETE_DELAY: Duration = Duration::from_millis(100);
const DELETE_ROWS_MAX: usize = 256;

/// Rows the broker acknowledged that are still to be deleted.
#[derive(Default)]
struct Acknowledged {
    ids: Vec<i64>,
    since: Option<tokio::time::Instant>,
}

impl Acknowledged {
    fn add(&mut self, ids: &[i64]) {
        if ids.is_empty() {
            return;
        }
        self.since.get_or_insert_with(tokio::time::Instant::now);
        self.ids.extend_from_slice(ids);
    }

    /// When the rows must be deleted, if there are any.
    fn deadline(&self) -> Option<tokio::time::Instant> {
        self.since.map(|since| since + DELETE_DELAY)
    }

    fn due(&self) -> bool {
        self.ids.len() >= DELETE_ROWS_MAX || self.deadline().is_some_and(|at| at <= tokio::time::Instant::now())
    }

    /// Deletes the rows on `session`, the leader's.
    async fn delete(&mut self, session: &mut sqlx::PgConnection) -> Result<()> {
        outbox::delete_published(session, &self.ids).await?;
        self.ids.clear();
        self.since = None;
        Ok(())
    }
}

pub async fn run(ctx: Arc<Runtime>, shutdown: CancellationToken) -> Result<()> {
    let poll_interval = Duration::from_millis(ctx.config.relay_poll_interval_ms);
    let mut backoff = Backoff::new(ctx.config.retry_backoff_max_ms);
    while !shutdown.is_cancelled() {
        match lead(&ctx, &shutdown).await {
            Ok(()) => {}
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "Relay lost its database session; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff.next_delay().max(poll_interval)) => {}
                }
            }
        }
    }
    tracing::info!("Relay stopped");
    Ok(())
}

/// Waits to become the publishing relay, then publishes until shutdown or
/// until its lock session fails.
async fn lead(ctx: &Runtime, shutdown: &CancellationToken) -> Result<()> {
    let poll_interval = Duration::from_millis(ctx.config.relay_poll_interval_ms);
    let mut lock_session = ctx.pool.acquire().await.context("Failed to get a connection for the relay lock")?.detach();
    let mut standby_logged = false;
    loop {
        let acquired: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK_KEY)
            .fetch_one(&mut lock_session)
            .await
            .context("Failed to ask for the relay lock")?;
        if acquired {
            break;
        }
        if !standby_logged {
            tracing::info!("Another relay is publishing; standing by");
            standby_logged = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(poll_interval) => {}
        }
    }
    tracing::info!("Relay is publishing");
    outbox::prepare_claims(&mut lock_session).await.context("Failed to set up the relay's session")?;
    let result = publish_until_shutdown(ctx, shutdown, &mut lock_session).await;
    // Closing the session releases the lock for a standby.
    let _ = lock_session.close().await;
    result
}

async fn publish_until_shutdown(
    ctx: &Runtime,
    shutdown: &CancellationToken,
    lock_session: &mut sqlx::PgConnection,
) -> Result<()> {
    let producer = kafka::producer(&ctx.config)?;
    let mut listener = PgListener::connect_with(&ctx.pool).await.context("Failed to connect the outbox listener")?;
    listener.listen(outbox::NOTIFY_CHANNEL).await.context("Failed to listen for outbox notifications")?;
    let poll_interval = Duration::from_millis(ctx.config.relay_poll_interval_ms);
    let mut backoff = Backoff::new(ctx.config.retry_backoff_max_ms);
    let mut next_prune = std::time::Instant::now();
    // Where the next claim starts (a writing transaction's id; see
    // `outbox::Claim::next_start`).
    let mut claim_start = 0;
    let mut acknowledged = Acknowledged::default();
    // What the last claim saw (`outbox::Claim::seen_until`; 0: not known).
    let mut seen_until = 0;
    // False when the relay woke with nothing to claim: to delete what was
    // acknowledged, or for writes its last claim had already taken.
    let mut claim_next = true;
    while !shutdown.is_cancelled() {
        if !std::mem::replace(&mut claim_next, true) {
            if acknowledged.due() {
                acknowledged.delete(lock_session).await.context("The relay's session failed")?;
            }
            wait(shutdown, &mut listener, poll_interval, &acknowledged, seen_until, &mut claim_next).await;
            continue;
        }
        // The leader, being one, also keeps the inbox small (the outbox
        // keeps itself small: published rows are deleted as they go).
        if std::time::Instant::now() >= next_prune {
            next_prune = std::time::Instant::now() + prune_interval(ctx.config.inbox_retention_ms);
            if let Err(error) = prune(ctx).await {
                tracing::warn!(error = format!("{error:#}"), "Could not prune the inbox; trying later");
            }
            // Once per pass the claim looks at the whole table again: the
            // cursor passes no row it could not see (see
            // `outbox::Claim::next_start`), and this bounds the cost of
            // being wrong about that to one pruning interval.
            claim_start = 0;
        }
        // Claims run on the lock session: a leader whose session died fails
        // here and steps down.
        let published =
            publish_batch(ctx, lock_session, &producer, &mut claim_start, &mut acknowledged, &mut seen_until).await;
        if acknowledged.due() {
            acknowledged.delete(lock_session).await.context("The relay's session failed")?;
        }
        match published {
            Ok(published) if published as i64 >= ctx.config.relay_batch_size_max => {
                backoff = Backoff::new(ctx.config.retry_backoff_max_ms);
                continue;
            }
            Ok(_) => backoff = Backoff::new(ctx.config.retry_backoff_max_ms),
            // A statement on the lock session failed: the session, and the
            // leadership with it, may be gone. Step down; `run` connects
            // again and waits for the lock.
            Err(error) if error.downcast_ref::<bridge_store::Error>().is_some() => {
                return Err(error.context("The relay's session failed"));
            }
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "Relay batch failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
                continue;
            }
        }
        wait(shutdown, &mut listener, poll_interval, &acknowledged, seen_until, &mut claim_next).await;
    }
    // Deliver what librdkafka still holds; the rows stay unpublished if this
    // fails and are sent again by the next relay.
    let _ = producer.flush(Duration::from_secs(5));
    let _ = acknowledged.delete(lock_session).await;
    Ok(())
}

/// Sleeps until a stage commits outbox rows (NOTIFY), the poll interval
/// passes (which covers lost notifications and rows left behind by a
/// failed batch) or the acknowledged rows are due for their delete. In the
/// last case, and when every notification came from a transaction that
/// had ended before the last claim read (`seen_until`), `claim_next`
/// turns false.
async fn wait(
    shutdown: &CancellationToken,
    listener: &mut PgListener,
    poll_interval: Duration,
    acknowledged: &Acknowledged,
    seen_until: i64,
    claim_next: &mut bool,
) {
    let delete_due = async {
        match acknowledged.deadline() {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        notification = listener.recv() => {
            let first = match notification {
                Ok(first) => first,
                Err(error) => {
                    tracing::warn!(error = %error, "Outbox listener failed; falling back to polling");
                    tokio::time::sleep(poll_interval).await;
                    return;
                }
            };
            // Every stage commit notifies. The next claim takes every row
            // committed so far, so the notifications that queued up
            // while the last batch was in flight are spent too: one
            // claim for all of them, not one (mostly empty) each. The
            // relay does not wait for more commits to join a batch:
            // under load they join on their own, while the previous
            // batch is being acknowledged, and at low load a wait would
            // only add latency to every hop.
            let mut newest = outbox::notifier(first.payload());
            while let Some(next) = listener.next_buffered() {
                newest = newest.zip(outbox::notifier(next.payload())).map(|(a, b)| a.max(b));
            }
            // A writer often commits just before a claim that was woken by
            // another, and its own notification arrives after: the claim
            // took its rows already.
            if newest.is_some_and(|notifier| notifier < seen_until) {
                *claim_next = false;
            }
        }
        _ = tokio::time::sleep(poll_interval) => {}
        _ = delete_due => *claim_next = false,
    }
}

/// Pruning runs about ten times per retention period, at most once a second
/// and at least once a minute.
fn prune_interval(retention_ms: u64) -> Duration {
    Duration::from_millis((retention_ms / 10).clamp(1_000, 60_000))
}
/// Rows deleted per statement, so a pruning pass never holds long locks.
const PRUNE_BATCH: i64 = 10_000;

/// Deletes inbox rows past their retention.
async fn prune(ctx: &Runtime) -> Result<()> {
    let mut conn = ctx.pool.acquire().await?;
    let inbox_rows = bridge_store::inbox::prune(&mut conn, ctx.config.inbox_retention_ms, PRUNE_BATCH).await?;
    if inbox_rows > 0 {
        tracing::info!(inbox_rows, "Pruned inbox rows past their retention");
    }
    Ok(())
}

/// OpenTelemetry's producer span for one outbox message, from the hand-over to
/// the broker's acknowledgement, in the trace of the step that wrote it.
fn send_span(message: &OutboxMessage) -> tracing::Span {
    let key = message.key.as_deref().and_then(|key| std::str::from_utf8(key).ok()).unwrap_or("");
    let span = tracing::info_span!(
        "send",
        "otel.kind" = "producer",
        "messaging.system" = "kafka",
        "messaging.operation.type" = "send",
        "messaging.destination.name" = %message.topic,
        "messaging.destination.partition.id" = tracing::field::Empty,
        "messaging.kafka.offset" = tracing::field::Empty,
        "messaging.kafka.message.key" = key,
        "error.type" = tracing::field::Empty,
        transfer_id = key,
    );
    let traceparent = message.headers.iter().find(|(name, _)| name == "traceparent");
    if let Some(parent) =
        traceparent.and_then(|(_, value)| std::str::from_utf8(value).ok()).and_then(crate::message::remote_parent)
    {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let _ = span.set_parent(parent);
    }
    span
}

/// Hands `message` to the producer; while its bounded queue is full, waits
/// for it to drain rather than grow memory.
async fn send(producer: &FutureProducer, message: &OutboxMessage) -> Result<DeliveryFuture, KafkaError> {
    let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
    for (key, value) in &message.headers {
        headers = headers.insert(Header { key, value: Some(value) });
    }
    let mut record = FutureRecord::to(&message.topic).payload(&message.payload).headers(headers);
    if let Some(key) = &message.key {
        record = record.key(key);
    }
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((error, _)) => return Err(error),
        }
    }
}

/// Publishes one batch, claimed from `claim_start` on `session` (the one
/// holding the leadership) past the rows in `awaiting_delete`, adds the
/// rows it published to them and moves `claim_start` on. Returns the number of
/// messages claimed.
async fn publish_batch(
    ctx: &Runtime,
    session: &mut sqlx::PgConnection,
    producer: &FutureProducer,
    claim_start: &mut i64,
    awaiting_delete: &mut Acknowledged,
    seen_until: &mut i64,
) -> Result<usize> {
    *seen_until = 0;
    let claim = outbox::claim(session, *claim_start, &awaiting_delete.ids, ctx.config.relay_batch_size_max).await?;
    let rows = &claim.rows;
    if rows.is_empty() {
        *claim_start = claim.next_start(&[]);
        *seen_until = claim.seen_until();
        return Ok(0);
    }
    crate::failpoint::hit("relay.after_claim");
    // A row is published when the broker acknowledged every one of its
    // messages; otherwise it stays, and all of them are sent again.
    let mut deliveries = Vec::with_capacity(rows.iter().map(|row| row.messages.len()).sum());
    let mut failed: Vec<(i64, String)> = Vec::new();
    for row in rows {
        for message in &row.messages {
            let span = send_span(message);
            match send(producer, message).await {
                Ok(delivery) => deliveries.push((row.id, (delivery, span))),
                Err(error) => failed.push((row.id, error.to_string())),
            }
        }
    }
    let (ids, sends): (Vec<i64>, Vec<_>) = deliveries.into_iter().unzip();
    let (futures, spans): (Vec<_>, Vec<tracing::Span>) = sends.into_iter().unzip();
    let mut acknowledged = 0;
    for ((id, result), span) in ids.into_iter().zip(join_all(futures).await).zip(spans) {
        // The send span ends here, when the broker has answered.
        match result {
            Ok(Ok(delivered)) => {
                span.record("messaging.destination.partition.id", delivered.partition);
                span.record("messaging.kafka.offset", delivered.offset);
                acknowledged += 1;
            }
            Ok(Err((error, _))) => {
                span.record("error.type", error.to_string());
                failed.push((id, error.to_string()))
            }
            Err(_) => failed.push((id, "delivery future cancelled".to_owned())),
        }
    }
    let mut unpublished: Vec<i64> = failed.iter().map(|(id, _)| *id).collect();
    unpublished.sort_unstable();
    unpublished.dedup();
    let published: Vec<i64> =
        rows.iter().map(|row| row.id).filter(|id| unpublished.binary_search(id).is_err()).collect();
    if !published.is_empty() {
        crate::failpoint::hit("relay.after_produce");
    }
    awaiting_delete.add(&published);
    crate::metrics::relay_batch(acknowledged, failed.len());
    if let Some((_, error)) = failed.first() {
        tracing::warn!(failed = failed.len(), error = %error, "Some outbox messages were not acknowledged; their rows will be retried");
        outbox::mark_failed(session, &unpublished, error).await?;
    }
    *claim_start = claim.next_start(&unpublished);
    if !failed.is_empty() {
        anyhow::bail!("{} of {} outbox rows were not acknowledged", unpublished.len(), rows.len());
    }
    *seen_until = claim.seen_until();
    Ok(rows.iter().map(|row| row.messages.len()).sum())
}
