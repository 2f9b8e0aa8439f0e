//! Steps waiting for an outside service to settle them.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::Result;

/// Records that `step` of `transfer_id` is pending at its service, to be
/// asked about again after `retry_after_ms`, with its deadline policy due
/// `deadline_after_ms` from now. Idempotent: a step pending again keeps its
/// first deadline.
pub async fn record(
    conn: &mut PgConnection,
    transfer_id: Uuid,
    step: &str,
    retry_after_ms: u64,
    deadline_after_ms: u64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO pending_steps (transfer_id, step, next_run_at, deadline_at)
         VALUES ($1, $2, now() + make_interval(secs => $3), now() + make_interval(secs => $4))
         ON CONFLICT (transfer_id, step) DO NOTHING",
    )
    .bind(transfer_id)
    .bind(step)
    .bind(retry_after_ms as f64 / 1_000.0)
    .bind(deadline_after_ms as f64 / 1_000.0)
    .execute(conn)
    .await?;
    Ok(())
}

/// Asks about `step` of `transfer_id` again after `retry_after_ms`,
/// whether it was pending before or not, noting why; the deadline is the
/// first one recorded, or `deadline_after_ms` from now.
pub async fn schedule(
    conn: &mut PgConnection,
    transfer_id: Uuid,
    step: &str,
    retry_after_ms: u64,
    deadline_after_ms: u64,
    status: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO pending_steps (transfer_id, step, next_run_at, deadline_at, last_status)
         VALUES ($1, $2, now() + make_interval(secs => $3), now() + make_interval(secs => $4), $5)
         ON CONFLICT (transfer_id, step) DO UPDATE
         SET next_run_at = EXCLUDED.next_run_at, last_status = EXCLUDED.last_status",
    )
    .bind(transfer_id)
    .bind(step)
    .bind(retry_after_ms as f64 / 1_000.0)
    .bind(deadline_after_ms as f64 / 1_000.0)
    .bind(status)
    .execute(conn)
    .await?;
    Ok(())
}

/// A claimed step: who, which step, how many times it was claimed, and
/// whether its deadline has passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueStep {
    pub transfer_id: Uuid,
    pub step: String,
    pub attempts: i32,
    pub overdue: bool,
}

/// Claims up to `batch_size_max` due steps of kind `step` for `lease_ms`:
/// their next run moves past the lease, so another runner skips them, and a
/// runner that dies mid-way leaves them to be claimed again when the lease
/// ends. Claiming by kind lets the caller bound its calls per service.
pub async fn claim_due(
    conn: &mut PgConnection,
    step: &str,
    batch_size_max: i64,
    lease_ms: u64,
) -> Result<Vec<DueStep>> {
    let rows: Vec<(Uuid, String, i32, bool)> = sqlx::query_as(
        "UPDATE pending_steps SET next_run_at = now() + make_interval(secs => $3), attempts = attempts + 1
         WHERE (transfer_id, step) IN (
             SELECT transfer_id, step FROM pending_steps WHERE step = $1 AND next_run_at <= now()
             ORDER BY next_run_at LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING transfer_id, step, attempts, coalesce(deadline_at <= now(), false)",
    )
    .bind(step)
    .bind(batch_size_max)
    .bind(lease_ms as f64 / 1_000.0)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(transfer_id, step, attempts, overdue)| DueStep { transfer_id, step, attempts, overdue })
        .collect())
}

/// Asks again after `retry_after_ms`, noting why.
pub async fn reschedule(
    conn: &mut PgConnection,
    transfer_id: Uuid,
    step: &str,
    retry_after_ms: u64,
    status: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE pending_steps SET next_run_at = now() + make_interval(secs => $3), last_status = $4
         WHERE transfer_id = $1 AND step = $2",
    )
    .bind(transfer_id)
    .bind(step)
    .bind(retry_after_ms as f64 / 1_000.0)
    .bind(status)
    .execute(conn)
    .await?;
    Ok(())
}

/// Done: called in the transaction that applies the step (or finds it
/// applied).
pub async fn finish(conn: &mut PgConnection, transfer_id: Uuid, step: &str) -> Result<()> {
    sqlx::query("DELETE FROM pending_steps WHERE transfer_id = $1 AND step = $2")
        .bind(transfer_id)
        .bind(step)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn count(conn: &mut PgConnection) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM pending_steps").fetch_one(conn).await?)
}
