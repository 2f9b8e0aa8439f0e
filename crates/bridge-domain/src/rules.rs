//! Validation rules: may this request go ahead?
//!
//! The store gathers the facts inside the validating database transaction and
//! this module decides. The order of checks is part of the contract: the first
//! failing rule names the rejection reason, so the same facts always give the
//! same reason.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::criteria::{InvestorAttributes, RuleSet};
use crate::{Currency, RejectReason};

/// What the validator knows about the investor's account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccountSnapshot {
    pub currency: Currency,
    pub balance_minor: i64,
    pub held_minor: i64,
    /// What funds' rules read: residence and accreditation.
    pub attributes: InvestorAttributes,
}

impl AccountSnapshot {
    /// Balance minus holds. Saturating: the stored values cannot overflow
    /// (the database keeps both within bounds), but a decision must not
    /// panic on any input, and a saturated value still compares correctly
    /// with any amount (found by the `check_request` fuzz target).
    pub fn available_minor(&self) -> i64 {
        self.balance_minor.saturating_sub(self.held_minor)
    }
}

/// What the validator knows about the fund that owns the target account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FundSnapshot {
    pub currency: Currency,
    pub minimum_investment_minor: i64,
    pub seats_max: i32,
    pub investors_count: i32,
    pub capacity_minor: i64,
    /// What the fund's investors hold in it, reserved or completed: the
    /// part of its capacity taken.
    pub allocated_minor: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestFacts<'a> {
    pub amount_minor: i64,
    pub currency: &'a str,
    pub investor: Option<AccountSnapshot>,
    pub fund: Option<FundSnapshot>,
    /// The fund's own rules (empty for a fund without any).
    pub rules: &'a RuleSet,
    /// What the investor already holds in the fund, reserved or completed;
    /// more than zero means a seat, so this transfer takes no new one.
    pub investor_committed_minor: i64,
    /// When the request is decided, for the fund's opening and closing.
    pub now: DateTime<Utc>,
}

/// A fund's terms as its administrator publishes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FundTerms {
    pub currency: String,
    pub minimum_investment_minor: i64,
    pub seats_max: i32,
    pub capacity_minor: i64,
    pub rules: RuleSet,
}

/// Decides a request. `Ok(())` means: hold the funds and reserve the
/// allocation. Each amount is an exact integer of minor units; the capacity
/// and per-investor checks use checked arithmetic so an absurd amount is
/// refused, not wrapped.
///
/// The order: the request itself, the accounts, the fund's dates, who the
/// investor is (residence, accreditation), the amount (the fund's minimum,
/// its maximum per investment, the investor's total), the fund's seats and
/// capacity, and last the investor's money.
pub fn check_request(facts: &RequestFacts<'_>) -> Result<(), RejectReason> {
    if facts.amount_minor <= 0 {
        return Err(RejectReason::NonPositiveAmount);
    }
    let currency = Currency::parse(facts.currency).map_err(|_| RejectReason::InvalidCurrency)?;
    let investor = facts.investor.ok_or(RejectReason::UnknownInvestorAccount)?;
    let fund = facts.fund.ok_or(RejectReason::UnknownFundAccount)?;
    if investor.currency != currency || fund.currency != currency {
        return Err(RejectReason::CurrencyMismatch);
    }
    facts.rules.check_eligibility(facts.now, &investor.attributes)?;
    if facts.amount_minor < fund.minimum_investment_minor {
        return Err(RejectReason::BelowMinimumInvestment);
    }
    facts.rules.check_amount(facts.amount_minor, facts.investor_committed_minor)?;
    if facts.investor_committed_minor <= 0 && fund.investors_count >= fund.seats_max {
        return Err(RejectReason::FundFull);
    }
    match fund.allocated_minor.checked_add(facts.amount_minor) {
        Some(total) if total <= fund.capacity_minor => {}
        _ => return Err(RejectReason::FundCapacityExceeded),
    }
    if investor.available_minor() < facts.amount_minor {
        return Err(RejectReason::InsufficientFunds);
    }
    Ok(())
}

/// A fund as a run of requests is decided against: its id, its snapshot as
/// read, and its rules.
#[derive(Clone, Copy, Debug)]
pub struct FundRead<'a> {
    pub id: &'a str,
    pub snapshot: FundSnapshot,
    pub rules: &'a RuleSet,
}

/// The books a run of requests is decided against, one request after
/// another: what was read, plus what the accepted requests before took (the
/// investor's hold, the fund's reservation and seat, the investor's total
/// in the fund). Deciding a run through it gives the decisions that
/// deciding each request after the previous one committed would give, so a
/// batch decides as single messages do.
#[derive(Debug, Default)]
pub struct RunningBooks {
    investors: HashMap<String, AccountSnapshot>,
    /// Amount reserved and seats taken in each fund by the run so far.
    taken: HashMap<String, (i64, i32)>,
    /// What each `(fund, investor)` pair holds, reserved or completed: as
    /// read, plus what the run reserved.
    committed: HashMap<(String, String), i64>,
}

impl RunningBooks {
    /// `investors`: the accounts as read, by id; `committed`: what each
    /// `(fund, investor)` pair held (reserved and completed) when read;
    /// pairs left out hold nothing.
    pub fn new(investors: HashMap<String, AccountSnapshot>, committed: HashMap<(String, String), i64>) -> Self {
        Self { investors, taken: HashMap::new(), committed }
    }

    /// Decides a request of `amount_minor` in `currency` from account
    /// `investor` into `fund` (if the fund account exists) at `now`, and if
    /// it is accepted, takes its hold, reservation and seat from the books.
    pub fn decide(
        &mut self,
        investor: &str,
        fund: Option<FundRead<'_>>,
        amount_minor: i64,
        currency: &str,
        now: DateTime<Utc>,
    ) -> Result<(), RejectReason> {
        let pair = fund.map(|fund| (fund.id.to_owned(), investor.to_owned()));
        let committed = pair.as_ref().and_then(|pair| self.committed.get(pair)).copied().unwrap_or_default();
        let facts = RequestFacts {
            amount_minor,
            currency,
            investor: self.investors.get(investor).copied(),
            fund: fund.map(|fund| {
                let (reserved, seats) = self.taken.get(fund.id).copied().unwrap_or_default();
                FundSnapshot {
                    allocated_minor: fund.snapshot.allocated_minor.saturating_add(reserved),
                    investors_count: fund.snapshot.investors_count.saturating_add(seats),
                    ..fund.snapshot
                }
            }),
            rules: fund.map_or(RuleSet::none(), |fund| fund.rules),
            investor_committed_minor: committed,
            now,
        };
        check_request(&facts)?;
        // Accepted, so the investor and the fund exist and the amount fits
        // both: the sums below cannot overflow.
        if let Some(account) = self.investors.get_mut(investor) {
            account.held_minor += amount_minor;
        }
        if let (Some(fund), Some(pair)) = (fund, pair) {
            let taken = self.taken.entry(fund.id.to_owned()).or_default();
            taken.0 += amount_minor;
            if committed <= 0 {
                taken.1 += 1;
            }
            *self.committed.entry(pair).or_default() += amount_minor;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::criteria::{CountryCode, Rule};

    fn eur() -> Currency {
        Currency::parse("EUR").unwrap()
    }

    fn country(code: &str) -> CountryCode {
        CountryCode::parse(code).unwrap()
    }

    fn at(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339).unwrap().with_timezone(&Utc)
    }

    fn account(balance_minor: i64) -> AccountSnapshot {
        AccountSnapshot {
            currency: eur(),
            balance_minor,
            held_minor: 0,
            attributes: InvestorAttributes { residence: Some(country("DE")), accredited: true },
        }
    }

    fn facts(amount_minor: i64, rules: &RuleSet) -> RequestFacts<'_> {
        RequestFacts {
            amount_minor,
            currency: "EUR",
            investor: Some(AccountSnapshot { held_minor: 2_000, ..account(10_000) }),
            fund: Some(FundSnapshot {
                currency: eur(),
                minimum_investment_minor: 1_000,
                seats_max: 2,
                investors_count: 1,
                capacity_minor: 50_000,
                allocated_minor: 40_000,
            }),
            rules,
            investor_committed_minor: 0,
            now: at("2026-06-01T00:00:00Z"),
        }
    }

    /// One table drives every rule, so each reason is shown with the smallest
    /// change to an otherwise acceptable request.
    #[test]
    fn each_rule_names_its_reason() {
        type Tweak = fn(&mut RequestFacts<'_>);
        let cases: [(&str, Tweak, Result<(), RejectReason>); 11] = [
            ("acceptable", |_| {}, Ok(())),
            ("exactly available", |f| f.amount_minor = 8_000, Ok(())),
            ("zero", |f| f.amount_minor = 0, Err(RejectReason::NonPositiveAmount)),
            ("negative", |f| f.amount_minor = -5, Err(RejectReason::NonPositiveAmount)),
            ("bad currency", |f| f.currency = "euro", Err(RejectReason::InvalidCurrency)),
            ("no investor", |f| f.investor = None, Err(RejectReason::UnknownInvestorAccount)),
            ("no fund", |f| f.fund = None, Err(RejectReason::UnknownFundAccount)),
            ("other currency", |f| f.currency = "USD", Err(RejectReason::CurrencyMismatch)),
            ("below minimum", |f| f.amount_minor = 999, Err(RejectReason::BelowMinimumInvestment)),
            ("no seat left", |f| f.fund.as_mut().unwrap().investors_count = 2, Err(RejectReason::FundFull)),
            ("over available", |f| f.amount_minor = 8_001, Err(RejectReason::InsufficientFunds)),
        ];
        let none = RuleSet::default();
        for (name, tweak, expected) in cases {
            let mut request = facts(5_000, &none);
            tweak(&mut request);
            assert_eq!(check_request(&request), expected, "case {name}");
        }
    }

    /// Each of a fund's own rules, against the same acceptable request.
    #[test]
    fn each_fund_rule_names_its_reason() {
        let residence = Rule::ResidenceIn { countries: BTreeSet::from([country("FR"), country("DE")]) };
        let cases: Vec<(&str, Vec<Rule>, fn(&mut RequestFacts<'_>), Result<(), RejectReason>)> = vec![
            ("resident", vec![residence.clone()], |_| {}, Ok(())),
            (
                "resident elsewhere",
                vec![residence.clone()],
                |f| f.investor.as_mut().unwrap().attributes.residence = Some(country("US")),
                Err(RejectReason::ResidenceNotAllowed),
            ),
            (
                "residence unknown",
                vec![residence],
                |f| f.investor.as_mut().unwrap().attributes.residence = None,
                Err(RejectReason::ResidenceNotAllowed),
            ),
            ("accredited", vec![Rule::AccreditedOnly {}], |_| {}, Ok(())),
            (
                "not accredited",
                vec![Rule::AccreditedOnly {}],
                |f| f.investor.as_mut().unwrap().attributes.accredited = false,
                Err(RejectReason::AccreditationRequired),
            ),
            ("at the maximum", vec![Rule::MaximumInvestment { maximum_minor: 5_000 }], |_| {}, Ok(())),
            (
                "above the maximum",
                vec![Rule::MaximumInvestment { maximum_minor: 4_999 }],
                |_| {},
                Err(RejectReason::AboveMaximumInvestment),
            ),
            (
                "investor total at the limit",
                vec![Rule::MaximumPerInvestor { maximum_minor: 7_000 }],
                |f| f.investor_committed_minor = 2_000,
                Ok(()),
            ),
            (
                "investor total over the limit",
                vec![Rule::MaximumPerInvestor { maximum_minor: 7_000 }],
                |f| f.investor_committed_minor = 2_001,
                Err(RejectReason::InvestorLimitExceeded),
            ),
            (
                "investor total overflows",
                vec![Rule::MaximumPerInvestor { maximum_minor: 7_000 }],
                |f| f.investor_committed_minor = i64::MAX,
                Err(RejectReason::InvestorLimitExceeded),
            ),
            (
                "not open yet",
                vec![Rule::OpensAt { at: at("2026-06-01T00:00:01Z") }],
                |_| {},
                Err(RejectReason::FundNotOpen),
            ),
            ("opens now", vec![Rule::OpensAt { at: at("2026-06-01T00:00:00Z") }], |_| {}, Ok(())),
            (
                "closes now",
                vec![Rule::ClosesAt { at: at("2026-06-01T00:00:00Z") }],
                |_| {},
                Err(RejectReason::FundClosed),
            ),
            ("closes later", vec![Rule::ClosesAt { at: at("2026-06-01T00:00:01Z") }], |_| {}, Ok(())),
            // The fixed checks come first, the investor's money last.
            (
                "currency before rules",
                vec![Rule::AccreditedOnly {}],
                |f| {
                    f.currency = "USD";
                    f.investor.as_mut().unwrap().attributes.accredited = false;
                },
                Err(RejectReason::CurrencyMismatch),
            ),
            (
                "minimum before maximum",
                vec![Rule::MaximumPerInvestor { maximum_minor: 1_000 }],
                |f| {
                    f.amount_minor = 999;
                    f.investor_committed_minor = 1_000;
                },
                Err(RejectReason::BelowMinimumInvestment),
            ),
            (
                "rules before money",
                vec![Rule::MaximumInvestment { maximum_minor: 1_000 }],
                |f| f.amount_minor = 9_000,
                Err(RejectReason::AboveMaximumInvestment),
            ),
        ];
        for (name, rules, tweak, expected) in cases {
            let rules = RuleSet::new(rules).unwrap();
            let mut request = facts(5_000, &rules);
            tweak(&mut request);
            assert_eq!(check_request(&request), expected, "case {name}");
        }
    }

    #[test]
    fn an_existing_investor_needs_no_new_seat_but_capacity_still_binds() {
        let none = RuleSet::default();
        let mut request = facts(5_000, &none);
        request.fund.as_mut().unwrap().investors_count = 2;
        request.investor_committed_minor = 1;
        assert_eq!(check_request(&request), Ok(()));
        request.amount_minor = 10_001;
        request.investor.as_mut().unwrap().balance_minor = 1_000_000;
        assert_eq!(check_request(&request), Err(RejectReason::FundCapacityExceeded));
        request.amount_minor = i64::MAX;
        assert_eq!(check_request(&request), Err(RejectReason::FundCapacityExceeded));
    }

    fn books(balance_minor: i64) -> RunningBooks {
        let investors = ["a", "b", "c"].map(|id| (id.to_owned(), account(balance_minor)));
        RunningBooks::new(investors.into_iter().collect(), HashMap::new())
    }

    fn fund(seats_max: i32, capacity_minor: i64) -> FundSnapshot {
        FundSnapshot {
            currency: eur(),
            minimum_investment_minor: 1_000,
            seats_max,
            investors_count: 0,
            capacity_minor,
            allocated_minor: 0,
        }
    }

    fn read(id: &str, snapshot: FundSnapshot) -> Option<FundRead<'_>> {
        Some(FundRead { id, snapshot, rules: RuleSet::none() })
    }

    #[test]
    fn a_run_sees_the_holds_reservations_and_seats_of_the_requests_before() {
        let now = Utc::now();
        // Balance: the second request of one investor finds the first's hold.
        let mut run = books(15_000);
        assert_eq!(run.decide("a", read("f", fund(10, 1_000_000)), 10_000, "EUR", now), Ok(()));
        assert_eq!(
            run.decide("a", read("f", fund(10, 1_000_000)), 10_000, "EUR", now),
            Err(RejectReason::InsufficientFunds)
        );
        assert_eq!(run.decide("a", read("f", fund(10, 1_000_000)), 5_000, "EUR", now), Ok(()));

        // Seats: two seats, three investors; a second request of a seated
        // investor takes no new seat.
        let mut run = books(100_000);
        let small = fund(2, 1_000_000);
        assert_eq!(run.decide("a", read("f", small), 1_000, "EUR", now), Ok(()));
        assert_eq!(run.decide("b", read("f", small), 1_000, "EUR", now), Ok(()));
        assert_eq!(run.decide("c", read("f", small), 1_000, "EUR", now), Err(RejectReason::FundFull));
        assert_eq!(run.decide("a", read("f", small), 1_000, "EUR", now), Ok(()));
        // Another fund's seats are its own.
        assert_eq!(run.decide("c", read("g", small), 1_000, "EUR", now), Ok(()));

        // Capacity: reservations of the run add up.
        let mut run = books(100_000);
        let tight = fund(10, 25_000);
        assert_eq!(run.decide("a", read("f", tight), 10_000, "EUR", now), Ok(()));
        assert_eq!(run.decide("b", read("f", tight), 10_000, "EUR", now), Ok(()));
        assert_eq!(run.decide("c", read("f", tight), 10_000, "EUR", now), Err(RejectReason::FundCapacityExceeded));
        assert_eq!(run.decide("c", read("f", tight), 5_000, "EUR", now), Ok(()));

        // An investor's total: the run's reservations count.
        let mut run = books(100_000);
        let limit = RuleSet::new(vec![Rule::MaximumPerInvestor { maximum_minor: 15_000 }]).unwrap();
        let limited = Some(FundRead { id: "f", snapshot: fund(10, 1_000_000), rules: &limit });
        assert_eq!(run.decide("a", limited, 10_000, "EUR", now), Ok(()));
        assert_eq!(run.decide("a", limited, 10_000, "EUR", now), Err(RejectReason::InvestorLimitExceeded));
        assert_eq!(run.decide("b", limited, 10_000, "EUR", now), Ok(()));
        assert_eq!(run.decide("a", limited, 5_000, "EUR", now), Ok(()));

        // A rejected request takes nothing; unknown accounts are reasons.
        let mut run = books(10_000);
        assert_eq!(
            run.decide("a", read("f", fund(1, 20_000)), 500, "EUR", now),
            Err(RejectReason::BelowMinimumInvestment)
        );
        assert_eq!(
            run.decide("z", read("f", fund(1, 20_000)), 5_000, "EUR", now),
            Err(RejectReason::UnknownInvestorAccount)
        );
        assert_eq!(run.decide("a", None, 5_000, "EUR", now), Err(RejectReason::UnknownFundAccount));
        assert_eq!(run.decide("a", read("f", fund(1, 20_000)), 10_000, "EUR", now), Ok(()));
    }

    #[test]
    fn a_run_starts_from_the_seats_holds_and_totals_it_read() {
        let held = AccountSnapshot { held_minor: 6_000, ..account(10_000) };
        let committed = HashMap::from([(("f".to_owned(), "a".to_owned()), 3_000)]);
        let mut run = RunningBooks::new(HashMap::from([("a".to_owned(), held)]), committed);
        let full = FundSnapshot { investors_count: 1, ..fund(1, 1_000_000) };
        let limit = RuleSet::new(vec![Rule::MaximumPerInvestor { maximum_minor: 7_000 }]).unwrap();
        let fund = Some(FundRead { id: "f", snapshot: full, rules: &limit });
        assert_eq!(run.decide("a", fund, 4_001, "EUR", Utc::now()), Err(RejectReason::InvestorLimitExceeded));
        assert_eq!(run.decide("a", fund, 4_000, "EUR", Utc::now()), Ok(()));
    }

    /// The one-message path as the database runs it: each request decided
    /// by `check_request` on the books as the requests before it left them
    /// once committed (holds, reservations, seats and totals applied here,
    /// independently of `RunningBooks`).
    fn one_at_a_time(
        investors: &HashMap<String, AccountSnapshot>,
        funds: &[(String, FundSnapshot, RuleSet)],
        requests: &[(usize, usize, i64, DateTime<Utc>)],
    ) -> Vec<Result<(), RejectReason>> {
        let mut investors = investors.clone();
        let mut funds: Vec<(String, FundSnapshot, RuleSet)> = funds.to_vec();
        let mut allocations: HashMap<(String, String), i64> = HashMap::new();
        let names: Vec<String> = investors.keys().cloned().collect::<BTreeSet<_>>().into_iter().collect();
        requests
            .iter()
            .map(|&(investor, fund, amount, now)| {
                let investor = &names[investor % names.len()];
                let (fund_id, snapshot, rules) = &mut funds[fund % 3];
                let committed = allocations.get(&(fund_id.clone(), investor.clone())).copied().unwrap_or_default();
                let decision = check_request(&RequestFacts {
                    amount_minor: amount,
                    currency: "EUR",
                    investor: investors.get(investor).copied(),
                    fund: Some(*snapshot),
                    rules,
                    investor_committed_minor: committed,
                    now,
                });
                if decision.is_ok() {
                    investors.get_mut(investor).unwrap().held_minor += amount;
                    snapshot.allocated_minor += amount;
                    if committed == 0 {
                        snapshot.investors_count += 1;
                    }
                    *allocations.entry((fund_id.clone(), investor.clone())).or_default() += amount;
                }
                decision
            })
            .collect()
    }

    fn rule_strategy() -> impl Strategy<Value = Vec<Rule>> {
        let countries = ["DE", "FR", "US"];
        (
            proptest::option::of(1_000i64..20_000),
            proptest::option::of(1_000i64..40_000),
            proptest::option::of(proptest::sample::subsequence(countries.to_vec(), 1..=3)),
            any::<bool>(),
            proptest::option::of(0i64..10),
            proptest::option::of(10i64..20),
        )
            .prop_map(|(maximum, per_investor, residence, accredited, opens, closes)| {
                let day = |n: i64| at("2026-06-01T00:00:00Z") + chrono::Duration::days(n);
                let mut rules = Vec::new();
                rules.extend(maximum.map(|maximum_minor| Rule::MaximumInvestment { maximum_minor }));
                rules.extend(per_investor.map(|maximum_minor| Rule::MaximumPerInvestor { maximum_minor }));
                rules.extend(
                    residence.map(|codes| Rule::ResidenceIn { countries: codes.into_iter().map(country).collect() }),
                );
                if accredited {
                    rules.push(Rule::AccreditedOnly {});
                }
                rules.extend(opens.map(|n| Rule::OpensAt { at: day(n) }));
                rules.extend(closes.map(|n| Rule::ClosesAt { at: day(n) }));
                rules
            })
    }

    proptest! {
        /// A run of requests decided through `RunningBooks` (the batch
        /// path) gets exactly the decisions deciding them one after another
        /// on committed books gets, under random rule sets, investors and
        /// request sequences.
        #[test]
        fn a_run_decides_as_one_message_at_a_time(
            rules in proptest::collection::vec(rule_strategy(), 3),
            limits in proptest::collection::vec((1i32..4, 5_000i64..100_000, 0i64..3_000), 3),
            people in proptest::collection::vec(
                (0i64..60_000, proptest::option::of(proptest::sample::select(vec!["DE", "FR", "US"])), any::<bool>()),
                1..5),
            requests in proptest::collection::vec((0usize..5, 0usize..3, -100i64..25_000, 0i64..25), 1..40),
        ) {
            let investors: HashMap<String, AccountSnapshot> = people
                .iter()
                .enumerate()
                .map(|(n, &(balance, residence, accredited))| {
                    let attributes = InvestorAttributes { residence: residence.map(country), accredited };
                    (format!("investor-{n}"), AccountSnapshot { attributes, ..account(balance) })
                })
                .collect();
            let funds: Vec<(String, FundSnapshot, RuleSet)> = rules
                .into_iter()
                .zip(limits)
                .enumerate()
                .map(|(n, (rules, (seats, capacity, minimum)))| {
                    let snapshot = FundSnapshot { minimum_investment_minor: minimum, ..fund(seats, capacity) };
                    (format!("fund-{n}"), snapshot, RuleSet::new(rules).unwrap())
                })
                .collect();
            let requests: Vec<(usize, usize, i64, DateTime<Utc>)> = requests
                .into_iter()
                .map(|(investor, fund, amount, day)| {
                    (investor, fund, amount, at("2026-06-01T00:00:00Z") + chrono::Duration::days(day))
                })
                .collect();
            let expected = one_at_a_time(&investors, &funds, &requests);

            let names: Vec<String> = investors.keys().cloned().collect::<BTreeSet<_>>().into_iter().collect();
            let mut run = RunningBooks::new(investors.clone(), HashMap::new());
            let decided: Vec<_> = requests
                .iter()
                .map(|&(investor, fund, amount, now)| {
                    let (id, snapshot, rules) = &funds[fund % 3];
                    let read = FundRead { id, snapshot: *snapshot, rules };
                    run.decide(&names[investor % names.len()], Some(read), amount, "EUR", now)
                })
                .collect();
            prop_assert_eq!(decided, expected);
        }
    }

    #[test]
    fn seats_read_as_taken_need_no_new_one() {
        let committed = HashMap::from([(("f".to_owned(), "a".to_owned()), 1)]);
        let mut run = RunningBooks::new(HashMap::from([("a".to_owned(), account(10_000))]), committed);
        let full = FundSnapshot { investors_count: 1, ..fund(1, 1_000_000) };
        assert_eq!(run.decide("a", read("f", full), 4_000, "EUR", Utc::now()), Ok(()));
    }
}
