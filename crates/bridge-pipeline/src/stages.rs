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
//! event does to the books (`TransferEvent::effect`, applied by
//! `bridge_store::books::apply`, which also fixes the order rows are locked
//! in). The validator records new transfers instead of advancing them, and
//! applies the same effects through the same store function.

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
use crate::context::{message_span, StageContext, StageName};
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
    ctx: &StageContext,
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
    ctx: &StageContext,
    consumer: &str,
    message: &Inbound,
    class: &'static str,
    reason: &str,
) -> Result<Outcome, StageError> {
    let mut tx = ctx.pool.begin().await?;
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
async fn commit(ctx: &StageContext, tx: sqlx::Transaction<'_, sqlx::Postgres>) -> Result<(), StageError> {
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

/// Validator: decides the request and, if it may proceed, holds the
/// investor's funds and reserves the fund allocation in the same transaction
/// that records the transfer.
async fn validate(ctx: &StageContext, message: &Inbound) -> Result<Outcome, StageError> {
    let mut candidate = requested_transfer(message)?;
    let transfer_id = candidate.id;
    let trace = TraceContext::continue_or_start(message.header("traceparent"));

    let mut tx = ctx.pool.begin().await?;
    // A transfer created through the HTTP API is already recorded, in state
    // requested, with its status event; it is validated like any other.
    let recorded = match transfers::get(&mut tx, transfer_id).await? {
        Some(existing) if !existing.same_request_as(&candidate) => {
            return Err(permanent(
                "conflicting_duplicate",
                format!("transfer {transfer_id} already exists with a different request; the first request stands"),
            ));
        }
        Some(existing) if existing.state == TransferState::Requested => Some(existing),
        Some(_) => return Ok(Outcome::Duplicate),
        None => None,
    };

    let investor = accounts::investor(&mut tx, &candidate.investor_account_id).await?;
    let fund = accounts::fund_by_account(&mut tx, &candidate.fund_account_id).await?;
    let allocation = match (&investor, &fund) {
        (Some(_), Some(fund)) => accounts::allocation(&mut tx, &fund.fund_id, &candidate.investor_account_id).await?,
        _ => None,
    };
    let decision = check_request(&RequestFacts {
        amount_minor: candidate.amount_minor,
        currency: &candidate.currency,
        investor: investor.map(|row| row.value),
        fund: fund.as_ref().map(|view| view.fund.value),
        investor_holds_seat: allocation.is_some_and(|row| row.value.holds_seat()),
    });
    candidate.fund_id = fund.as_ref().map(|view| view.fund_id.clone());

    let (requested, newly_recorded) = match recorded {
        Some(existing) => {
            if existing.fund_id != candidate.fund_id {
                transfers::set_fund(&mut tx, transfer_id, candidate.fund_id.as_deref()).await?;
            }
            (Transfer { fund_id: candidate.fund_id.clone(), ..existing }, false)
        }
        None => (transfers::insert_requested(&mut tx, &candidate).await?, true),
    };
    let event = match decision {
        Ok(()) => TransferEvent::Validated,
        Err(reason) => TransferEvent::Rejected(reason),
    };
    let next = transfers::advance(&mut tx, &requested, &event).await?;
    let messages = validation_messages(ctx, &requested, newly_recorded, &next, &trace)?;
    outbox::enqueue(&mut tx, &messages).await?;
    // The hold and the reservation, guarded by the balance and the fund's
    // limits as they are now: books that changed since the read above are a
    // lost race, and the request is decided again.
    books::apply(&mut tx, &[(&requested, event.effect(requested.amount_minor))]).await?;
    crate::failpoint::hit("stage.inside_tx");
    commit(ctx, tx).await?;
    Ok(Outcome::Applied)
}

/// The transfer a request asks for, in state `requested` at version 1.
fn requested_transfer(message: &Inbound) -> Result<Transfer, StageError> {
    let request: TransferRequested = decode_payload(message)?;
    let requested_at = DateTime::from_timestamp_millis(request.requested_at).ok_or_else(|| {
        permanent("invalid_request", format!("requested_at {} is out of range", request.requested_at))
    })?;
    Ok(Transfer {
        id: parse_transfer_id(&request.transfer_id)?,
        investor_account_id: request.investor_account_id,
        fund_account_id: request.fund_account_id,
        fund_id: None,
        amount_minor: request.amount_minor,
        currency: request.currency,
        reference: request.reference,
        source_system: request.source_system,
        requested_at,
        state: TransferState::Requested,
        reason_code: None,
        version: 1,
        traceparent: message.header("traceparent").map(str::to_owned),
    })
}

/// What a validation emits, in this order: the status event of the new
/// transfer (unless it was recorded before, by the API), the validated
/// event if it was accepted, and the status event of the decision.
fn validation_messages(
    ctx: &StageContext,
    requested: &Transfer,
    newly_recorded: bool,
    decided: &Transfer,
    trace: &TraceContext,
) -> Result<Vec<OutboxMessage>, StageError> {
    let origin = StageName::Validator.as_str();
    let mut messages = Vec::with_capacity(3);
    if newly_recorded {
        messages.push(status_message(ctx, origin, requested, None, trace)?);
    }
    if decided.state == TransferState::Validated {
        let event_id = ids::stage_event_id(decided.id, "validated");
        let now = Utc::now();
        let event = stage_event!(TransferValidated, decided, event_id, now);
        messages.push(envelope(ctx, origin, event_id, decided, trace, now, ctx.topics.validated(), &event)?);
    }
    messages.push(status_message(ctx, origin, decided, Some(requested.state), trace)?);
    Ok(messages)
}

/// The validator for several requests of one partition in one transaction,
/// set-based: one read each of the transfers, the investors, the funds and
/// the seats; the requests are then decided one after another in the
/// partition's order, each against the books the ones before it left
/// (`RunningBooks`), so the batch decides exactly as one message at a time
/// would; then one insert of the transfers with their history, the holds
/// (investors locked in key order, each hold guarded by the available
/// balance), one outbox insert, and the allocations and funds (locked in
/// key order, each fund's update guarded by its limits), whatever the
/// number of requests. Rows are locked only for the transaction's tail,
/// and a guard that finds the books changed since they were read refuses
/// the batch.
///
/// Like `complete_batch`, only the fast path for the usual case, and for
/// the messages before the first that does not decode, is not a valid
/// request or names a transfer a message before it named: the decisions
/// depend on the order, so the batch stops there and that message and those
/// after it go one by one. The batch as a whole is not applied (the
/// transaction is rolled back and `handle` decides each message with its
/// full error policy) if a transfer was recorded before (a repeat, or one
/// created through the API), a fund filled up since it was read, or on any
/// error.
pub async fn validate_batch(ctx: &StageContext, messages: &[Inbound]) -> Vec<bool> {
    let mut requests = Vec::with_capacity(messages.len());
    let mut seen = std::collections::HashSet::with_capacity(messages.len());
    for message in messages {
        let Ok(requested) = requested_transfer(message) else { break };
        if !seen.insert(requested.id) {
            break;
        }
        requests.push((message.clone(), requested));
    }
    if requests.is_empty() {
        return vec![false; messages.len()];
    }
    let transfer_of = |(_, requested): &(Inbound, Transfer)| requested.id;
    let mut applied = shared(&ctx.groups.validator, requests, transfer_of, |requests| async move {
        try_validate_batch(ctx, &requests).await
    })
    .await;
    // The messages after the batch go one by one.
    applied.resize(messages.len(), false);
    applied
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

async fn try_validate_batch(ctx: &StageContext, requests: &[(Inbound, Transfer)]) -> Result<bool, StageError> {
    let stage = StageName::Validator.as_str();
    let mut tx = ctx.pool.begin().await?;
    let ids: Vec<Uuid> = requests.iter().map(|(_, requested)| requested.id).collect();
    if !transfers::get_many(&mut tx, &ids).await?.is_empty() {
        return Ok(false);
    }
    let investor_ids: Vec<&str> =
        requests.iter().map(|(_, requested)| requested.investor_account_id.as_str()).collect();
    let investors = accounts::investors_by_id(&mut tx, &investor_ids).await?;
    let account_ids: Vec<&str> = requests.iter().map(|(_, requested)| requested.fund_account_id.as_str()).collect();
    let funds = accounts::funds_by_accounts(&mut tx, &account_ids).await?;
    let pairs: Vec<(&str, &str)> = requests
        .iter()
        .filter_map(|(_, requested)| {
            let fund = funds.get(&requested.fund_account_id)?;
            Some((fund.fund_id.as_str(), requested.investor_account_id.as_str()))
        })
        .collect();
    let seats = accounts::seats_held(&mut tx, &pairs).await?;

    let mut books = bridge_domain::RunningBooks::new(investors, seats);
    let mut decided = Vec::with_capacity(requests.len());
    for (_, requested) in requests {
        let fund = funds.get(&requested.fund_account_id);
        let decision = books.decide(
            &requested.investor_account_id,
            fund.map(|view| (view.fund_id.as_str(), view.fund.value)),
            requested.amount_minor,
            &requested.currency,
        );
        let event = match decision {
            Ok(()) => TransferEvent::Validated,
            Err(reason) => TransferEvent::Rejected(reason),
        };
        decided.push((Transfer { fund_id: fund.map(|view| view.fund_id.clone()), ..requested.clone() }, event));
    }
    let next = transfers::insert_decided(&mut tx, &decided).await?;
    let mut messages = Vec::with_capacity(3 * requests.len());
    for (((message, _), (requested, _)), after) in requests.iter().zip(&decided).zip(&next) {
        // Each transfer's events under the span of the message that
        // caused them, so its trace stays one tree.
        let span = message_span(stage, message);
        let trace = span.in_scope(|| TraceContext::continue_or_start(message.header("traceparent")));
        messages.extend(validation_messages(ctx, requested, true, after, &trace)?);
    }
    outbox::enqueue(&mut tx, &messages).await?;
    let changes: Vec<_> =
        decided.iter().map(|(requested, event)| (requested, event.effect(requested.amount_minor))).collect();
    books::apply(&mut tx, &changes).await?;
    crate::failpoint::hit("stage.inside_tx");
    commit(ctx, tx).await?;
    Ok(true)
}

/// Records a transfer requested through the HTTP API, in the caller's
/// transaction: the transfer in state `requested` (version 1), its status
/// event, and the request event the validator consumes, as an upstream
/// system would have published it. The validator then finds the transfer
/// recorded and validates it.
pub async fn record_api_request(
    ctx: &StageContext,
    conn: &mut PgConnection,
    request: &TransferRequested,
    traceparent: Option<&str>,
) -> Result<Transfer, StageError> {
    const ORIGIN: &str = "api";
    let transfer_id = parse_transfer_id(&request.transfer_id)?;
    let requested_at = DateTime::from_timestamp_millis(request.requested_at)
        .ok_or_else(|| permanent("invalid_request", "requested_at is out of range"))?;
    let trace = TraceContext::continue_or_start(traceparent);
    let fund_id = accounts::fund_by_account(&mut *conn, &request.fund_account_id).await?.map(|view| view.fund_id);
    let candidate = Transfer {
        id: transfer_id,
        investor_account_id: request.investor_account_id.clone(),
        fund_account_id: request.fund_account_id.clone(),
        fund_id,
        amount_minor: request.amount_minor,
        currency: request.currency.clone(),
        reference: request.reference.clone(),
        source_system: request.source_system.clone(),
        requested_at,
        state: TransferState::Requested,
        reason_code: None,
        version: 1,
        traceparent: Some(trace.child_traceparent()),
    };
    let requested = transfers::insert_requested(&mut *conn, &candidate).await?;
    let now = Utc::now();
    let event_id = ids::stage_event_id(transfer_id, "requested");
    let messages = [
        status_message(ctx, ORIGIN, &requested, None, &trace)?,
        envelope(ctx, ORIGIN, event_id, &requested, &trace, now, ctx.topics.requested(), request)?,
    ];
    outbox::enqueue(conn, &messages).await?;
    Ok(requested)
}

/// Loads the transfer an outcome event refers to, outside any transaction,
/// and says whether the step still has to be done. The transfer's state is
/// the whole answer: the inbox row of an applied step is written in the same
/// transaction that moves the state on, so a message already in the inbox
/// always finds the state past `expected` (and a look at the inbox would be
/// one more round trip for nothing). The step's transaction still records
/// the inbox row and checks the state again under the row lock.
async fn pending_step(
    ctx: &StageContext,
    transfer_id: Uuid,
    expected: TransferState,
) -> Result<Option<Transfer>, StageError> {
    let mut conn = ctx.pool.acquire().await?;
    let transfer = transfers::get(&mut conn, transfer_id)
        .await?
        .ok_or_else(|| permanent("unknown_transfer", format!("transfer {transfer_id} does not exist")))?;
    Ok((transfer.state == expected).then_some(transfer))
}

/// Opens the step's transaction: records the event in the inbox and re-reads
/// the transfer. `None` means another consumer applied the step meanwhile.
async fn begin_step(
    conn: &mut PgConnection,
    stage: StageName,
    event_id: Option<&str>,
    transfer_id: Uuid,
    expected: TransferState,
) -> Result<Option<Transfer>, StageError> {
    // The settlement runner has no event to record; the state check below
    // (and the version check when advancing) keep it to one application.
    if let Some(event_id) = event_id {
        if !inbox::record(&mut *conn, stage.as_str(), event_id).await? {
            return Ok(None);
        }
    }
    let transfer = transfers::get_for_update(conn, transfer_id).await?;
    Ok(transfer.filter(|transfer| transfer.state == expected))
}

fn movement(transfer: &Transfer, step: Step, account_id: &str) -> Result<MoneyMovement, StageError> {
    Ok(MoneyMovement {
        idempotency_key: ids::idempotency_key(transfer.id, step),
        transfer_id: transfer.id,
        account_id: account_id.to_owned(),
        amount: money_of(transfer)?,
    })
}

/// Withdrawal: the investor's bank debits the investor. On success the held
/// funds become a debit of the balance; on a decline the hold and the
/// reservation are released and the transfer fails.
async fn withdraw(ctx: &StageContext, message: &Inbound) -> Result<Outcome, StageError> {
    let event: TransferValidated = decode_payload(message)?;
    let transfer_id = parse_transfer_id(&event.transfer_id)?;
    let trace = TraceContext::continue_or_start(message.header("traceparent"));
    withdrawal_step(ctx, transfer_id, Some(&event.event_id), &trace, Ask::Perform).await
}

/// One transfer's part in a step's transaction.
struct Advance<'a> {
    /// The transfer as locked in this transaction, waiting for the step.
    before: &'a Transfer,
    /// The trace of the message (or callback, or runner) that asked.
    trace: TraceContext,
    /// The service's reference for a settled movement.
    reference: String,
}

/// Ends a step's transaction, for one transfer or a batch moved on by the
/// same event: their new versions (version-checked), each transfer's
/// outcome event if the event has one and its status event through the
/// outbox, what the event does to the books, then commit.
async fn finish_step(
    ctx: &StageContext,
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    stage: StageName,
    event: &TransferEvent,
    steps: &[Advance<'_>],
) -> Result<(), StageError> {
    let before: Vec<Transfer> = steps.iter().map(|step| step.before.clone()).collect();
    let next = transfers::advance_many(&mut tx, &before, event).await?;
    let mut messages = Vec::with_capacity(2 * next.len());
    for (step, after) in steps.iter().zip(&next) {
        if let Some(outcome) = outcome_message(ctx, stage, event, after, &step.reference, &step.trace)? {
            messages.push(outcome);
        }
        messages.push(status_message(ctx, stage.as_str(), after, Some(step.before.state), &step.trace)?);
    }
    outbox::enqueue(&mut tx, &messages).await?;
    let changes: Vec<_> = before.iter().map(|transfer| (transfer, event.effect(transfer.amount_minor))).collect();
    books::apply(&mut tx, &changes).await?;
    crate::failpoint::hit("stage.inside_tx");
    commit(ctx, tx).await
}

/// The event a settled money step emits for the next stage, if `event` is
/// one.
fn outcome_message(
    ctx: &StageContext,
    stage: StageName,
    event: &TransferEvent,
    next: &Transfer,
    reference: &str,
    trace: &TraceContext,
) -> Result<Option<OutboxMessage>, StageError> {
    let now = Utc::now();
    let origin = stage.as_str();
    let reference = reference.to_owned();
    let message = match event {
        TransferEvent::Withdrawn => {
            let event_id = ids::stage_event_id(next.id, "withdrawn");
            let event = stage_event!(FundsWithdrawn, next, event_id, now, external_reference = reference);
            envelope(ctx, origin, event_id, next, trace, now, ctx.topics.withdrawn(), &event)?
        }
        TransferEvent::Deposited => {
            let event_id = ids::stage_event_id(next.id, "deposited");
            let event = stage_event!(FundsDeposited, next, event_id, now, external_reference = reference);
            envelope(ctx, origin, event_id, next, trace, now, ctx.topics.deposited(), &event)?
        }
        _ => return Ok(None),
    };
    Ok(Some(message))
}

/// Records a step its service holds as pending, for the settlement runner,
/// and lets the partition move on. Not a result: a redelivered event asks
/// the service again, which is harmless. Checked under the transfer's row
/// lock, so a late "pending" cannot bring back a step another process has
/// just applied.
async fn defer(
    ctx: &StageContext,
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    transfer_id: Uuid,
    step: Step,
) -> Result<Outcome, StageError> {
    match transfers::get_for_update(&mut tx, transfer_id).await? {
        Some(current) if current.state == step.waits_in() => {}
        _ => return Ok(Outcome::Duplicate),
    }
    pending::record(&mut tx, transfer_id, step.as_str(), pending_retry_ms(0), ctx.config.pending_deadline_ms).await?;
    tx.commit().await?;
    Ok(Outcome::Deferred)
}

/// How long to wait before asking a service about a pending step again.
pub fn pending_retry_ms(attempts: i32) -> u64 {
    let ceiling = (500u64 << attempts.clamp(0, 10)).min(30_000);
    rand::rng().random_range(ceiling / 2..=ceiling)
}

/// What a step asks of its service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask<'a> {
    /// Carry the step out (or learn how it went, asking again by key).
    Perform,
    /// Cancel it unless it has settled. If the cancellation wins, the step
    /// is failed and compensated as a decline with `reason` as its code; if
    /// the service settled first, the step applies as usual.
    Cancel { reason: &'a str },
}

/// A cancellation reads as a decline with the caller's reason.
fn cancelled_as(outcome: ServiceOutcome, reason: &str) -> ServiceOutcome {
    match outcome {
        ServiceOutcome::Declined { code } if code == CANCELLED => ServiceOutcome::Declined { code: reason.to_owned() },
        other => other,
    }
}

/// Carries a step of a transfer on without the message that asked for it:
/// for the settlement runner and settlement callbacks. A refund is the
/// deposit step's compensation, so news of it settles the deposit step.
pub async fn settle_step(
    ctx: &StageContext,
    transfer_id: Uuid,
    step: Step,
    trace: &TraceContext,
    ask: Ask<'_>,
) -> Result<Outcome, StageError> {
    match step {
        Step::Withdrawal => withdrawal_step(ctx, transfer_id, None, trace, ask).await,
        Step::Deposit | Step::Refund => deposit_step(ctx, transfer_id, None, trace, ask).await,
    }
}

/// The withdrawal step for one transfer: from the stage (with the event that
/// asked for it), from the settlement runner or a settlement callback
/// (without).
pub async fn withdrawal_step(
    ctx: &StageContext,
    transfer_id: Uuid,
    event_id: Option<&str>,
    trace: &TraceContext,
    ask: Ask<'_>,
) -> Result<Outcome, StageError> {
    let stage = StageName::Withdrawal;
    let Some(transfer) = pending_step(ctx, transfer_id, TransferState::Validated).await? else {
        return Ok(Outcome::Duplicate);
    };
    let movement = MoneyStep::Withdrawal.movement(&transfer)?;
    let outcome = match ask {
        Ask::Perform => ctx.services.investor.withdraw(&movement).await?,
        Ask::Cancel { reason } => cancelled_as(ctx.services.investor.cancel_withdrawal(&movement).await?, reason),
    };

    let mut tx = ctx.pool.begin().await?;
    if outcome == ServiceOutcome::Pending {
        return defer(ctx, tx, transfer_id, Step::Withdrawal).await;
    }
    let Some(current) = begin_step(&mut tx, stage, event_id, transfer_id, TransferState::Validated).await? else {
        return Ok(Outcome::Duplicate);
    };
    pending::finish(&mut tx, transfer_id, Step::Withdrawal.as_str()).await?;
    let (event, reference) = match outcome {
        ServiceOutcome::Settled { reference } => (TransferEvent::Withdrawn, reference),
        ServiceOutcome::Declined { code } => (TransferEvent::WithdrawalFailed(FailureReason(code)), String::new()),
        ServiceOutcome::Pending => unreachable!("pending handled above"),
    };
    let step = Advance { before: &current, trace: trace.clone(), reference };
    finish_step(ctx, tx, stage, &event, &[step]).await?;
    Ok(Outcome::Applied)
}

/// Deposit: the fund administrator credits the fund account. On a decline the
/// investor is refunded (at the bank, then in our books) and the reservation
/// released: the transfer is reversed.
async fn deposit(ctx: &StageContext, message: &Inbound) -> Result<Outcome, StageError> {
    let event: FundsWithdrawn = decode_payload(message)?;
    let transfer_id = parse_transfer_id(&event.transfer_id)?;
    let trace = TraceContext::continue_or_start(message.header("traceparent"));
    deposit_step(ctx, transfer_id, Some(&event.event_id), &trace, Ask::Perform).await
}

/// The deposit step (with its compensation) for one transfer.
pub async fn deposit_step(
    ctx: &StageContext,
    transfer_id: Uuid,
    event_id: Option<&str>,
    trace: &TraceContext,
    ask: Ask<'_>,
) -> Result<Outcome, StageError> {
    let stage = StageName::Deposit;
    let Some(transfer) = pending_step(ctx, transfer_id, TransferState::Withdrawn).await? else {
        return Ok(Outcome::Duplicate);
    };
    let remit = MoneyStep::Deposit.movement(&transfer)?;
    let remitted = match ask {
        Ask::Perform => ctx.services.fund.remit(&remit).await?,
        Ask::Cancel { reason } => cancelled_as(ctx.services.fund.cancel_remittance(&remit).await?, reason),
    };
    let outcome = match remitted {
        ServiceOutcome::Pending => DepositOutcome::Pending,
        ServiceOutcome::Declined { code } => {
            let refund = movement(&transfer, Step::Refund, &transfer.investor_account_id)?;
            match ctx.services.investor.refund(&refund).await {
                // The refund itself is under way; the runner asks again and
                // finds the deposit's decline stored under its own key.
                Ok(ServiceOutcome::Pending) => DepositOutcome::Pending,
                Ok(ServiceOutcome::Settled { .. }) => DepositOutcome::Reversed { code },
                Ok(ServiceOutcome::Declined { code: refund_code }) => {
                    DepositOutcome::NeedsPerson { code: format!("DEPOSIT_{code}_REFUND_{refund_code}") }
                }
                // The refund was refused outright: still a person's job, and
                // the transfer must say so rather than vanish into a
                // dead-letter topic with money in transit.
                Err(error) if !error.is_retryable() => {
                    DepositOutcome::NeedsPerson { code: format!("DEPOSIT_{code}_REFUND_REFUSED") }
                }
                Err(error) => return Err(error.into()),
            }
        }
        ServiceOutcome::Settled { reference } => DepositOutcome::Deposited { reference },
    };
    let mut tx = ctx.pool.begin().await?;
    if matches!(outcome, DepositOutcome::Pending) {
        return defer(ctx, tx, transfer_id, Step::Deposit).await;
    }
    let Some(current) = begin_step(&mut tx, stage, event_id, transfer_id, TransferState::Withdrawn).await? else {
        return Ok(Outcome::Duplicate);
    };
    pending::finish(&mut tx, transfer_id, Step::Deposit.as_str()).await?;
    let (event, reference) = match outcome {
        DepositOutcome::Deposited { reference } => (TransferEvent::Deposited, reference),
        DepositOutcome::NeedsPerson { code } => {
            // Money is at neither end we can reach. The transfer stops in
            // manual review with the money in transit and the reservation
            // kept, and says so on the status topic; an operator resolves it.
            tracing::error!(transfer_id = %transfer_id, reason = %code, "Deposit and refund both declined; transfer needs manual review");
            (TransferEvent::CompensationFailed(FailureReason(code)), String::new())
        }
        // The investor was refunded at the bank: back in our books too.
        DepositOutcome::Reversed { code } => (TransferEvent::DepositFailed(FailureReason(code)), String::new()),
        DepositOutcome::Pending => unreachable!("pending handled above"),
    };
    let step = Advance { before: &current, trace: trace.clone(), reference };
    finish_step(ctx, tx, stage, &event, &[step]).await?;
    Ok(Outcome::Applied)
}

/// A money stage's step: what the one-message and batch paths share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MoneyStep {
    Withdrawal,
    Deposit,
}

impl MoneyStep {
    fn stage(self) -> StageName {
        match self {
            Self::Withdrawal => StageName::Withdrawal,
            Self::Deposit => StageName::Deposit,
        }
    }

    fn step(self) -> Step {
        match self {
            Self::Withdrawal => Step::Withdrawal,
            Self::Deposit => Step::Deposit,
        }
    }

    /// The state a transfer waits in for this step.
    fn expected(self) -> TransferState {
        match self {
            Self::Withdrawal => TransferState::Validated,
            Self::Deposit => TransferState::Withdrawn,
        }
    }

    fn applied(self) -> TransferEvent {
        match self {
            Self::Withdrawal => TransferEvent::Withdrawn,
            Self::Deposit => TransferEvent::Deposited,
        }
    }

    /// The event that asked for the step: its id and its transfer's.
    fn decode(self, message: &Inbound) -> Result<(String, Uuid), StageError> {
        let (event_id, transfer_id) = match self {
            Self::Withdrawal => {
                let event: TransferValidated = decode_payload(message)?;
                (event.event_id, event.transfer_id)
            }
            Self::Deposit => {
                let event: FundsWithdrawn = decode_payload(message)?;
                (event.event_id, event.transfer_id)
            }
        };
        Ok((event_id, parse_transfer_id(&transfer_id)?))
    }

    fn movement(self, transfer: &Transfer) -> Result<MoneyMovement, StageError> {
        match self {
            Self::Withdrawal => movement(transfer, self.step(), &transfer.investor_account_id),
            Self::Deposit => movement(transfer, self.step(), &transfer.fund_account_id),
        }
    }

    async fn perform(self, ctx: &StageContext, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        match self {
            Self::Withdrawal => ctx.services.investor.withdraw(movement).await,
            Self::Deposit => ctx.services.fund.remit(movement).await,
        }
    }
}

/// Service calls one lane's batch has in flight at once. Bounded, so a
/// partition's backlog cannot flood a bank; with the default six partitions
/// a process asks a service at most 48 things at a time.
const SERVICE_CALLS_IN_FLIGHT: usize = 8;

/// Withdrawal for several queued messages of one partition. See
/// [`money_batch`].
pub async fn withdraw_batch(ctx: &StageContext, messages: &[Inbound]) -> Vec<bool> {
    money_batch(ctx, MoneyStep::Withdrawal, messages).await
}

/// Deposit for several queued messages of one partition. See
/// [`money_batch`].
pub async fn deposit_batch(ctx: &StageContext, messages: &[Inbound]) -> Vec<bool> {
    money_batch(ctx, MoneyStep::Deposit, messages).await
}

/// A money stage's step for several messages of one partition: the
/// service is asked about all of them concurrently (a lane would otherwise
/// wait out each call in turn), and the steps it settled are applied in one
/// set-based transaction (`apply_money_batch`), which may hold other
/// partitions' settled steps too (see `group_commit`). The calls stay the
/// lane's own, so a slow service holds only the partitions it is slow for.
///
/// Only settled steps take this path; the answer says which messages were
/// applied. The others go one by one with the full policy: a message that
/// does not decode, a second message for a transfer, a transfer unknown or
/// not waiting for this step, a step the service declined, holds as pending
/// or failed to answer, and every message if the transaction fails. Steps of
/// different transfers do not depend on each other, so those may come after
/// the batch that passed them in the partition; a transfer's own messages
/// stay in order, as only its first in the batch can take the batch. A step
/// asked about here and then taken one by one asks the service again under
/// the same idempotency key, which answers as it did the first time. So a
/// bad message neither takes its neighbours down nor applies twice, and no
/// money moves twice.
async fn money_batch(ctx: &StageContext, step: MoneyStep, messages: &[Inbound]) -> Vec<bool> {
    let mut batch = Vec::with_capacity(messages.len());
    let mut seen = std::collections::HashSet::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let Ok((event_id, transfer_id)) = step.decode(message) else { continue };
        if seen.insert(transfer_id) {
            batch.push(MoneyBatchItem { index, message, event_id, transfer_id });
        }
    }
    let mut applied = vec![false; messages.len()];
    let settled = match settle_money_batch(ctx, step, &batch).await {
        Ok(settled) => settled,
        Err(error) => {
            tracing::debug!(error = %error, size = batch.len(), "Batch not applied; taking its messages one by one");
            return applied;
        }
    };
    if settled.is_empty() {
        return applied;
    }
    let indexes: Vec<usize> = settled.iter().map(|(index, _)| *index).collect();
    let steps = settled.into_iter().map(|(_, step)| step).collect();
    // The calls were this lane's own; the transaction may take other
    // partitions' settled steps too (see `group_commit`).
    let group = match step {
        MoneyStep::Withdrawal => &ctx.groups.withdrawal,
        MoneyStep::Deposit => &ctx.groups.deposit,
    };
    let transfer_of = |settled: &SettledStep| settled.transfer_id;
    let done =
        shared(group, steps, transfer_of, |steps| async move { apply_money_batch(ctx, step, &steps).await }).await;
    for (index, done) in indexes.into_iter().zip(done) {
        applied[index] = done;
    }
    applied
}

struct MoneyBatchItem<'a> {
    /// Where the message stands in the lane's queue.
    index: usize,
    message: &'a Inbound,
    event_id: String,
    transfer_id: Uuid,
}

/// Asks the service about the batch's steps, concurrently, and answers the
/// ones it settled, each with its message's index in the lane's queue.
async fn settle_money_batch(
    ctx: &StageContext,
    step: MoneyStep,
    batch: &[MoneyBatchItem<'_>],
) -> Result<Vec<(usize, SettledStep)>, StageError> {
    use futures::StreamExt;

    let ids: Vec<Uuid> = batch.iter().map(|item| item.transfer_id).collect();
    // Read outside any transaction, as `pending_step` does: no row is held
    // while the services are asked. A transfer not waiting for this step (a
    // repeat, or one the settlement runner moved on) is left out here.
    let waiting: Vec<Transfer> = {
        let mut conn = ctx.pool.acquire().await?;
        transfers::get_many(&mut conn, &ids).await?
    }
    .into_iter()
    .filter(|transfer| transfer.state == step.expected())
    .collect();
    if waiting.is_empty() {
        return Ok(Vec::new());
    }
    let movements = waiting.iter().map(|transfer| step.movement(transfer)).collect::<Result<Vec<_>, _>>()?;
    // The calls are made up front (a future does nothing until polled) so
    // the stream holds no closure, which would keep the batch's future from
    // being `Send` for every lifetime.
    let calls: Vec<_> = movements.iter().map(|movement| step.perform(ctx, movement)).collect();
    let outcomes: Vec<_> = futures::stream::iter(calls).buffered(SERVICE_CALLS_IN_FLIGHT).collect().await;
    let mut settled = std::collections::HashMap::with_capacity(batch.len());
    for (transfer, outcome) in waiting.iter().zip(outcomes) {
        if let Ok(ServiceOutcome::Settled { reference }) = outcome {
            settled.insert(transfer.id, reference);
        }
    }
    Ok(batch
        .iter()
        .filter_map(|item| {
            let reference = settled.remove(&item.transfer_id)?;
            let step = SettledStep {
                message: item.message.clone(),
                event_id: item.event_id.clone(),
                transfer_id: item.transfer_id,
                reference,
            };
            Some((item.index, step))
        })
        .collect())
}

/// Applies settled steps in one transaction, set-based, all of them or none:
/// one inbox insert, one locking read, one update of the transfers with their
/// history, one ledger insert, one update of the accounts, one outbox insert,
/// one commit.
async fn apply_money_batch(ctx: &StageContext, step: MoneyStep, settled: &[SettledStep]) -> Result<bool, StageError> {
    let stage = step.stage();
    let mut tx = ctx.pool.begin().await?;
    let event_ids: Vec<String> = settled.iter().map(|step| step.event_id.clone()).collect();
    // Something else applied one of them since the read before the calls
    // (another process after a rebalance, or the settlement runner): the
    // batch is rolled back whole, and each message finds its own answer one
    // by one.
    if inbox::record_many(&mut tx, stage.as_str(), &event_ids).await? != settled.len() as u64 {
        return Ok(false);
    }
    let settled_ids: Vec<Uuid> = settled.iter().map(|step| step.transfer_id).collect();
    let current = transfers::get_many_for_update(&mut tx, &settled_ids).await?;
    if current.len() != settled.len() || current.iter().any(|transfer| transfer.state != step.expected()) {
        return Ok(false);
    }
    pending::finish_many(&mut tx, &settled_ids, step.step().as_str()).await?;
    let by_transfer: std::collections::HashMap<Uuid, &SettledStep> =
        settled.iter().map(|settled| (settled.transfer_id, settled)).collect();
    let steps: Vec<Advance<'_>> = current
        .iter()
        .map(|before| {
            // Each event under the span of the message that caused it, so a
            // transfer's trace stays one tree.
            let settled = by_transfer[&before.id];
            let message = &settled.message;
            let span = message_span(stage.as_str(), message);
            let trace = span.in_scope(|| TraceContext::continue_or_start(message.header("traceparent")));
            Advance { before, trace, reference: settled.reference.clone() }
        })
        .collect();
    finish_step(ctx, tx, stage, &step.applied(), &steps).await?;
    Ok(true)
}

/// Hands a step that stayed pending past its deadline to a person: the
/// transfer moves to `manual_review` with `reason`, frozen where it stood
/// (funds held, or money in transit, and the reservation kept), and the
/// step is no longer asked about.
pub async fn hold_for_review(
    ctx: &StageContext,
    transfer_id: Uuid,
    step: Step,
    reason: &str,
    trace: &TraceContext,
) -> Result<Outcome, StageError> {
    let (stage, expected) = match step {
        Step::Withdrawal => (StageName::Withdrawal, step.waits_in()),
        Step::Deposit | Step::Refund => (StageName::Deposit, step.waits_in()),
    };
    let mut tx = ctx.pool.begin().await?;
    let Some(current) = transfers::get_for_update(&mut tx, transfer_id).await?.filter(|t| t.state == expected) else {
        return Ok(Outcome::Duplicate);
    };
    pending::finish(&mut tx, transfer_id, step.as_str()).await?;
    tracing::error!(transfer_id = %transfer_id, step = step.as_str(), reason, "Step still pending past its deadline; transfer needs manual review");
    let event = TransferEvent::StepOverdue(FailureReason(reason.to_owned()));
    finish_step(
        ctx,
        tx,
        stage,
        &event,
        &[Advance { before: &current, trace: trace.clone(), reference: String::new() }],
    )
    .await?;
    Ok(Outcome::Applied)
}

/// What the outside services said about a deposit.
enum DepositOutcome {
    /// The deposit, or the refund after a declined deposit, is pending.
    Pending,
    Deposited {
        reference: String,
    },
    /// Deposit declined, investor refunded.
    Reversed {
        code: String,
    },
    /// Deposit declined and the refund declined too.
    NeedsPerson {
        code: String,
    },
}

/// Completion: the reserved allocation becomes a completed one.
async fn complete(ctx: &StageContext, message: &Inbound) -> Result<Outcome, StageError> {
    let event: FundsDeposited = decode_payload(message)?;
    let transfer_id = parse_transfer_id(&event.transfer_id)?;
    let stage = StageName::Completion;
    let trace = TraceContext::continue_or_start(message.header("traceparent"));
    let mut tx = ctx.pool.begin().await?;
    let Some(current) =
        begin_step(&mut tx, stage, Some(&event.event_id), transfer_id, TransferState::Deposited).await?
    else {
        if transfers::get(&mut tx, transfer_id).await?.is_none() {
            return Err(permanent("unknown_transfer", format!("transfer {transfer_id} does not exist")));
        }
        return Ok(Outcome::Duplicate);
    };
    finish_step(
        ctx,
        tx,
        stage,
        &TransferEvent::Completed,
        &[Advance { before: &current, trace, reference: String::new() }],
    )
    .await?;
    Ok(Outcome::Applied)
}

/// Completion for several messages of one partition in one transaction,
/// set-based: one inbox insert, one locking read, one update of the
/// transfers with their history, one pass over allocations and funds, one
/// outbox insert, one commit, whatever the number of messages.
///
/// This is only the fast path for the usual case, taken by the messages
/// before the first that does not decode or names a transfer a message
/// before it named; that one and those after it go one by one. The batch
/// is not applied at all if a message was applied before, a transfer is not
/// (or no longer) deposited, or on any error: the transaction is then
/// rolled back whole, and `handle` decides each message with its full error
/// policy, so a bad message neither takes its neighbours down nor applies
/// twice.
pub async fn complete_batch(ctx: &StageContext, messages: &[Inbound]) -> Vec<bool> {
    let mut batch = Vec::with_capacity(messages.len());
    let mut seen = std::collections::HashSet::with_capacity(messages.len());
    for message in messages {
        let Ok(event) = decode_payload::<FundsDeposited>(message) else { break };
        let Ok(transfer_id) = parse_transfer_id(&event.transfer_id) else { break };
        if !seen.insert(transfer_id) {
            break;
        }
        batch.push((transfer_id, message.clone(), event));
    }
    if batch.is_empty() {
        return vec![false; messages.len()];
    }
    let transfer_of = |(transfer_id, _, _): &(Uuid, Inbound, FundsDeposited)| *transfer_id;
    let mut applied = shared(&ctx.groups.completion, batch, transfer_of, |batch| async move {
        let by_transfer: CompletionBatch<'_> =
            batch.iter().map(|(transfer_id, message, event)| (*transfer_id, (message, event))).collect();
        try_complete_batch(ctx, &by_transfer).await
    })
    .await;
    // The messages after the batch go one by one.
    applied.resize(messages.len(), false);
    applied
}

/// The messages of a batch by transfer (one each).
type CompletionBatch<'a> = std::collections::HashMap<Uuid, (&'a Inbound, &'a FundsDeposited)>;

async fn try_complete_batch(ctx: &StageContext, batch: &CompletionBatch<'_>) -> Result<bool, StageError> {
    let stage = StageName::Completion;
    let mut tx = ctx.pool.begin().await?;
    let event_ids: Vec<String> = batch.values().map(|(_, event)| event.event_id.clone()).collect();
    if inbox::record_many(&mut tx, stage.as_str(), &event_ids).await? != batch.len() as u64 {
        return Ok(false);
    }
    let ids: Vec<Uuid> = batch.keys().copied().collect();
    let current = transfers::get_many_for_update(&mut tx, &ids).await?;
    if current.len() != ids.len() || current.iter().any(|transfer| transfer.state != TransferState::Deposited) {
        return Ok(false);
    }
    let steps: Vec<Advance<'_>> = current
        .iter()
        .map(|before| {
            // Each status event under the span of the message that caused
            // it, so a transfer's trace stays one tree.
            let (message, _) = batch[&before.id];
            let span = message_span(stage.as_str(), message);
            let trace = span.in_scope(|| TraceContext::continue_or_start(message.header("traceparent")));
            Advance { before, trace, reference: String::new() }
        })
        .collect();
    finish_step(ctx, tx, stage, &TransferEvent::Completed, &steps).await?;
    Ok(true)
}
