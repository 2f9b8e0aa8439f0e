//! Handing a transfer to a person: a step still pending past its deadline.

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
