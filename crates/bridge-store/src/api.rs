//! What the HTTP API keeps: API keys and Idempotency-Key records.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Result;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    pub id: Uuid,
    pub prefix: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub investor_account_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

type KeyRow = (Uuid, String, String, Vec<String>, Option<String>, DateTime<Utc>, Option<DateTime<Utc>>);

fn key_of((id, prefix, name, scopes, investor_account_id, created_at, revoked_at): KeyRow) -> ApiKey {
    ApiKey { id, prefix, name, scopes, investor_account_id, created_at, revoked_at }
}

pub async fn insert_key(conn: &mut PgConnection, key: &ApiKey, hash: &[u8]) -> Result<()> {
    sqlx::query(
        "INSERT INTO api_keys (id, prefix, hash, name, scopes, investor_account_id) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(key.id)
    .bind(&key.prefix)
    .bind(hash)
    .bind(&key.name)
    .bind(&key.scopes)
    .bind(&key.investor_account_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The key with this public prefix and its stored hash.
pub async fn key_by_prefix(conn: &mut PgConnection, prefix: &str) -> Result<Option<(ApiKey, Vec<u8>)>> {
    let row: Option<(
        Uuid,
        String,
        String,
        Vec<String>,
        Option<String>,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        Vec<u8>,
    )> = sqlx::query_as(
        "SELECT id, prefix, name, scopes, investor_account_id, created_at, revoked_at, hash
             FROM api_keys WHERE prefix = $1",
    )
    .bind(prefix)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(id, prefix, name, scopes, investor, created, revoked, hash)| {
        (key_of((id, prefix, name, scopes, investor, created, revoked)), hash)
    }))
}

pub async fn keys(conn: &mut PgConnection) -> Result<Vec<ApiKey>> {
    let rows: Vec<KeyRow> = sqlx::query_as(
        "SELECT id, prefix, name, scopes, investor_account_id, created_at, revoked_at FROM api_keys ORDER BY created_at",
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(key_of).collect())
}

/// Revokes the key with this prefix. False when there is none, or it was
/// revoked already.
pub async fn revoke_key(conn: &mut PgConnection, prefix: &str) -> Result<bool> {
    let updated = sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL")
        .bind(prefix)
        .execute(conn)
        .await?;
    Ok(updated.rows_affected() == 1)
}

/// Records the first use of `idempotency_key` by `api_key_id`, or returns
/// the earlier request's fingerprint and transfer. Run in the transaction
/// that creates the transfer: a concurrent identical request waits on the
/// primary key until this one commits, then sees it.
pub async fn claim_idempotency(
    conn: &mut PgConnection,
    api_key_id: Uuid,
    idempotency_key: &str,
    request_hash: &[u8],
    transfer_id: Uuid,
) -> Result<Option<(Vec<u8>, Uuid)>> {
    let inserted = sqlx::query(
        "INSERT INTO api_idempotency (api_key_id, idempotency_key, request_hash, transfer_id)
         VALUES ($1, $2, $3, $4) ON CONFLICT (api_key_id, idempotency_key) DO NOTHING",
    )
    .bind(api_key_id)
    .bind(idempotency_key)
    .bind(request_hash)
    .bind(transfer_id)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(None);
    }
    let existing: (Vec<u8>, Uuid) = sqlx::query_as(
        "SELECT request_hash, transfer_id FROM api_idempotency WHERE api_key_id = $1 AND idempotency_key = $2",
    )
    .bind(api_key_id)
    .bind(idempotency_key)
    .fetch_one(conn)
    .await?;
    Ok(Some(existing))
}

/// A fund's terms and how much of it is taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FundOverview {
    pub id: String,
    pub name: String,
    pub currency: String,
    pub minimum_investment_minor: i64,
    pub seats_max: i32,
    pub investors_count: i32,
    pub capacity_minor: i64,
    pub reserved_minor: i64,
    pub completed_minor: i64,
    /// The fund's own criteria, as stored (`bridge_domain::RuleSet`'s form).
    pub rules: serde_json::Value,
}

pub async fn fund(conn: &mut PgConnection, id: &str) -> Result<Option<FundOverview>> {
    let row: Option<(String, String, String, i64, i32, i32, i64, i64, i64, serde_json::Value)> = sqlx::query_as(
        // The fund's row holds only the total its capacity bounds; the split
        // is its investors' allocations, summed in the same snapshot.
        "SELECT f.id, f.name, f.currency, f.minimum_investment_minor, f.seats_max, f.investors_count,
                f.capacity_minor, coalesce(a.reserved, 0)::bigint, coalesce(a.completed, 0)::bigint, f.rules
         FROM funds f
         LEFT JOIN LATERAL (SELECT sum(reserved_minor) AS reserved, sum(completed_minor) AS completed
                            FROM allocations WHERE fund_id = f.id) a ON true
         WHERE f.id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(
        |(
            id,
            name,
            currency,
            minimum_investment_minor,
            seats_max,
            investors_count,
            capacity,
            reserved,
            completed,
            rules,
        )| {
            FundOverview {
                id,
                name,
                currency: currency.trim().to_owned(),
                minimum_investment_minor,
                seats_max,
                investors_count,
                capacity_minor: capacity,
                reserved_minor: reserved,
                completed_minor: completed,
                rules,
            }
        },
    ))
}

/// A page of transfers, newest first, after `cursor` (the last row of the
/// previous page: its creation time and id).
pub async fn list_transfers(
    conn: &mut PgConnection,
    investor: Option<&str>,
    fund_account: Option<&str>,
    state: Option<&str>,
    cursor: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<(Uuid, DateTime<Utc>)>> {
    Ok(sqlx::query_as(
        "SELECT id, created_at FROM transfers
         WHERE ($1::text IS NULL OR investor_account_id = $1)
           AND ($2::text IS NULL OR fund_account_id = $2)
           AND ($3::text IS NULL OR state = $3)
           AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5))
         ORDER BY created_at DESC, id DESC LIMIT $6",
    )
    .bind(investor)
    .bind(fund_account)
    .bind(state)
    .bind(cursor.map(|(at, _)| at))
    .bind(cursor.map(|(_, id)| id))
    .bind(limit)
    .fetch_all(conn)
    .await?)
}
