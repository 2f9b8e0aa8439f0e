//! Storage of the account-service simulator: the outside world's own books.
//! Only the simulator uses these tables; tests read them to prove what really
//! happened at the "bank".

use sqlx::PgConnection;

use crate::Result;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimOperation {
    pub idempotency_key: String,
    pub operation: String,
    pub account_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub outcome: String,
    pub reference: String,
}

impl SimOperation {
    /// Whether `other` is the same request body, as a payment API compares a
    /// retried request against the one first seen under its idempotency key.
    pub fn same_request(&self, other: &SimOperation) -> bool {
        self.operation == other.operation
            && self.account_id == other.account_id
            && self.amount_minor == other.amount_minor
            && self.currency == other.currency
    }
}

/// The statement that settles the pending operation under key `$1` once its
/// time has come; [`find`] runs it alone, [`record_once`] inside its own.
macro_rules! settle_due {
    () => {
        "UPDATE sim_operations SET outcome = final_outcome, final_outcome = NULL
         WHERE idempotency_key = $1 AND outcome = 'pending' AND settles_at <= now()"
    };
}

/// Stores `operation` unless its idempotency key was seen before; returns the
/// operation stored under the key (the new one or the earlier one). With
/// `settle_after_ms` above zero a new operation is stored as `pending` and
/// turns into its outcome that much later (see [`find`]).
///
/// One statement does what a bank's idempotent endpoint does on every call:
/// store the new operation, or settle the stored one if its time has come, or
/// read it back. Its sub-statements share one snapshot, so an operation that
/// another call stored under the same key after that snapshot was taken is
/// invisible to all three and the statement returns no row; [`find`], whose
/// statements each take a newer snapshot, reads it then.
pub async fn record_once(
    conn: &mut PgConnection,
    operation: &SimOperation,
    settle_after_ms: u64,
) -> Result<SimOperation> {
    let row: Option<(String, String, i64, String, String, String)> = sqlx::query_as(concat!(
        "WITH new AS (
             INSERT INTO sim_operations
                 (idempotency_key, operation, account_id, amount_minor, currency, outcome, reference,
                  final_outcome, settles_at, transfer_id)
             VALUES ($1, $2, $3, $4, $5, CASE WHEN $8 > 0 THEN 'pending' ELSE $6 END, $7,
                     CASE WHEN $8 > 0 THEN $6 END,
                     CASE WHEN $8 > 0 THEN now() + make_interval(secs => $8) END, $9)
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING operation, account_id, amount_minor, currency, outcome, reference
         ), due AS (",
        settle_due!(),
        "
             RETURNING operation, account_id, amount_minor, currency, outcome, reference
         )
         SELECT * FROM new
         UNION ALL SELECT * FROM due
         UNION ALL
         SELECT operation, account_id, amount_minor, currency, outcome, reference
         FROM sim_operations
         WHERE idempotency_key = $1 AND NOT EXISTS (SELECT FROM due)",
    ))
    .bind(&operation.idempotency_key)
    .bind(&operation.operation)
    .bind(&operation.account_id)
    .bind(operation.amount_minor)
    .bind(&operation.currency)
    .bind(&operation.outcome)
    .bind(&operation.reference)
    .bind(settle_after_ms as f64 / 1_000.0)
    // What a bank would keep as the caller's reference; our books' side.
    .bind(bridge_domain::ids::parse_idempotency_key(&operation.idempotency_key).map(|(transfer_id, _)| transfer_id))
    .fetch_optional(&mut *conn)
    .await?;
    let stored = match row {
        Some(row) => Some(sim_operation(&operation.idempotency_key, row)),
        None => find(conn, &operation.idempotency_key).await?,
    };
    stored.ok_or_else(|| crate::Error::Corrupt(format!("operation {} vanished", operation.idempotency_key)))
}

/// Cancels the operation under `operation.idempotency_key` if it has not
/// settled: a pending one becomes declined with code `CANCELLED`, and a key
/// never seen is stored as cancelled, so a request that arrives later with
/// that key finds the cancellation instead of moving money. A final
/// operation is left as it is. Returns what the key now holds.
pub async fn cancel(conn: &mut PgConnection, operation: &SimOperation) -> Result<SimOperation> {
    // Settle first whatever was due to settle before now: a cancellation
    // cannot undo a settlement that has already happened.
    find(&mut *conn, &operation.idempotency_key).await?;
    sqlx::query(
        "UPDATE sim_operations SET outcome = 'declined', reference = 'CANCELLED', final_outcome = NULL
         WHERE idempotency_key = $1 AND outcome = 'pending'",
    )
    .bind(&operation.idempotency_key)
    .execute(&mut *conn)
    .await?;
    let tombstone =
        SimOperation { outcome: "declined".to_owned(), reference: "CANCELLED".to_owned(), ..operation.clone() };
    record_once(conn, &tombstone, 0).await
}

/// `active`, `frozen` or `closed`; accounts the simulator has never heard of
/// are active.
pub async fn account_status(conn: &mut PgConnection, account_id: &str) -> Result<String> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM sim_accounts WHERE id = $1")
        .bind(account_id)
        .fetch_optional(conn)
        .await?;
    Ok(status.unwrap_or_else(|| "active".to_owned()))
}

pub async fn set_account_status(conn: &mut PgConnection, account_id: &str, status: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO sim_accounts (id, status) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status",
    )
    .bind(account_id)
    .bind(status)
    .execute(conn)
    .await?;
    Ok(())
}

/// The operation stored under `key`, if any. A pending operation whose time
/// has come settles as it is read.
pub async fn find(conn: &mut PgConnection, key: &str) -> Result<Option<SimOperation>> {
    sqlx::query(settle_due!()).bind(key).execute(&mut *conn).await?;
    let row: Option<(String, String, i64, String, String, String)> = sqlx::query_as(
        "SELECT operation, account_id, amount_minor, currency, outcome, reference
         FROM sim_operations WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|row| sim_operation(key, row)))
}

fn sim_operation(
    key: &str,
    (operation, account_id, amount_minor, currency, outcome, reference): (String, String, i64, String, String, String),
) -> SimOperation {
    SimOperation { idempotency_key: key.to_owned(), operation, account_id, amount_minor, currency, outcome, reference }
}

/// Publishes a fund's terms at the simulated fund administrator.
pub async fn set_fund_terms(conn: &mut PgConnection, fund_id: &str, terms: &crate::accounts::FundTerms) -> Result<()> {
    let rules = serde_json::to_value(&terms.rules).map_err(|error| crate::Error::Corrupt(error.to_string()))?;
    sqlx::query(
        "INSERT INTO sim_funds (id, currency, minimum_investment_minor, seats_max, capacity_minor, rules)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO UPDATE SET currency = EXCLUDED.currency,
             minimum_investment_minor = EXCLUDED.minimum_investment_minor,
             seats_max = EXCLUDED.seats_max, capacity_minor = EXCLUDED.capacity_minor, rules = EXCLUDED.rules",
    )
    .bind(fund_id)
    .bind(&terms.currency)
    .bind(terms.minimum_investment_minor)
    .bind(terms.seats_max)
    .bind(terms.capacity_minor)
    .bind(rules)
    .execute(conn)
    .await?;
    Ok(())
}

/// A fund's terms at the simulated fund administrator, rules as published
/// (JSON, not checked here: the administrator's answer is what Bridge must
/// cope with).
pub async fn fund_terms(conn: &mut PgConnection, fund_id: &str) -> Result<Option<SimFundTerms>> {
    let row: Option<(String, i64, i32, i64, serde_json::Value)> = sqlx::query_as(
        "SELECT currency, minimum_investment_minor, seats_max, capacity_minor, rules FROM sim_funds WHERE id = $1",
    )
    .bind(fund_id)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(currency, minimum_investment_minor, seats_max, capacity_minor, rules)| SimFundTerms {
        currency: currency.trim().to_owned(),
        minimum_investment_minor,
        seats_max,
        capacity_minor,
        rules,
    }))
}

/// A fund's terms as the simulated administrator serves them.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SimFundTerms {
    pub currency: String,
    pub minimum_investment_minor: i64,
    pub seats_max: i32,
    pub capacity_minor: i64,
    pub rules: serde_json::Value,
}
