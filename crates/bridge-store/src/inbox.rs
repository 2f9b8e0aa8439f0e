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

/// Deletes inbox rows older than `older_than_ms`, oldest first, `batch` per
/// statement, and returns how many went. Safe because the inbox is the first
/// of two guards: every step also checks the transfer's state under its row
/// lock, so a message redelivered after its row was pruned finds the step
/// done. Dead-letter records (`dlq:` ids) are kept: they alone stop a
/// replayed poison message from being dead-lettered twice.
pub async fn prune(conn: &mut PgConnection, older_than_ms: u64, batch: i64) -> Result<u64> {
    crate::delete_in_batches(
        conn,
        "DELETE FROM inbox WHERE (consumer, message_id) IN (
             SELECT consumer, message_id FROM inbox
              WHERE received_at < now() - make_interval(secs => $1::double precision / 1000)
                AND message_id NOT LIKE 'dlq:%'
              ORDER BY received_at
              LIMIT $2)",
        older_than_ms,
        batch,
    )
    .await
}
