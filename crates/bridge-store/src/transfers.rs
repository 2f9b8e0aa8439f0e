//! Transfers and their version history (invariant I6).
//!
//! `transfers` holds the current state; `transfer_versions` holds every state
//! the transfer has been in, one immutable row per version; `open_transfers`
//! lists the transfers not yet in a final state (migration 0029 says why it
//! is a table and not an index). All three change only through
//! [`insert_requested`], [`insert_decided`] and [`advance_step`] (which
//! [`advance`] calls for one transfer), each writing the tables together in
//! one statement, the new states asked of the domain state machine first.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use bridge_domain::{ids, TransferEvent, TransferState};

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub id: Uuid,
    pub investor_account_id: String,
    pub fund_account_id: String,
    pub fund_id: Option<String>,
    pub amount_minor: i64,
    pub currency: String,
    pub reference: String,
    pub source_system: String,
    pub requested_at: DateTime<Utc>,
    pub state: TransferState,
    pub reason_code: Option<String>,
    pub version: i64,
    pub traceparent: Option<String>,
    /// The attempt its money steps' idempotency keys carry (see
    /// `ids::idempotency_key`): 0 unless an operator retried a voided step.
    pub step_attempt: i32,
}

impl Transfer {
    /// Whether `other` asks for the same movement of money. Used to tell an
    /// idempotent re-publication from a conflicting reuse of a transfer id.
    pub fn same_request_as(&self, other: &Transfer) -> bool {
        self.investor_account_id == other.investor_account_id
            && self.fund_account_id == other.fund_account_id
            && self.amount_minor == other.amount_minor
            && self.currency == other.currency
            && self.reference == other.reference
    }
}

/// One row of a transfer's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferVersion {
    pub version: i64,
    pub state: TransferState,
    pub previous_state: Option<TransferState>,
    pub reason_code: Option<String>,
    pub event_id: Uuid,
    pub recorded_at: DateTime<Utc>,
    /// Set when a person, not a stage, made the change.
    pub actor: Option<Actor>,
}

type TransferRow = (
    Uuid,
    String,
    String,
    Option<String>,
    i64,
    String,
    String,
    String,
    DateTime<Utc>,
    String,
    Option<String>,
    i64,
    Option<String>,
    i32,
);

fn from_row(row: TransferRow) -> Result<Transfer> {
    let (
        id,
        investor,
        fund_account,
        fund_id,
        amount,
        currency,
        reference,
        source,
        requested_at,
        state,
        reason,
        version,
        traceparent,
        step_attempt,
    ) = row;
    Ok(Transfer {
        id,
        investor_account_id: investor,
        fund_account_id: fund_account,
        fund_id,
        amount_minor: amount,
        currency,
        reference,
        source_system: source,
        requested_at,
        state: TransferState::parse(&state).map_err(|error| Error::Corrupt(error.to_string()))?,
        reason_code: reason,
        version,
        traceparent,
        step_attempt,
    })
}

/// The ids of the open transfers (`open_transfers`), to select them from
/// `transfers` as `id = {OPEN_IDS}`. An array rather than a join: a join
/// may be planned as a scan of every transfer ever recorded, where the
/// array is read through the primary key, so the cost follows the open
/// transfers only.
pub(crate) const OPEN_IDS: &str = "ANY (ARRAY(SELECT transfer_id FROM open_transfers))";

const COLUMNS: &str = "id, investor_account_id, fund_account_id, fund_id, amount_minor, currency, reference,
    source_system, requested_at, state, reason_code, version, traceparent, step_attempt";

pub async fn get(conn: &mut PgConnection, id: Uuid) -> Result<Option<Transfer>> {
    let row: Option<TransferRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM transfers WHERE id = $1")).bind(id).fetch_optional(conn).await?;
    row.map(from_row).transpose()
}

/// The transfers with these ids, in no particular order; missing ids are
/// left out. Not prepared: it also runs outside step transactions (see the
/// crate's note).
pub async fn get_many(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Transfer>> {
    // A lone message's read: the one-row statement, which is prepared.
    if let [id] = ids {
        return Ok(get(conn, *id).await?.into_iter().collect());
    }
    let rows: Vec<TransferRow> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM transfers WHERE id = ANY($1)"))
        .persistent(false)
        .bind(ids)
        .fetch_all(conn)
        .await?;
    rows.into_iter().map(from_row).collect()
}

/// Reads the transfer and locks its row until the transaction ends, so two
/// transactions applying the same step queue up and the second sees the
/// first one's result instead of acting on a stale read.
pub async fn get_for_update(conn: &mut PgConnection, id: Uuid) -> Result<Option<Transfer>> {
    let row: Option<TransferRow> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM transfers WHERE id = $1 FOR UPDATE"))
        .bind(id)
        .fetch_optional(conn)
        .await?;
    row.map(from_row).transpose()
}

/// Locks the transfers with these ids (in id order, so two batches lock in
/// the same order and cannot deadlock on each other), then records in the
/// inbox that `consumer`
/// applied `message_ids`, in one statement (one round trip). Answers the
/// transfers and how many of the messages were new (fewer than given: some
/// were applied before, and the caller must roll back). The locks come
/// first, on every path that records a step's message, so two consumers
/// given the same message (a partition moving between processes) queue on
/// the transfer, instead of each holding what the other waits for.
pub async fn lock_for_messages(
    conn: &mut PgConnection,
    ids: &[Uuid],
    consumer: &str,
    message_ids: &[String],
) -> Result<(Vec<Transfer>, u64)> {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let sql = SQL.get_or_init(|| {
        // The inbox insert's condition reads every locked row first.
        format!(
            "WITH locked AS (SELECT {COLUMNS} FROM transfers WHERE id = ANY($1) ORDER BY id FOR UPDATE),
             recorded AS (
                 INSERT INTO inbox (consumer, message_id)
                 SELECT $2, message_id FROM unnest($3::text[]) AS message_id
                 WHERE (SELECT count(*) FROM locked) >= 0
                 ON CONFLICT DO NOTHING RETURNING 1
             )
             SELECT {COLUMNS}, (SELECT count(*) FROM recorded) AS recorded FROM locked"
        )
    });
    let rows: Vec<sqlx::postgres::PgRow> =
        sqlx::query(sql).bind(ids).bind(consumer).bind(message_ids).fetch_all(conn).await?;
    let mut recorded = 0;
    let mut transfers = Vec::with_capacity(rows.len());
    for row in rows {
        use sqlx::{FromRow, Row};
        recorded = row.try_get::<i64, _>("recorded")? as u64;
        transfers.push(from_row(<TransferRow as FromRow<'_, sqlx::postgres::PgRow>>::from_row(&row)?)?);
    }
    Ok((transfers, recorded))
}

/// The versions `event` moves each of `current` to: what [`advance_step`]
/// writes, known before it runs, so the events announcing them can be
/// written by the same statement. An illegal event is refused here.
pub fn next_versions(current: &[Transfer], event: &TransferEvent) -> Result<Vec<Transfer>> {
    current.iter().map(|transfer| next_version(transfer, event)).collect()
}

fn next_version(current: &Transfer, event: &TransferEvent) -> Result<Transfer> {
    let state =
        current.state.apply(event).map_err(|error| Error::Corrupt(format!("transfer {}: {error}", current.id)))?;
    Ok(Transfer {
        state,
        version: current.version + 1,
        reason_code: event.reason_code().map(str::to_owned),
        ..current.clone()
    })
}

/// What a step's statement writes besides the transfers' new versions.
pub struct StepWrites<'a> {
    /// The kind of pending step (`pending_steps.step`) the step settles
    /// for each transfer, if it is a money step: the record, if any, goes.
    /// The transfers' rows must be locked already, as the settlement runner
    /// takes the transfer's lock before the pending step's.
    pub settles: Option<&'a str>,
    /// The step's ledger postings (never locked: inserted).
    pub postings: &'a crate::ledger::Postings,
    /// The events the step emits, as its transaction's outbox row.
    pub outbox: &'a [crate::outbox::OutboxMessage],
}

/// A step's changes to transfers whose rows this transaction has locked,
/// in one statement (one round trip): each transfer moved from `current`
/// to `next` (from [`next_versions`]), version-checked, with its history
/// row naming `actors` (one per transfer: who made the change when not the
/// stage), and the `writes` beside them. The accounts' balances are not
/// among them: they are locked in `books`' order, statement by statement.
/// A conflict if any transfer changed since it was read; the caller then
/// rolls back, which undoes the rest.
pub async fn advance_step(
    conn: &mut PgConnection,
    current: &[Transfer],
    next: &[Transfer],
    actors: &[Option<&Actor>],
    writes: StepWrites<'_>,
) -> Result<()> {
    if current.len() != next.len() || current.len() != actors.len() {
        return Err(Error::Corrupt(format!(
            "a step of {} transfers with {} new versions and {} actors",
            current.len(),
            next.len(),
            actors.len()
        )));
    }
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let sql = SQL.get_or_init(|| {
        format!(
            "WITH input AS (
                 SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::uuid[],
                                      $7::bool[], $8::text[], $9::text[], $10::text[])
                     AS i(id, version, previous_state, state, reason_code, event_id, closes, actor, note,
                          external_reference)
             ),
             updated AS (
                 UPDATE transfers t SET state = input.state, reason_code = input.reason_code,
                        version = input.version + 1, updated_at = now()
                 FROM input WHERE t.id = input.id AND t.version = input.version
                 RETURNING t.id, t.created_at, input.closes
             ),
             closed AS (
                 DELETE FROM open_transfers o USING updated
                 WHERE updated.closes AND o.created_at = updated.created_at AND o.transfer_id = updated.id
             ),
             settled AS (
                 DELETE FROM pending_steps WHERE $11::text IS NOT NULL AND step = $11 AND transfer_id = ANY($1)
             ),
             posted AS ({}),
             queued AS ({})
             INSERT INTO transfer_versions (transfer_id, version, state, previous_state, reason_code, event_id,
                                            actor, note, external_reference)
             SELECT input.id, input.version + 1, input.state, input.previous_state, input.reason_code,
                    input.event_id, input.actor, input.note, input.external_reference
             FROM input JOIN updated ON updated.id = input.id",
            crate::ledger::Postings::insert_sql(12),
            crate::outbox::Columns::insert_sql(19),
        )
    });
    let ids: Vec<Uuid> = current.iter().map(|transfer| transfer.id).collect();
    let versions: Vec<i64> = current.iter().map(|transfer| transfer.version).collect();
    let previous: Vec<&str> = current.iter().map(|transfer| transfer.state.as_str()).collect();
    let states: Vec<&str> = next.iter().map(|transfer| transfer.state.as_str()).collect();
    let reasons: Vec<Option<&str>> = next.iter().map(|transfer| transfer.reason_code.as_deref()).collect();
    let event_ids: Vec<Uuid> =
        next.iter().map(|transfer| ids::status_event_id(transfer.id, transfer.version)).collect();
    let closes: Vec<bool> = next.iter().map(|transfer| transfer.state.is_terminal()).collect();
    let names: Vec<Option<&str>> = actors.iter().map(|actor| actor.map(|actor| actor.name.as_str())).collect();
    let notes: Vec<Option<&str>> = actors.iter().map(|actor| actor.map(|actor| actor.note.as_str())).collect();
    let references: Vec<Option<&str>> =
        actors.iter().map(|actor| actor.and_then(|actor| actor.external_reference.as_deref())).collect();
    let query = sqlx::query(sql)
        .bind(&ids)
        .bind(&versions)
        .bind(&previous)
        .bind(&states)
        .bind(&reasons)
        .bind(&event_ids)
        .bind(&closes)
        .bind(&names)
        .bind(&notes)
        .bind(&references)
        .bind(writes.settles);
    let query = crate::outbox::Columns::of(writes.outbox).bind(writes.postings.bind(query));
    let updated = query.execute(&mut *conn).await?.rows_affected();
    if updated != current.len() as u64 {
        let id = match current {
            [one] => one.id.to_string(),
            _ => format!("{} of {}", current.len() as u64 - updated, current.len()),
        };
        return Err(Error::Conflict { entity: "transfer", id });
    }
    Ok(())
}

/// Records a new transfer in state `requested`, version 1. A concurrent
/// insert of the same id loses with a retryable unique violation.
pub async fn insert_requested(conn: &mut PgConnection, transfer: &Transfer) -> Result<Transfer> {
    let mut stored = transfer.clone();
    stored.state = TransferState::Requested;
    stored.version = 1;
    stored.reason_code = None;
    // The row and its first version in one statement (one round trip).
    sqlx::query(
        "WITH inserted AS (
             INSERT INTO transfers (id, investor_account_id, fund_account_id, fund_id, amount_minor, currency,
                                    reference, source_system, requested_at, state, version, traceparent)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'requested', 1, $10)
             RETURNING id, created_at
         ),
         listed AS (INSERT INTO open_transfers (created_at, transfer_id) SELECT created_at, id FROM inserted)
         INSERT INTO transfer_versions (transfer_id, version, state, previous_state, reason_code, event_id)
         SELECT id, 1, 'requested', NULL, NULL, $11 FROM inserted",
    )
    .bind(stored.id)
    .bind(&stored.investor_account_id)
    .bind(&stored.fund_account_id)
    .bind(&stored.fund_id)
    .bind(stored.amount_minor)
    .bind(&stored.currency)
    .bind(&stored.reference)
    .bind(&stored.source_system)
    .bind(stored.requested_at)
    .bind(&stored.traceparent)
    .bind(ids::status_event_id(stored.id, stored.version))
    .execute(&mut *conn)
    .await?;
    Ok(stored)
}

/// The transfers [`insert_decided`] records: each at version 2 in its
/// decided state. Known before it runs, so the events announcing them can
/// be written by the same statement.
pub fn decided_versions(decided: &[(Transfer, TransferEvent)]) -> Result<Vec<Transfer>> {
    decided
        .iter()
        .map(|(requested, event)| {
            let requested = Transfer { state: TransferState::Requested, version: 1, ..requested.clone() };
            next_version(&requested, event)
        })
        .collect()
}

/// Records new transfers whose request is already decided, in one
/// statement: each transfer in `next` (from [`decided_versions`]) at
/// version 2 in its decided state, with both of its history rows
/// (requested, then the decision), exactly what `insert_requested`
/// followed by `advance` writes, and `outbox`, the events announcing them,
/// as the transaction's outbox row. A transfer that exists already loses
/// with a unique violation.
pub async fn insert_decided(
    conn: &mut PgConnection,
    next: &[Transfer],
    outbox: &[crate::outbox::OutboxMessage],
) -> Result<()> {
    let column = |field: fn(&Transfer) -> Option<&str>| next.iter().map(field).collect::<Vec<_>>();
    let ids: Vec<Uuid> = next.iter().map(|transfer| transfer.id).collect();
    let amounts: Vec<i64> = next.iter().map(|transfer| transfer.amount_minor).collect();
    let requested_at: Vec<DateTime<Utc>> = next.iter().map(|transfer| transfer.requested_at).collect();
    let first_events: Vec<Uuid> = ids.iter().map(|id| ids::status_event_id(*id, 1)).collect();
    let second_events: Vec<Uuid> = ids.iter().map(|id| ids::status_event_id(*id, 2)).collect();
    let open: Vec<bool> = next.iter().map(|transfer| !transfer.state.is_terminal()).collect();
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let sql = SQL.get_or_init(|| {
        format!(
            "WITH input AS (
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[],
                                  $7::text[], $8::text[], $9::timestamptz[], $10::text[], $11::text[], $12::text[],
                                  $13::uuid[], $14::uuid[], $15::bool[])
                 AS i(id, investor_account_id, fund_account_id, fund_id, amount_minor, currency, reference,
                      source_system, requested_at, state, reason_code, traceparent, first_event, second_event,
                      open)
         ),
         inserted AS (
             INSERT INTO transfers (id, investor_account_id, fund_account_id, fund_id, amount_minor, currency,
                                    reference, source_system, requested_at, state, reason_code, version, traceparent)
             SELECT id, investor_account_id, fund_account_id, fund_id, amount_minor, currency, reference,
                    source_system, requested_at, state, reason_code, 2, traceparent
             FROM input
             RETURNING id, created_at
         ),
         listed AS (
             INSERT INTO open_transfers (created_at, transfer_id)
             SELECT inserted.created_at, inserted.id FROM inserted JOIN input USING (id) WHERE input.open
         ),
         queued AS ({})
         INSERT INTO transfer_versions (transfer_id, version, state, previous_state, reason_code, event_id)
         SELECT input.id, 1, 'requested', NULL, NULL, input.first_event FROM input JOIN inserted USING (id)
         UNION ALL
         SELECT input.id, 2, input.state, 'requested', input.reason_code, input.second_event
         FROM input JOIN inserted USING (id)",
            crate::outbox::Columns::insert_sql(16),
        )
    });
    let query = sqlx::query(sql)
        .bind(&ids)
        .bind(column(|transfer| Some(transfer.investor_account_id.as_str())))
        .bind(column(|transfer| Some(transfer.fund_account_id.as_str())))
        .bind(column(|transfer| transfer.fund_id.as_deref()))
        .bind(&amounts)
        .bind(column(|transfer| Some(transfer.currency.as_str())))
        .bind(column(|transfer| Some(transfer.reference.as_str())))
        .bind(column(|transfer| Some(transfer.source_system.as_str())))
        .bind(&requested_at)
        .bind(column(|transfer| Some(transfer.state.as_str())))
        .bind(column(|transfer| transfer.reason_code.as_deref()))
        .bind(column(|transfer| transfer.traceparent.as_deref()))
        .bind(&first_events)
        .bind(&second_events)
        .bind(&open);
    let inserted = crate::outbox::Columns::of(outbox).bind(query).execute(&mut *conn).await?.rows_affected();
    if inserted != 2 * next.len() as u64 {
        return Err(Error::Corrupt(format!("{inserted} history rows written for {} new transfers", next.len())));
    }
    Ok(())
}

/// Who moved a transfer, when it was not the stage that consumed the
/// step's message: an operator resolving a manual review (in their words,
/// naming the outside operation if any), the settlement runner, or a
/// settlement callback (naming the message id it came under).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    pub name: String,
    pub note: String,
    pub external_reference: Option<String>,
}

/// Moves `current` along the state machine by `event`, version-checked, and
/// appends the new version to the history. Returns the new state of the
/// transfer. An illegal event is refused before anything is written.
pub async fn advance(conn: &mut PgConnection, current: &Transfer, event: &TransferEvent) -> Result<Transfer> {
    advance_as(conn, current, event, None).await
}

/// [`advance`], with the actor recorded in the new version when it is not
/// the stage the event names.
pub async fn advance_as(
    conn: &mut PgConnection,
    current: &Transfer,
    event: &TransferEvent,
    actor: Option<&Actor>,
) -> Result<Transfer> {
    let next = next_version(current, event)?;
    let writes = StepWrites { settles: None, postings: &crate::ledger::Postings::default(), outbox: &[] };
    advance_step(conn, std::slice::from_ref(current), std::slice::from_ref(&next), &[actor], writes).await?;
    Ok(next)
}

type VersionRow =
    (i64, String, Option<String>, Option<String>, Uuid, DateTime<Utc>, Option<String>, Option<String>, Option<String>);

pub async fn history(conn: &mut PgConnection, id: Uuid) -> Result<Vec<TransferVersion>> {
    let rows: Vec<VersionRow> = sqlx::query_as(
        "SELECT version, state, previous_state, reason_code, event_id, recorded_at, actor, note, external_reference
         FROM transfer_versions WHERE transfer_id = $1 ORDER BY version",
    )
    .bind(id)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(version, state, previous, reason_code, event_id, recorded_at, actor, note, reference)| {
            let parse = |text: &str| TransferState::parse(text).map_err(|error| Error::Corrupt(error.to_string()));
            Ok(TransferVersion {
                version,
                state: parse(&state)?,
                previous_state: previous.as_deref().map(parse).transpose()?,
                reason_code,
                event_id,
                recorded_at,
                actor: actor.map(|name| Actor { name, note: note.unwrap_or_default(), external_reference: reference }),
            })
        })
        .collect()
}

/// The state a transfer in manual review froze in: the state of the
/// version before the one that handed it to a person.
pub async fn frozen_from(conn: &mut PgConnection, id: Uuid) -> Result<Option<TransferState>> {
    let previous: Option<Option<String>> = sqlx::query_scalar(
        "SELECT previous_state FROM transfer_versions
         WHERE transfer_id = $1 AND state = 'manual_review' ORDER BY version DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?;
    previous
        .flatten()
        .map(|state| TransferState::parse(&state).map_err(|error| Error::Corrupt(error.to_string())))
        .transpose()
}

/// Moves a transfer's money steps to a new attempt of their idempotency
/// keys, version-checked against `current`; the caller advances the
/// transfer in the same transaction.
pub async fn next_step_attempt(conn: &mut PgConnection, current: &Transfer) -> Result<i32> {
    let attempt: Option<i32> = sqlx::query_scalar(
        "UPDATE transfers SET step_attempt = step_attempt + 1 WHERE id = $1 AND version = $2 RETURNING step_attempt",
    )
    .bind(current.id)
    .bind(current.version)
    .fetch_optional(conn)
    .await?;
    attempt.ok_or_else(|| Error::Conflict { entity: "transfer", id: current.id.to_string() })
}

/// Counts of transfers per state, for progress reports.
pub async fn count_by_state(conn: &mut PgConnection, ids: Option<&[Uuid]>) -> Result<Vec<(TransferState, i64)>> {
    let rows: Vec<(String, i64)> = match ids {
        Some(ids) => {
            sqlx::query_as("SELECT state, count(*) FROM transfers WHERE id = ANY($1) GROUP BY state")
                .bind(ids)
                .fetch_all(conn)
                .await?
        }
        None => sqlx::query_as("SELECT state, count(*) FROM transfers GROUP BY state").fetch_all(conn).await?,
    };
    rows.into_iter()
        .map(|(state, count)| {
            Ok((TransferState::parse(&state).map_err(|error| Error::Corrupt(error.to_string()))?, count))
        })
        .collect()
}

/// Transfers validated more than `older_than_ms` ago and still waiting for
/// their withdrawal: reservations due to expire. Oldest first, at most
/// `limit`.
pub async fn validated_before(conn: &mut PgConnection, older_than_ms: u64, limit: i64) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        // A transfer validated before the cutoff was created before it too:
        // the open list's key narrows the search to those. As an array, so
        // the transfers are read by their key whatever the planner guesses
        // of the cutoff (a join may scan the whole table instead).
        "SELECT id FROM transfers
         WHERE id = ANY (ARRAY(SELECT transfer_id FROM open_transfers
                               WHERE created_at < now() - make_interval(secs => $1)))
           AND state = 'validated' AND updated_at < now() - make_interval(secs => $1)
         ORDER BY updated_at LIMIT $2",
    )
    .bind(older_than_ms as f64 / 1_000.0)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Sets the fund a transfer's fund account belongs to, as the validator
/// found it.
pub async fn set_fund(conn: &mut PgConnection, id: Uuid, fund_id: Option<&str>) -> Result<()> {
    sqlx::query("UPDATE transfers SET fund_id = $2 WHERE id = $1").bind(id).bind(fund_id).execute(conn).await?;
    Ok(())
}
