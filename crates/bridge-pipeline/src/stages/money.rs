//! The money steps: the withdrawal at the investor's bank and the deposit
//! at the fund administrator (with its refund when the deposit is
//! declined), from a stage's message, a batch, the settlement runner or a
//! callback; steps a service holds as pending are recorded for the
//! settlement runner.

use std::ops::ControlFlow;

use super::*;
use bridge_store::transfers::Actor;

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

fn movement(transfer: &Transfer, step: Step, account_id: &str) -> Result<MoneyMovement, StageError> {
    Ok(MoneyMovement {
        idempotency_key: ids::idempotency_key(transfer.id, step, transfer.step_attempt),
        transfer_id: transfer.id,
        account_id: account_id.to_owned(),
        amount: money_of(transfer)?,
        // Under the span of the message (or runner, or callback) asking,
        // when traces are exported; in the transfer's trace either way.
        traceparent: Some(TraceContext::continue_or_start(transfer.traceparent.as_deref()).child_traceparent()),
        bank_access: None,
    })
}

/// Puts each investor's own bank access, where Bridge holds one, on their
/// withdrawals (and records it as used). Opened only for the call and
/// never logged: the token stays a secret value, and the HTTP client marks
/// its header sensitive. Access that does not open (tampered with, moved,
/// or sealed under a key not configured) is left off and the bank decides.
async fn attach_bank_access(ctx: &StageContext, movements: &mut [MoneyMovement]) -> Result<(), StageError> {
    let Some(keyring) = &ctx.keyring else { return Ok(()) };
    let investors: Vec<&str> = movements.iter().map(|movement| movement.account_id.as_str()).collect();
    let sealed = {
        let mut conn = ctx.pool.acquire().await?;
        bridge_store::bank_access::take_for_withdrawals(&mut conn, &investors).await?
    };
    for (investor, stored) in sealed {
        match keyring.open(&stored) {
            Ok(token) => {
                let access = bridge_services::BankAccess::new(token);
                for movement in movements.iter_mut().filter(|movement| movement.account_id == investor) {
                    movement.bank_access = Some(access.clone());
                }
            }
            Err(error) => {
                tracing::error!(investor_account_id = %investor, error = %error, "An investor's bank access does not open; the withdrawal goes without it");
            }
        }
    }
    Ok(())
}

/// Withdrawal: the investor's bank debits the investor. On success the held
/// funds become a debit of the balance; on a decline the hold and the
/// reservation are released and the transfer fails.
pub(super) async fn withdraw(ctx: &StageContext, message: &Inbound) -> Result<Outcome, StageError> {
    let event: TransferValidated = decode_payload(message)?;
    let transfer_id = parse_transfer_id(&event.transfer_id)?;
    let trace = TraceContext::continue_or_start(message.header("traceparent"));
    withdrawal_step(ctx, transfer_id, Some(&event.event_id), &trace, Ask::Perform, None).await
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
/// for the settlement runner, settlement callbacks and operators'
/// resolutions, each named as `actor` in the version it writes. A refund is
/// the deposit step's compensation, so news of it settles the deposit step.
pub async fn settle_step(
    ctx: &StageContext,
    transfer_id: Uuid,
    step: Step,
    trace: &TraceContext,
    ask: Ask<'_>,
    actor: Option<&Actor>,
) -> Result<Outcome, StageError> {
    match step {
        Step::Withdrawal => withdrawal_step(ctx, transfer_id, None, trace, ask, actor).await,
        Step::Deposit | Step::Refund => deposit_step(ctx, transfer_id, None, trace, ask, actor).await,
    }
}

/// The withdrawal step for one transfer: from the stage (with the event that
/// asked for it), from the settlement runner or a settlement callback
/// (without; `actor` names them in the history).
pub async fn withdrawal_step(
    ctx: &StageContext,
    transfer_id: Uuid,
    event_id: Option<&str>,
    trace: &TraceContext,
    ask: Ask<'_>,
    actor: Option<&Actor>,
) -> Result<Outcome, StageError> {
    let stage = StageName::Withdrawal;
    let (_, outcome) = match MoneyStep::Withdrawal.ask(ctx, transfer_id, ask, trace).await? {
        ControlFlow::Continue(answered) => answered,
        ControlFlow::Break(outcome) => return Ok(outcome),
    };

    let mut tx = bridge_store::begin_step_transaction(&ctx.pool).await?;
    if outcome == ServiceOutcome::Pending {
        return defer(ctx, tx, transfer_id, Step::Withdrawal).await;
    }
    let Some(current) = begin_step(&mut tx, stage, event_id, transfer_id, TransferState::Validated).await? else {
        return Ok(Outcome::Duplicate);
    };
    let (event, reference) = match outcome {
        ServiceOutcome::Settled { reference } => (TransferEvent::Withdrawn, reference),
        ServiceOutcome::Declined { code } if ask == Ask::Perform => {
            match ctx.config.decline_retries.of(&code).filter(|retry| current.step_attempt < retry.attempts as i32) {
                Some(retry) => return retry_declined(ctx, tx, &current, &code, retry).await,
                None => (TransferEvent::WithdrawalFailed(FailureReason(code)), String::new()),
            }
        }
        ServiceOutcome::Declined { code } => (TransferEvent::WithdrawalFailed(FailureReason(code)), String::new()),
        ServiceOutcome::Pending => unreachable!("pending handled above"),
    };
    let step = Advance { before: &current, trace: trace.clone(), reference, actor };
    finish_step(ctx, tx, stage.as_str(), &event, Some(Step::Withdrawal), &[step]).await?;
    Ok(Outcome::Applied)
}

/// A withdrawal declined with a code configured to be asked again: the
/// transfer keeps waiting (funds held), its keys move to a new attempt so
/// the bank decides anew, and the settlement runner asks after the
/// configured wait. The decline is counted and logged with its code; the
/// transfer fails with it once the attempts are used up.
async fn retry_declined(
    ctx: &StageContext,
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    current: &Transfer,
    code: &str,
    retry: &crate::config::DeclineRetry,
) -> Result<Outcome, StageError> {
    let attempt = transfers::next_step_attempt(&mut tx, current).await?;
    // A new attempt, with a deadline of its own.
    pending::finish(&mut tx, current.id, Step::Withdrawal.as_str()).await?;
    let status = format!("declined {code}; attempt {attempt} of {} after {} ms", retry.attempts, retry.delay_ms);
    pending::schedule(
        &mut tx,
        current.id,
        Step::Withdrawal.as_str(),
        retry.delay_ms,
        ctx.config.pending_deadline_ms,
        &status,
    )
    .await?;
    tx.commit().await?;
    tracing::warn!(transfer_id = %current.id, code, attempt, attempts = retry.attempts, delay_ms = retry.delay_ms, "Withdrawal declined; asking again later under a new idempotency key");
    Ok(Outcome::Applied)
}

/// Deposit: the fund administrator credits the fund account. On a decline the
/// investor is refunded (at the bank, then in our books) and the reservation
/// released: the transfer is reversed.
pub(super) async fn deposit(ctx: &StageContext, message: &Inbound) -> Result<Outcome, StageError> {
    let event: FundsWithdrawn = decode_payload(message)?;
    let transfer_id = parse_transfer_id(&event.transfer_id)?;
    let trace = TraceContext::continue_or_start(message.header("traceparent"));
    deposit_step(ctx, transfer_id, Some(&event.event_id), &trace, Ask::Perform, None).await
}

/// The deposit step (with its compensation) for one transfer.
pub async fn deposit_step(
    ctx: &StageContext,
    transfer_id: Uuid,
    event_id: Option<&str>,
    trace: &TraceContext,
    ask: Ask<'_>,
    actor: Option<&Actor>,
) -> Result<Outcome, StageError> {
    let stage = StageName::Deposit;
    let (transfer, remitted) = match MoneyStep::Deposit.ask(ctx, transfer_id, ask, trace).await? {
        ControlFlow::Continue(answered) => answered,
        ControlFlow::Break(outcome) => return Ok(outcome),
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
    let mut tx = bridge_store::begin_step_transaction(&ctx.pool).await?;
    if matches!(outcome, DepositOutcome::Pending) {
        return defer(ctx, tx, transfer_id, Step::Deposit).await;
    }
    let Some(current) = begin_step(&mut tx, stage, event_id, transfer_id, TransferState::Withdrawn).await? else {
        return Ok(Outcome::Duplicate);
    };
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
    let step = Advance { before: &current, trace: trace.clone(), reference, actor };
    finish_step(ctx, tx, stage.as_str(), &event, Some(Step::Deposit), &[step]).await?;
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

    async fn cancel(self, ctx: &StageContext, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        match self {
            Self::Withdrawal => ctx.services.investor.cancel_withdrawal(movement).await,
            Self::Deposit => ctx.services.fund.cancel_remittance(movement).await,
        }
    }

    /// Asks the service about the step of a transfer waiting for it, outside
    /// any transaction. Breaks with the message's outcome when there is
    /// nothing more to do: the transfer is not waiting for the step (a
    /// repeat), or the service refused the step as wrong and the transfer
    /// went to a person.
    async fn ask(
        self,
        ctx: &StageContext,
        transfer_id: Uuid,
        ask: Ask<'_>,
        trace: &TraceContext,
    ) -> Result<ControlFlow<Outcome, (Transfer, ServiceOutcome)>, StageError> {
        let Some(transfer) = pending_step(ctx, transfer_id, self.expected()).await? else {
            return Ok(ControlFlow::Break(Outcome::Duplicate));
        };
        let mut movement = self.movement(&transfer)?;
        if matches!((self, ask), (Self::Withdrawal, Ask::Perform)) {
            attach_bank_access(ctx, std::slice::from_mut(&mut movement)).await?;
        }
        let answer = match ask {
            // A batch asked a moment ago and the service did not settle the
            // step: its answer stands for asking again under the same key.
            Ask::Perform => match ctx.answered.take(&movement.idempotency_key) {
                Some(answer) => Ok(answer),
                None => self.perform(ctx, &movement).await,
            },
            Ask::Cancel { reason } => self.cancel(ctx, &movement).await.map(|outcome| cancelled_as(outcome, reason)),
        };
        match answer {
            Ok(outcome) => Ok(ControlFlow::Continue((transfer, outcome))),
            // A cancellation the service refuses as wrong (an account it
            // does not know) finds nothing it could have moved: the step
            // reads as cancelled.
            Err(ServiceError::Refused(why)) if matches!(ask, Ask::Cancel { .. }) => {
                tracing::info!(transfer_id = %transfer_id, step = self.step().as_str(), why, "The service refused the cancellation as wrong; nothing moved under the key");
                let reason = match ask {
                    Ask::Cancel { reason } => reason.to_owned(),
                    Ask::Perform => unreachable!("matched a cancellation"),
                };
                Ok(ControlFlow::Continue((transfer, ServiceOutcome::Declined { code: reason })))
            }
            Err(ServiceError::Refused(why)) => {
                Ok(ControlFlow::Break(refused(ctx, transfer_id, self.step(), &why, trace).await?))
            }
            Err(error) => Err(error.into()),
        }
    }
}

/// Cancels `step` of `transfer` at its service under the transfer's current
/// key, unless it settled: for an operator's resolution, before the
/// transfer is reopened, so whatever asks about the step afterwards (the
/// step code, the settlement runner) finds the operation cancelled or
/// settled, never still able to move money. A refund is cancelled as the
/// deposit it compensates.
pub(super) async fn cancel_at_service(
    ctx: &StageContext,
    transfer: &Transfer,
    step: Step,
) -> Result<ServiceOutcome, ServiceError> {
    let step = match step {
        Step::Withdrawal => MoneyStep::Withdrawal,
        Step::Deposit | Step::Refund => MoneyStep::Deposit,
    };
    let movement = step.movement(transfer).map_err(|error| ServiceError::Refused(error.to_string()))?;
    step.cancel(ctx, &movement).await
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
/// the service answered here without settling it (pending or declined) is
/// taken one by one with that answer ([`Answered`]); one it failed to answer
/// is asked again under the same idempotency key, as is a settled step whose
/// transaction failed, and the service answers as it did the first time. So
/// a bad message neither takes its neighbours down nor applies twice, and no
/// money moves twice.
///
/// A lone message comes here too, so it can share its stage's transaction
/// with other partitions' steps.
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

/// The services' answers about steps a batch asked about and did not
/// settle (pending, declined), by idempotency key, until the step is taken
/// one by one a moment later: without them every such step would be asked
/// about twice, and a bank that settles later answers every step so. An
/// answer is taken once, and one not taken within [`Answered::KEPT`] is not
/// used (the step is asked again, as it would have been).
#[derive(Default)]
pub struct Answered(std::sync::Mutex<AnswersByKey>);

type AnswersByKey = std::collections::HashMap<String, (std::time::Instant, ServiceOutcome)>;

impl Answered {
    const KEPT: std::time::Duration = std::time::Duration::from_secs(2);
    /// Past this many answers kept, stale ones are dropped.
    const TIDY_ABOVE: usize = 1_024;

    fn lock(&self) -> std::sync::MutexGuard<'_, AnswersByKey> {
        // Each change is one insert or one removal: a panic elsewhere while
        // the lock was held leaves the map whole.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn put(&self, key: &str, answer: ServiceOutcome) {
        let mut answers = self.lock();
        if answers.len() >= Self::TIDY_ABOVE {
            answers.retain(|_, (at, _)| at.elapsed() < Self::KEPT);
        }
        answers.insert(key.to_owned(), (std::time::Instant::now(), answer));
    }

    fn take(&self, key: &str) -> Option<ServiceOutcome> {
        let (at, answer) = self.lock().remove(key)?;
        (at.elapsed() < Self::KEPT).then_some(answer)
    }
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
    let mut movements = waiting.iter().map(|transfer| step.movement(transfer)).collect::<Result<Vec<_>, _>>()?;
    if matches!(step, MoneyStep::Withdrawal) {
        attach_bank_access(ctx, &mut movements).await?;
    }
    // The calls are made up front (a future does nothing until polled) so
    // the stream holds no closure, which would keep the batch's future from
    // being `Send` for every lifetime.
    let calls: Vec<_> = movements.iter().map(|movement| step.perform(ctx, movement)).collect();
    let outcomes: Vec<_> = futures::stream::iter(calls).buffered(SERVICE_CALLS_IN_FLIGHT).collect().await;
    let mut settled = std::collections::HashMap::with_capacity(batch.len());
    for ((transfer, movement), outcome) in waiting.iter().zip(&movements).zip(outcomes) {
        match outcome {
            Ok(ServiceOutcome::Settled { reference }) => {
                settled.insert(transfer.id, reference);
            }
            Ok(answer) => ctx.answered.put(&movement.idempotency_key, answer),
            Err(_) => {}
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
/// one locking read with the inbox insert, one statement for the transfers with
/// their history, pending records, ledger postings and outbox row, one update
/// of the accounts, one commit.
async fn apply_money_batch(ctx: &StageContext, step: MoneyStep, settled: &[SettledStep]) -> Result<bool, StageError> {
    let stage = step.stage();
    let mut tx = bridge_store::begin_step_transaction(&ctx.pool).await?;
    let event_ids: Vec<String> = settled.iter().map(|step| step.event_id.clone()).collect();
    // Something else applied one of them since the read before the calls
    // (another process after a rebalance, or the settlement runner): the
    // batch is rolled back whole, and each message finds its own answer one
    // by one.
    let settled_ids: Vec<Uuid> = settled.iter().map(|step| step.transfer_id).collect();
    let (current, recorded) = transfers::lock_for_messages(&mut tx, &settled_ids, stage.as_str(), &event_ids).await?;
    if recorded != settled.len() as u64
        || current.len() != settled.len()
        || current.iter().any(|transfer| transfer.state != step.expected())
    {
        return Ok(false);
    }
    let by_transfer: std::collections::HashMap<Uuid, &SettledStep> =
        settled.iter().map(|settled| (settled.transfer_id, settled)).collect();
    let mut spans = Vec::with_capacity(current.len());
    let group = stage.group_id(&ctx.config);
    let steps: Vec<Advance<'_>> = current
        .iter()
        .map(|before| {
            // Each event under the span of the message that caused it, so a
            // transfer's trace stays one tree.
            let settled = by_transfer[&before.id];
            let message = &settled.message;
            let span = batch_message_span(stage, &group, message);
            let trace = span.in_scope(|| TraceContext::continue_or_start(message.header("traceparent")));
            spans.push(span);
            Advance { before, trace, reference: settled.reference.clone(), actor: None }
        })
        .collect();
    finish_step(ctx, tx, stage.as_str(), &step.applied(), Some(step.step()), &steps).await?;
    log_applied(&spans);
    Ok(true)
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
