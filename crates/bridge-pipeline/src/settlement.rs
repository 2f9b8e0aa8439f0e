//! The settlement runner: pending steps asked about again, deadlines,
//! reservation expiry, fund terms on a schedule.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use bridge_domain::Step;

use crate::context::StageContext;
use crate::stages::{self, Outcome};

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
pub(crate) async fn run_settlement(ctx: Arc<StageContext>, shutdown: CancellationToken) -> Result<()> {
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

/// How the runner is named in the versions it writes.
fn runner_actor() -> bridge_store::transfers::Actor {
    bridge_store::transfers::Actor {
        name: "settlement runner".to_owned(),
        note: String::new(),
        external_reference: None,
    }
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
        Ok(kind) => stages::settle_step(ctx, step.transfer_id, kind, &trace, ask, Some(&runner_actor())).await,
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
            let actor = bridge_store::transfers::Actor {
                name: "settlement runner".to_owned(),
                note: "the reservation expired".to_owned(),
                external_reference: None,
            };
            match stages::withdrawal_step(&ctx, transfer_id, None, &trace, ask, Some(&actor)).await {
                Ok(outcome) => tracing::info!(transfer_id = %transfer_id, outcome = ?outcome, "Reservation expired; withdrawal cancelled unless it had settled"),
                Err(error) => tracing::warn!(transfer_id = %transfer_id, error = %error, "Could not expire a reservation yet; trying again"),
            }
            drop(permit);
        });
    }
    count
}
