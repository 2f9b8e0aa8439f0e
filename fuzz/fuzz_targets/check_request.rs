//! Request validation with any numbers and any currency text: an answer,
//! never a panic, and an acceptance only when every rule truly holds (so
//! holding the funds and reserving the allocation keeps invariant I5).
#![no_main]

use bridge_domain::{check_request, AccountSnapshot, Currency, FundSnapshot, RequestFacts};
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
    let investor = AccountSnapshot { currency: eur, balance_minor: next(), held_minor: next() };
    let fund = FundSnapshot {
        currency: eur,
        minimum_investment_minor: next(),
        seats_max: next() as i32,
        investors_count: next() as i32,
        capacity_minor: next(),
        reserved_minor: next(),
        completed_minor: next(),
    };
    let amount_minor = next();
    let facts = RequestFacts {
        amount_minor,
        currency: if flags & 1 == 0 { "EUR" } else { &currency },
        investor: (flags & 2 == 0).then_some(investor),
        fund: (flags & 4 == 0).then_some(fund),
        investor_holds_seat: flags & 8 != 0,
    };
    if check_request(&facts).is_ok() {
        assert!(amount_minor > 0);
        assert!(amount_minor >= fund.minimum_investment_minor);
        assert!(i128::from(investor.balance_minor) - i128::from(investor.held_minor) >= i128::from(amount_minor));
        let committed = i128::from(fund.reserved_minor) + i128::from(fund.completed_minor) + i128::from(amount_minor);
        assert!(committed <= i128::from(fund.capacity_minor));
        assert!(facts.investor_holds_seat || fund.investors_count < fund.seats_max);
    }
});
