//! The transactional outbox. Stages write a row inside their state-change
//! transaction, holding all the messages that transaction emits, in order;
//! the leading relay reads rows, publishes their messages, and deletes each
//! row only after the broker has acknowledged all of them (invariant I4),
//! all on the session that holds its leadership. Every row in the table is
//! one still to publish.
//!
//! Rows are claimed in the order of the transactions that wrote them (each
//! row records its writer's id), then of their ids. That keeps a transfer's
//! events in order: a stage writes a transfer's next event only after it
//! read the one before, so its transaction started after the earlier one
//! committed and has the higher id. It also lets the claim start from a
//! cursor instead of the start of the index, which holds an entry for every
//! row deleted since the last vacuum (see [`Claim::next_start`]).

use sqlx::{Executor, PgConnection, Row};
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
///
/// The notification carries its own transaction's id. That transaction
/// began after the writer committed, so a claim that read after it ended
/// saw the writer's rows (`Claim::seen_until`), and a relay woken only by
/// such notifications has nothing new to claim.
pub async fn wake_relay(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, pg_current_xact_id()::text)").bind(NOTIFY_CHANNEL).execute(conn).await?;
    Ok(())
}

/// The id of the transaction that sent a relay's wake-up (`wake_relay`);
/// none from a sender that did not say (an earlier release's, which sent
/// an empty payload).
pub fn notifier(payload: &str) -> Option<i64> {
    payload.parse().ok()
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
    /// Only the leader claims and deletes, on the session that makes it
    /// leader, so no row changes under the cursor but by its own hand.
    /// Every transaction with a lower id had ended when this claim read,
    /// and the claim took all the rows they wrote (unless it returns 0: a
    /// claim that ran out of room took only some). Rows that turn out not
    /// to be published are the caller's to remember.
    pub fn seen_until(&self) -> i64 {
        if self.full {
            0
        } else {
            self.horizon
        }
    }

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
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let sql = SQL.get_or_init(|| Columns::insert_sql(1));
    Columns::of(messages).bind(sqlx::query(sql)).execute(conn).await?;
    Ok(())
}

/// A transaction's messages as the columns of its outbox row, to be written
/// by [`enqueue`] or by a step's own statement (`transfers::advance_step`),
/// which saves the round trip.
pub(crate) struct Columns<'a> {
    event_ids: Vec<Uuid>,
    topics: Vec<&'a str>,
    keys: Vec<Option<&'a [u8]>>,
    payloads: Vec<&'a [u8]>,
    header_counts: Vec<i32>,
    names: Vec<&'a str>,
    values: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    pub(crate) fn of(messages: &'a [OutboxMessage]) -> Self {
        let headers = messages.iter().flat_map(|message| message.headers.iter());
        let (names, values) = headers.map(|(name, value)| (name.as_str(), value.as_slice())).unzip();
        Self {
            event_ids: messages.iter().map(|message| message.event_id).collect(),
            topics: messages.iter().map(|message| message.topic.as_str()).collect(),
            keys: messages.iter().map(|message| message.key.as_deref()).collect(),
            payloads: messages.iter().map(|message| message.payload.as_slice()).collect(),
            header_counts: messages.iter().map(|message| message.headers.len() as i32).collect(),
            names,
            values,
        }
    }

    /// The statement that writes the row, none if there are no messages,
    /// with its seven parameters numbered from `first` (bound by
    /// [`Self::bind`]).
    pub(crate) fn insert_sql(first: usize) -> String {
        let p: Vec<String> = (first..first + 7).map(|n| format!("${n}")).collect();
        format!(
            "INSERT INTO outbox (event_ids, topics, message_keys, payloads, header_counts, header_names, header_values)
             SELECT {0}::uuid[], {1}::text[], {2}::bytea[], {3}::bytea[], {4}::int4[], {5}::text[], {6}::bytea[]
             WHERE cardinality({0}::uuid[]) > 0",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6]
        )
    }

    pub(crate) fn bind<'q>(self, query: crate::PgQuery<'q>) -> crate::PgQuery<'q>
    where
        'a: 'q,
    {
        query
            .bind(self.event_ids)
            .bind(self.topics)
            .bind(self.keys)
            .bind(self.payloads)
            .bind(self.header_counts)
            .bind(self.names)
            .bind(self.values)
    }
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

/// Sets the planner up for [`claim`] on `session`, the leading relay's own
/// connection, for as long as it lives.
///
/// The planner, which expects few rows past the cursor, would rather fetch
/// them all and sort them than read the index in order; with a backlog of
/// unpublished rows that read them all on every claim. Reading the index in
/// order stops at the limit. (With those plans priced out, the cost
/// estimate of any other is so high that Postgres would compile it to
/// machine code first, which takes longer than the claim itself.) Set once
/// for the session, they cost no statement per claim, and the claim's
/// statements stay prepared: planned under them whether Postgres plans
/// each execution or keeps a generic plan.
pub async fn prepare_claims(session: &mut PgConnection) -> Result<()> {
    session.execute("SET enable_bitmapscan = off; SET enable_sort = off; SET jit = off").await?;
    Ok(())
}

/// Reads the rows written by transactions from `start` on (0: all), in
/// order, up to `batch_size_max` messages (but always a whole row, and at
/// least one), leaving out the rows with ids in `published`: rows the
/// broker acknowledged whose delete is still to come (see
/// `delete_published`).
///
/// Neither locks nor a transaction: only the leading relay claims, on the
/// session that holds its leadership (see `relay`), and it deletes on the
/// same session what the broker acknowledged. A relay that lost that
/// session can neither claim nor delete, so no other claim is ever half
/// done beside this one, and no row is passed that another claim will
/// still change. Each statement commits on its own: a claim that finds
/// nothing writes nothing and waits for no flush.
pub async fn claim(session: &mut PgConnection, start: i64, published: &[i64], batch_size_max: i64) -> Result<Claim> {
    // One statement, so one snapshot: its horizon is the oldest transaction
    // still running when the rows were read, and what ended before it is
    // visible to the read. The outer row is always there, so an empty claim
    // still answers the horizon. A row holds at least one message, so
    // `batch_size_max` rows hold enough; of those, only the rows that start
    // before `batch_size_max` messages are sent, the rest left for the next
    // claim. A batch's row holds up to a hundred messages, and a relay
    // behind the stages read, decoded and dropped whole rows by the hundred
    // on every claim.
    let read = sqlx::query(
        "SELECT horizon.xmin, o.id, o.event_ids, o.topics, o.message_keys, o.payloads, o.header_counts,
                o.header_names, o.header_values, o.writer
         FROM (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin) horizon
         LEFT JOIN LATERAL (
             SELECT * FROM (
                 SELECT id, event_ids, topics, message_keys, payloads, header_counts, header_names, header_values,
                        writer_xid::text::bigint AS writer,
                        sum(cardinality(event_ids)) OVER (ORDER BY writer_xid, id ROWS UNBOUNDED PRECEDING)
                            - cardinality(event_ids) AS messages_before
                 FROM outbox WHERE writer_xid >= $1::text::xid8 AND id <> ALL($3)
                 ORDER BY writer_xid, id LIMIT $2
             ) w WHERE w.messages_before < $2
         ) o ON true",
    )
    .bind(start.to_string())
    .bind(batch_size_max)
    .bind(published)
    .fetch_all(&mut *session)
    .await?;
    let horizon: i64 = match read.first() {
        Some(row) => row.try_get("xmin")?,
        None => return Err(crate::Error::Corrupt("the outbox claim read no horizon".to_owned())),
    };
    let mut stored: Vec<StoredRow> = Vec::with_capacity(read.len());
    for row in read {
        if let Some(id) = row.try_get::<Option<i64>, _>("id")? {
            stored.push((
                id,
                row.try_get("event_ids")?,
                row.try_get("topics")?,
                row.try_get("message_keys")?,
                row.try_get("payloads")?,
                row.try_get("header_counts")?,
                row.try_get("header_names")?,
                row.try_get("header_values")?,
                row.try_get("writer")?,
            ));
        }
    }
    // The join is not bound to keep the subquery's order; the claim is.
    stored.sort_unstable_by_key(|&(id, .., writer)| (writer, id));
    let rows: Vec<OutboxRow> = stored.into_iter().map(messages).collect::<Result<_>>()?;
    // Out of room (each row holds a message at least): the rows left out, if
    // any, come after the last one taken.
    let taken: usize = rows.iter().map(|row| row.messages.len()).sum();
    let full = taken as i64 >= batch_size_max;
    Ok(Claim { rows, horizon, full })
}

/// Deletes the rows the broker acknowledged. A delete writes only the old
/// row's header to the WAL, where stamping the row published wrote a new
/// copy of it (payload included) and an index entry, and pruning it later
/// wrote again. The relay gathers the acknowledged rows of several claims
/// into one delete (claiming past them meanwhile), so at a low load a
/// published row does not cost a commit of its own.
pub async fn delete_published(session: &mut PgConnection, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)").bind(ids).execute(session).await?;
    Ok(())
}

pub async fn mark_failed(session: &mut PgConnection, ids: &[i64], error: &str) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = ANY($1)")
        .bind(ids)
        .bind(error)
        .execute(session)
        .await?;
    Ok(())
}

/// Messages still to publish.
pub async fn unpublished_count(conn: &mut PgConnection) -> Result<i64> {
    Ok(crate::gauges::outbox(conn).await?.0)
}
