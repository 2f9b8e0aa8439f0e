//! The models' history (`model_history`, migrations 0022, 0025 and 0031):
//! every change to an investor account, fund, fund account or allocation,
//! read back newest first with the transfers that made it.

use sqlx::PgConnection;

use crate::Result;

/// One entry of a model's history (`model_history`).
#[derive(Clone, Debug, serde::Serialize, sqlx::FromRow)]
pub struct HistoryEntry {
    pub version: i64,
    pub at: chrono::DateTime<chrono::Utc>,
    pub actor: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    /// The transfers of this row (its investor, fund, fund account or
    /// allocation) whose versions the same transaction recorded, leaving
    /// out versions that move no money (a request recorded, a rejection):
    /// the steps, or an operator's resolution, that made this change.
    /// Empty for a change no transfer made (the fund-terms sync, an
    /// investor's attributes) and for entries older than migration 0025.
    pub transfers: Vec<uuid::Uuid>,
}

/// The history of one row of `model` (`investor_accounts`, `funds`,
/// `fund_accounts`, `allocations`), newest first, at most `limit` entries,
/// each with the transfers that made it; with `investor`, only that
/// investor's transfers are named (a batch's transaction also carries
/// other investors' steps).
///
/// An update's entry stores only the row after it (migration 0031): its
/// `before` is the `after` of the entry one version below, the key's
/// previous entry, so one more entry than asked for is read. Entries
/// written before that migration stored both, and keep their own.
pub async fn history(
    conn: &mut PgConnection,
    model: &str,
    key: &str,
    limit: i64,
    investor: Option<&str>,
) -> Result<Vec<HistoryEntry>> {
    Ok(sqlx::query_as(
        "SELECT h.version, h.at, h.actor,
                coalesce(h.before, CASE WHEN h.previous_version = h.version - 1 THEN h.previous_after END) AS before,
                h.after,
                coalesce((SELECT array_agg(DISTINCT v.transfer_id)
                          FROM transfer_versions v JOIN transfers t ON t.id = v.transfer_id
                          WHERE v.recorded_at = h.at AND v.xid = h.xid
                            AND v.state NOT IN ('requested', 'rejected')
                            AND CASE h.model
                                    WHEN 'investor_accounts' THEN t.investor_account_id = h.key
                                    WHEN 'funds' THEN t.fund_id = h.key
                                    WHEN 'fund_accounts' THEN t.fund_account_id = h.key
                                    ELSE t.fund_id || '/' || t.investor_account_id = h.key
                                END
                            AND ($4::text IS NULL OR t.investor_account_id = $4)), '{}') AS transfers
         FROM (SELECT h.*,
                      lead(h.version) OVER newest_first AS previous_version,
                      lead(h.after) OVER newest_first AS previous_after
               FROM (SELECT * FROM model_history
                     WHERE model = $1 AND key = $2 ORDER BY id DESC LIMIT $3::bigint + 1) h
               WINDOW newest_first AS (ORDER BY h.id DESC)) h
         ORDER BY h.id DESC LIMIT $3::bigint",
    )
    .bind(model)
    .bind(key)
    .bind(limit.clamp(1, 1_000))
    .bind(investor)
    .fetch_all(conn)
    .await?)
}
