//! The four stages. Each turns one consumed message into one database
//! transaction: inbox insert, version-checked state change, ledger postings
//! and outbox rows, committed together. Calls to outside services happen
//! before that transaction, with an idempotency key, so repeating a step after
//! a crash asks the service the same question and gets the first answer.
//! Under load each stage also has a batch path that applies a partition's
//! queued messages in one set-based transaction (shared with other
//! partitions' batches that wait at the same time), falling back to this
//! one-message path for anything out of the ordinary.
//!
//! Whatever the path, a step's transaction ends in [`finish_step`]: the
//! transfers' new versions, their events through the outbox, and what the
//! event does to the books (`TransferEvent::effect`: its postings written
//! with the versions, its balances by `bridge_store::books`, which also
//! fixes the order rows are locked in). The validator records new
//! transfers instead of advancing them, and applies the same effects
//! through the same store module.
//!
//! One module per step: `validate`, `money` (the withdrawal and the deposit
//! with its refund), `complete` and `review` (a step overdue, handed to a
//! person). What they share is here: the error policy and dead-lettering
//! (`process`), the events, and `finish_step`.

use chrono::{DateTime, Utc};
use rand::Rng;
use sqlx::PgConnection;
use uuid::Uuid;

use bridge_codec::{
    decode, Event, FundsDeposited, FundsWithdrawn, TransferRequested, TransferStatusChanged, TransferValidated,
};
use bridge_domain::{
    check_request, ids, Currency, FailureReason, Money, RequestFacts, Step, TransferEvent, TransferState,
};
use bridge_store::outbox::{self, OutboxMessage};
use bridge_store::transfers::{self, Transfer};
use bridge_store::{accounts, books, inbox, pending};

use crate::batches::SettledStep;
use crate::context::{message_span, Runtime, StageContext, StageName};
use crate::group_commit::{GroupCommit, Verdict};
use crate::message::{dead_letter_headers as dlq, Envelope, Inbound, TraceContext};
pub use crate::outcome::{Outcome, StageError};
use crate::services::{MoneyMovement, ServiceError, ServiceOutcome, CANCELLED};
use crate::Topics;

fn permanent(class: &'static str, message: impl Into<String>) -> StageError {
    StageError::Permanent { class, message: message.into() }
}

fn decode_payload<T: Event>(message: &Inbound) -> Result<T, StageError> {
    let payload = message.payload.as_deref().unwrap_or_default();
    decode::<T>(payload).map_err(|error| permanent(error.class(), error.to_string()))
}

fn parse_transfer_id(text: &str) -> Result<Uuid, StageError> {
    Uuid::parse_str(text).map_err(|_| permanent("invalid_request", format!("transfer_id {text:?} is not a UUID")))
}

fn money_of(transfer: &Transfer) -> Result<Money, StageError> {
    let currency = Currency::parse(&transfer.currency)
        .map_err(|error| permanent("processing_error", format!("transfer {}: {error}", transfer.id)))?;
    Ok(Money::new(transfer.amount_minor, currency))
}

/// Processes one message to completion: retries lost races a bounded number
/// of times, dead-letters what can never succeed, and hands transient
/// failures back to the caller, which retries the message later.
pub async fn handle(ctx: &StageContext, stage: StageName, message: &Inbound) -> Result<Outcome, StageError> {
    process(ctx, stage.as_str(), message, || async move {
        match stage {
            StageName::Validator => validate(ctx, message).await,
            StageName::Withdrawal => withdraw(ctx, message).await,
            StageName::Deposit => deposit(ctx, message).await,
            StageName::Completion => complete(ctx, message).await,
        }
    })
    .await
}

/// Runs `attempt` for one message of consumer `consumer` (a stage, or
/// another consumer such as the notifier) with the stages' error policy:
/// lost races retried at once a bounded number of times, what can never
/// succeed dead-lettered, transient failures handed back to the caller.
pub async fn process<F, Fut>(
    ctx: &Runtime,
    consumer: &'static str,
    message: &Inbound,
    attempt: F,
) -> Result<Outcome, StageError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Outcome, StageError>>,
{
    let mut races = 0;
    loop {
        match attempt().await {
            Ok(outcome) => return Ok(outcome),
            Err(StageError::Race { reason, .. }) if races < ctx.config.transaction_attempts_max => {
                races += 1;
                tracing::debug!(stage = consumer, attempt = races, reason = %reason, "Retrying after a lost race");
                // A short random pause lets the winner finish and spreads the
                // losers out so they do not collide again in lockstep.
                let pause_ms = rand::rng().random_range(0..(2u64 << races.min(6)));
                tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
            }
            Err(StageError::Race { reason, unique_violation: true }) => {
                return dead_letter(ctx, consumer, message, "processing_error", &reason).await;
            }
            Err(StageError::Race { reason, .. }) => return Err(StageError::Transient(reason)),
            Err(StageError::Permanent { class, message: reason }) => {
                tracing::warn!(
                    stage = consumer,
                    topic = %message.topic,
                    partition = message.partition,
                    offset = message.offset,
                    error_class = class,
                    error = %reason,
                    "Dead-lettering a message that cannot be processed"
                );
                return dead_letter(ctx, consumer, message, class, &reason).await;
            }
            Err(transient) => return Err(transient),
        }
    }
}

/// Sends the original message (key, bytes, headers) to `<topic>.dlq` with
/// error headers, through the outbox, exactly once per log position.
async fn dead_letter(
    ctx: &Runtime,
    consumer: &str,
    message: &Inbound,
    class: &'static str,
    reason: &str,
) -> Result<Outcome, StageError> {
    let mut tx = bridge_store::begin_step_transaction(&ctx.pool).await?;
    if !inbox::record(&mut tx, consumer, &format!("dlq:{}", message.position_id())).await? {
        return Ok(Outcome::DeadLettered);
    }
    // The original headers, minus any that pose as ours: a sender must not
    // be able to steer where a redrive sends its message.
    let mut headers: Vec<(String, Vec<u8>)> =
        message.headers.iter().filter(|(name, _)| !name.starts_with("bridge_dlq_")).cloned().collect();
    let now = Utc::now().to_rfc3339();
    for (name, value) in [
        (dlq::ORIGINAL_TOPIC, message.topic.clone()),
        (dlq::ORIGINAL_PARTITION, message.partition.to_string()),
        (dlq::ORIGINAL_OFFSET, message.offset.to_string()),
        (dlq::ERROR_CLASS, class.to_owned()),
        (dlq::ERROR_MESSAGE, reason.chars().take(1_000).collect()),
        (dlq::STAGE, consumer.to_owned()),
        (dlq::FAILED_AT, now),
    ] {
        headers.push((name.to_owned(), value.into_bytes()));
    }
    let record = OutboxMessage {
        event_id: Uuid::new_v4(),
        topic: Topics::dead_letter(&message.topic),
        key: message.key.clone(),
        payload: message.payload.clone().unwrap_or_default(),
        headers,
    };
    outbox::enqueue(&mut tx, &[record]).await?;
    commit(ctx, tx).await?;
    Ok(Outcome::DeadLettered)
}

/// Commits a transaction that wrote outbox rows, then wakes the relay.
async fn commit(ctx: &Runtime, tx: sqlx::Transaction<'_, sqlx::Postgres>) -> Result<(), StageError> {
    tx.commit().await?;
    ctx.relay_waker.wake();
    Ok(())
}

fn millis(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

fn status_message(
    ctx: &StageContext,
    origin: &str,
    transfer: &Transfer,
    previous: Option<TransferState>,
    trace: &TraceContext,
) -> Result<OutboxMessage, StageError> {
    let event_id = ids::status_event_id(transfer.id, transfer.version);
    let now = Utc::now();
    let event = TransferStatusChanged {
        event_id: event_id.to_string(),
        transfer_id: transfer.id.to_string(),
        version: transfer.version,
        state: transfer.state.as_str().to_owned(),
        previous_state: previous.map(|state| state.as_str().to_owned()),
        terminal: transfer.state.is_terminal(),
        reason_code: transfer.reason_code.clone(),
        investor_account_id: transfer.investor_account_id.clone(),
        fund_account_id: transfer.fund_account_id.clone(),
        amount_minor: transfer.amount_minor,
        currency: transfer.currency.clone(),
        reference: transfer.reference.clone(),
        occurred_at: millis(now),
    };
    envelope::<TransferStatusChanged>(ctx, origin, event_id, transfer, trace, now, ctx.topics.status(), &event)
}

#[allow(clippy::too_many_arguments)]
fn envelope<T: Event>(
    ctx: &StageContext,
    origin: &str,
    event_id: Uuid,
    transfer: &Transfer,
    trace: &TraceContext,
    time: DateTime<Utc>,
    topic: String,
    event: &T,
) -> Result<OutboxMessage, StageError> {
    let payload = ctx.encode(&topic, event)?;
    let subject = transfer.id.to_string();
    let source = format!("{}/{}", ctx.source, origin);
    Ok(Envelope { event_id, ce_type: T::CE_TYPE, source: &source, subject: &subject, time, trace }
        .into_outbox(topic, &subject, payload))
}

/// The fields every stage outcome event shares.
macro_rules! stage_event {
    ($type:ident, $transfer:expr, $event_id:expr, $now:expr $(, $field:ident = $value:expr)?) => {
        $type {
            event_id: $event_id.to_string(),
            transfer_id: $transfer.id.to_string(),
            version: $transfer.version,
            investor_account_id: $transfer.investor_account_id.clone(),
            fund_account_id: $transfer.fund_account_id.clone(),
            fund_id: $transfer.fund_id.clone().unwrap_or_default(),
            amount_minor: $transfer.amount_minor,
            currency: $transfer.currency.clone(),
            occurred_at: millis($now),
            $($field: $value,)?
        }
    };
}

/// The span of a message a batch carries: the one-message path's span,
/// with the stage's consumer group (`StageName::group_id`, taken once per
/// batch), which there the consumer's lane records.
fn batch_message_span(stage: StageName, group: &str, message: &Inbound) -> tracing::Span {
    let span = message_span(stage.as_str(), message);
    span.record("messaging.consumer.group.name", group);
    span
}

/// The line the one-message path writes for each message it applied,
/// under each message's span, once the batch's transaction has committed.
fn log_applied(spans: &[tracing::Span]) {
    for span in spans {
        span.in_scope(|| tracing::debug!(outcome = ?Outcome::Applied, "Message processed"));
    }
}

/// Applies a lane's batch `items` with `apply` in a transaction that may
/// take other partitions' batches too (see `group_commit`), and answers per
/// item whether it was applied. `apply` applies all of its items or none:
/// `Ok(false)` when something in them stands in the way, which refuses the
/// transaction (its batches are then tried one at a time), and an error
/// leaves them all to the one-message path. A transaction naming a transfer
/// twice is refused without being tried: within a lane's batch a second
/// message for a transfer ends the batch, so two lanes name one transfer
/// only if its messages were published under different keys.
async fn shared<T, F, Fut>(group: &GroupCommit<T>, items: Vec<T>, transfer_of: fn(&T) -> Uuid, apply: F) -> Vec<bool>
where
    T: Send + Clone,
    F: Fn(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = Result<bool, StageError>>,
{
    group
        .apply(items, |items| {
            let size = items.len();
            let mut seen = std::collections::HashSet::with_capacity(size);
            let distinct = items.iter().all(|item| seen.insert(transfer_of(item)));
            let applied = distinct.then(|| apply(items));
            async move {
                let Some(applied) = applied else { return Verdict::Refused };
                match applied.await {
                    Ok(true) => Verdict::Done(vec![true; size]),
                    Ok(false) => Verdict::Refused,
                    Err(error) => {
                        tracing::debug!(error = %error, size, "Batch not applied; taking its messages one by one");
                        Verdict::Done(vec![false; size])
                    }
                }
            }
        })
        .await
}

/// Opens the step's transaction: re-reads the transfer under its row lock
/// and records the event in the inbox, in one statement. `None` means
/// another consumer applied the step meanwhile.
async fn begin_step(
    conn: &mut PgConnection,
    stage: StageName,
    event_id: Option<&str>,
    transfer_id: Uuid,
    expected: TransferState,
) -> Result<Option<Transfer>, StageError> {
    // The settlement runner has no event to record; the state check below
    // (and the version check when advancing) keep it to one application.
    let transfer = match event_id {
        Some(event_id) => {
            let (mut locked, recorded) =
                transfers::lock_for_messages(conn, &[transfer_id], stage.as_str(), &[event_id.to_owned()]).await?;
            if recorded == 0 {
                return Ok(None);
            }
            locked.pop()
        }
        None => transfers::get_for_update(conn, transfer_id).await?,
    };
    Ok(transfer.filter(|transfer| transfer.state == expected))
}

/// One transfer's part in a step's transaction.
struct Advance<'a> {
    /// The transfer as locked in this transaction, waiting for the step.
    before: &'a Transfer,
    /// The trace of the message (or callback, or runner) that asked.
    trace: TraceContext,
    /// The service's reference for a settled movement.
    reference: String,
    /// Who made the change, when not the stage: an operator resolving a
    /// review (the one-transfer path only).
    actor: Option<&'a transfers::Actor>,
}

/// Ends a step's transaction, for one transfer or a batch moved on by the
/// same event: their new versions (version-checked), each transfer's
/// outcome event if the event has one and its status event through the
/// outbox, the record of the money step it `settles` (if pending), and
/// what the event does to the books, then commit. All but the balances go
/// in one statement (`transfers::advance_step`): the events are built from
/// the versions the step will write, known beforehand.
async fn finish_step(
    ctx: &StageContext,
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    origin: &str,
    event: &TransferEvent,
    settles: Option<Step>,
    steps: &[Advance<'_>],
) -> Result<(), StageError> {
    let before: Vec<Transfer> = steps.iter().map(|step| step.before.clone()).collect();
    let next = transfers::next_versions(&before, event)?;
    let mut messages = Vec::with_capacity(2 * next.len());
    for (step, after) in steps.iter().zip(&next) {
        if let Some(outcome) = outcome_message(ctx, origin, event, after, &step.reference, &step.trace)? {
            messages.push(outcome);
        }
        messages.push(status_message(ctx, origin, after, Some(step.before.state), &step.trace)?);
    }
    let changes: Vec<_> = before.iter().map(|transfer| (transfer, event.effect(transfer.amount_minor))).collect();
    let postings = books::postings(&changes)?;
    let actors: Vec<_> = steps.iter().map(|step| step.actor).collect();
    let writes = transfers::StepWrites { settles: settles.map(Step::as_str), postings: &postings, outbox: &messages };
    transfers::advance_step(&mut tx, &before, &next, &actors, writes).await?;
    books::apply_balances(&mut tx, &changes).await?;
    crate::failpoint::hit("stage.inside_tx");
    commit(ctx, tx).await
}

/// The event a settled money step emits for the next stage, if `event` is
/// one.
fn outcome_message(
    ctx: &StageContext,
    origin: &str,
    event: &TransferEvent,
    next: &Transfer,
    reference: &str,
    trace: &TraceContext,
) -> Result<Option<OutboxMessage>, StageError> {
    let now = Utc::now();
    let reference = reference.to_owned();
    let message = match event {
        TransferEvent::Withdrawn => {
            let event_id = ids::stage_event_id(next.id, "withdrawn");
            let event = stage_event!(FundsWithdrawn, next, event_id, now, external_reference = reference);
            envelope(ctx, origin, event_id, next, trace, now, ctx.topics.withdrawn(), &event)?
        }
        TransferEvent::Deposited | TransferEvent::DepositConfirmed => {
            let event_id = ids::stage_event_id(next.id, "deposited");
            let event = stage_event!(FundsDeposited, next, event_id, now, external_reference = reference);
            envelope(ctx, origin, event_id, next, trace, now, ctx.topics.deposited(), &event)?
        }
        _ => return Ok(None),
    };
    Ok(Some(message))
}

// After `stage_event!`, which the step modules use.
mod complete;
mod money;
pub mod resolve;
mod review;
mod validate;

use complete::complete;
pub use complete::complete_batch;
pub(crate) use money::Answered;
use money::{deposit, withdraw};
pub use money::{deposit_batch, deposit_step, pending_retry_ms, settle_step, withdraw_batch, withdrawal_step, Ask};
pub use review::hold_for_review;
use review::refused;
use validate::validate;
pub use validate::{record_api_request, validate_batch};
