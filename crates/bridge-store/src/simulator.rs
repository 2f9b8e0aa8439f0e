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

/// Up to `limit` operations of the kinds named (`withdrawal`, `refund`,
/// `deposit`), by idempotency key after `after`: a service's list of what it
/// holds, in pages. Pending operations whose time has come settle first.
pub async fn list(
    conn: &mut PgConnection,
    operations: &[&str],
    after: &str,
    limit: usize,
) -> Result<Vec<SimOperation>> {
    sqlx::query(
        "UPDATE sim_operations SET outcome = final_outcome, final_outcome = NULL
         WHERE outcome = 'pending' AND settles_at <= now()",
    )
    .execute(&mut *conn)
    .await?;
    let rows: Vec<(String, String, String, i64, String, String, String)> = sqlx::query_as(
        "SELECT idempotency_key, operation, account_id, amount_minor, currency, outcome, reference
         FROM sim_operations WHERE idempotency_key > $1 AND operation = ANY($2)
         ORDER BY idempotency_key LIMIT $3",
    )
    .bind(after)
    .bind(operations)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(key, operation, account_id, amount_minor, currency, outcome, reference)| {
            sim_operation(&key, (operation, account_id, amount_minor, currency, outcome, reference))
        })
        .collect())
}

fn sim_operation(
    key: &str,
    (operation, account_id, amount_minor, currency, outcome, reference): (String, String, i64, String, String, String),
) -> SimOperation {
    SimOperation { idempotency_key: key.to_owned(), operation, account_id, amount_minor, currency, outcome, reference }
}

/// Publishes a fund's terms at the simulated fund administrator.
pub async fn set_fund_terms(
    conn: &mut PgConnection,
    fund_id: &str,
    terms: &crate::fund_terms::FundTerms,
) -> Result<()> {
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

/// Issues a consent at the simulated bank for `account_id`: the bank keeps
/// the token's SHA-256 only. From then on a withdrawal from that account
/// must carry a valid consent of its own.
pub async fn issue_consent(
    conn: &mut PgConnection,
    account_id: &str,
    consent_id: &str,
    token: &str,
    expires_at: chrono::DateTime<chrono::Utc>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO sim_bank_consents (token_sha256, consent_id, account_id, expires_at)
         VALUES (sha256(convert_to($1, 'UTF8')), $2, $3, $4)",
    )
    .bind(token)
    .bind(consent_id)
    .bind(account_id)
    .bind(expires_at)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn revoke_consent(conn: &mut PgConnection, consent_id: &str) -> Result<()> {
    sqlx::query("UPDATE sim_bank_consents SET revoked_at = now() WHERE consent_id = $1")
        .bind(consent_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// What the simulated bank makes of the access a withdrawal carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessVerdict {
    /// The account was never linked with a consent: the service token is
    /// enough, as for a direct-debit mandate.
    NotRequired,
    /// A valid consent of this account.
    Valid { consent_id: String },
    /// Declined with `code`: `BANK_ACCESS_EXPIRED` (none carried, expired or
    /// revoked: the investor must reconnect) or `BANK_ACCESS_INVALID` (a
    /// token the bank never issued, or another account's).
    Refused { code: &'static str, consent_id: Option<String> },
}

impl AccessVerdict {
    fn label(&self) -> &'static str {
        match self {
            AccessVerdict::NotRequired => "not_required",
            AccessVerdict::Valid { .. } => "valid",
            AccessVerdict::Refused { code, .. } => code,
        }
    }
}

/// Checks the access a withdrawal under `key` from `account_id` carried,
/// and records what the bank saw (`sim_bank_access_seen`).
pub async fn check_bank_access(
    conn: &mut PgConnection,
    key: &str,
    account_id: &str,
    token: Option<&str>,
) -> Result<AccessVerdict> {
    let linked: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sim_bank_consents WHERE account_id = $1)")
        .bind(account_id)
        .fetch_one(&mut *conn)
        .await?;
    let verdict = match token {
        _ if !linked => AccessVerdict::NotRequired,
        None => AccessVerdict::Refused { code: "BANK_ACCESS_EXPIRED", consent_id: None },
        Some(token) => {
            let consent: Option<(String, String, bool)> = sqlx::query_as(
                "SELECT consent_id, account_id, revoked_at IS NULL AND expires_at > now()
                 FROM sim_bank_consents WHERE token_sha256 = sha256(convert_to($1, 'UTF8'))",
            )
            .bind(token)
            .fetch_optional(&mut *conn)
            .await?;
            match consent {
                None => AccessVerdict::Refused { code: "BANK_ACCESS_INVALID", consent_id: None },
                Some((consent_id, owner, _)) if owner != account_id => {
                    AccessVerdict::Refused { code: "BANK_ACCESS_INVALID", consent_id: Some(consent_id) }
                }
                Some((consent_id, _, false)) => {
                    AccessVerdict::Refused { code: "BANK_ACCESS_EXPIRED", consent_id: Some(consent_id) }
                }
                Some((consent_id, _, true)) => AccessVerdict::Valid { consent_id },
            }
        }
    };
    if verdict != AccessVerdict::NotRequired {
        let consent_id = match &verdict {
            AccessVerdict::Valid { consent_id } => Some(consent_id.clone()),
            AccessVerdict::Refused { consent_id, .. } => consent_id.clone(),
            AccessVerdict::NotRequired => None,
        };
        sqlx::query(
            "INSERT INTO sim_bank_access_seen (idempotency_key, account_id, consent_id, verdict)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(key)
        .bind(account_id)
        .bind(consent_id)
        .bind(verdict.label())
        .execute(conn)
        .await?;
    }
    Ok(verdict)
}

/// What the simulated bank saw on each withdrawal of `account_id`, in
/// order: `(idempotency key, consent id, verdict)`.
pub async fn bank_access_seen(
    conn: &mut PgConnection,
    account_id: &str,
) -> Result<Vec<(String, Option<String>, String)>> {
    Ok(sqlx::query_as(
        "SELECT idempotency_key, consent_id, verdict FROM sim_bank_access_seen WHERE account_id = $1 ORDER BY id",
    )
    .bind(account_id)
    .fetch_all(conn)
    .await?)
}
