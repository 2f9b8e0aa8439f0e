//! Validation rules: may this request go ahead?
//!
//! The store gathers the facts inside the validating database transaction and
//! this module decides. The order of checks is part of the contract: the first
//! failing rule names the rejection reason, so the same facts always give the
//! same reason.

use std::collections::{HashMap, HashSet};

use crate::{Currency, RejectReason};

/// What the validator knows about the investor's account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccountSnapshot {
    pub currency: Currency,
    pub balance_minor: i64,
    pub held_minor: i64,
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
    pub reserved_minor: i64,
    pub completed_minor: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestFacts<'a> {
    pub amount_minor: i64,
    pub currency: &'a str,
    pub investor: Option<AccountSnapshot>,
    pub fund: Option<FundSnapshot>,
    /// The investor already holds (reserved or completed) an allocation in
    /// the fund, so this transfer takes no new seat.
    pub investor_holds_seat: bool,
}

/// A fund's terms as its administrator publishes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FundTerms {
    pub currency: String,
    pub minimum_investment_minor: i64,
    pub seats_max: i32,
    pub capacity_minor: i64,
}

/// Decides a request. `Ok(())` means: hold the funds and reserve the
/// allocation. Each amount is an exact integer of minor units; the capacity
/// check uses checked arithmetic so an absurd amount is refused, not wrapped.
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
    if facts.amount_minor < fund.minimum_investment_minor {
        return Err(RejectReason::BelowMinimumInvestment);
    }
    if !facts.investor_holds_seat && fund.investors_count >= fund.seats_max {
        return Err(RejectReason::FundFull);
    }
    let committed =
        fund.reserved_minor.checked_add(fund.completed_minor).and_then(|sum| sum.checked_add(facts.amount_minor));
    match committed {
        Some(total) if total <= fund.capacity_minor => {}
        _ => return Err(RejectReason::FundCapacityExceeded),
    }
    if investor.available_minor() < facts.amount_minor {
        return Err(RejectReason::InsufficientFunds);
    }
    Ok(())
}

/// The books a run of requests is decided against, one request after
/// another: what was read, plus what the accepted requests before took (the
/// investor's hold, the fund's reservation and seat). Deciding a run through
/// it gives the decisions that deciding each request after the previous
/// one committed would give, so a batch decides as single messages do.
#[derive(Debug, Default)]
pub struct RunningBooks {
    investors: HashMap<String, AccountSnapshot>,
    /// Amount reserved and seats taken in each fund by the run so far.
    taken: HashMap<String, (i64, i32)>,
    /// `(fund, investor)` pairs holding a seat.
    seats: HashSet<(String, String)>,
}

impl RunningBooks {
    /// `investors`: the accounts as read, by id; `seats`: the `(fund,
    /// investor)` pairs that held a seat when read.
    pub fn new(investors: HashMap<String, AccountSnapshot>, seats: HashSet<(String, String)>) -> Self {
        Self { investors, taken: HashMap::new(), seats }
    }

    /// Decides a request of `amount_minor` in `currency` from account
    /// `investor` into `fund` (the fund's id and its snapshot as read, if
    /// the fund account exists), and if it is accepted, takes its hold,
    /// reservation and seat from the books.
    pub fn decide(
        &mut self,
        investor: &str,
        fund: Option<(&str, FundSnapshot)>,
        amount_minor: i64,
        currency: &str,
    ) -> Result<(), RejectReason> {
        let seat = fund.map(|(fund_id, _)| (fund_id.to_owned(), investor.to_owned()));
        let facts = RequestFacts {
            amount_minor,
            currency,
            investor: self.investors.get(investor).copied(),
            fund: fund.map(|(fund_id, read)| {
                let (reserved, seats) = self.taken.get(fund_id).copied().unwrap_or_default();
                FundSnapshot {
                    reserved_minor: read.reserved_minor.saturating_add(reserved),
                    investors_count: read.investors_count.saturating_add(seats),
                    ..read
                }
            }),
            investor_holds_seat: seat.as_ref().is_some_and(|seat| self.seats.contains(seat)),
        };
        check_request(&facts)?;
        // Accepted, so the investor and the fund exist and the amount fits
        // both: the sums below cannot overflow.
        if let Some(account) = self.investors.get_mut(investor) {
            account.held_minor += amount_minor;
        }
        if let (Some((fund_id, _)), Some(seat)) = (fund, seat) {
            let taken = self.taken.entry(fund_id.to_owned()).or_default();
            taken.0 += amount_minor;
            if self.seats.insert(seat) {
                taken.1 += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur() -> Currency {
        Currency::parse("EUR").unwrap()
    }

    fn facts(amount_minor: i64) -> RequestFacts<'static> {
        RequestFacts {
            amount_minor,
            currency: "EUR",
            investor: Some(AccountSnapshot { currency: eur(), balance_minor: 10_000, held_minor: 2_000 }),
            fund: Some(FundSnapshot {
                currency: eur(),
                minimum_investment_minor: 1_000,
                seats_max: 2,
                investors_count: 1,
                capacity_minor: 50_000,
                reserved_minor: 10_000,
                completed_minor: 30_000,
            }),
            investor_holds_seat: false,
        }
    }

    /// One table drives every rule, so each reason is shown with the smallest
    /// change to an otherwise acceptable request.
    #[test]
    fn each_rule_names_its_reason() {
        type Tweak = fn(&mut RequestFacts<'static>);
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
        for (name, tweak, expected) in cases {
            let mut request = facts(5_000);
            tweak(&mut request);
            assert_eq!(check_request(&request), expected, "case {name}");
        }
    }

    #[test]
    fn an_existing_investor_needs_no_new_seat_but_capacity_still_binds() {
        let mut request = facts(5_000);
        request.fund.as_mut().unwrap().investors_count = 2;
        request.investor_holds_seat = true;
        assert_eq!(check_request(&request), Ok(()));
        request.amount_minor = 10_001;
        request.investor.as_mut().unwrap().balance_minor = 1_000_000;
        assert_eq!(check_request(&request), Err(RejectReason::FundCapacityExceeded));
        request.amount_minor = i64::MAX;
        assert_eq!(check_request(&request), Err(RejectReason::FundCapacityExceeded));
    }

    fn books(balance_minor: i64) -> RunningBooks {
        let account = AccountSnapshot { currency: eur(), balance_minor, held_minor: 0 };
        let investors = [("a", account), ("b", account), ("c", account)];
        RunningBooks::new(investors.into_iter().map(|(id, account)| (id.to_owned(), account)).collect(), HashSet::new())
    }

    fn fund(seats_max: i32, capacity_minor: i64) -> FundSnapshot {
        FundSnapshot {
            currency: eur(),
            minimum_investment_minor: 1_000,
            seats_max,
            investors_count: 0,
            capacity_minor,
            reserved_minor: 0,
            completed_minor: 0,
        }
    }

    #[test]
    fn a_run_sees_the_holds_reservations_and_seats_of_the_requests_before() {
        // Balance: the second request of one investor finds the first's hold.
        let mut run = books(15_000);
        assert_eq!(run.decide("a", Some(("f", fund(10, 1_000_000))), 10_000, "EUR"), Ok(()));
        assert_eq!(
            run.decide("a", Some(("f", fund(10, 1_000_000))), 10_000, "EUR"),
            Err(RejectReason::InsufficientFunds)
        );
        assert_eq!(run.decide("a", Some(("f", fund(10, 1_000_000))), 5_000, "EUR"), Ok(()));

        // Seats: two seats, three investors; a second request of a seated
        // investor takes no new seat.
        let mut run = books(100_000);
        let small = fund(2, 1_000_000);
        assert_eq!(run.decide("a", Some(("f", small)), 1_000, "EUR"), Ok(()));
        assert_eq!(run.decide("b", Some(("f", small)), 1_000, "EUR"), Ok(()));
        assert_eq!(run.decide("c", Some(("f", small)), 1_000, "EUR"), Err(RejectReason::FundFull));
        assert_eq!(run.decide("a", Some(("f", small)), 1_000, "EUR"), Ok(()));
        // Another fund's seats are its own.
        assert_eq!(run.decide("c", Some(("g", small)), 1_000, "EUR"), Ok(()));

        // Capacity: reservations of the run add up.
        let mut run = books(100_000);
        let tight = fund(10, 25_000);
        assert_eq!(run.decide("a", Some(("f", tight)), 10_000, "EUR"), Ok(()));
        assert_eq!(run.decide("b", Some(("f", tight)), 10_000, "EUR"), Ok(()));
        assert_eq!(run.decide("c", Some(("f", tight)), 10_000, "EUR"), Err(RejectReason::FundCapacityExceeded));
        assert_eq!(run.decide("c", Some(("f", tight)), 5_000, "EUR"), Ok(()));

        // A rejected request takes nothing; unknown accounts are reasons.
        let mut run = books(10_000);
        assert_eq!(
            run.decide("a", Some(("f", fund(1, 20_000))), 500, "EUR"),
            Err(RejectReason::BelowMinimumInvestment)
        );
        assert_eq!(
            run.decide("z", Some(("f", fund(1, 20_000))), 5_000, "EUR"),
            Err(RejectReason::UnknownInvestorAccount)
        );
        assert_eq!(run.decide("a", None, 5_000, "EUR"), Err(RejectReason::UnknownFundAccount));
        assert_eq!(run.decide("a", Some(("f", fund(1, 20_000))), 10_000, "EUR"), Ok(()));
    }

    #[test]
    fn a_run_starts_from_the_seats_and_holds_it_read() {
        let held = AccountSnapshot { currency: eur(), balance_minor: 10_000, held_minor: 6_000 };
        let seats = HashSet::from([("f".to_owned(), "a".to_owned())]);
        let mut run = RunningBooks::new(HashMap::from([("a".to_owned(), held)]), seats);
        let full = FundSnapshot { investors_count: 1, ..fund(1, 1_000_000) };
        assert_eq!(run.decide("a", Some(("f", full)), 5_000, "EUR"), Err(RejectReason::InsufficientFunds));
        assert_eq!(run.decide("a", Some(("f", full)), 4_000, "EUR"), Ok(()));
    }
}
