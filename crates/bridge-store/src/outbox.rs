//! The transactional outbox. Stages write rows inside their state-change
//! transaction; the relay claims unpublished rows with `FOR UPDATE SKIP
//! LOCKED` (so several relays share the work and none waits on another's
//! lock), publishes them, and stamps `published_at` only after the broker has
//! acknowledged each one (invariant I4).

use sqlx::{PgConnection, Postgres, QueryBuilder, Transaction};
use uuid::Uuid;

use crate::Result;

/// The Postgres notification channel that wakes the relay.
pub const NOTIFY_CHANNEL: &str = "bridge_outbox";

/// Wakes the relay: to be sent after a transaction that wrote outbox rows
/// committed, never inside it. Postgres holds a database-wide lock from the
/// commit of a transaction that issued NOTIFY until that commit is durable,
/// so a NOTIFY inside the writers' transactions made their commits queue
/// one behind another instead of sharing WAL flushes. On its own, with
/// nothing to make durable, it holds that lock only for a moment.
pub async fn wake_relay(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')").bind(NOTIFY_CHANNEL).execute(conn).await?;
    Ok(())
}

/// One message to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxMessage {
    pub event_id: Uuid,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A claimed row: the message plus its row id.
#[derive(Clone, Debug)]
pub struct OutboxRow {
    pub id: i64,
    pub message: OutboxMessage,
}

/// Writes `messages` to the outbox, in order, as one multi-row insert: a
/// step's outcome event and status event cost one round trip, not one each.
pub async fn enqueue(conn: &mut PgConnection, messages: &[OutboxMessage]) -> Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let mut insert = QueryBuilder::<Postgres>::new(
        "INSERT INTO outbox (event_id, topic, message_key, payload, header_names, header_values) ",
    );
    // The row ids follow the VALUES order, which is the order the relay
    // publishes in.
    insert.push_values(messages, |mut row, message| {
        let (names, values): (Vec<&str>, Vec<&[u8]>) =
            message.headers.iter().map(|(name, value)| (name.as_str(), value.as_slice())).unzip();
        row.push_bind(message.event_id)
            .push_bind(&message.topic)
            .push_bind(message.key.as_deref())
            .push_bind(&message.payload)
            .push_bind(names)
            .push_bind(values);
    });
    insert.build().execute(conn).await?;
    Ok(())
}

/// Locks up to `batch_size_max` unpublished rows, oldest first, skipping rows
/// another relay holds. The lock lasts until `tx` ends.
pub async fn claim(tx: &mut Transaction<'_, Postgres>, batch_size_max: i64) -> Result<Vec<OutboxRow>> {
    type Row = (i64, Uuid, String, Option<Vec<u8>>, Vec<u8>, Vec<String>, Vec<Vec<u8>>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, event_id, topic, message_key, payload, header_names, header_values
         FROM outbox WHERE published_at IS NULL
         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .persistent(false)
    .bind(batch_size_max)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, event_id, topic, key, payload, names, values)| OutboxRow {
            id,
            message: OutboxMessage { event_id, topic, key, payload, headers: names.into_iter().zip(values).collect() },
        })
        .collect())
}

pub async fn mark_published(tx: &mut Transaction<'_, Postgres>, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("UPDATE outbox SET published_at = now(), attempts = attempts + 1 WHERE id = ANY($1)")
        .persistent(false)
        .bind(ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn mark_failed(tx: &mut Transaction<'_, Postgres>, ids: &[i64], error: &str) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = ANY($1)")
        .persistent(false)
        .bind(ids)
        .bind(error)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn unpublished_count(conn: &mut PgConnection) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetch_one(conn).await?)
}

/// Deletes rows published more than `older_than_ms` ago, oldest first,
/// `batch` per statement, and returns how many went. Unpublished rows are
/// never touched. Keeps the table, and the relay's claim, small however long
/// the pipeline runs.
pub async fn prune_published(conn: &mut PgConnection, older_than_ms: u64, batch: i64) -> Result<u64> {
    crate::delete_in_batches(
        conn,
        "DELETE FROM outbox WHERE id IN (
             SELECT id FROM outbox
              WHERE published_at < now() - make_interval(secs => $1::double precision / 1000)
              ORDER BY id
              LIMIT $2)",
        older_than_ms,
        batch,
    )
    .await
}
