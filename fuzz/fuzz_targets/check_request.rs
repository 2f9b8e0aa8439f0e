//! Request validation with any numbers and any currency text: an answer,
//! never a panic, and an acceptance only when every rule truly holds (so
//! holding the funds and reserving the allocation keeps invariant I5).
#![no_main]

use bridge_domain::{check_request, AccountSnapshot, Currency, FundSnapshot, InvestorAttributes, RequestFacts, Rule, RuleSet};
use libfuzzer_sys::fuzz_target;

fn numbers(data: &[u8]) -> impl Iterator<Item = i64> + '_ {
    data.chunks(8).map(|chunk| {
        let mut bytes = [0u8; 8];
        bytes[..chunk.len()].copy_from_slice(chunk);
        i64::from_le_bytes(bytes)
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (head, rest) = data.split_at(4);
    let currency = String::from_utf8_lossy(&head[..3]).into_owned();
    let flags = head[3];
    let mut n = numbers(rest).chain(std::iter::repeat(0));
    let mut next = || n.next().unwrap_or_default();
    let eur = Currency::parse("EUR").expect("EUR");
    let attributes = InvestorAttributes { residence: None, accredited: flags & 16 != 0 };
    let investor = AccountSnapshot { currency: eur, balance_minor: next(), held_minor: next(), attributes };
    let fund = FundSnapshot {
        currency: eur,
        minimum_investment_minor: next(),
        seats_max: next() as i32,
        investors_count: next() as i32,
        capacity_minor: next(),
        allocated_minor: next(),
    };
    let amount_minor = next();
    let committed_minor = next();
    let (maximum, per_investor) = (next(), next());
    // Rules the data makes up; a contradictory set is refused by `new`.
    let mut rules = Vec::new();
    if flags & 32 != 0 {
        rules.push(Rule::MaximumInvestment { maximum_minor: maximum });
    }
    if flags & 64 != 0 {
        rules.push(Rule::MaximumPerInvestor { maximum_minor: per_investor });
    }
    if flags & 128 != 0 {
        rules.push(Rule::AccreditedOnly {});
    }
    let rules = RuleSet::new(rules).unwrap_or_default();
    let facts = RequestFacts {
        amount_minor,
        currency: if flags & 1 == 0 { "EUR" } else { &currency },
        investor: (flags & 2 == 0).then_some(investor),
        fund: (flags & 4 == 0).then_some(fund),
        rules: &rules,
        investor_committed_minor: if flags & 8 != 0 { committed_minor } else { 0 },
        now: chrono::DateTime::from_timestamp(next().rem_euclid(1 << 35), 0).unwrap_or_default(),
    };
    if check_request(&facts).is_ok() {
        assert!(amount_minor > 0);
        assert!(amount_minor >= fund.minimum_investment_minor);
        assert!(i128::from(investor.balance_minor) - i128::from(investor.held_minor) >= i128::from(amount_minor));
        let committed = i128::from(fund.allocated_minor) + i128::from(amount_minor);
        assert!(committed <= i128::from(fund.capacity_minor));
        assert!(facts.investor_committed_minor > 0 || fund.investors_count < fund.seats_max);
        for rule in rules.rules() {
            match rule {
                Rule::MaximumInvestment { maximum_minor } => assert!(amount_minor <= *maximum_minor),
                Rule::MaximumPerInvestor { maximum_minor } => assert!(
                    i128::from(facts.investor_committed_minor) + i128::from(amount_minor) <= i128::from(*maximum_minor)
                ),
                Rule::AccreditedOnly {} => assert!(investor.attributes.accredited),
                _ => {}
            }
        }
    }
});
