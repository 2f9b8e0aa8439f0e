//! What the operator console reads and keeps: its sign-in sessions, the
//! overview's figures, the transfer search, and the parts of a transfer's
//! story that live outside its history (steps waiting at a service, the
//! status events as the notifier received them, their deliveries).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::api::ApiKey;
use crate::transfers::{self, Transfer};
use crate::Result;

/// A signed-in console session: the key it belongs to, as the key stands
/// now, and the token its forms carry.
#[derive(Clone, Debug)]
pub struct Session {
    pub key: ApiKey,
    pub csrf_token: String,
    pub expires_at: DateTime<Utc>,
}

/// Records a new session for `api_key_id`, valid for `lifetime_secs` at
/// most. Sessions that ended more than a day ago are forgotten now.
pub async fn start_session(
    conn: &mut PgConnection,
    token_hash: &[u8],
    api_key_id: Uuid,
    csrf_token: &str,
    source: &str,
    lifetime_secs: i64,
) -> Result<DateTime<Utc>> {
    sqlx::query("DELETE FROM console_sessions WHERE expires_at < now() - interval '1 day'").execute(&mut *conn).await?;
    let expires_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO console_sessions (token_hash, api_key_id, csrf_token, source, expires_at)
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) RETURNING expires_at",
    )
    .bind(token_hash)
    .bind(api_key_id)
    .bind(csrf_token)
    .bind(source)
    .bind(lifetime_secs as f64)
    .fetch_one(conn)
    .await?;
    Ok(expires_at)
}

/// The live session with this token: not ended, not expired, used within
/// `idle_secs`, and its key not revoked. Using it keeps it from going idle
/// (the last use is written at most once a minute).
pub async fn session(conn: &mut PgConnection, token_hash: &[u8], idle_secs: i64) -> Result<Option<Session>> {
    let row: Option<(
        Uuid,
        String,
        String,
        Vec<String>,
        Option<String>,
        DateTime<Utc>,
        String,
        DateTime<Utc>,
        DateTime<Utc>,
    )> = sqlx::query_as(
        "SELECT k.id, k.prefix, k.name, k.scopes, k.investor_account_id, k.created_at,
                s.csrf_token, s.expires_at, s.last_seen_at
         FROM console_sessions s JOIN api_keys k ON k.id = s.api_key_id
         WHERE s.token_hash = $1 AND s.ended_at IS NULL AND k.revoked_at IS NULL
           AND s.expires_at > now() AND s.last_seen_at > now() - make_interval(secs => $2)",
    )
    .bind(token_hash)
    .bind(idle_secs as f64)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((id, prefix, name, scopes, investor_account_id, created_at, csrf_token, expires_at, last_seen)) = row
    else {
        return Ok(None);
    };
    if Utc::now() - last_seen > chrono::Duration::seconds(60) {
        sqlx::query("UPDATE console_sessions SET last_seen_at = now() WHERE token_hash = $1")
            .bind(token_hash)
            .execute(conn)
            .await?;
    }
    let key = ApiKey { id, prefix, name, scopes, investor_account_id, created_at, revoked_at: None };
    Ok(Some(Session { key, csrf_token, expires_at }))
}

/// Signs a session out.
pub async fn end_session(conn: &mut PgConnection, token_hash: &[u8]) -> Result<()> {
    sqlx::query("UPDATE console_sessions SET ended_at = now() WHERE token_hash = $1 AND ended_at IS NULL")
        .bind(token_hash)
        .execute(conn)
        .await?;
    Ok(())
}

/// The overview's database figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Overview {
    /// Every transfer per state, terminal ones included.
    pub states: Vec<(String, i64)>,
    /// Transfers completed per minute, oldest minute first, minutes without
    /// a completion left out.
    pub completed_per_minute: Vec<(DateTime<Utc>, i64)>,
    pub outbox_unpublished: i64,
    pub outbox_oldest_age_secs: i64,
    /// Steps waiting at a service, by how close their deadline is:
    /// `overdue`, `within 1 hour`, `within 1 day`, `later`, `no deadline`.
    pub pending_by_deadline: Vec<(String, i64)>,
    pub reviews_waiting: i64,
    /// Notification targets: (id, channel, shown target, enabled, why
    /// disabled, failing since), only those failing or disabled.
    pub troubled_targets: Vec<TroubledTarget>,
    /// Deliveries given up on, waiting for a redrive.
    pub deliveries_dead: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TroubledTarget {
    pub id: i64,
    pub channel: String,
    pub target: String,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    pub failing_since: Option<DateTime<Utc>>,
}

/// The database side of the overview, over the last `hours` for the
/// completion rate.
pub async fn overview(conn: &mut PgConnection, hours: i64) -> Result<Overview> {
    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM transfers GROUP BY state ORDER BY state")
            .fetch_all(&mut *conn)
            .await?;
    // transfer_versions has a BRIN index on recorded_at: the window reads
    // only the recent blocks.
    let completed_per_minute: Vec<(DateTime<Utc>, i64)> = sqlx::query_as(
        "SELECT date_trunc('minute', recorded_at), count(*) FROM transfer_versions
         WHERE recorded_at > now() - make_interval(hours => $1::int) AND state = 'completed'
         GROUP BY 1 ORDER BY 1",
    )
    .bind(hours as i32)
    .fetch_all(&mut *conn)
    .await?;
    let (outbox_unpublished, outbox_oldest_age_secs) = crate::gauges::outbox(conn).await?;
    let pending_by_deadline: Vec<(String, i64)> = sqlx::query_as(
        "SELECT bucket, count(*) FROM (
             SELECT CASE WHEN deadline_at IS NULL THEN 'no deadline'
                         WHEN deadline_at <= now() THEN 'overdue'
                         WHEN deadline_at <= now() + interval '1 hour' THEN 'within 1 hour'
                         WHEN deadline_at <= now() + interval '1 day' THEN 'within 1 day'
                         ELSE 'later' END AS bucket
             FROM pending_steps) steps
         GROUP BY bucket",
    )
    .fetch_all(&mut *conn)
    .await?;
    let order = ["overdue", "within 1 hour", "within 1 day", "later", "no deadline"];
    let mut pending_by_deadline: Vec<(String, i64)> = order
        .iter()
        .map(|bucket| {
            let count = pending_by_deadline.iter().find(|(name, _)| name == bucket).map_or(0, |(_, count)| *count);
            ((*bucket).to_owned(), count)
        })
        .collect();
    pending_by_deadline.retain(|(bucket, count)| *count > 0 || *bucket == "overdue");
    let reviews_waiting: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM transfers WHERE id = {} AND state = 'manual_review'",
        crate::transfers::OPEN_IDS
    ))
    .fetch_one(&mut *conn)
    .await?;
    let troubled_targets = sqlx::query_as::<_, (i64, String, String, bool, Option<String>, Option<DateTime<Utc>>)>(
        "SELECT id, channel, target, enabled, disabled_reason, failing_since FROM notification_subscriptions
         WHERE NOT enabled OR failing_since IS NOT NULL ORDER BY id",
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|(id, channel, target, enabled, disabled_reason, failing_since)| TroubledTarget {
        id,
        channel,
        target,
        enabled,
        disabled_reason,
        failing_since,
    })
    .collect();
    let deliveries_dead: i64 = sqlx::query_scalar("SELECT count(*) FROM notification_deliveries WHERE status = 'dead'")
        .fetch_one(&mut *conn)
        .await?;
    Ok(Overview {
        states,
        completed_per_minute,
        outbox_unpublished,
        outbox_oldest_age_secs,
        pending_by_deadline,
        reviews_waiting,
        troubled_targets,
        deliveries_dead,
    })
}

/// What the transfer search filters on; every field is optional.
#[derive(Clone, Debug, Default)]
pub struct Search {
    pub id: Option<Uuid>,
    pub investor: Option<String>,
    /// A fund account or a fund.
    pub fund: Option<String>,
    pub state: Option<String>,
    pub reason: Option<String>,
    /// Created at or after.
    pub from: Option<DateTime<Utc>>,
    /// Created before.
    pub to: Option<DateTime<Utc>>,
}

/// The newest transfers matching `search`, at most `limit`.
pub async fn search(conn: &mut PgConnection, search: &Search, limit: i64) -> Result<Vec<Transfer>> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM transfers
         WHERE ($1::uuid IS NULL OR id = $1)
           AND ($2::text IS NULL OR investor_account_id = $2)
           AND ($3::text IS NULL OR fund_account_id = $3 OR fund_id = $3)
           AND ($4::text IS NULL OR state = $4)
           AND ($5::text IS NULL OR reason_code = $5)
           AND ($6::timestamptz IS NULL OR created_at >= $6)
           AND ($7::timestamptz IS NULL OR created_at < $7)
         ORDER BY created_at DESC, id DESC LIMIT $8",
    )
    .bind(search.id)
    .bind(&search.investor)
    .bind(&search.fund)
    .bind(&search.state)
    .bind(&search.reason)
    .bind(search.from)
    .bind(search.to)
    .bind(limit.clamp(1, 1_000))
    .persistent(false)
    .fetch_all(&mut *conn)
    .await?;
    let mut found = transfers::get_many(conn, &ids).await?;
    found.sort_by_key(|transfer| ids.iter().position(|id| *id == transfer.id));
    Ok(found)
}

/// A step a service accepted and has not settled yet.
#[derive(Clone, Debug, Serialize)]
pub struct PendingStep {
    pub step: String,
    pub attempts: i32,
    pub last_status: String,
    pub created_at: DateTime<Utc>,
    pub next_run_at: DateTime<Utc>,
    pub deadline_at: Option<DateTime<Utc>>,
}

pub async fn pending_steps_of(conn: &mut PgConnection, transfer_id: Uuid) -> Result<Vec<PendingStep>> {
    Ok(pending(conn, Some(transfer_id), 10).await?.into_iter().map(|(_, step)| step).collect())
}

/// Steps waiting at a service across all transfers, nearest deadline
/// first (those without one last).
pub async fn pending_steps(conn: &mut PgConnection, limit: i64) -> Result<Vec<(Uuid, PendingStep)>> {
    pending(conn, None, limit).await
}

async fn pending(conn: &mut PgConnection, transfer_id: Option<Uuid>, limit: i64) -> Result<Vec<(Uuid, PendingStep)>> {
    let rows: Vec<(Uuid, String, i32, String, DateTime<Utc>, DateTime<Utc>, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT transfer_id, step, attempts, last_status, created_at, next_run_at, deadline_at
             FROM pending_steps WHERE $1::uuid IS NULL OR transfer_id = $1
             ORDER BY deadline_at NULLS LAST, created_at LIMIT $2",
    )
    .bind(transfer_id)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(transfer_id, step, attempts, last_status, created_at, next_run_at, deadline_at)| {
            (transfer_id, PendingStep { step, attempts, last_status, created_at, next_run_at, deadline_at })
        })
        .collect())
}

/// A status event as the notifier received it from the status topic.
#[derive(Clone, Debug, Serialize)]
pub struct ReceivedEvent {
    pub event_id: Uuid,
    pub version: i64,
    pub state: String,
    pub received_at: DateTime<Utc>,
    pub event: serde_json::Value,
}

pub async fn events_of(conn: &mut PgConnection, transfer_id: Uuid) -> Result<Vec<ReceivedEvent>> {
    let rows: Vec<(Uuid, i64, String, DateTime<Utc>, serde_json::Value)> = sqlx::query_as(
        "SELECT event_id, version, state, received_at, event FROM notification_log
         WHERE transfer_id = $1 ORDER BY version",
    )
    .bind(transfer_id)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(event_id, version, state, received_at, event)| ReceivedEvent {
            event_id,
            version,
            state,
            received_at,
            event,
        })
        .collect())
}

/// One notification of one status event to one target.
#[derive(Clone, Debug, Serialize)]
pub struct Delivery {
    pub id: i64,
    pub subscription_id: i64,
    pub channel: String,
    /// As stored in the clear: redacted for targets that are secrets.
    pub target: String,
    pub version: i64,
    pub state: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

type DeliveryRow =
    (i64, i64, String, String, i64, String, String, i32, Option<String>, DateTime<Utc>, Option<DateTime<Utc>>);

fn delivery(
    (id, subscription_id, channel, target, version, state, status, attempts, last_error, created_at, finished_at): DeliveryRow,
) -> Delivery {
    Delivery {
        id,
        subscription_id,
        channel,
        target,
        version,
        state,
        status,
        attempts,
        last_error,
        created_at,
        finished_at,
    }
}

pub async fn deliveries_of(conn: &mut PgConnection, transfer_id: Uuid) -> Result<Vec<Delivery>> {
    let rows: Vec<DeliveryRow> = sqlx::query_as(
        "SELECT d.id, d.subscription_id, s.channel, s.target, l.version, l.state, d.status, d.attempts,
                d.last_error, d.created_at, d.finished_at
         FROM notification_log l
         JOIN notification_deliveries d ON d.event_id = l.event_id
         JOIN notification_subscriptions s ON s.id = d.subscription_id
         WHERE l.transfer_id = $1 ORDER BY l.version, d.id",
    )
    .bind(transfer_id)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(delivery).collect())
}

/// The latest deliveries of one status (`pending`, `delivered`, `dead`),
/// newest first, optionally of one subscription.
pub async fn deliveries(
    conn: &mut PgConnection,
    status: &str,
    subscription_id: Option<i64>,
    limit: i64,
) -> Result<Vec<Delivery>> {
    let rows: Vec<DeliveryRow> = sqlx::query_as(
        "SELECT d.id, d.subscription_id, s.channel, s.target, l.version, l.state, d.status, d.attempts,
                d.last_error, d.created_at, d.finished_at
         FROM notification_deliveries d
         JOIN notification_log l ON l.event_id = d.event_id
         JOIN notification_subscriptions s ON s.id = d.subscription_id
         WHERE d.status = $1 AND ($2::bigint IS NULL OR d.subscription_id = $2)
         ORDER BY d.id DESC LIMIT $3",
    )
    .bind(status)
    .bind(subscription_id)
    .bind(limit.clamp(1, 1_000))
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(delivery).collect())
}

/// When each target started failing, for the subscriptions page.
pub async fn failing_since(conn: &mut PgConnection) -> Result<Vec<(i64, DateTime<Utc>)>> {
    Ok(sqlx::query_as(
        "SELECT id, failing_since FROM notification_subscriptions WHERE failing_since IS NOT NULL ORDER BY id",
    )
    .fetch_all(conn)
    .await?)
}

/// The audit records that name `target`, newest first.
pub async fn audit_of(conn: &mut PgConnection, target: &str, limit: i64) -> Result<Vec<crate::audit::AuditRecord>> {
    Ok(sqlx::query_as(
        "SELECT id, at, actor, action, target, source, outcome FROM audit_log
         WHERE target = $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(target)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}
