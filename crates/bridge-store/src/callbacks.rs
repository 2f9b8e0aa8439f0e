//! Receipts of settlement callbacks, for replay protection.

use sqlx::PgConnection;

use crate::Result;

/// Remembers delivery `webhook_id` from `service`. False when it was seen
/// before: a replay (or the sender's retry of a delivery already handled).
pub async fn record(conn: &mut PgConnection, service: &str, webhook_id: &str) -> Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO callback_receipts (service, webhook_id) VALUES ($1, $2)
         ON CONFLICT (service, webhook_id) DO NOTHING",
    )
    .bind(service)
    .bind(webhook_id)
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Forgets a delivery that could not be handled, so the sender's retry of it
/// is accepted.
pub async fn forget(conn: &mut PgConnection, service: &str, webhook_id: &str) -> Result<()> {
    sqlx::query("DELETE FROM callback_receipts WHERE service = $1 AND webhook_id = $2")
        .bind(service)
        .bind(webhook_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Drops receipts older than `older_than_secs`: once a delivery is older than
/// the signature's tolerance, the timestamp check refuses it by itself.
pub async fn prune(conn: &mut PgConnection, older_than_secs: i64) -> Result<u64> {
    let deleted = sqlx::query("DELETE FROM callback_receipts WHERE received_at < now() - make_interval(secs => $1)")
        .bind(older_than_secs as f64)
        .execute(conn)
        .await?;
    Ok(deleted.rows_affected())
}
