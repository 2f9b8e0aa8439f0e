//! Investors' own access to their bank accounts (an open-banking access
//! token or consent), which a withdrawal carries to the Investor Account
//! Service. Only what may be shown lives here (`investor_bank_access`);
//! the token is a credential (`credentials`), sealed and opened by
//! `bridge-secrets` under [`credential_name`], so the investor's id is
//! part of what the ciphertext is bound to.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::credentials::{self, StoredCredential};
use crate::Result;

/// The credential holding an investor's bank access token.
pub fn credential_name(investor_account_id: &str) -> String {
    format!("investor-bank-access/{investor_account_id}")
}

/// What may be shown of an investor's bank access: never the token.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct BankAccessMetadata {
    pub investor_account_id: String,
    pub consent_id: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub set_at: DateTime<Utc>,
    pub set_by: String,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What is recorded beside a new token.
#[derive(Clone, Debug)]
pub struct NewBankAccess<'a> {
    pub consent_id: &'a str,
    pub scopes: &'a [String],
    pub expires_at: Option<DateTime<Utc>>,
    pub set_by: &'a str,
}

/// Records the metadata of an investor's new bank access (the caller
/// stores the sealed token in the same transaction), replacing an earlier
/// one, revoked or not. `false` if the investor account does not exist.
pub async fn record(conn: &mut PgConnection, investor_account_id: &str, access: &NewBankAccess<'_>) -> Result<bool> {
    let recorded = sqlx::query(
        "INSERT INTO investor_bank_access (investor_account_id, consent_id, scopes, expires_at, set_by)
         SELECT id, $2, $3, $4, $5 FROM investor_accounts WHERE id = $1
         ON CONFLICT (investor_account_id) DO UPDATE SET consent_id = EXCLUDED.consent_id,
             scopes = EXCLUDED.scopes, expires_at = EXCLUDED.expires_at, set_at = now(),
             set_by = EXCLUDED.set_by, last_used_at = NULL, revoked_at = NULL",
    )
    .bind(investor_account_id)
    .bind(access.consent_id)
    .bind(access.scopes)
    .bind(access.expires_at)
    .bind(access.set_by)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(recorded == 1)
}

pub async fn metadata(conn: &mut PgConnection, investor_account_id: &str) -> Result<Option<BankAccessMetadata>> {
    Ok(sqlx::query_as(
        "SELECT investor_account_id, consent_id, scopes, expires_at, set_at, set_by, last_used_at, revoked_at
         FROM investor_bank_access WHERE investor_account_id = $1",
    )
    .bind(investor_account_id)
    .fetch_optional(conn)
    .await?)
}

/// Revokes an investor's bank access: the token is deleted (nothing is
/// left to open), the metadata kept with when it was revoked. `false` if
/// there was none to revoke.
pub async fn revoke(conn: &mut PgConnection, investor_account_id: &str) -> Result<bool> {
    credentials::delete(&mut *conn, &credential_name(investor_account_id)).await?;
    let revoked = sqlx::query(
        "UPDATE investor_bank_access SET revoked_at = now()
         WHERE investor_account_id = $1 AND revoked_at IS NULL",
    )
    .bind(investor_account_id)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(revoked == 1)
}

/// The sealed tokens of these investors' access that is not revoked, by
/// investor, and marks them used now (a withdrawal is about to carry them).
/// One statement for a whole batch; the join spells out
/// [`credential_name`].
pub async fn take_for_withdrawals(
    conn: &mut PgConnection,
    investor_account_ids: &[&str],
) -> Result<Vec<(String, StoredCredential)>> {
    let rows: Vec<(String, String, String, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        // Rows locked in key order first, so two batches with investors in
        // common wait for each other instead of deadlocking.
        "WITH locked AS (
             SELECT investor_account_id FROM investor_bank_access
             WHERE investor_account_id = ANY($1) AND revoked_at IS NULL
             ORDER BY investor_account_id FOR UPDATE
         ),
         used AS (
             UPDATE investor_bank_access a SET last_used_at = now()
             FROM locked WHERE a.investor_account_id = locked.investor_account_id
             RETURNING a.investor_account_id
         )
         SELECT used.investor_account_id, c.name, c.key_id, c.wrapped_key, c.ciphertext
         FROM used JOIN credentials c ON c.name = 'investor-bank-access/' || used.investor_account_id",
    )
    .persistent(false)
    .bind(investor_account_ids)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(investor, name, key_id, wrapped_key, ciphertext)| {
            (investor, StoredCredential { name, key_id, wrapped_key, ciphertext })
        })
        .collect())
}
