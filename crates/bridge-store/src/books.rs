//! Applies what transfer events do to the books ([`Effect`], decided in
//! `bridge-domain`): the functions every step's transaction calls, whether
//! it carries one transfer or a batch: [`apply`], or [`postings`] for the
//! step's own statement and [`apply_balances`] after it.
//!
//! It also decides the one order in which a step's transaction locks the
//! shared rows, after the transfers' own rows (which the caller has locked
//! or inserted): ledger rows (inserted, never locked), then investor
//! accounts, then allocations, then funds, then fund accounts, each in key
//! order. Every path takes them in this order, so two transactions wait for
//! each other instead of deadlocking, and the rows most transactions want
//! (a fund's, a fund account's) are taken last and held for the shortest
//! time.

use std::collections::BTreeMap;

use sqlx::PgConnection;

use bridge_domain::{Book, Currency, Effect, Money};

use crate::accounts;
use crate::ledger::{self, Posting, Postings};
use crate::transfers::Transfer;
use crate::{Error, Result};

/// Applies each transfer's effect, set-based: its ledger postings
/// ([`postings`]), then its balances ([`apply_balances`]). A hold is
/// guarded by the investor's available balance and a reservation by the
/// fund's limits: if the books changed since the caller decided, the whole
/// call fails with a conflict and the caller decides again.
pub async fn apply(conn: &mut PgConnection, changes: &[(&Transfer, Effect)]) -> Result<()> {
    ledger::post_many(conn, &postings(changes)?).await?;
    apply_balances(conn, changes).await
}

/// The ledger postings of each transfer's effect: first in the locking
/// order, as they lock nothing (a step's own statement may write them,
/// `transfers::advance_step`).
pub fn postings(changes: &[(&Transfer, Effect)]) -> Result<Postings> {
    let mut postings = Postings::default();
    for (transfer, effect) in changes {
        if let Some(posting) = effect.posting {
            let name = |book| match book {
                Book::Investor => ledger::investor_account(&transfer.investor_account_id),
                Book::InTransit => ledger::IN_TRANSIT.to_owned(),
                Book::FundAccount => ledger::fund_account(&transfer.fund_account_id),
            };
            let (debit, credit) = (name(posting.debit), name(posting.credit));
            postings.push(&Posting {
                transfer_id: Some(transfer.id),
                step: posting.step.as_str(),
                debit_account: &debit,
                credit_account: &credit,
                amount: money_of(transfer)?,
            });
        }
    }
    Ok(postings)
}

/// Applies what each transfer's effect does to balances, holds,
/// allocations, funds and fund accounts, in the locking order, with the
/// guards [`apply`] describes; the postings are the caller's to write
/// (before, or in the statement that advances the transfers).
pub async fn apply_balances(conn: &mut PgConnection, changes: &[(&Transfer, Effect)]) -> Result<()> {
    if let [(transfer, effect)] = changes {
        return apply_one(conn, transfer, effect).await;
    }
    // Investors: a hold needs room on the balance; a change to money
    // already decided (a settled withdrawal, a released hold, a refund)
    // needs none.
    let mut holds = Vec::new();
    let mut adjustments = Vec::new();
    for (transfer, effect) in changes {
        let investor = transfer.investor_account_id.as_str();
        match (effect.balance_minor, effect.held_minor) {
            (0, 0) => {}
            (0, held) if held > 0 => holds.push((investor, held)),
            (balance, held) => adjustments.push((investor, balance, held)),
        }
    }
    accounts::hold_many(conn, &holds).await?;
    if !adjustments.is_empty() {
        accounts::adjust_investors(conn, &adjustments).await?;
    }

    // Allocations, then their funds.
    let mut reservations = Vec::new();
    let mut completions = Vec::new();
    let mut releases: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for (transfer, effect) in changes {
        let investor = transfer.investor_account_id.as_str();
        match allocation_change(transfer, effect)? {
            AllocationChange::None => {}
            AllocationChange::Allocate(delta) if delta > 0 => reservations.push((fund_of(transfer)?, investor, delta)),
            AllocationChange::Allocate(delta) => *releases.entry((fund_of(transfer)?, investor)).or_default() += delta,
            AllocationChange::Complete(amount) => {
                completions.push((fund_of(transfer)?.to_owned(), investor.to_owned(), amount));
            }
        }
    }
    accounts::reserve_allocations(conn, &reservations).await?;
    if !completions.is_empty() {
        accounts::complete_allocations(conn, &completions).await?;
    }
    // Releases come one at a time (a decline, a reversal); in key order all
    // the same.
    for ((fund, investor), released) in releases {
        accounts::adjust_allocation(conn, fund, investor, released).await?;
    }

    let credits: Vec<(&str, i64)> = changes
        .iter()
        .filter(|(_, effect)| effect.fund_account_minor != 0)
        .map(|(transfer, effect)| (transfer.fund_account_id.as_str(), effect.fund_account_minor))
        .collect();
    if !credits.is_empty() {
        accounts::credit_fund_accounts(conn, &credits).await?;
    }
    Ok(())
}

/// `apply_balances` for one transfer, the one-message path: the same
/// changes in the same order, each one prepared statement on one row (a
/// batch's statements over arrays lock rows first).
async fn apply_one(conn: &mut PgConnection, transfer: &Transfer, effect: &Effect) -> Result<()> {
    if effect.balance_minor != 0 || effect.held_minor != 0 {
        accounts::adjust_investor(conn, &transfer.investor_account_id, effect.balance_minor, effect.held_minor).await?;
    }
    match allocation_change(transfer, effect)? {
        AllocationChange::None => {}
        AllocationChange::Allocate(delta) => {
            accounts::adjust_allocation(conn, fund_of(transfer)?, &transfer.investor_account_id, delta).await?;
        }
        AllocationChange::Complete(amount) => {
            accounts::complete_allocation(conn, fund_of(transfer)?, &transfer.investor_account_id, amount).await?;
        }
    }
    if effect.fund_account_minor != 0 {
        accounts::credit_fund_account(conn, &transfer.fund_account_id, effect.fund_account_minor).await?;
    }
    Ok(())
}

/// What an event does to the investor's allocation in the fund (and so to
/// the fund's allocated total).
enum AllocationChange {
    None,
    /// Reserved (positive: taking capacity, and a seat if the investor had
    /// none) or a reservation given back (negative: a decline, a refund).
    Allocate(i64),
    /// This much of the reservation made completed; the fund's total is
    /// unchanged.
    Complete(i64),
}

fn allocation_change(transfer: &Transfer, effect: &Effect) -> Result<AllocationChange> {
    Ok(match (effect.reserved_minor, effect.completed_minor) {
        (0, 0) => AllocationChange::None,
        (reserved, 0) => AllocationChange::Allocate(reserved),
        (reserved, completed) if reserved == -completed && completed > 0 => AllocationChange::Complete(completed),
        (reserved, completed) => {
            return Err(Error::Corrupt(format!(
                "transfer {}: no step reserves {reserved} and completes {completed}",
                transfer.id
            )))
        }
    })
}

fn money_of(transfer: &Transfer) -> Result<Money> {
    let currency = Currency::parse(&transfer.currency)
        .map_err(|error| Error::Corrupt(format!("transfer {}: {error}", transfer.id)))?;
    Ok(Money::new(transfer.amount_minor, currency))
}

fn fund_of(transfer: &Transfer) -> Result<&str> {
    transfer.fund_id.as_deref().ok_or_else(|| Error::Corrupt(format!("transfer {} has no fund", transfer.id)))
}
