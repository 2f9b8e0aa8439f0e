//! Fund criteria (minimum investment and the fund's rules), seats and
//! capacity belong to the fund administrator; reservations against them
//! belong to us. The settlement runner (and `bridge funds-sync`) reads each
//! fund's terms from the Fund Account Service and applies them to the
//! `funds` table. Seats and capacity bind at once: a reservation re-checks
//! them in its own statement. The other criteria (the minimum, the fund's
//! rules) apply to the validations that read the fund after the new terms
//! commit; a validation already under way decides on the terms it read,
//! as if it had finished a moment before the change.

use anyhow::Result;

use bridge_store::fund_terms::{self as terms, TermsApplied};

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
    /// Funds whose terms could not be read (the service failed, or answered
    /// terms that do not parse, such as a rule set that contradicts
    /// itself): they keep the terms they had, and the other funds are
    /// still synchronised.
    pub failed: Vec<(String, String)>,
}

pub async fn sync(ctx: &StageContext) -> Result<SyncReport> {
    let ids = {
        let mut conn = ctx.pool.acquire().await?;
        terms::fund_ids(&mut conn).await?
    };
    let mut report = SyncReport { checked: ids.len(), ..SyncReport::default() };
    for id in ids {
        let terms = match ctx.services.fund.fund_terms(&id).await {
            Ok(Some(terms)) => terms,
            Ok(None) => {
                report.unknown.push(id);
                continue;
            }
            Err(error) => {
                tracing::warn!(fund_id = %id, error = %error, "Fund terms could not be read");
                report.failed.push((id, error.to_string()));
                continue;
            }
        };
        let mut tx = ctx.pool.begin().await?;
        bridge_store::set_actor(&mut tx, "fund terms sync").await?;
        match terms::apply_fund_terms(&mut tx, &id, &terms).await? {
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
