//! Operators' resolutions of transfers in manual review.
//!
//! What a resolution may do is decided by `bridge_domain::Resolution` from
//! where the transfer froze. A resolution that asks a service (retry, fail)
//! reopens the transfer where it froze and hands the step to the same step
//! code the pipeline runs: the service is asked under the transfer's
//! idempotency key (or cancelled by it) and its answer decides, so the
//! operator's word never moves money by itself. The reopening records the
//! step as pending in the same transaction, so if this process dies before
//! the step has run, the settlement runner asks about it. A resolution that
//! records what happened outside Bridge (a refund, a confirmed deposit)
//! applies its event like a stage would: new version, status event through
//! the outbox, ledger postings and balances, in one transaction.
//!
//! Operators are coordinated by `review_actions`: one resolution per review
//! at a time (a second operator gets a conflict naming the first), each
//! idempotent under its key, and with four-eyes on, each waits for a second
//! operator's approval before it runs. The transfer's version check guards
//! the money whatever those rows say.

use bridge_domain::Resolution;
use bridge_store::reviews::{self, ActionStatus, NewAction, Operator, Recorded, ReviewAction};
use bridge_store::transfers::Actor;

use super::money::cancel_at_service;
use super::*;

/// The reason code of a step an operator cancelled.
pub const CANCELLED_BY_OPERATOR: &str = "CANCELLED_BY_OPERATOR";
/// The longest reason an operator may give.
const REASON_CHARS_MAX: usize = 1_000;
const REFERENCE_CHARS_MAX: usize = 200;

/// A resolution as an operator asks for it.
#[derive(Clone, Debug)]
pub struct ResolutionRequest {
    pub resolution: Resolution,
    /// Why, in the operator's words: kept in the transfer's history.
    pub reason: String,
    /// The outside operation a refund or a confirmed deposit was, as its
    /// bank or administrator names it.
    pub reference: Option<String>,
    /// Retry under a new idempotency key: the service is first asked to
    /// cancel the old operation, and only if it has not settled is a new
    /// one made.
    pub new_attempt: bool,
    /// Makes a repeated request (a retried HTTP call) answer as the first.
    pub idempotency_key: Option<String>,
}

/// What a resolution request came to.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub action: ReviewAction,
    /// The transfer as it stands afterwards.
    pub transfer: Transfer,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("no transfer {0}")]
    UnknownTransfer(Uuid),
    #[error("no resolution {0}")]
    UnknownAction(Uuid),
    #[error("{0}")]
    Invalid(String),
    #[error("transfer {} is {}, not in manual review", .0.id, .0.state)]
    NotInReview(Box<Transfer>),
    #[error("{resolution} cannot resolve a transfer that froze in {frozen}: {why}")]
    NotApplicable { resolution: Resolution, frozen: TransferState, why: &'static str },
    #[error("resolution {} ({} by {}) is {} for this review", .open.id, .open.action, .open.requested_by, status_name(.open.status))]
    Conflict { open: Box<ReviewAction>, transfer: Box<Transfer> },
    #[error("a resolution needs a second operator to approve it; {0} asked for it")]
    SameOperator(String),
    #[error("resolution {} is {}, not waiting for approval", .0.id, status_name(.0.status))]
    NotAwaiting(Box<ReviewAction>),
    #[error("the idempotency key was used for a different request")]
    KeyReused,
    #[error(transparent)]
    Store(#[from] bridge_store::Error),
    #[error(transparent)]
    Stage(#[from] StageError),
}

impl From<sqlx::Error> for ReviewError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(error.into())
    }
}

fn status_name(status: ActionStatus) -> &'static str {
    match status {
        ActionStatus::AwaitingApproval => "waiting for approval",
        ActionStatus::Running => "running",
        ActionStatus::Done => "done",
        ActionStatus::NotApplied => "not applied",
        ActionStatus::Rejected => "rejected",
    }
}

/// Asks for a resolution of the transfer in manual review. With
/// `approvals` of 2 or more it waits for a second operator's
/// [`approve`]; otherwise it runs now.
pub async fn request(
    ctx: &StageContext,
    transfer_id: Uuid,
    asked: &ResolutionRequest,
    operator: &Operator,
    approvals: u8,
) -> Result<Resolved, ReviewError> {
    let reason = asked.reason.trim();
    if reason.is_empty() || reason.chars().count() > REASON_CHARS_MAX {
        return Err(ReviewError::Invalid(format!("a reason of 1 to {REASON_CHARS_MAX} characters is required")));
    }
    let reference = asked.reference.as_deref().map(str::trim).filter(|reference| !reference.is_empty());
    if asked.resolution.needs_reference() && reference.is_none() {
        return Err(ReviewError::Invalid(format!(
            "{} records an operation made outside Bridge: name it with a reference",
            asked.resolution
        )));
    }
    if reference.is_some_and(|reference| reference.chars().count() > REFERENCE_CHARS_MAX) {
        return Err(ReviewError::Invalid(format!("a reference has at most {REFERENCE_CHARS_MAX} characters")));
    }
    if asked.new_attempt && asked.resolution != Resolution::Retry {
        return Err(ReviewError::Invalid("only a retry can take a new attempt".to_owned()));
    }
    let mut conn = ctx.pool.acquire().await?;
    let transfer = transfers::get(&mut conn, transfer_id).await?.ok_or(ReviewError::UnknownTransfer(transfer_id))?;
    let same = |action: &ReviewAction| action.transfer_id == transfer_id && action.action == asked.resolution;
    // A repeat answers as the first request did, whatever the transfer has
    // done since.
    if let Some(key) = asked.idempotency_key.as_deref() {
        if let Some(found) = reviews::by_key(&mut conn, key).await? {
            return if same(&found) { Ok(Resolved { action: found, transfer }) } else { Err(ReviewError::KeyReused) };
        }
    }
    if transfer.state != TransferState::ManualReview {
        return Err(ReviewError::NotInReview(Box::new(transfer)));
    }
    let frozen = frozen_in(&mut conn, &transfer).await?;
    asked.resolution.event(frozen).map_err(|why| ReviewError::NotApplicable {
        resolution: asked.resolution,
        frozen,
        why,
    })?;
    let new = NewAction {
        transfer_id,
        review_version: transfer.version,
        action: asked.resolution,
        new_attempt: asked.new_attempt,
        reason,
        reference,
        operator,
        needs_approval: approvals >= 2,
        idempotency_key: asked.idempotency_key.as_deref(),
    };
    match reviews::record(&mut conn, &new).await? {
        Recorded::Repeat(found) if same(&found) => Ok(Resolved { action: found, transfer }),
        Recorded::Repeat(_) => Err(ReviewError::KeyReused),
        Recorded::Conflict(open) => Err(ReviewError::Conflict { open: Box::new(open), transfer: Box::new(transfer) }),
        Recorded::New(action) if action.status == ActionStatus::AwaitingApproval => {
            tracing::info!(transfer_id = %transfer_id, action = %action.action, operator = %operator.name, "Resolution waiting for a second operator's approval");
            Ok(Resolved { action, transfer })
        }
        Recorded::New(action) => {
            drop(conn);
            run(ctx, action).await
        }
    }
}

/// A second operator approves a resolution waiting for it, which then runs.
pub async fn approve(ctx: &StageContext, action_id: Uuid, approver: &Operator) -> Result<Resolved, ReviewError> {
    let mut conn = ctx.pool.acquire().await?;
    let action = reviews::get(&mut conn, action_id).await?.ok_or(ReviewError::UnknownAction(action_id))?;
    if action.requested_by_id == approver.id {
        return Err(ReviewError::SameOperator(action.requested_by));
    }
    if !reviews::approve(&mut conn, action_id, approver).await? {
        let current = reviews::get(&mut conn, action_id).await?.ok_or(ReviewError::UnknownAction(action_id))?;
        return Err(ReviewError::NotAwaiting(Box::new(current)));
    }
    let action = reviews::get(&mut conn, action_id).await?.ok_or(ReviewError::UnknownAction(action_id))?;
    drop(conn);
    run(ctx, action).await
}

/// Turns down (or, by its requester, withdraws) a resolution waiting for
/// approval; the review is open for another.
pub async fn reject(
    ctx: &StageContext,
    action_id: Uuid,
    by: &Operator,
    why: &str,
) -> Result<ReviewAction, ReviewError> {
    let mut conn = ctx.pool.acquire().await?;
    let rejected = reviews::reject(&mut conn, action_id, by, why.trim()).await?;
    let action = reviews::get(&mut conn, action_id).await?.ok_or(ReviewError::UnknownAction(action_id))?;
    if !rejected {
        return Err(ReviewError::NotAwaiting(Box::new(action)));
    }
    Ok(action)
}

async fn frozen_in(conn: &mut PgConnection, transfer: &Transfer) -> Result<TransferState, ReviewError> {
    transfers::frozen_from(conn, transfer.id)
        .await?
        .ok_or_else(|| ReviewError::Invalid(format!("transfer {} has no manual-review version", transfer.id)))
}

/// Runs a resolution and records how it ended.
async fn run(ctx: &StageContext, action: ReviewAction) -> Result<Resolved, ReviewError> {
    let (status, outcome) = match execute(ctx, &action).await {
        Ok(ended) => ended,
        Err(error) => (ActionStatus::NotApplied, format!("nothing changed: {error}")),
    };
    let mut conn = ctx.pool.acquire().await?;
    let transfer =
        transfers::get(&mut conn, action.transfer_id).await?.ok_or(ReviewError::UnknownTransfer(action.transfer_id))?;
    let result_state = (status == ActionStatus::Done).then_some(transfer.state);
    reviews::finish(&mut conn, action.id, status, &outcome, result_state).await?;
    tracing::info!(transfer_id = %transfer.id, action = %action.action, outcome, state = %transfer.state, "Manual review resolution ran");
    let action = reviews::get(&mut conn, action.id).await?.ok_or(ReviewError::UnknownAction(action.id))?;
    Ok(Resolved { action, transfer })
}

/// Who a resolution's versions name.
fn actor_of(action: &ReviewAction) -> Actor {
    let name = match &action.approved_by {
        Some(approver) => format!("operator {}, approved by {approver}", action.requested_by),
        None => format!("operator {}", action.requested_by),
    };
    Actor { name, note: action.reason.clone(), external_reference: action.reference.clone() }
}

/// Carries a resolution out; answers how it ended, in words for the
/// operator. An error means nothing changed.
async fn execute(ctx: &StageContext, action: &ReviewAction) -> Result<(ActionStatus, String), ReviewError> {
    let unchanged = |why: String| Ok((ActionStatus::NotApplied, why));
    let transfer = {
        let mut conn = ctx.pool.acquire().await?;
        transfers::get(&mut conn, action.transfer_id).await?.ok_or(ReviewError::UnknownTransfer(action.transfer_id))?
    };
    if transfer.state != TransferState::ManualReview || transfer.version != action.review_version {
        return unchanged(format!(
            "the transfer changed since the resolution was asked for: it is {} at version {}",
            transfer.state, transfer.version
        ));
    }
    let frozen = frozen_in(&mut *ctx.pool.acquire().await?, &transfer).await?;
    let (event, step) = action.action.event(frozen).map_err(|why| ReviewError::NotApplicable {
        resolution: action.action,
        frozen,
        why,
    })?;
    let actor = actor_of(action);
    let trace = TraceContext::continue_or_start(transfer.traceparent.as_deref());

    if !action.action.asks_service() {
        // Recorded as done outside: the event applies like a stage's.
        let mut tx = bridge_store::begin_step_transaction(&ctx.pool).await?;
        // The postings it makes are the operator's, in the books' history.
        bridge_store::set_actor(&mut tx, &actor.name).await?;
        let Some(current) = locked_in_review(&mut tx, action).await? else {
            return unchanged("the transfer changed while the resolution ran".to_owned());
        };
        let reference = action.reference.clone().unwrap_or_default();
        let advance = Advance { before: &current, trace, reference, actor: Some(&actor) };
        finish_step(ctx, tx, "review", &event, None, &[advance]).await?;
        let next = current.state.apply(&event).map_err(|error| StageError::Transient(error.to_string()))?;
        return Ok((ActionStatus::Done, format!("recorded {}: the transfer is {next}", event.name())));
    }

    // Before reopening, make sure nothing asked about the step afterwards
    // can move money the operator means to stop: a failed step, or the old
    // operation of a new attempt, is cancelled at the service first.
    let mut new_attempt = action.new_attempt;
    let mut note = String::new();
    if action.action == Resolution::Fail || new_attempt {
        match cancel_at_service(ctx, &transfer, step).await {
            Ok(ServiceOutcome::Pending) => {
                return unchanged(format!(
                    "the service still holds the {step} as pending and cannot cancel it yet; try again later"
                ))
            }
            Ok(ServiceOutcome::Settled { reference }) => {
                // It went through after all: the step applies as settled,
                // under the key it settled under.
                new_attempt = false;
                note = format!("the service had settled the {step} ({reference}); ");
            }
            Ok(ServiceOutcome::Declined { .. }) | Err(ServiceError::Refused(_)) => {}
            Err(error) => return unchanged(format!("the {step} could not be cancelled at the service: {error}")),
        }
    }

    let mut tx = bridge_store::begin_step_transaction(&ctx.pool).await?;
    let Some(mut current) = locked_in_review(&mut tx, action).await? else {
        return unchanged("the transfer changed while the resolution ran".to_owned());
    };
    if new_attempt {
        current.step_attempt = transfers::next_step_attempt(&mut tx, &current).await?;
    }
    let reopened = transfers::advance_as(&mut tx, &current, &event, Some(&actor)).await?;
    let status = status_message(ctx, "review", &reopened, Some(current.state), &trace)?;
    outbox::enqueue(&mut tx, &[status]).await?;
    // Should this process stop before the step below has run, the
    // settlement runner asks about it.
    pending::record(&mut tx, transfer.id, step.as_str(), pending_retry_ms(2), ctx.config.pending_deadline_ms).await?;
    commit(ctx, tx).await?;
    crate::failpoint::hit("review.after_reopen");

    let ask = match action.action {
        Resolution::Fail => Ask::Cancel { reason: CANCELLED_BY_OPERATOR },
        _ => Ask::Perform,
    };
    let keys = if new_attempt { format!(" under attempt {} of its keys", current.step_attempt) } else { String::new() };
    // The step's own version names the resolution's operators too.
    let step_actor = Actor { name: actor.name.clone(), note: String::new(), external_reference: None };
    let ran = match settle_step(ctx, transfer.id, step, &trace, ask, Some(&step_actor)).await {
        Ok(Outcome::Deferred) => "is pending at the service; the settlement runner follows it".to_owned(),
        Ok(_) => "ran".to_owned(),
        Err(error) => format!("did not finish ({error}); the settlement runner asks again"),
    };
    // The resolution has run whatever this read finds.
    let now = match ctx.pool.acquire().await {
        Ok(mut conn) => transfers::get(&mut conn, transfer.id).await.ok().flatten().map(|transfer| transfer.state),
        Err(_) => None,
    };
    let state = now.map_or_else(|| "not known yet".to_owned(), |state| state.to_string());
    Ok((ActionStatus::Done, format!("{note}reopened; the {step} step{keys} {ran}: the transfer is {state}")))
}

/// The transfer locked in this transaction, if it still stands at the
/// review the action resolves.
async fn locked_in_review(conn: &mut PgConnection, action: &ReviewAction) -> Result<Option<Transfer>, ReviewError> {
    let current = transfers::get_for_update(conn, action.transfer_id).await?;
    Ok(current
        .filter(|transfer| transfer.state == TransferState::ManualReview && transfer.version == action.review_version))
}
