//! Handing a transfer to a person: a step still pending past its deadline,
//! or one its service refused as wrong.

use super::*;

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
    tracing::error!(transfer_id = %transfer_id, step = step.as_str(), reason, "Step still pending past its deadline; transfer needs manual review");
    let event = TransferEvent::StepOverdue(FailureReason(reason.to_owned()));
    hand_to_person(ctx, transfer_id, step, event, trace).await
}

/// Hands a step its service refused as wrong (an account it does not know,
/// a malformed movement) to a person instead of a dead-letter topic: the
/// transfer moves to `manual_review` with `<STEP>_REFUSED` as its reason,
/// its funds held or its money in transit, in plain sight.
pub(super) async fn refused(
    ctx: &StageContext,
    transfer_id: Uuid,
    step: Step,
    why: &str,
    trace: &TraceContext,
) -> Result<Outcome, StageError> {
    let reason = format!("{}_REFUSED", step.as_str().to_uppercase());
    tracing::error!(transfer_id = %transfer_id, step = step.as_str(), reason, why, "The service refused the step as wrong; transfer needs manual review");
    hand_to_person(ctx, transfer_id, step, TransferEvent::StepRefused(FailureReason(reason)), trace).await
}

/// Moves the transfer waiting for `step` to `manual_review` by `event`,
/// frozen where it stood, and stops asking about the step.
async fn hand_to_person(
    ctx: &StageContext,
    transfer_id: Uuid,
    step: Step,
    event: TransferEvent,
    trace: &TraceContext,
) -> Result<Outcome, StageError> {
    let (stage, expected) = match step {
        Step::Withdrawal => (StageName::Withdrawal, step.waits_in()),
        Step::Deposit | Step::Refund => (StageName::Deposit, step.waits_in()),
    };
    let mut tx = bridge_store::begin_step_transaction(&ctx.pool).await?;
    let Some(current) = transfers::get_for_update(&mut tx, transfer_id).await?.filter(|t| t.state == expected) else {
        return Ok(Outcome::Duplicate);
    };
    finish_step(
        ctx,
        tx,
        stage.as_str(),
        &event,
        Some(step),
        &[Advance { before: &current, trace: trace.clone(), reference: String::new(), actor: None }],
    )
    .await?;
    Ok(Outcome::Applied)
}
