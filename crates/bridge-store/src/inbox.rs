//! Consumer-side deduplication.

use sqlx::PgConnection;

use crate::Result;

/// Records that `consumer` applied `message_id`. Returns false when it had
/// already been applied: the caller must then roll back and do nothing.
pub async fn record(conn: &mut PgConnection, consumer: &str, message_id: &str) -> Result<bool> {
    let inserted = sqlx::query("INSERT INTO inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(consumer)
        .bind(message_id)
        .execute(conn)
        .await?
        .rows_affected();
    Ok(inserted == 1)
}

pub async fn contains(conn: &mut PgConnection, consumer: &str, message_id: &str) -> Result<bool> {
    let found: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM inbox WHERE consumer = $1 AND message_id = $2)")
        .bind(consumer)
        .bind(message_id)
        .fetch_one(conn)
        .await?;
    Ok(found)
}
