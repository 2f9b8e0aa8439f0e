//! A fund's criteria as data: a typed rule set, published by the fund's
//! administrator with its terms, stored with the fund (and so versioned
//! with it), and evaluated by [`crate::check_request`].
//!
//! The serialised form is a JSON list of tagged rules, e.g.
//! `[{"rule": "residence_in", "countries": ["DE", "FR"]},
//!   {"rule": "maximum_per_investor", "maximum_minor": 5000000}]`.
//! A list that does not parse, or that contradicts itself, is refused as a
//! whole ([`RuleSet::parse`]): a fund's criteria are never half applied.
//!
//! The order of the list does not matter: each kind of rule has one place
//! in the order of checks (see `check_request`), so the same facts always
//! give the same reason whatever order the administrator listed them in.

use std::collections::BTreeSet;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::RejectReason;

/// An ISO 3166-1 alpha-2 country code, such as `DE`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountryCode([u8; 2]);

impl CountryCode {
    /// Accepts only the assigned codes of ISO 3166-1 (checked against the
    /// `iso_country` table), in upper case.
    pub fn parse(code: &str) -> Result<Self, RuleError> {
        let bytes = code.as_bytes();
        let valid = bytes.len() == 2
            && bytes.iter().all(u8::is_ascii_uppercase)
            && code.parse::<iso_country::Country>().is_ok_and(|country| country != iso_country::Country::Unspecified);
        if !valid {
            return Err(RuleError(format!("{code:?} is not an ISO 3166-1 alpha-2 country code")));
        }
        Ok(Self([bytes[0], bytes[1]]))
    }

    pub fn as_str(&self) -> &str {
        // Two ASCII upper-case letters, checked by `parse`.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Debug for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for CountryCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CountryCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = String::deserialize(deserializer)?;
        CountryCode::parse(&code).map_err(serde::de::Error::custom)
    }
}

/// A fund's rule set, or an investor's attributes, could not be accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuleError(pub String);

/// One criterion of a fund. The fund's own columns carry the criteria
/// every fund has (its currency, minimum investment, seats and capacity,
/// which the database also guards); these are the ones a fund may add.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum Rule {
    /// No single investment above this amount (`ABOVE_MAXIMUM_INVESTMENT`).
    MaximumInvestment { maximum_minor: i64 },
    /// An investor's reserved and completed allocation in the fund, this
    /// request included, at most this amount (`INVESTOR_LIMIT_EXCEEDED`).
    MaximumPerInvestor { maximum_minor: i64 },
    /// Only investors resident in one of these countries
    /// (`RESIDENCE_NOT_ALLOWED`; an investor with no recorded residence is
    /// not resident anywhere).
    ResidenceIn { countries: BTreeSet<CountryCode> },
    /// Only accredited investors (`ACCREDITATION_REQUIRED`).
    AccreditedOnly {},
    /// No new money before this instant (`FUND_NOT_OPEN`).
    OpensAt { at: DateTime<Utc> },
    /// No new money from this instant on (`FUND_CLOSED`).
    ClosesAt { at: DateTime<Utc> },
}

impl Rule {
    fn kind(&self) -> &'static str {
        match self {
            Rule::MaximumInvestment { .. } => "maximum_investment",
            Rule::MaximumPerInvestor { .. } => "maximum_per_investor",
            Rule::ResidenceIn { .. } => "residence_in",
            Rule::AccreditedOnly {} => "accredited_only",
            Rule::OpensAt { .. } => "opens_at",
            Rule::ClosesAt { .. } => "closes_at",
        }
    }
}

/// A fund's additional criteria, at most one rule of each kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RuleSet(Vec<Rule>);

impl<'de> Deserialize<'de> for RuleSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        RuleSet::new(Vec::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// What the rules need to know about the investor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InvestorAttributes {
    pub residence: Option<CountryCode>,
    pub accredited: bool,
}

impl RuleSet {
    /// The rules of a fund with none of its own.
    pub fn none() -> &'static RuleSet {
        static NONE: RuleSet = RuleSet(Vec::new());
        &NONE
    }

    /// A rule set from its rules, refused if it contradicts itself: two
    /// rules of one kind, a maximum that is not positive, an empty list of
    /// countries, or a fund that closes before it opens.
    pub fn new(rules: Vec<Rule>) -> Result<Self, RuleError> {
        let mut kinds = BTreeSet::new();
        for rule in &rules {
            if !kinds.insert(rule.kind()) {
                return Err(RuleError(format!("more than one {} rule", rule.kind())));
            }
            match rule {
                Rule::MaximumInvestment { maximum_minor } | Rule::MaximumPerInvestor { maximum_minor }
                    if *maximum_minor <= 0 =>
                {
                    return Err(RuleError(format!("{}: maximum_minor must be positive", rule.kind())));
                }
                Rule::ResidenceIn { countries } if countries.is_empty() => {
                    return Err(RuleError("residence_in: no countries listed".to_owned()));
                }
                _ => {}
            }
        }
        let set = Self(rules);
        if let (Some(opens), Some(closes)) = (set.opens_at(), set.closes_at()) {
            if closes <= opens {
                return Err(RuleError(format!("the fund closes ({closes}) before it opens ({opens})")));
            }
        }
        Ok(set)
    }

    /// Parses the JSON form (a list of tagged rules).
    pub fn parse(json: &str) -> Result<Self, RuleError> {
        serde_json::from_str(json).map_err(|error| RuleError(format!("fund rules: {error}")))
    }

    pub fn rules(&self) -> &[Rule] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The per-investor maximum, if the fund has one: the database checks
    /// it again after reserving (`bridge_store::accounts`), since two
    /// requests of one investor may be decided at once in two partitions.
    pub fn maximum_per_investor(&self) -> Option<i64> {
        self.0.iter().find_map(|rule| match rule {
            Rule::MaximumPerInvestor { maximum_minor } => Some(*maximum_minor),
            _ => None,
        })
    }

    fn opens_at(&self) -> Option<DateTime<Utc>> {
        self.0.iter().find_map(|rule| match rule {
            Rule::OpensAt { at } => Some(*at),
            _ => None,
        })
    }

    fn closes_at(&self) -> Option<DateTime<Utc>> {
        self.0.iter().find_map(|rule| match rule {
            Rule::ClosesAt { at } => Some(*at),
            _ => None,
        })
    }

    /// Whether the fund takes new money at `now` from this investor: the
    /// checks that do not depend on the amount, in their fixed order.
    pub(crate) fn check_eligibility(
        &self,
        now: DateTime<Utc>,
        investor: &InvestorAttributes,
    ) -> Result<(), RejectReason> {
        if self.opens_at().is_some_and(|opens| now < opens) {
            return Err(RejectReason::FundNotOpen);
        }
        if self.closes_at().is_some_and(|closes| now >= closes) {
            return Err(RejectReason::FundClosed);
        }
        for rule in &self.0 {
            if let Rule::ResidenceIn { countries } = rule {
                if !investor.residence.is_some_and(|country| countries.contains(&country)) {
                    return Err(RejectReason::ResidenceNotAllowed);
                }
            }
        }
        if self.0.contains(&Rule::AccreditedOnly {}) && !investor.accredited {
            return Err(RejectReason::AccreditationRequired);
        }
        Ok(())
    }

    /// The amount's checks, after the fund's minimum: the maximum per
    /// investment, then the investor's total with `committed_minor` already
    /// reserved or completed in the fund (checked arithmetic: an absurd
    /// amount is refused, not wrapped).
    pub(crate) fn check_amount(&self, amount_minor: i64, committed_minor: i64) -> Result<(), RejectReason> {
        for rule in &self.0 {
            if let Rule::MaximumInvestment { maximum_minor } = rule {
                if amount_minor > *maximum_minor {
                    return Err(RejectReason::AboveMaximumInvestment);
                }
            }
        }
        if let Some(maximum) = self.maximum_per_investor() {
            match committed_minor.checked_add(amount_minor) {
                Some(total) if total <= maximum => {}
                _ => return Err(RejectReason::InvestorLimitExceeded),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn country_codes_are_assigned_iso_codes() {
        assert_eq!(CountryCode::parse("DE").unwrap().as_str(), "DE");
        assert!(CountryCode::parse("GB").is_ok());
        for bad in ["de", "XX", "DEU", "D", "", "ZZ", "D\u{0301}"] {
            assert!(CountryCode::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rule_sets_parse_from_their_json_form_and_refuse_contradictions() {
        let set = RuleSet::parse(
            r#"[{"rule": "residence_in", "countries": ["FR", "DE"]},
                {"rule": "maximum_per_investor", "maximum_minor": 5000},
                {"rule": "accredited_only"},
                {"rule": "opens_at", "at": "2026-01-01T00:00:00Z"},
                {"rule": "closes_at", "at": "2027-01-01T00:00:00Z"}]"#,
        )
        .unwrap();
        assert_eq!(set.rules().len(), 5);
        assert_eq!(set.maximum_per_investor(), Some(5000));
        // The JSON form round-trips.
        assert_eq!(RuleSet::parse(&serde_json::to_string(&set).unwrap()).unwrap(), set);
        assert_eq!(RuleSet::parse("[]").unwrap(), RuleSet::default());

        for (json, why) in [
            (r#"[{"rule": "maximum_investment", "maximum_minor": 0}]"#, "positive"),
            (
                r#"[{"rule": "maximum_investment", "maximum_minor": 5}, {"rule": "maximum_investment", "maximum_minor": 6}]"#,
                "more than one",
            ),
            (r#"[{"rule": "residence_in", "countries": []}]"#, "no countries"),
            (r#"[{"rule": "residence_in", "countries": ["XX"]}]"#, "ISO 3166"),
            (
                r#"[{"rule": "opens_at", "at": "2027-01-01T00:00:00Z"}, {"rule": "closes_at", "at": "2026-01-01T00:00:00Z"}]"#,
                "closes",
            ),
            (r#"[{"rule": "minimum_age", "years": 18}]"#, "unknown variant"),
            (r#"[{"rule": "accredited_only", "strict": true}]"#, "unknown field"),
            (r#"{"rule": "accredited_only"}"#, "sequence"),
        ] {
            let error = RuleSet::parse(json).unwrap_err().0;
            assert!(error.contains(why), "{json}: {error}");
        }
    }

    #[test]
    fn the_order_of_the_list_does_not_change_the_reason() {
        let investor = InvestorAttributes { residence: Some(CountryCode::parse("US").unwrap()), accredited: false };
        let residence = Rule::ResidenceIn { countries: BTreeSet::from([CountryCode::parse("DE").unwrap()]) };
        let one = RuleSet::new(vec![Rule::AccreditedOnly {}, residence.clone()]).unwrap();
        let other = RuleSet::new(vec![residence, Rule::AccreditedOnly {}]).unwrap();
        let now = Utc::now();
        assert_eq!(one.check_eligibility(now, &investor), Err(RejectReason::ResidenceNotAllowed));
        assert_eq!(other.check_eligibility(now, &investor), Err(RejectReason::ResidenceNotAllowed));
    }
}
