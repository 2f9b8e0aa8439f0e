//! Fund criteria (minimum investment), seats and capacity belong to the fund
//! administrator; reservations against them belong to us. The settlement
//! runner (and `bridge funds sync`) reads each fund's terms from the Fund
//! Account Service and applies them to the `funds` table, bumping the fund's
//! version so a validation that read the old terms decides again.

use anyhow::Result;

use bridge_store::accounts::{self, TermsApplied};

use crate::context::StageContext;

/// What one synchronisation found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub checked: usize,
    pub updated: Vec<String>,
    /// Funds the administrator does not know.
    pub unknown: Vec<String>,
    /// Terms we could not take, with why (e.g. capacity below what is
    /// already reserved).
    pub refused: Vec<(String, String)>,
}

pub async fn sync(ctx: &StageContext) -> Result<SyncReport> {
    let ids = {
        let mut conn = ctx.pool.acquire().await?;
        accounts::fund_ids(&mut conn).await?
    };
    let mut report = SyncReport { checked: ids.len(), ..SyncReport::default() };
    for id in ids {
        let Some(terms) = ctx.services.fund.fund_terms(&id).await? else {
            report.unknown.push(id);
            continue;
        };
        let mut tx = ctx.pool.begin().await?;
        bridge_store::set_actor(&mut tx, "fund terms sync").await?;
        match accounts::apply_fund_terms(&mut tx, &id, &terms).await? {
            TermsApplied::Unchanged => {}
            TermsApplied::Updated => {
                tracing::info!(fund_id = %id, terms = ?terms, "Fund terms updated from the fund administrator");
                report.updated.push(id);
            }
            TermsApplied::Refused(reason) => {
                tracing::warn!(fund_id = %id, reason = %reason, "Fund terms from the fund administrator refused");
                report.refused.push((id, reason));
            }
        }
        tx.commit().await?;
    }
    Ok(report)
}
