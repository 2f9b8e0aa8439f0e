//! The upstream systems registered to publish transfer requests
//! (`request_sources`): their scope and the name of their signing secret.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::Result;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Source {
    pub name: String,
    /// Investor account ids, or prefixes ending in `*`.
    pub investors: Vec<String>,
    /// Fund ids, or prefixes ending in `*`.
    pub funds: Vec<String>,
    /// The credential holding its signing secret.
    #[serde(skip)]
    pub secret_credential: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl Source {
    /// Whether the source may move `investor`'s money into `fund`.
    pub fn may_move(&self, investor: &str, fund: Option<&str>) -> bool {
        let matches = |patterns: &[String], value: &str| {
            patterns.iter().any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => value.starts_with(prefix),
                None => pattern == value,
            })
        };
        matches(&self.investors, investor) && fund.is_some_and(|fund| matches(&self.funds, fund))
    }
}

type Row = (String, Vec<String>, Vec<String>, String, DateTime<Utc>, Option<DateTime<Utc>>);

fn source_of((name, investors, funds, secret_credential, created_at, revoked_at): Row) -> Source {
    Source { name, investors, funds, secret_credential, created_at, revoked_at }
}

/// Registers a source, or replaces the scope and secret of one of that name
/// (which is no longer revoked).
pub async fn put(conn: &mut PgConnection, source: &Source) -> Result<()> {
    sqlx::query(
        "INSERT INTO request_sources (name, investors, funds, secret_credential) VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE SET investors = EXCLUDED.investors, funds = EXCLUDED.funds,
             secret_credential = EXCLUDED.secret_credential, revoked_at = NULL",
    )
    .bind(&source.name)
    .bind(&source.investors)
    .bind(&source.funds)
    .bind(&source.secret_credential)
    .execute(conn)
    .await?;
    Ok(())
}

/// Every source, revoked ones included, by name.
pub async fn list(conn: &mut PgConnection) -> Result<Vec<Source>> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT name, investors, funds, secret_credential, created_at, revoked_at FROM request_sources ORDER BY name",
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(source_of).collect())
}

/// Revokes a source: its requests are rejected from now on. `false` if
/// there is no active source of that name.
pub async fn revoke(conn: &mut PgConnection, name: &str) -> Result<bool> {
    let updated = sqlx::query("UPDATE request_sources SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL")
        .bind(name)
        .execute(conn)
        .await?
        .rows_affected();
    Ok(updated == 1)
}
