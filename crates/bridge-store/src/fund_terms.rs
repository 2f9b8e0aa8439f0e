//! A fund's terms as its administrator publishes them (criteria, its rules
//! among them, seats and capacity), applied to the `funds` table.

use sqlx::PgConnection;

use bridge_domain::RuleSet;

use crate::{Error, Result};

pub use bridge_domain::FundTerms;

/// What applying a fund's terms did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TermsApplied {
    Unchanged,
    Updated,
    /// Refused, with why: the fund is unknown here, its currency differs, or
    /// the new terms are below what is already reserved and completed.
    Refused(String),
}

pub async fn fund_ids(conn: &mut PgConnection) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar("SELECT id FROM funds ORDER BY id").fetch_all(conn).await?)
}

/// Takes the administrator's criteria (the fund's rules among them), seats
/// and capacity for `fund_id`, under the fund's row lock. New seats and
/// capacity bind every reservation from now on (each re-checks them); a
/// validation that read the old criteria decides on those (see
/// `bridge_pipeline::fund_terms`). Terms that the fund's current
/// reservations already exceed are refused (the CHECK constraints would
/// refuse them too).
pub async fn apply_fund_terms(conn: &mut PgConnection, fund_id: &str, terms: &FundTerms) -> Result<TermsApplied> {
    let current: Option<(String, i64, i32, i64, i32, i64, serde_json::Value, i64)> = sqlx::query_as(
        "SELECT currency, minimum_investment_minor, seats_max, capacity_minor, investors_count,
                allocated_minor, rules, version
         FROM funds WHERE id = $1 FOR UPDATE",
    )
    .bind(fund_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((currency, minimum, seats, capacity, investors, committed, rules, version)) = current else {
        return Ok(TermsApplied::Refused("unknown fund".to_owned()));
    };
    if currency.trim() != terms.currency {
        return Ok(TermsApplied::Refused(format!("currency {} differs from {}", terms.currency, currency.trim())));
    }
    let rules_now = serde_json::from_value::<RuleSet>(rules).ok();
    if (minimum, seats, capacity) == (terms.minimum_investment_minor, terms.seats_max, terms.capacity_minor)
        && rules_now.as_ref() == Some(&terms.rules)
    {
        return Ok(TermsApplied::Unchanged);
    }
    if terms.minimum_investment_minor <= 0 || terms.seats_max <= 0 || terms.capacity_minor <= 0 {
        return Ok(TermsApplied::Refused("terms must be positive".to_owned()));
    }
    if terms.seats_max < investors || terms.capacity_minor < committed {
        return Ok(TermsApplied::Refused(format!(
            "{} seats and {} capacity are below the {investors} seats and {committed} already taken",
            terms.seats_max, terms.capacity_minor
        )));
    }
    let rules = serde_json::to_value(&terms.rules)
        .map_err(|error| Error::Corrupt(format!("fund {fund_id}: rules do not serialise: {error}")))?;
    // Under the row's lock, so `version + 1` from what was read.
    sqlx::query(
        "UPDATE funds SET minimum_investment_minor = $2, seats_max = $3, capacity_minor = $4, rules = $5,
                          version = $6 + 1, updated_at = now()
         WHERE id = $1",
    )
    .bind(fund_id)
    .bind(terms.minimum_investment_minor)
    .bind(terms.seats_max)
    .bind(terms.capacity_minor)
    .bind(rules)
    .bind(version)
    .execute(conn)
    .await?;
    Ok(TermsApplied::Updated)
}
