//! The notifier: every transfer status change, to everyone who asked to hear
//! about it, over the channels they chose.
//!
//! Two loops:
//!
//! - the **consumer** reads `bridge.transfers.status.v1` (its own consumer
//!   group) and, for each event, in one transaction writes the event log
//!   (`notification_log`, which is also its inbox: an event seen before
//!   notifies nobody twice) and one delivery per matching subscription;
//! - the **sender** claims the head of each target's queue (oldest pending
//!   delivery of one subscription, leased), renders it for its channel and
//!   sends it. A success moves the queue on; a failure is retried on an
//!   exponential schedule with jitter up to a maximum of attempts, then
//!   dead-lettered (`bridge notify redrive` puts it back). A target that has
//!   failed for longer than `disable_after_ms` is switched off until an
//!   operator enables it again.
//!
//! Each target has its own queue and at most one delivery in flight, and many
//! targets are served at once, so a target that is down or slow delays only
//! itself; its queue keeps the order of a transfer's changes.

pub mod channels;
pub mod outbound;
pub mod rebuild;
pub mod templates;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rand::Rng;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use bridge_codec::TransferStatusChanged;
use bridge_pipeline::message::Inbound;
use bridge_pipeline::runner::{consume, Handler, Runtime};
use bridge_pipeline::stages::{self, Outcome, StageError};
use bridge_store::notifications::{self, ClaimedDelivery, LoggedEvent};

pub use channels::{Channels, SendError, SmsProvider, SmtpServer};

const CONSUMER: &str = "notifier";

#[derive(Clone, Debug)]
pub struct NotifierConfig {
    /// Targets served at once (one delivery in flight per target).
    pub targets_in_flight_max: usize,
    /// Attempts per delivery before it is dead-lettered.
    pub attempts_max: i32,
    /// First retry delay; each further retry doubles it, up to
    /// `retry_max_ms`, with jitter.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// A target failing without a single success for this long is disabled.
    pub disable_after_ms: u64,
    /// How long a claimed delivery is ours before another notifier may take
    /// it over; longer than any send (the request timeout bounds those).
    pub lease_ms: u64,
    /// How often the sender looks for due deliveries when idle.
    pub poll_interval_ms: u64,
    /// How long a delivered notification's row is kept (the event itself
    /// stays in the event log). Pending and dead deliveries are never pruned.
    pub delivered_retention_ms: u64,
    /// How often the sender prunes delivered rows past their retention.
    pub prune_interval_ms: u64,
    pub channels: channels::ChannelsConfig,
    /// Opens webhook signing secrets, which are kept in the encrypted
    /// credentials store.
    pub keyring: Option<Arc<bridge_secrets::Keyring>>,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        Self {
            targets_in_flight_max: 64,
            attempts_max: 10,
            retry_base_ms: 1_000,
            retry_max_ms: 3_600_000,
            disable_after_ms: 24 * 3_600_000,
            lease_ms: 60_000,
            poll_interval_ms: 100,
            delivered_retention_ms: 7 * 24 * 3_600_000,
            prune_interval_ms: 60_000,
            channels: channels::ChannelsConfig::default(),
            keyring: None,
        }
    }
}

/// Delivered rows deleted per statement when pruning.
const PRUNE_BATCH: i64 = 10_000;

pub struct Notifier {
    ctx: Arc<Runtime>,
    config: NotifierConfig,
    channels: Arc<Channels>,
    /// Wakes the sender when a queue may have a new head: a delivery
    /// finished, or the consumer queued new ones. Polling covers other
    /// notifier processes.
    wake: Arc<tokio::sync::Notify>,
    /// Signing secrets opened so far, by reference: opened once, not per
    /// delivery.
    secrets: Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
}

impl Notifier {
    /// `ctx` is a pipeline context: its pool, topics and Kafka settings are
    /// used; its account services are not.
    pub fn new(ctx: Arc<Runtime>, config: NotifierConfig) -> Result<Self> {
        let channels = Arc::new(Channels::new(config.channels.clone())?);
        Ok(Self { ctx, config, channels, wake: Arc::new(tokio::sync::Notify::new()), secrets: Arc::default() })
    }

    pub fn group_id(&self) -> String {
        format!("{}bridge-notifier", self.ctx.config.group_prefix)
    }

    /// Runs the consumer and the sender until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let (handler_ctx, wake) = (self.ctx.clone(), self.wake.clone());
        let handler: Handler = Arc::new(move |message| {
            let (ctx, wake) = (handler_ctx.clone(), wake.clone());
            Box::pin(async move {
                let outcome = stages::process(&ctx, CONSUMER, message, || accept(&ctx, message)).await;
                wake.notify_one();
                outcome
            })
        });
        let topic = self.ctx.topics.status();
        let group = self.group_id();
        let consumer = consume(&self.ctx, CONSUMER, &group, &topic, handler, shutdown.clone());
        let sender = self.send_loop(shutdown.clone());
        let (consumed, sent) = tokio::join!(consumer, sender);
        consumed.and(sent)
    }

    /// Runs the sender alone (deliveries already queued), until `shutdown`.
    pub async fn run_sender(&self, shutdown: CancellationToken) -> Result<()> {
        self.send_loop(shutdown).await
    }

    async fn send_loop(&self, shutdown: CancellationToken) -> Result<()> {
        let limit = Arc::new(tokio::sync::Semaphore::new(self.config.targets_in_flight_max.max(1)));
        let mut tasks = JoinSet::new();
        let mut next_prune = tokio::time::Instant::now();
        let mut pruning: Option<tokio::task::JoinHandle<()>> = None;
        tracing::info!("Notification sender started");
        while !shutdown.is_cancelled() {
            // Delivered rows would otherwise pile up by one per event and
            // target for ever. One pass at a time, beside the sends.
            if tokio::time::Instant::now() >= next_prune && pruning.as_ref().is_none_or(|pass| pass.is_finished()) {
                next_prune = tokio::time::Instant::now() + Duration::from_millis(self.config.prune_interval_ms);
                let (pool, retention_ms) = (self.ctx.pool.clone(), self.config.delivered_retention_ms);
                pruning = Some(tokio::spawn(async move {
                    let pruned = match pool.acquire().await {
                        Ok(mut conn) => notifications::prune_delivered(&mut conn, retention_ms, PRUNE_BATCH).await,
                        Err(error) => Err(error.into()),
                    };
                    match pruned {
                        Ok(0) => {}
                        Ok(rows) => tracing::info!(rows, "Pruned delivered notifications past their retention"),
                        Err(error) => tracing::warn!(error = %error, "Could not prune delivered notifications"),
                    }
                }));
            }
            let free = limit.available_permits();
            let claimed = if free == 0 {
                Ok(Vec::new())
            } else {
                match self.ctx.pool.acquire().await {
                    Ok(mut conn) => notifications::claim_heads(&mut conn, free as i64, self.config.lease_ms).await,
                    Err(error) => Err(error.into()),
                }
            };
            let claimed = claimed.unwrap_or_else(|error| {
                tracing::warn!(error = %error, "Could not claim deliveries; retrying");
                Vec::new()
            });
            let idle = claimed.is_empty();
            for delivery in claimed {
                let permit = limit.clone().try_acquire_owned().expect("claimed no more than the free permits");
                let (ctx, channels, config) = (self.ctx.clone(), self.channels.clone(), self.config.clone());
                let (wake, secrets) = (self.wake.clone(), self.secrets.clone());
                tasks.spawn(async move {
                    send_one(&ctx, &channels, &config, &secrets, delivery).await;
                    drop(permit);
                    wake.notify_one();
                });
            }
            while tasks.try_join_next().is_some() {}
            if idle {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(self.config.poll_interval_ms)) => {}
                }
            }
        }
        // Sends in flight finish within the request timeout; a delivery cut
        // short is retried when its lease ends.
        while tasks.join_next().await.is_some() {}
        if let Some(pass) = pruning {
            let _ = pass.await;
        }
        tracing::info!("Notification sender stopped");
        Ok(())
    }
}

/// One status event: logged and queued for its subscribers, once.
async fn accept(ctx: &Runtime, message: &Inbound) -> Result<Outcome, StageError> {
    let payload = message.payload.as_deref().unwrap_or_default();
    let event: TransferStatusChanged = bridge_codec::decode(payload)
        .map_err(|error| StageError::Permanent { class: error.class(), message: error.to_string() })?;
    let invalid = |what: &str| StageError::Permanent {
        class: "invalid_event",
        message: format!("status event {what} is not a UUID"),
    };
    let logged = LoggedEvent {
        event_id: Uuid::parse_str(&event.event_id).map_err(|_| invalid("event_id"))?,
        transfer_id: Uuid::parse_str(&event.transfer_id).map_err(|_| invalid("transfer_id"))?,
        version: event.version,
        state: event.state.clone(),
        investor_account_id: event.investor_account_id.clone(),
        fund_account_id: event.fund_account_id.clone(),
        event: serde_json::to_value(&event)
            .map_err(|error| StageError::Permanent { class: "invalid_event", message: error.to_string() })?,
        // Under this message's span: a receiver's work joins the transfer's
        // trace.
        traceparent: Some(
            bridge_pipeline::message::TraceContext::continue_or_start(message.header("traceparent"))
                .child_traceparent(),
        ),
    };
    let mut tx = ctx.pool.begin().await?;
    let accepted = notifications::accept(&mut tx, &logged).await?;
    tx.commit().await?;
    Ok(if accepted.is_some() { Outcome::Applied } else { Outcome::Duplicate })
}

/// How long to wait before attempt `attempts + 1`: doubling from the base,
/// capped, with jitter (half to all of it) so that retries of many
/// deliveries to a target that came back do not arrive in lockstep.
pub fn retry_delay_ms(config: &NotifierConfig, attempts: i32) -> u64 {
    let ceiling = config
        .retry_base_ms
        .saturating_mul(1u64 << attempts.clamp(0, 30).saturating_sub(1))
        .min(config.retry_max_ms)
        .max(1);
    rand::rng().random_range(ceiling / 2..=ceiling)
}

/// A `credential:<name>` reference opened from the credentials store (and
/// kept in `cache`).
async fn open_reference(
    ctx: &Runtime,
    config: &NotifierConfig,
    cache: &std::sync::Mutex<std::collections::HashMap<String, String>>,
    reference: &str,
    what: &str,
) -> Result<String, SendError> {
    if !reference.starts_with(bridge_secrets::REFERENCE_PREFIX) {
        return Err(SendError::Permanent(format!("{what} is not in the credentials store")));
    }
    if let Some(secret) = cache.lock().expect("secret cache").get(reference) {
        return Ok(secret.clone());
    }
    let keyring = config
        .keyring
        .as_ref()
        .ok_or_else(|| SendError::Permanent(format!("no master keys configured to open the {what}")))?;
    let mut conn = ctx.pool.acquire().await.map_err(|error| SendError::Transient(error.to_string()))?;
    let opened = bridge_secrets::open_reference(&mut conn, keyring, reference).await.map_err(|error| match error {
        bridge_secrets::Error::Store(error) => SendError::Transient(error.to_string()),
        other => SendError::Permanent(other.to_string()),
    })?;
    let secret = secrecy::ExposeSecret::expose_secret(&opened).to_owned();
    cache.lock().expect("secret cache").insert(reference.to_owned(), secret.clone());
    Ok(secret)
}

/// The delivery with its signing secret and its sealed target opened from
/// the credentials store, for sending only.
async fn with_secret(
    ctx: &Runtime,
    config: &NotifierConfig,
    cache: &std::sync::Mutex<std::collections::HashMap<String, String>>,
    mut delivery: ClaimedDelivery,
) -> Result<ClaimedDelivery, SendError> {
    if let Some(reference) = delivery.secret.clone() {
        delivery.secret = Some(open_reference(ctx, config, cache, &reference, "signing secret").await?);
    }
    if let Some(reference) = delivery.sealed_target.take() {
        delivery.target = open_reference(ctx, config, cache, &reference, "target").await?;
    }
    Ok(delivery)
}

async fn send_one(
    ctx: &Runtime,
    channels: &Channels,
    config: &NotifierConfig,
    cache: &std::sync::Mutex<std::collections::HashMap<String, String>>,
    delivery: ClaimedDelivery,
) {
    let result = match with_secret(ctx, config, cache, delivery.clone()).await {
        Ok(opened) => channels.send(&opened).await,
        Err(error) => Err(error),
    };
    if result.is_ok() {
        bridge_pipeline::failpoint::hit("notifier.mid_delivery");
    }
    let recorded = match ctx.pool.acquire().await {
        Ok(mut conn) => match &result {
            Ok(()) => {
                bridge_pipeline::metrics::notification_delivery(&delivery.channel, "delivered");
                notifications::mark_delivered(&mut conn, &delivery).await.map(|()| false)
            }
            Err(error) => {
                let retry = match error {
                    SendError::Permanent(_) => None,
                    SendError::Transient(_) if delivery.attempts >= config.attempts_max => None,
                    SendError::Transient(_) => Some(retry_delay_ms(config, delivery.attempts)),
                };
                if retry.is_none() {
                    tracing::warn!(delivery = delivery.id, target = delivery.subscription_id, attempts = delivery.attempts, error = %error, "Delivery dead-lettered");
                }
                let outcome = if retry.is_some() { "retry" } else { "dead" };
                bridge_pipeline::metrics::notification_delivery(&delivery.channel, outcome);
                notifications::mark_failed(&mut conn, &delivery, &error.to_string(), retry, config.disable_after_ms)
                    .await
            }
        },
        Err(error) => Err(error.into()),
    };
    match recorded {
        Ok(true) => {
            tracing::error!(target = delivery.subscription_id, "Notification target failing for too long; disabled")
        }
        Ok(false) => {}
        // The lease runs out and the delivery is tried again: at worst a
        // receiver hears twice, which the webhook-id lets it detect.
        Err(error) => tracing::warn!(delivery = delivery.id, error = %error, "Could not record a delivery's outcome"),
    }
}
