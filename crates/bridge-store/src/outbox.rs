//! The transactional outbox. Stages write a row inside their state-change
//! transaction, holding all the messages that transaction emits, in order;
//! the relay claims rows with `FOR UPDATE`, publishes their messages, and
//! deletes each row only after the broker has acknowledged all of them, in
//! the claim's transaction (invariant I4). Every row in the table is one
//! still to publish.
//!
//! Rows are claimed in the order of the transactions that wrote them (each
//! row records its writer's id), then of their ids. That keeps a transfer's
//! events in order: a stage writes a transfer's next event only after it
//! read the one before, so its transaction started after the earlier one
//! committed and has the higher id. It also lets the claim start from a
//! cursor instead of the start of the index, which holds an entry for every
//! row deleted since the last vacuum (see [`Claim::next_start`]).

use sqlx::{PgConnection, Postgres, Transaction};
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

/// A claimed row: the messages one transaction wrote, in order, and the
/// row's id.
#[derive(Clone, Debug)]
pub struct OutboxRow {
    pub id: i64,
    pub messages: Vec<OutboxMessage>,
    /// The id (`xid8`) of the transaction that wrote the row.
    pub writer: i64,
}

/// What a claim took, and what it knows about the rows it did not see.
#[derive(Clone, Debug)]
pub struct Claim {
    pub rows: Vec<OutboxRow>,
    /// The oldest transaction running when the claim began: every
    /// transaction older than it had ended, so the claim saw all its rows.
    horizon: i64,
    /// The claim took as many rows as it was allowed, so more may wait.
    full: bool,
}

impl Claim {
    /// Where the next claim may start (a writer id), once the rows with ids
    /// in `unpublished` turned out not to be published.
    ///
    /// Rows that are not there yet come from transactions still running
    /// when this claim began, or begun after; either way their writer ids
    /// are at least the horizon. Rows this claim left for lack of room come
    /// after its last row, and rows it took but could not publish are
    /// claimed again. Anything below the answer was therefore published, and
    /// the index entries below it can be skipped. A writer that stays open
    /// holds the cursor back (the claim is then as slow as a full one, never
    /// wrong); a relay that stops leading keeps its cursor no longer.
    /// Rows another claim has locked are waited for, not skipped, so none
    /// is passed while a relay that lost its leadership still holds it.
    pub fn next_start(&self, unpublished: &[i64]) -> i64 {
        let mut start = self.horizon;
        if self.full {
            if let Some(last) = self.rows.last() {
                start = start.min(last.writer);
            }
        }
        for row in self.rows.iter().filter(|row| unpublished.contains(&row.id)) {
            start = start.min(row.writer);
        }
        start
    }
}

/// Writes `messages` to the outbox, in order, as one row: a transaction's
/// messages are claimed, published and deleted together, so a step's
/// outcome and status events, or a whole batch's, cost one row, not one
/// each.
pub async fn enqueue(conn: &mut PgConnection, messages: &[OutboxMessage]) -> Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let event_ids: Vec<Uuid> = messages.iter().map(|message| message.event_id).collect();
    let topics: Vec<&str> = messages.iter().map(|message| message.topic.as_str()).collect();
    let keys: Vec<Option<&[u8]>> = messages.iter().map(|message| message.key.as_deref()).collect();
    let payloads: Vec<&[u8]> = messages.iter().map(|message| message.payload.as_slice()).collect();
    let header_counts: Vec<i32> = messages.iter().map(|message| message.headers.len() as i32).collect();
    let headers = messages.iter().flat_map(|message| message.headers.iter());
    let (names, values): (Vec<&str>, Vec<&[u8]>) =
        headers.map(|(name, value)| (name.as_str(), value.as_slice())).unzip();
    sqlx::query(
        "INSERT INTO outbox (event_ids, topics, message_keys, payloads, header_counts, header_names, header_values)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(event_ids)
    .bind(topics)
    .bind(keys)
    .bind(payloads)
    .bind(header_counts)
    .bind(names)
    .bind(values)
    .execute(conn)
    .await?;
    Ok(())
}

/// One outbox row as stored: the messages' fields side by side.
type StoredRow =
    (i64, Vec<Uuid>, Vec<String>, Vec<Option<Vec<u8>>>, Vec<Vec<u8>>, Vec<i32>, Vec<String>, Vec<Vec<u8>>, i64);

/// The messages of a stored row, in order. The table's CHECK keeps the
/// arrays aligned; header counts that do not add up are an error, not a
/// guess.
fn messages(row: StoredRow) -> Result<OutboxRow> {
    let (id, event_ids, topics, keys, payloads, header_counts, names, values, writer) = row;
    let mut headers = names.into_iter().zip(values);
    let mut messages = Vec::with_capacity(topics.len());
    for ((((event_id, topic), key), payload), count) in
        event_ids.into_iter().zip(topics).zip(keys).zip(payloads).zip(header_counts)
    {
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        let headers: Vec<(String, Vec<u8>)> = headers.by_ref().take(count).collect();
        if headers.len() != count {
            return Err(crate::Error::Corrupt(format!("outbox row {id}: its header counts exceed its headers")));
        }
        messages.push(OutboxMessage { event_id, topic, key, payload, headers });
    }
    if headers.next().is_some() {
        return Err(crate::Error::Corrupt(format!("outbox row {id}: it has headers no message counts")));
    }
    Ok(OutboxRow { id, messages, writer })
}

/// Locks the rows written by transactions from `start` on (0: all), in
/// order, up to `batch_size_max` messages (but always a whole row, and at
/// least one). The locks last until `tx` ends.
pub async fn claim(tx: &mut Transaction<'_, Postgres>, start: i64, batch_size_max: i64) -> Result<Claim> {
    // The horizon is taken before the rows are read, so from an older
    // snapshot than theirs: what ended before it is visible to the read.
    // The planner, which expects few rows past the cursor, would rather
    // fetch them all and sort them than read the index in order; with a
    // backlog of unpublished rows that read them all on every claim.
    // Reading the index in order stops at the limit. (With those plans
    // priced out, the cost estimate of any other is so high that Postgres
    // would compile it to machine code first, which takes longer than the
    // claim itself.)
    let horizon: i64 = sqlx::query_scalar(
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint
         FROM (SELECT set_config('enable_bitmapscan', 'off', true), set_config('enable_sort', 'off', true),
                      set_config('jit', 'off', true)) planner",
    )
    .persistent(false)
    .fetch_one(&mut **tx)
    .await?;
    // No SKIP LOCKED: only the leading relay claims, and a row another
    // claim holds is one a relay that lost its leadership has not finished
    // with. Waiting for it (then seeing whether it was published) keeps the
    // cursor from passing it.
    // A row holds at least one message, so `batch_size_max` rows hold
    // enough; rows past the limit are locked but left for the next claim,
    // like rows past a LIMIT.
    let stored: Vec<StoredRow> = sqlx::query_as(
        "SELECT id, event_ids, topics, message_keys, payloads, header_counts, header_names, header_values,
                writer_xid::text::bigint AS writer
         FROM outbox WHERE writer_xid >= $1::text::xid8
         ORDER BY writer_xid, id LIMIT $2 FOR UPDATE",
    )
    .persistent(false)
    .bind(start.to_string())
    .bind(batch_size_max)
    .fetch_all(&mut **tx)
    .await?;
    let mut full = stored.len() as i64 >= batch_size_max;
    let mut rows: Vec<OutboxRow> = Vec::with_capacity(stored.len());
    let mut taken = 0;
    for row in stored {
        if taken >= batch_size_max {
            full = true;
            break;
        }
        let row = messages(row)?;
        taken += row.messages.len() as i64;
        rows.push(row);
    }
    Ok(Claim { rows, horizon, full })
}

/// Deletes the rows the broker acknowledged. A delete writes only the old
/// row's header to the WAL, where stamping the row published wrote a new
/// copy of it (payload included) and an index entry, and pruning it later
/// wrote again.
pub async fn delete_published(tx: &mut Transaction<'_, Postgres>, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)").persistent(false).bind(ids).execute(&mut **tx).await?;
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

/// Messages still to publish.
pub async fn unpublished_count(conn: &mut PgConnection) -> Result<i64> {
    Ok(crate::gauges::outbox(conn).await?.0)
}
