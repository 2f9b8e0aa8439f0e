//! Point-in-time figures for metrics and alerts. Every query here reads a
//! partial index or a table that stays small (open transfers, pending steps,
//! the unpublished outbox), so scraping stays cheap however much history the
//! database keeps.

use sqlx::PgConnection;

use crate::Result;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Transfers not yet terminal, per state (`manual_review` included).
    pub open_transfers: Vec<(String, i64)>,
    pub pending_steps: i64,
    /// Pending steps past their deadline.
    pub pending_steps_overdue: i64,
    pub outbox_unpublished: i64,
    /// Age of the oldest unpublished outbox row, 0 when there is none.
    pub outbox_oldest_age_secs: i64,
}

pub async fn read(conn: &mut PgConnection) -> Result<Gauges> {
    let open_transfers: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT state, count(*) FROM transfers WHERE id = {} GROUP BY state ORDER BY state",
        crate::transfers::OPEN_IDS
    ))
    .fetch_all(&mut *conn)
    .await?;
    let (pending_steps, pending_steps_overdue): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE deadline_at <= now()) FROM pending_steps")
            .fetch_one(&mut *conn)
            .await?;
    let (outbox_unpublished, outbox_oldest_age_secs) = outbox(conn).await?;
    Ok(Gauges { open_transfers, pending_steps, pending_steps_overdue, outbox_unpublished, outbox_oldest_age_secs })
}

/// Messages in the outbox, still to publish, and the age of the oldest in
/// seconds (0 when there is none).
pub async fn outbox(conn: &mut PgConnection) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT coalesce(sum(cardinality(topics)), 0)::bigint, coalesce(extract(epoch FROM now() - min(created_at)), 0)::bigint
         FROM outbox",
    )
        .fetch_one(conn)
        .await?)
}
