//! Transfers waiting for a person, and operators' resolutions of them
//! (`review_actions`): what was asked, by whom, who approved it, how it
//! ended. The rows coordinate operators (one resolution at a time per
//! review) and keep the record; what a resolution does to a transfer is
//! guarded by the transfer's own version check, whatever these rows say.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use bridge_domain::{Resolution, TransferState};

use crate::{Error, Result};

/// A transfer in manual review.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Review {
    pub transfer_id: Uuid,
    pub investor_account_id: String,
    pub fund_account_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub reason_code: Option<String>,
    /// The version that handed the transfer to a person.
    pub version: i64,
    /// Where it froze: `validated` (funds held) or `withdrawn` (money in
    /// transit).
    pub frozen_in: Option<String>,
    pub since: DateTime<Utc>,
    /// A resolution under way or waiting for approval.
    pub open_action: Option<Uuid>,
}

/// Transfers in manual review, oldest first.
pub async fn waiting(conn: &mut PgConnection, limit: i64) -> Result<Vec<Review>> {
    type Row = (Uuid, String, String, i64, String, Option<String>, i64, Option<String>, DateTime<Utc>, Option<Uuid>);
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT t.id, t.investor_account_id, t.fund_account_id, t.amount_minor, t.currency, t.reason_code,
                t.version, v.previous_state, v.recorded_at, a.id
         FROM transfers t
         JOIN transfer_versions v ON v.transfer_id = t.id AND v.version = t.version
         LEFT JOIN review_actions a ON a.transfer_id = t.id AND a.review_version = t.version
                                   AND a.status IN ('awaiting_approval', 'running')
         WHERE t.id = {} AND t.state = 'manual_review'
         ORDER BY v.recorded_at, t.id
         LIMIT $1",
        crate::transfers::OPEN_IDS
    ))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(transfer_id, investor, fund_account, amount, currency, reason, version, frozen, since, open)| Review {
            transfer_id,
            investor_account_id: investor,
            fund_account_id: fund_account,
            amount_minor: amount,
            currency,
            reason_code: reason,
            version,
            frozen_in: frozen,
            since,
            open_action: open,
        })
        .collect())
}

/// Where a resolution stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionStatus {
    /// Four-eyes: a second operator must approve it before it runs.
    AwaitingApproval,
    Running,
    /// It ran: the transfer moved on (see `result_state`).
    Done,
    /// It ran and changed nothing (the service could not act yet, the
    /// transfer changed meanwhile); another may be asked.
    NotApplied,
    /// The approver turned it down.
    Rejected,
}

impl ActionStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::AwaitingApproval => "awaiting_approval",
            Self::Running => "running",
            Self::Done => "done",
            Self::NotApplied => "not_applied",
            Self::Rejected => "rejected",
        }
    }

    fn parse(text: &str) -> Result<Self> {
        [Self::AwaitingApproval, Self::Running, Self::Done, Self::NotApplied, Self::Rejected]
            .into_iter()
            .find(|status| status.as_str() == text)
            .ok_or_else(|| Error::Corrupt(format!("review action status {text:?}")))
    }
}

/// An operator, as the API key or the command line names them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Operator {
    /// What tells two operators apart (an API key's id, a token's subject).
    pub id: String,
    /// How they are shown in histories.
    pub name: String,
}

/// One resolution of one review.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReviewAction {
    pub id: Uuid,
    pub transfer_id: Uuid,
    pub review_version: i64,
    #[serde(serialize_with = "as_str")]
    pub action: Resolution,
    pub new_attempt: bool,
    pub reason: String,
    pub reference: Option<String>,
    pub requested_by: String,
    #[serde(skip)]
    pub requested_by_id: String,
    pub requested_at: DateTime<Utc>,
    pub approved_by: Option<String>,
    pub approved_at: Option<DateTime<Utc>>,
    pub status: ActionStatus,
    pub outcome: Option<String>,
    pub result_state: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
}

fn as_str<S: serde::Serializer>(resolution: &Resolution, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(resolution.as_str())
}

const ACTION_COLUMNS: &str = "id, transfer_id, review_version, action, new_attempt, reason, reference, requested_by,
    requested_by_id, requested_at, approved_by, approved_at, status, outcome, result_state, finished_at";

type ActionRow = (
    Uuid,
    Uuid,
    i64,
    String,
    bool,
    String,
    Option<String>,
    String,
    String,
    DateTime<Utc>,
    Option<String>,
    Option<DateTime<Utc>>,
    String,
    Option<String>,
    Option<String>,
    Option<DateTime<Utc>>,
);

fn action_of(row: ActionRow) -> Result<ReviewAction> {
    let (id, transfer_id, review_version, action, new_attempt, reason, reference, requested_by, requested_by_id) =
        (row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7, row.8);
    Ok(ReviewAction {
        id,
        transfer_id,
        review_version,
        action: action.parse().map_err(Error::Corrupt)?,
        new_attempt,
        reason,
        reference,
        requested_by,
        requested_by_id,
        requested_at: row.9,
        approved_by: row.10,
        approved_at: row.11,
        status: ActionStatus::parse(&row.12)?,
        outcome: row.13,
        result_state: row.14,
        finished_at: row.15,
    })
}

/// A resolution as an operator asks for it.
#[derive(Clone, Debug)]
pub struct NewAction<'a> {
    pub transfer_id: Uuid,
    pub review_version: i64,
    pub action: Resolution,
    pub new_attempt: bool,
    pub reason: &'a str,
    pub reference: Option<&'a str>,
    pub operator: &'a Operator,
    pub needs_approval: bool,
    pub idempotency_key: Option<&'a str>,
}

/// How long a resolution may run before a new one of the same review takes
/// it as abandoned: far longer than any service call it makes.
const RUNNING_ABANDONED_AFTER_SECS: f64 = 300.0;

/// What recording a resolution found.
#[derive(Clone, Debug)]
pub enum Recorded {
    /// Recorded, to run now or after approval.
    New(ReviewAction),
    /// The idempotency key was used before: the action it recorded.
    Repeat(ReviewAction),
    /// Another resolution of this review is open or done.
    Conflict(ReviewAction),
}

/// Records a resolution, unless its idempotency key was used before or
/// another resolution of the same review got there first.
pub async fn record(conn: &mut PgConnection, new: &NewAction<'_>) -> Result<Recorded> {
    if let Some(key) = new.idempotency_key {
        if let Some(found) = by_key(&mut *conn, key).await? {
            return Ok(Recorded::Repeat(found));
        }
    }
    // A resolution whose process stopped while it ran would hold the review
    // for ever; after a while it is taken as abandoned. Whatever it did,
    // the transfer's version check keeps a later one from repeating it.
    sqlx::query(
        "UPDATE review_actions SET status = 'not_applied', finished_at = now(),
                outcome = 'abandoned: the process running it stopped before it finished'
         WHERE transfer_id = $1 AND review_version = $2 AND status = 'running'
           AND coalesce(approved_at, requested_at) < now() - make_interval(secs => $3)",
    )
    .bind(new.transfer_id)
    .bind(new.review_version)
    .bind(RUNNING_ABANDONED_AFTER_SECS)
    .execute(&mut *conn)
    .await?;
    let status = if new.needs_approval { ActionStatus::AwaitingApproval } else { ActionStatus::Running };
    let inserted: Option<ActionRow> = sqlx::query_as(&format!(
        "INSERT INTO review_actions (id, transfer_id, review_version, action, new_attempt, reason, reference,
                                     requested_by, requested_by_id, status, idempotency_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT DO NOTHING
         RETURNING {ACTION_COLUMNS}"
    ))
    .bind(Uuid::new_v4())
    .bind(new.transfer_id)
    .bind(new.review_version)
    .bind(new.action.as_str())
    .bind(new.new_attempt)
    .bind(new.reason)
    .bind(new.reference)
    .bind(&new.operator.name)
    .bind(&new.operator.id)
    .bind(status.as_str())
    .bind(new.idempotency_key)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = inserted {
        return Ok(Recorded::New(action_of(row)?));
    }
    // Lost to a concurrent request under the same key, or to another
    // resolution of this review.
    if let Some(key) = new.idempotency_key {
        if let Some(found) = by_key(&mut *conn, key).await? {
            return Ok(Recorded::Repeat(found));
        }
    }
    let open: Option<ActionRow> = sqlx::query_as(&format!(
        "SELECT {ACTION_COLUMNS} FROM review_actions
         WHERE transfer_id = $1 AND review_version = $2 AND status IN ('awaiting_approval', 'running', 'done')"
    ))
    .bind(new.transfer_id)
    .bind(new.review_version)
    .fetch_optional(&mut *conn)
    .await?;
    match open {
        Some(row) => Ok(Recorded::Conflict(action_of(row)?)),
        None => Err(Error::Conflict { entity: "review", id: new.transfer_id.to_string() }),
    }
}

/// The resolution recorded under an idempotency key.
pub async fn by_key(conn: &mut PgConnection, key: &str) -> Result<Option<ReviewAction>> {
    let row: Option<ActionRow> =
        sqlx::query_as(&format!("SELECT {ACTION_COLUMNS} FROM review_actions WHERE idempotency_key = $1"))
            .bind(key)
            .fetch_optional(conn)
            .await?;
    row.map(action_of).transpose()
}

pub async fn get(conn: &mut PgConnection, id: Uuid) -> Result<Option<ReviewAction>> {
    let row: Option<ActionRow> = sqlx::query_as(&format!("SELECT {ACTION_COLUMNS} FROM review_actions WHERE id = $1"))
        .bind(id)
        .fetch_optional(conn)
        .await?;
    row.map(action_of).transpose()
}

/// Every resolution asked for a transfer, oldest first.
pub async fn of_transfer(conn: &mut PgConnection, transfer_id: Uuid) -> Result<Vec<ReviewAction>> {
    let rows: Vec<ActionRow> = sqlx::query_as(&format!(
        "SELECT {ACTION_COLUMNS} FROM review_actions WHERE transfer_id = $1 ORDER BY requested_at, id"
    ))
    .bind(transfer_id)
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(action_of).collect()
}

/// Approves a resolution waiting for it: `false` if it is no longer
/// waiting. The database refuses an approver who asked for it.
pub async fn approve(conn: &mut PgConnection, id: Uuid, approver: &Operator) -> Result<bool> {
    let updated = sqlx::query(
        "UPDATE review_actions SET status = 'running', approved_by = $2, approved_by_id = $3, approved_at = now()
         WHERE id = $1 AND status = 'awaiting_approval' AND requested_by_id <> $3",
    )
    .bind(id)
    .bind(&approver.name)
    .bind(&approver.id)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// Turns down a resolution waiting for approval (its requester may
/// withdraw it too): `false` if it is no longer waiting.
pub async fn reject(conn: &mut PgConnection, id: Uuid, by: &Operator, why: &str) -> Result<bool> {
    let updated = sqlx::query(
        "UPDATE review_actions SET status = 'rejected', outcome = $2, finished_at = now()
         WHERE id = $1 AND status = 'awaiting_approval'",
    )
    .bind(id)
    .bind(format!("rejected by {}: {why}", by.name))
    .execute(conn)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// Records how a running resolution ended.
pub async fn finish(
    conn: &mut PgConnection,
    id: Uuid,
    status: ActionStatus,
    outcome: &str,
    result_state: Option<TransferState>,
) -> Result<()> {
    sqlx::query(
        "UPDATE review_actions SET status = $2, outcome = $3, result_state = $4, finished_at = now()
         WHERE id = $1 AND status = 'running'",
    )
    .bind(id)
    .bind(status.as_str())
    .bind(outcome)
    .bind(result_state.map(TransferState::as_str))
    .execute(conn)
    .await?;
    Ok(())
}

/// A transfer as people read it, for `bridge review show` and
/// `GET /v1/reviews/{id}`.
pub fn transfer_json(transfer: &crate::transfers::Transfer) -> serde_json::Value {
    serde_json::json!({
        "id": transfer.id, "state": transfer.state.as_str(), "version": transfer.version,
        "reason_code": transfer.reason_code, "investor_account_id": transfer.investor_account_id,
        "fund_account_id": transfer.fund_account_id, "amount_minor": transfer.amount_minor,
        "currency": transfer.currency, "reference": transfer.reference, "step_attempt": transfer.step_attempt,
    })
}

/// A transfer's whole story: where it stands (and where it froze, if a
/// person must resolve it), every version with who made it and why, its
/// ledger lines and its resolutions. `None` for a transfer that does not
/// exist.
pub async fn story(conn: &mut PgConnection, id: Uuid) -> Result<Option<serde_json::Value>> {
    use crate::{ledger, transfers};
    let Some(transfer) = transfers::get(conn, id).await? else { return Ok(None) };
    let frozen_in = match transfer.state {
        TransferState::ManualReview => transfers::frozen_from(conn, id).await?,
        _ => None,
    };
    let history: Vec<serde_json::Value> = transfers::history(conn, id)
        .await?
        .into_iter()
        .map(|version| {
            let actor = version.actor.as_ref();
            serde_json::json!({
                "version": version.version, "state": version.state.as_str(),
                "previous_state": version.previous_state.map(TransferState::as_str),
                "reason_code": version.reason_code, "recorded_at": version.recorded_at,
                "actor": actor.map(|actor| &actor.name),
                "note": actor.map(|actor| &actor.note),
                "external_reference": actor.and_then(|actor| actor.external_reference.as_ref()),
            })
        })
        .collect();
    let mut shown = transfer_json(&transfer);
    shown["frozen_in"] = serde_json::json!(frozen_in.map(TransferState::as_str));
    Ok(Some(serde_json::json!({
        "transfer": shown,
        "history": history,
        "ledger": ledger::of_transfer(conn, id).await?,
        "resolutions": of_transfer(conn, id).await?,
    })))
}
