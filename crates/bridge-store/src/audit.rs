//! The audit log: admin and operator actions, append-only (a database
//! trigger refuses updates, deletes and truncation).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;

use crate::Result;

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct AuditRecord {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// An API key (`name (brk_prefix)`), a token's subject, or an operator
    /// at the command line.
    pub actor: String,
    /// `POST /v1/admin/...`, or a command such as `keys create`.
    pub action: String,
    pub target: String,
    /// The client's address, or `cli`.
    pub source: String,
    /// An HTTP status, `ok`, or the error.
    pub outcome: String,
}

pub async fn record(
    conn: &mut PgConnection,
    actor: &str,
    action: &str,
    target: &str,
    source: &str,
    outcome: &str,
) -> Result<()> {
    sqlx::query("INSERT INTO audit_log (actor, action, target, source, outcome) VALUES ($1, $2, $3, $4, $5)")
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(source)
        .bind(outcome)
        .execute(conn)
        .await?;
    Ok(())
}

/// The newest records first, `limit` of them, older than `before` if given.
pub async fn list(conn: &mut PgConnection, limit: i64, before: Option<i64>) -> Result<Vec<AuditRecord>> {
    Ok(sqlx::query_as(
        "SELECT id, at, actor, action, target, source, outcome FROM audit_log
         WHERE $2::bigint IS NULL OR id < $2 ORDER BY id DESC LIMIT $1",
    )
    .bind(limit.clamp(1, 1_000))
    .bind(before)
    .fetch_all(conn)
    .await?)
}
