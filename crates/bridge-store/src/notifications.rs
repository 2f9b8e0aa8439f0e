//! Notification subscriptions, the event log and the delivery queues.
//!
//! Every target (subscription) has its own queue: its deliveries are sent one
//! at a time, oldest first, so a target hears about a transfer's changes in
//! order, and a target that is down or slow holds back only its own queue.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::Result;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewSubscription {
    /// `investor`, `fund` or `operator`.
    pub subscriber_kind: String,
    /// Investor account id or fund account id; `None` for operators.
    pub subscriber_id: Option<String>,
    /// Transfer states to hear about; empty for all.
    pub states: Vec<String>,
    /// `webhook`, `slack`, `sms` or `email`.
    pub channel: String,
    pub target: String,
    /// A webhook's signing secret as a `credential:<name>` reference to the
    /// encrypted credentials store; never the secret itself.
    pub secret: Option<String>,
    /// The full target URL, sealed: a `credential:<name>` reference; then
    /// `target` is only its redacted form.
    pub sealed_target: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    pub id: i64,
    pub subscriber_kind: String,
    pub subscriber_id: Option<String>,
    pub states: Vec<String>,
    pub channel: String,
    pub target: String,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
}

pub async fn subscribe(conn: &mut PgConnection, new: &NewSubscription) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO notification_subscriptions
             (subscriber_kind, subscriber_id, states, channel, target, secret, sealed_target)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
    )
    .bind(&new.subscriber_kind)
    .bind(&new.subscriber_id)
    .bind(&new.states)
    .bind(&new.channel)
    .bind(&new.target)
    .bind(&new.secret)
    .bind(&new.sealed_target)
    .fetch_one(conn)
    .await?)
}

pub async fn subscriptions(conn: &mut PgConnection) -> Result<Vec<Subscription>> {
    let rows: Vec<(i64, String, Option<String>, Vec<String>, String, String, bool, Option<String>)> = sqlx::query_as(
        "SELECT id, subscriber_kind, subscriber_id, states, channel, target, enabled, disabled_reason
         FROM notification_subscriptions ORDER BY id",
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, subscriber_kind, subscriber_id, states, channel, target, enabled, disabled_reason)| Subscription {
            id,
            subscriber_kind,
            subscriber_id,
            states,
            channel,
            target,
            enabled,
            disabled_reason,
        })
        .collect())
}

/// Enables or disables a target. Enabling clears its failure streak, so the
/// automatic switch-off starts counting afresh. Returns whether it exists.
pub async fn set_enabled(conn: &mut PgConnection, id: i64, enabled: bool, reason: Option<&str>) -> Result<bool> {
    let updated = sqlx::query(
        "UPDATE notification_subscriptions
         SET enabled = $2, disabled_reason = CASE WHEN $2 THEN NULL ELSE $3 END,
             failing_since = CASE WHEN $2 THEN NULL ELSE failing_since END
         WHERE id = $1",
    )
    .bind(id)
    .bind(enabled)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// A status event as the notifier keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct LoggedEvent {
    pub event_id: Uuid,
    pub transfer_id: Uuid,
    pub version: i64,
    pub state: String,
    pub investor_account_id: String,
    pub fund_account_id: String,
    /// The whole event as JSON, as webhooks receive it.
    pub event: serde_json::Value,
    /// The trace the event belongs to, passed on to webhook receivers.
    pub traceparent: Option<String>,
}

/// Writes `event` to the event log and queues one delivery per matching
/// enabled-or-not subscription (a disabled target's deliveries wait for it to
/// be enabled again). Returns `None` when the event was logged before: a
/// redelivered event notifies nobody twice.
pub async fn accept(conn: &mut PgConnection, event: &LoggedEvent) -> Result<Option<u64>> {
    if !insert_event(&mut *conn, "notification_log", event).await? {
        return Ok(None);
    }
    let queued = sqlx::query(
        "INSERT INTO notification_deliveries (subscription_id, event_id)
         SELECT id, $1 FROM notification_subscriptions
         WHERE (cardinality(states) = 0 OR $2 = ANY(states))
           AND (subscriber_kind = 'operator'
                OR (subscriber_kind = 'investor' AND subscriber_id = $3)
                OR (subscriber_kind = 'fund' AND subscriber_id = $4))
         ORDER BY id
         ON CONFLICT (subscription_id, event_id) DO NOTHING",
    )
    .bind(event.event_id)
    .bind(&event.state)
    .bind(&event.investor_account_id)
    .bind(&event.fund_account_id)
    .execute(conn)
    .await?;
    Ok(Some(queued.rows_affected()))
}

/// A delivery claimed for sending.
#[derive(Clone)]
pub struct ClaimedDelivery {
    pub id: i64,
    pub subscription_id: i64,
    pub event_id: Uuid,
    /// Including this one.
    pub attempts: i32,
    pub channel: String,
    pub target: String,
    pub secret: Option<String>,
    /// The sealed full target (see `NewSubscription`), opened only to send.
    pub sealed_target: Option<String>,
    pub event: serde_json::Value,
    pub traceparent: Option<String>,
}

impl std::fmt::Debug for ClaimedDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedDelivery")
            .field("id", &self.id)
            .field("subscription_id", &self.subscription_id)
            .field("event_id", &self.event_id)
            .field("attempts", &self.attempts)
            .field("channel", &self.channel)
            .field("target", &self.target)
            .field("secret", &self.secret.as_ref().map(|_| "[REDACTED]"))
            .finish_non_exhaustive()
    }
}

/// Claims the head of up to `limit` target queues whose head is due, for
/// `lease_ms`. A queue whose head is leased (being sent, here or by another
/// notifier) or waiting for its retry time is skipped as a whole, which is
/// what keeps each target's deliveries in order, one at a time.
///
/// A queue runs in the order of the transactions that queued its deliveries
/// (`writer_xid`, then id), and its head is taken only once every transaction
/// older than the head's writer has ended: until then one of them could still
/// queue a delivery ahead of it. So a head, once claimable, stays the head
/// until it is delivered or dead. Ordering by id alone let a delivery whose
/// transaction drew a lower id but committed later slip in front of a head
/// already in flight.
pub async fn claim_heads(conn: &mut PgConnection, limit: i64, lease_ms: u64) -> Result<Vec<ClaimedDelivery>> {
    // The conditions on `d` are checked again on the locked row, so two
    // notifiers cannot both claim a head.
    type Row = (i64, i64, Uuid, i32, String, String, Option<String>, Option<String>, serde_json::Value, Option<String>);
    let rows: Vec<Row> = sqlx::query_as(
        // One index probe per enabled target for its head (rather than a
        // scan of every pending delivery), so a long backlog at one target
        // does not make claiming slower for the others. The horizon is a
        // subquery so that it is taken once per claim, not once per target.
        "WITH due AS (
             SELECT h.id FROM notification_subscriptions s
             CROSS JOIN LATERAL (
                 SELECT q.id, q.writer_xid, q.next_attempt_at, q.leased_until FROM notification_deliveries q
                 WHERE q.subscription_id = s.id AND q.status = 'pending'
                 ORDER BY q.writer_xid, q.id LIMIT 1) h
             WHERE s.enabled AND h.writer_xid < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
               AND h.next_attempt_at <= now() AND (h.leased_until IS NULL OR h.leased_until < now())
             ORDER BY h.next_attempt_at LIMIT $1)
         UPDATE notification_deliveries d
         SET leased_until = now() + make_interval(secs => $2), attempts = d.attempts + 1
         FROM due, notification_subscriptions s, notification_log l
         WHERE d.id = due.id AND s.id = d.subscription_id AND l.event_id = d.event_id
           AND d.status = 'pending' AND d.next_attempt_at <= now()
           AND (d.leased_until IS NULL OR d.leased_until < now())
         RETURNING d.id, d.subscription_id, d.event_id, d.attempts, s.channel, s.target, s.secret,
                   s.sealed_target, l.event, l.traceparent",
    )
    .bind(limit)
    .bind(lease_ms as f64 / 1_000.0)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, subscription_id, event_id, attempts, channel, target, secret, sealed_target, event, traceparent)| {
            ClaimedDelivery {
                id,
                subscription_id,
                event_id,
                attempts,
                channel,
                target,
                secret,
                sealed_target,
                event,
                traceparent,
            }
        })
        .collect())
}

pub async fn mark_delivered(conn: &mut PgConnection, delivery: &ClaimedDelivery) -> Result<()> {
    sqlx::query(
        "UPDATE notification_deliveries SET status = 'delivered', finished_at = now(), leased_until = NULL,
                last_error = NULL
         WHERE id = $1",
    )
    .bind(delivery.id)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE notification_subscriptions SET failing_since = NULL WHERE id = $1 AND failing_since IS NOT NULL",
    )
    .bind(delivery.subscription_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a failed attempt: retried after `retry_after_ms`, or dead-lettered
/// when `None`. A target failing for longer than `disable_after_ms` is
/// switched off; returns true when this failure switched it off.
pub async fn mark_failed(
    conn: &mut PgConnection,
    delivery: &ClaimedDelivery,
    error: &str,
    retry_after_ms: Option<u64>,
    disable_after_ms: u64,
) -> Result<bool> {
    sqlx::query(
        "UPDATE notification_deliveries
         SET status = CASE WHEN $3::float8 IS NULL THEN 'dead' ELSE 'pending' END,
             next_attempt_at = now() + make_interval(secs => coalesce($3::float8, 0)),
             finished_at = CASE WHEN $3::float8 IS NULL THEN now() END,
             leased_until = NULL, last_error = $2
         WHERE id = $1",
    )
    .bind(delivery.id)
    .bind(error.chars().take(1_000).collect::<String>())
    .bind(retry_after_ms.map(|ms| ms as f64 / 1_000.0))
    .execute(&mut *conn)
    .await?;
    let disabled: Option<bool> = sqlx::query_scalar(
        "UPDATE notification_subscriptions
         SET failing_since = coalesce(failing_since, now()),
             enabled = NOT (coalesce(failing_since, now()) < now() - make_interval(secs => $2)),
             disabled_reason = CASE WHEN coalesce(failing_since, now()) < now() - make_interval(secs => $2)
                                    THEN 'failing since ' || coalesce(failing_since, now())::text || ': ' || $3
                               END
         WHERE id = $1 AND enabled
         RETURNING NOT enabled",
    )
    .bind(delivery.subscription_id)
    .bind(disable_after_ms as f64 / 1_000.0)
    .bind(error.chars().take(200).collect::<String>())
    .fetch_optional(conn)
    .await?;
    Ok(disabled.unwrap_or(false))
}

/// Puts dead-lettered deliveries (of one target, or all) back in their
/// queues, attempts reset. Returns how many. They join the back of their
/// queues, in id order among themselves: put back in front, one could
/// become the head while the head it overtook is in flight.
pub async fn redrive(conn: &mut PgConnection, subscription_id: Option<i64>) -> Result<u64> {
    let updated = sqlx::query(
        "UPDATE notification_deliveries
         SET status = 'pending', attempts = 0, next_attempt_at = now(), finished_at = NULL,
             writer_xid = pg_current_xact_id()
         WHERE status = 'dead' AND ($1::bigint IS NULL OR subscription_id = $1)",
    )
    .bind(subscription_id)
    .execute(conn)
    .await?;
    Ok(updated.rows_affected())
}

/// Deletes deliveries delivered more than `older_than_ms` ago, oldest first,
/// `batch` per statement, and returns how many went. Pending and dead
/// deliveries are never touched; the events themselves stay in
/// `notification_log`. The rows are found through the index of delivered
/// rows, so a pass reads only what it deletes.
pub async fn prune_delivered(conn: &mut PgConnection, older_than_ms: u64, batch: i64) -> Result<u64> {
    crate::delete_in_batches(
        conn,
        "DELETE FROM notification_deliveries WHERE id IN (
             SELECT id FROM notification_deliveries
              WHERE status = 'delivered'
                AND finished_at < now() - make_interval(secs => $1::double precision / 1000)
              ORDER BY finished_at
              LIMIT $2)",
        older_than_ms,
        batch,
    )
    .await
}

/// Deliveries per status for one target (or all), for reports and tests.
pub async fn delivery_counts(conn: &mut PgConnection, subscription_id: Option<i64>) -> Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT status, count(*) FROM notification_deliveries
         WHERE $1::bigint IS NULL OR subscription_id = $1 GROUP BY status ORDER BY status",
    )
    .bind(subscription_id)
    .fetch_all(conn)
    .await?)
}

/// Empties the rebuild table before a rebuild.
pub async fn clear_rebuild(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("TRUNCATE notification_log_rebuild").execute(conn).await?;
    Ok(())
}

/// Adds one status event read back from the topic (repeats are ignored).
pub async fn rebuild_insert(conn: &mut PgConnection, event: &LoggedEvent) -> Result<()> {
    insert_event(conn, "notification_log_rebuild", event).await.map(|_| ())
}

/// Adds `event` to `table` (the live log or the rebuild, which share their
/// shape) unless it is there; true when it was new.
async fn insert_event(conn: &mut PgConnection, table: &'static str, event: &LoggedEvent) -> Result<bool> {
    let inserted = sqlx::query(&format!(
        "INSERT INTO {table} (event_id, transfer_id, version, state, event, traceparent)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING"
    ))
    .bind(event.event_id)
    .bind(event.transfer_id)
    .bind(event.version)
    .bind(&event.state)
    .bind(&event.event)
    .bind(&event.traceparent)
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// How the rebuilt log compares with the live one and with the transfers'
/// own history (the source of truth).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RebuildComparison {
    pub rebuilt: i64,
    pub live: i64,
    /// On the topic but not in the live log: events the notifier lost.
    pub missing_from_log: i64,
    /// In the live log but not on the topic (retention, or a wrong topic).
    pub missing_from_topic: i64,
    /// The same event id with another transfer, version or state.
    pub differing: i64,
    /// Transfer versions whose status event is on neither: never published.
    pub versions_never_published: i64,
}

pub async fn compare_rebuild(conn: &mut PgConnection) -> Result<RebuildComparison> {
    let row: (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM notification_log_rebuild),
                (SELECT count(*) FROM notification_log),
                (SELECT count(*) FROM notification_log_rebuild r
                  WHERE NOT EXISTS (SELECT 1 FROM notification_log l WHERE l.event_id = r.event_id)),
                (SELECT count(*) FROM notification_log l
                  WHERE NOT EXISTS (SELECT 1 FROM notification_log_rebuild r WHERE r.event_id = l.event_id)),
                (SELECT count(*) FROM notification_log l JOIN notification_log_rebuild r USING (event_id)
                  WHERE (l.transfer_id, l.version, l.state) IS DISTINCT FROM (r.transfer_id, r.version, r.state)),
                (SELECT count(*) FROM transfer_versions v
                  WHERE NOT EXISTS (SELECT 1 FROM notification_log_rebuild r
                                    WHERE r.transfer_id = v.transfer_id AND r.version = v.version)
                    AND NOT EXISTS (SELECT 1 FROM notification_log l
                                    WHERE l.transfer_id = v.transfer_id AND l.version = v.version))",
    )
    .fetch_one(conn)
    .await?;
    Ok(RebuildComparison {
        rebuilt: row.0,
        live: row.1,
        missing_from_log: row.2,
        missing_from_topic: row.3,
        differing: row.4,
        versions_never_published: row.5,
    })
}

/// The rebuilt events the live log lacks, oldest version first.
pub async fn missing_from_log(conn: &mut PgConnection) -> Result<Vec<LoggedEvent>> {
    let rows: Vec<(Uuid, Uuid, i64, String, serde_json::Value, Option<String>)> = sqlx::query_as(
        "SELECT r.event_id, r.transfer_id, r.version, r.state, r.event, r.traceparent FROM notification_log_rebuild r
         WHERE NOT EXISTS (SELECT 1 FROM notification_log l WHERE l.event_id = r.event_id)
         ORDER BY r.transfer_id, r.version",
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(event_id, transfer_id, version, state, event, traceparent)| LoggedEvent {
            investor_account_id: event["investor_account_id"].as_str().unwrap_or_default().to_owned(),
            fund_account_id: event["fund_account_id"].as_str().unwrap_or_default().to_owned(),
            event_id,
            transfer_id,
            version,
            state,
            event,
            traceparent,
        })
        .collect())
}
