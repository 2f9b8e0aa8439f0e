//! Investor accounts, funds, fund accounts and allocations.
//!
//! Balances, holds, reservations and seats change by atomic updates under
//! the rows' locks (`balance_minor = balance_minor + $2`), guarded where a
//! decision rests on them; a failed guard is [`Error::Conflict`] and the
//! caller retries the whole transaction. Every update moves the row's
//! version from N to N + 1, and the database refuses one that does not
//! (migration 0022), so a writer that sets absolute values from a row it
//! read earlier writes `version = $read + 1` and fails if the row moved on.
//! Each change is also recorded, before and after, in `model_history`.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::PgConnection;

use bridge_domain::{AccountSnapshot, CountryCode, Currency, FundSnapshot, InvestorAttributes, Money, RuleSet};

use crate::ledger::{self, Posting};
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct InvestorSeed {
    pub id: String,
    pub opening_balance: Money,
}

#[derive(Clone, Debug)]
pub struct FundSeed {
    pub id: String,
    pub name: String,
    pub currency: Currency,
    pub minimum_investment_minor: i64,
    pub seats_max: i32,
    pub capacity_minor: i64,
}

#[derive(Clone, Debug)]
pub struct FundAccountSeed {
    pub id: String,
    pub fund_id: String,
    pub currency: Currency,
}

fn currency(code: &str) -> Result<Currency> {
    Currency::parse(code.trim()).map_err(|error| Error::Corrupt(error.to_string()))
}

fn conflict(entity: &'static str, id: &str) -> Error {
    Error::Conflict { entity, id: id.to_owned() }
}

/// A version-checked update must touch exactly one row; none means the
/// version moved under us.
fn exactly_one(rows_updated: u64, entity: &'static str, id: &str) -> Result<()> {
    if rows_updated == 1 {
        Ok(())
    } else {
        Err(conflict(entity, id))
    }
}

/// Creates the investor account with its opening balance, posted against the
/// opening-balance equity account so the ledger explains every unit. Does
/// nothing if the account exists.
pub async fn seed_investor(conn: &mut PgConnection, seed: &InvestorSeed) -> Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO investor_accounts (id, currency, balance_minor) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&seed.id)
    .bind(seed.opening_balance.currency.as_str())
    .bind(seed.opening_balance.amount_minor)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if inserted && seed.opening_balance.amount_minor > 0 {
        let account = ledger::investor_account(&seed.id);
        ledger::post(
            conn,
            &Posting {
                transfer_id: None,
                step: "opening_balance",
                debit_account: ledger::OPENING_BALANCES,
                credit_account: &account,
                amount: seed.opening_balance,
            },
        )
        .await?;
    }
    Ok(inserted)
}

pub async fn seed_fund(conn: &mut PgConnection, seed: &FundSeed) -> Result<()> {
    sqlx::query(
        "INSERT INTO funds (id, name, currency, minimum_investment_minor, seats_max, capacity_minor)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&seed.id)
    .bind(&seed.name)
    .bind(seed.currency.as_str())
    .bind(seed.minimum_investment_minor)
    .bind(seed.seats_max)
    .bind(seed.capacity_minor)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn seed_fund_account(conn: &mut PgConnection, seed: &FundAccountSeed) -> Result<()> {
    sqlx::query("INSERT INTO fund_accounts (id, fund_id, currency) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING")
        .bind(&seed.id)
        .bind(&seed.fund_id)
        .bind(seed.currency.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(Clone, Copy, Debug)]
pub struct Versioned<T> {
    pub value: T,
    pub version: i64,
}

/// An investor account as the validator reads it.
type InvestorRow = (String, i64, i64, Option<String>, bool, i64);

const INVESTOR_COLUMNS: &str = "currency, balance_minor, held_minor, residence_country, accredited, version";

fn investor_snapshot(
    (code, balance_minor, held_minor, residence, accredited, _): InvestorRow,
) -> Result<AccountSnapshot> {
    let residence = residence
        .map(|code| CountryCode::parse(&code).map_err(|error| Error::Corrupt(error.to_string())))
        .transpose()?;
    Ok(AccountSnapshot {
        currency: currency(&code)?,
        balance_minor,
        held_minor,
        attributes: InvestorAttributes { residence, accredited },
    })
}

pub async fn investor(conn: &mut PgConnection, id: &str) -> Result<Option<Versioned<AccountSnapshot>>> {
    let row: Option<InvestorRow> =
        sqlx::query_as(&format!("SELECT {INVESTOR_COLUMNS} FROM investor_accounts WHERE id = $1"))
            .bind(id)
            .fetch_optional(conn)
            .await?;
    row.map(|row| {
        let version = row.5;
        Ok(Versioned { value: investor_snapshot(row)?, version })
    })
    .transpose()
}

/// The investor accounts with these ids, by id; unknown ids are left out.
/// Not locked: a batch decides on them and `hold_many` re-checks each
/// account's available balance when it takes the holds.
pub async fn investors_by_id(conn: &mut PgConnection, ids: &[&str]) -> Result<HashMap<String, AccountSnapshot>> {
    let rows: Vec<(String, String, i64, i64, Option<String>, bool, i64)> =
        sqlx::query_as(&format!("SELECT id, {INVESTOR_COLUMNS} FROM investor_accounts WHERE id = ANY($1)"))
            .bind(ids)
            .fetch_all(conn)
            .await?;
    rows.into_iter()
        .map(|(id, code, balance, held, residence, accredited, version)| {
            Ok((id, investor_snapshot((code, balance, held, residence, accredited, version))?))
        })
        .collect()
}

/// Sets what funds' rules read about an investor: residence (an ISO 3166-1
/// alpha-2 code, or none) and accreditation. With `expected_version`, only
/// if the account is still at that version (a conflict otherwise: the
/// caller read it before someone else changed it). Returns the new version,
/// or `None` for an unknown account.
pub async fn set_investor_attributes(
    conn: &mut PgConnection,
    id: &str,
    attributes: InvestorAttributes,
    expected_version: Option<i64>,
) -> Result<Option<i64>> {
    // Attributes already as asked write nothing (no version, no history
    // entry): the account's version is the answer.
    let version: Option<i64> = sqlx::query_scalar(
        "WITH changed AS (
             UPDATE investor_accounts
             SET residence_country = $2, accredited = $3, version = version + 1, updated_at = now()
             WHERE id = $1 AND ($4::bigint IS NULL OR version = $4)
               AND (residence_country IS DISTINCT FROM $2 OR accredited IS DISTINCT FROM $3)
             RETURNING version
         )
         SELECT version FROM changed
         UNION ALL
         SELECT version FROM investor_accounts
         WHERE id = $1 AND ($4::bigint IS NULL OR version = $4) AND NOT EXISTS (SELECT 1 FROM changed)",
    )
    .bind(id)
    .bind(attributes.residence.map(|code| code.as_str().to_owned()))
    .bind(attributes.accredited)
    .bind(expected_version)
    .fetch_optional(&mut *conn)
    .await?;
    if version.is_none() && expected_version.is_some() {
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM investor_accounts WHERE id = $1)")
            .bind(id)
            .fetch_one(conn)
            .await?;
        if exists {
            return Err(conflict("investor account", id));
        }
    }
    Ok(version)
}

/// Holds the amounts of accepted requests, `(investor, amount)` each
/// (an investor's amounts added up). The rows are locked in key order first (so
/// two batches cannot deadlock on each other), and only now, near the end
/// of the caller's transaction: locked from the caller's first read, they
/// would stall every withdrawal of those investors for the whole batch.
/// Each hold applies only if the account still has that much available; a
/// hold taken elsewhere since the caller read the account (the only change
/// that lowers what is available) makes this a conflict, and the caller
/// decides again.
pub(crate) async fn hold_many(conn: &mut PgConnection, requests: &[(&str, i64)]) -> Result<()> {
    if requests.is_empty() {
        return Ok(());
    }
    let mut holds: BTreeMap<&str, i64> = BTreeMap::new();
    for (investor, amount) in requests {
        *holds.entry(investor).or_default() += amount;
    }
    let (ids, amounts): (Vec<&str>, Vec<i64>) = holds.iter().map(|(id, amount)| (*id, *amount)).unzip();
    lock_in_key_order(conn, "investor_accounts", &ids).await?;
    let updated = sqlx::query(
        "UPDATE investor_accounts a
         SET held_minor = a.held_minor + i.amount, version = a.version + 1, updated_at = now()
         FROM unnest($1::text[], $2::bigint[]) AS i(id, amount)
         WHERE a.id = i.id AND a.balance_minor - a.held_minor >= i.amount",
    )
    .bind(&ids)
    .bind(&amounts)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if updated != holds.len() as u64 {
        return Err(conflict("investor account", &format!("{} of a batch", holds.len() as u64 - updated)));
    }
    Ok(())
}

/// The fund behind a fund account.
#[derive(Clone, Debug)]
pub struct FundView {
    pub fund_id: String,
    pub account_currency: Currency,
    pub fund: Versioned<FundSnapshot>,
    /// The fund's own criteria.
    pub rules: RuleSet,
}

/// A fund account and the fund behind it.
type FundViewRow = (String, String, String, String, i64, i32, i32, i64, i64, i64, serde_json::Value);

const FUND_VIEW: &str = "SELECT a.id, f.id, a.currency, f.currency, f.minimum_investment_minor, f.seats_max,
        f.investors_count, f.capacity_minor, f.allocated_minor, f.version, f.rules
 FROM fund_accounts a JOIN funds f ON f.id = a.fund_id";

fn fund_view(row: FundViewRow) -> Result<(String, FundView)> {
    let (
        account_id,
        fund_id,
        account_code,
        fund_code,
        minimum,
        seats_max,
        investors,
        capacity,
        allocated,
        version,
        rules,
    ) = row;
    // Rules are checked before they are stored (`apply_fund_terms`), so a
    // row whose rules do not parse was changed behind Bridge's back.
    let rules: RuleSet = serde_json::from_value(rules)
        .map_err(|error| Error::Corrupt(format!("fund {fund_id}: its rules do not parse: {error}")))?;
    let fund_currency = currency(&fund_code)?;
    let account_currency = currency(&account_code)?;
    Ok((
        account_id,
        FundView {
            fund_id,
            account_currency,
            fund: Versioned {
                value: FundSnapshot {
                    // A fund account in another currency than its fund cannot
                    // receive this transfer; surface it as a currency mismatch.
                    currency: if account_currency == fund_currency { fund_currency } else { account_currency },
                    minimum_investment_minor: minimum,
                    seats_max,
                    investors_count: investors,
                    capacity_minor: capacity,
                    allocated_minor: allocated,
                },
                version,
            },
            rules,
        },
    ))
}

pub async fn fund_by_account(conn: &mut PgConnection, fund_account_id: &str) -> Result<Option<FundView>> {
    let row: Option<FundViewRow> =
        sqlx::query_as(&format!("{FUND_VIEW} WHERE a.id = $1")).bind(fund_account_id).fetch_optional(conn).await?;
    Ok(row.map(fund_view).transpose()?.map(|(_, view)| view))
}

/// `fund_by_account` for many accounts, by account id; unknown accounts are
/// left out.
pub async fn funds_by_accounts(
    conn: &mut PgConnection,
    fund_account_ids: &[&str],
) -> Result<HashMap<String, FundView>> {
    let rows: Vec<FundViewRow> =
        sqlx::query_as(&format!("{FUND_VIEW} WHERE a.id = ANY($1)")).bind(fund_account_ids).fetch_all(conn).await?;
    rows.into_iter().map(fund_view).collect()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allocation {
    pub reserved_minor: i64,
    pub completed_minor: i64,
}

impl Allocation {
    /// What the investor holds in the fund, reserved and completed.
    pub fn total_minor(&self) -> i64 {
        self.reserved_minor + self.completed_minor
    }
}

pub async fn allocation(
    conn: &mut PgConnection,
    fund_id: &str,
    investor_account_id: &str,
) -> Result<Option<Versioned<Allocation>>> {
    let row: Option<(i64, i64, i64)> = sqlx::query_as(
        "SELECT reserved_minor, completed_minor, version FROM allocations
         WHERE fund_id = $1 AND investor_account_id = $2",
    )
    .bind(fund_id)
    .bind(investor_account_id)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(reserved_minor, completed_minor, version)| Versioned {
        value: Allocation { reserved_minor, completed_minor },
        version,
    }))
}

/// What each of these `(fund, investor)` pairs holds in its fund, reserved
/// and completed; pairs holding nothing are left out (more than zero is a
/// seat).
pub async fn allocations_held(
    conn: &mut PgConnection,
    pairs: &[(&str, &str)],
) -> Result<HashMap<(String, String), i64>> {
    let (funds, investors): (Vec<&str>, Vec<&str>) = pairs.iter().copied().unzip();
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT a.fund_id, a.investor_account_id, a.reserved_minor + a.completed_minor FROM allocations a
         JOIN unnest($1::text[], $2::text[]) AS i(fund_id, investor_account_id)
           ON a.fund_id = i.fund_id AND a.investor_account_id = i.investor_account_id
         WHERE a.reserved_minor + a.completed_minor > 0",
    )
    .bind(&funds)
    .bind(&investors)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|(fund, investor, total)| ((fund, investor), total)).collect())
}

/// Checks, after reserving, that no `(fund, investor, maximum)` pair holds
/// more than its fund's maximum per investor. The validator decided on a
/// total it read; two requests of one investor (different transfers, so
/// perhaps different partitions and processes) may be decided at once, and
/// unlike seats and capacity the fund's row does not carry this limit. The
/// reservation has locked the allocation rows and updated them on their
/// newest versions, so this read sees every reservation committed before
/// and none can slip in until the caller commits; a total over the maximum
/// is a conflict, and the caller decides again on fresh data.
pub async fn check_investor_limits(conn: &mut PgConnection, limits: &[(&str, &str, i64)]) -> Result<()> {
    if limits.is_empty() {
        return Ok(());
    }
    let funds: Vec<&str> = limits.iter().map(|(fund, _, _)| *fund).collect();
    let investors: Vec<&str> = limits.iter().map(|(_, investor, _)| *investor).collect();
    let maxima: Vec<i64> = limits.iter().map(|(_, _, maximum)| *maximum).collect();
    let over: Option<String> = sqlx::query_scalar(
        "SELECT a.fund_id || '/' || a.investor_account_id FROM allocations a
         JOIN unnest($1::text[], $2::text[], $3::bigint[]) AS i(fund_id, investor_account_id, maximum)
           ON a.fund_id = i.fund_id AND a.investor_account_id = i.investor_account_id
         WHERE a.reserved_minor + a.completed_minor > i.maximum
         LIMIT 1",
    )
    .bind(&funds)
    .bind(&investors)
    .bind(&maxima)
    .fetch_optional(conn)
    .await?;
    match over {
        Some(pair) => Err(conflict("allocation over the fund's maximum per investor", &pair)),
        None => Ok(()),
    }
}

/// One investor's change, in one atomic update under the row's lock: a hold
/// (`held_delta_minor` > 0 with no balance change) only if the available
/// balance covers it (else a conflict: the caller decides again), any other
/// change to money already decided (a settled withdrawal, a released hold,
/// a refund) unguarded. The CHECK constraints still refuse a negative
/// available balance. `hold_many` and `adjust_investors` for batches.
pub(crate) async fn adjust_investor(
    conn: &mut PgConnection,
    id: &str,
    balance_delta_minor: i64,
    held_delta_minor: i64,
) -> Result<()> {
    let hold = balance_delta_minor == 0 && held_delta_minor > 0;
    let updated = sqlx::query(
        "UPDATE investor_accounts
         SET balance_minor = balance_minor + $2, held_minor = held_minor + $3,
             version = version + 1, updated_at = now()
         WHERE id = $1 AND (NOT $4 OR balance_minor - held_minor >= $3)",
    )
    .bind(id)
    .bind(balance_delta_minor)
    .bind(held_delta_minor)
    .bind(hold)
    .execute(conn)
    .await?
    .rows_affected();
    match updated {
        1 => Ok(()),
        _ if hold => Err(conflict("investor account", id)),
        _ => Err(Error::Corrupt(format!("investor account {id} vanished"))),
    }
}

/// Credits a fund account: one atomic increment, since every deposit into
/// the fund updates this one row (see `adjust_allocation`).
pub(crate) async fn credit_fund_account(conn: &mut PgConnection, id: &str, amount_minor: i64) -> Result<()> {
    let updated = sqlx::query(
        "UPDATE fund_accounts SET balance_minor = balance_minor + $2, version = version + 1, updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(amount_minor)
    .execute(conn)
    .await?
    .rows_affected();
    if updated != 1 {
        return Err(Error::Corrupt(format!("fund account {id} vanished")));
    }
    Ok(())
}

/// Reserves (a positive delta) or releases (a negative one) an investor's
/// allocation in a fund and, in the same statement, the fund's allocated
/// total and seat count.
///
/// A fund is the hottest row in the system: every validation and release
/// of every investor in it updates the same row. So this is not a
/// read-then-version-check (which would make concurrent transactions on one
/// fund abort each other and retry in a storm) but one atomic statement: the
/// allocation is upserted by its delta, the seat change follows from its
/// total before and after, and the fund's update carries a guard that
/// restates the fund's limits. It waits only for row locks, and it applies
/// only if the fund still has room. A fund that filled up since the caller's
/// decision is a conflict, so the caller decides again on fresh data (and
/// rejects). The CHECK constraints stay as the last line (a release of an
/// allocation that does not exist fails on them). Being one statement, it
/// is also one round trip where a read and two writes were three.
pub(crate) async fn adjust_allocation(
    conn: &mut PgConnection,
    fund_id: &str,
    investor_account_id: &str,
    reserved_delta_minor: i64,
) -> Result<()> {
    let updated = sqlx::query(
        "WITH updated AS (
             UPDATE allocations
             SET reserved_minor = reserved_minor + $3, version = version + 1, updated_at = now()
             WHERE fund_id = $1 AND investor_account_id = $2
             RETURNING reserved_minor + completed_minor AS total_after
         ),
         -- Not ON CONFLICT: Postgres checks the proposed row before the
         -- conflict, so a negative delta (a release) would fail the CHECKs
         -- even when the row exists. A concurrent first insert for the same
         -- pair loses with a retryable unique violation.
         inserted AS (
             INSERT INTO allocations (fund_id, investor_account_id, reserved_minor, completed_minor)
             SELECT $1, $2, $3, 0 WHERE NOT EXISTS (SELECT 1 FROM updated)
             RETURNING reserved_minor + completed_minor AS total_after
         ),
         allocation AS (SELECT total_after FROM updated UNION ALL SELECT total_after FROM inserted),
         seat AS (
             SELECT CASE
                 WHEN total_after - $3 <= 0 AND total_after > 0 THEN 1
                 WHEN total_after - $3 > 0 AND total_after <= 0 THEN -1
                 ELSE 0
             END AS delta
             FROM allocation
         )
         UPDATE funds
         SET allocated_minor = allocated_minor + $3,
             investors_count = investors_count + seat.delta, version = version + 1, updated_at = now()
         FROM seat
         WHERE funds.id = $1
           AND funds.allocated_minor + $3 <= funds.capacity_minor
           AND funds.investors_count + seat.delta <= funds.seats_max",
    )
    .bind(fund_id)
    .bind(investor_account_id)
    .bind(reserved_delta_minor)
    .execute(conn)
    .await?
    .rows_affected();
    exactly_one(updated, "fund", fund_id)
}

/// Turns an investor's reserved allocation in a fund into a completed one.
/// The fund's allocated total and seats do not change, so its row is not
/// touched: a completion never waits for, nor holds up, a validation into
/// the same fund. The CHECK constraints refuse a reservation that is not
/// there.
pub(crate) async fn complete_allocation(
    conn: &mut PgConnection,
    fund_id: &str,
    investor_account_id: &str,
    amount_minor: i64,
) -> Result<()> {
    let updated = sqlx::query(
        "UPDATE allocations
         SET reserved_minor = reserved_minor - $3, completed_minor = completed_minor + $3,
             version = version + 1, updated_at = now()
         WHERE fund_id = $1 AND investor_account_id = $2",
    )
    .bind(fund_id)
    .bind(investor_account_id)
    .bind(amount_minor)
    .execute(conn)
    .await?
    .rows_affected();
    if updated != 1 {
        return Err(Error::Corrupt(format!("no allocation of {investor_account_id} in fund {fund_id} to complete")));
    }
    Ok(())
}

/// `complete_allocation` for a batch of completions, `(fund, investor,
/// amount)` each, set-based: the allocations are locked in key order first,
/// the order every other writer of them follows too (`adjust_allocation`
/// and `reserve_allocations` take an allocation before its fund), so
/// batches and single steps cannot deadlock.
pub(crate) async fn complete_allocations(conn: &mut PgConnection, completions: &[(String, String, i64)]) -> Result<()> {
    let funds: Vec<&str> = completions.iter().map(|(fund, _, _)| fund.as_str()).collect();
    let investors: Vec<&str> = completions.iter().map(|(_, investor, _)| investor.as_str()).collect();
    let amounts: Vec<i64> = completions.iter().map(|(_, _, amount)| *amount).collect();
    let pairs = completions.iter().map(|(fund, investor, _)| (fund, investor)).collect::<HashSet<_>>();
    let pairs = pairs.len() as u64;
    let locked = lock_allocations(conn, &funds, &investors).await?;
    let updated = sqlx::query(
        "UPDATE allocations a
         SET reserved_minor = a.reserved_minor - i.amount, completed_minor = a.completed_minor + i.amount,
             version = a.version + 1, updated_at = now()
         FROM (SELECT fund_id, investor_account_id, sum(amount) AS amount
               FROM unnest($1::text[], $2::text[], $3::bigint[]) AS i(fund_id, investor_account_id, amount)
               GROUP BY 1, 2) i
         WHERE a.fund_id = i.fund_id AND a.investor_account_id = i.investor_account_id",
    )
    .bind(&funds)
    .bind(&investors)
    .bind(&amounts)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if locked != pairs || updated != pairs {
        return Err(Error::Corrupt(format!("{} of {pairs} allocations to complete are missing", pairs - updated)));
    }
    Ok(())
}

/// Locks the existing allocations of these `(fund, investor)` pairs in key
/// order and returns how many it locked.
async fn lock_allocations(conn: &mut PgConnection, funds: &[&str], investors: &[&str]) -> Result<u64> {
    let locked = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM (
             SELECT 1 FROM allocations a
             JOIN (SELECT DISTINCT * FROM unnest($1::text[], $2::text[]) AS i(fund_id, investor_account_id)) i
               ON a.fund_id = i.fund_id AND a.investor_account_id = i.investor_account_id
             ORDER BY a.fund_id, a.investor_account_id FOR UPDATE OF a) locked",
    )
    .bind(funds)
    .bind(investors)
    .fetch_one(&mut *conn)
    .await?;
    Ok(locked as u64)
}

/// Locks the rows of `table` (keyed by a text `id`) with these ids, in key
/// order: the order every batch takes them in, so two batches, or a batch
/// and a single step, wait for each other instead of deadlocking.
async fn lock_in_key_order(conn: &mut PgConnection, table: &'static str, ids: &[&str]) -> Result<()> {
    sqlx::query(&format!("SELECT 1 FROM {table} WHERE id = ANY($1) ORDER BY id FOR UPDATE"))
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Rows just locked cannot vanish before the update that follows: if fewer
/// than `expected` were updated, the books are not what the schema allows.
fn all_updated(updated: u64, expected: usize, what: &str) -> Result<()> {
    if updated == expected as u64 {
        return Ok(());
    }
    Err(Error::Corrupt(format!("{} of {expected} {what} vanished", expected as u64 - updated)))
}

/// Reserves allocations for a batch of accepted requests, `(fund, investor,
/// amount)` each, set-based: `adjust_allocation`'s reservation for all of
/// them in one statement, after locking the rows in key order. Each
/// allocation grows by its pair's total (created if it is new), each fund's
/// allocated total by its requests' sum and its seat count by the pairs that
/// had no seat before; each fund's update carries the same guard as
/// `adjust_allocation`, so a fund that filled up since the caller decided
/// refuses the whole batch with a conflict.
pub(crate) async fn reserve_allocations(conn: &mut PgConnection, reservations: &[(&str, &str, i64)]) -> Result<()> {
    if reservations.is_empty() {
        return Ok(());
    }
    let mut pairs: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for (fund, investor, amount) in reservations {
        *pairs.entry((fund, investor)).or_default() += amount;
    }
    let funds: Vec<&str> = pairs.keys().map(|(fund, _)| *fund).collect();
    let investors: Vec<&str> = pairs.keys().map(|(_, investor)| *investor).collect();
    let amounts: Vec<i64> = pairs.values().copied().collect();
    let distinct_funds = funds.iter().collect::<HashSet<_>>().len() as u64;
    // Allocations, then their funds: the order every writer of these rows
    // follows, so batches and single steps cannot deadlock on them.
    lock_allocations(conn, &funds, &investors).await?;
    lock_in_key_order(conn, "funds", &funds).await?;
    let updated = sqlx::query(
        "WITH input AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) AS i(fund_id, investor_account_id, amount)
         ),
         updated AS (
             UPDATE allocations a
             SET reserved_minor = a.reserved_minor + input.amount, version = a.version + 1, updated_at = now()
             FROM input
             WHERE a.fund_id = input.fund_id AND a.investor_account_id = input.investor_account_id
             RETURNING a.fund_id, a.reserved_minor + a.completed_minor AS total_after, input.amount
         ),
         -- Not ON CONFLICT, for the reason `adjust_allocation` gives; a
         -- concurrent first insert of a pair loses with a retryable unique
         -- violation.
         inserted AS (
             INSERT INTO allocations (fund_id, investor_account_id, reserved_minor, completed_minor)
             SELECT input.fund_id, input.investor_account_id, input.amount, 0 FROM input
             WHERE NOT EXISTS (
                 SELECT 1 FROM allocations a
                 WHERE a.fund_id = input.fund_id AND a.investor_account_id = input.investor_account_id)
             RETURNING fund_id, reserved_minor + completed_minor AS total_after, reserved_minor AS amount
         ),
         per_fund AS (
             SELECT fund_id, sum(amount) AS amount,
                    count(*) FILTER (WHERE total_after - amount <= 0 AND total_after > 0) AS seats
             FROM (SELECT * FROM updated UNION ALL SELECT * FROM inserted) changed
             GROUP BY fund_id
         )
         UPDATE funds f
         SET allocated_minor = f.allocated_minor + p.amount, investors_count = f.investors_count + p.seats,
             version = f.version + 1, updated_at = now()
         FROM per_fund p
         WHERE f.id = p.fund_id
           AND f.allocated_minor + p.amount <= f.capacity_minor
           AND f.investors_count + p.seats <= f.seats_max",
    )
    .bind(&funds)
    .bind(&investors)
    .bind(&amounts)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if updated != distinct_funds {
        return Err(conflict("fund", &format!("{} of a batch", distinct_funds - updated)));
    }
    Ok(())
}

/// Applies balance and hold changes to money already decided (a settled
/// withdrawal, a released hold, a refund), `(account, balance delta, held
/// delta)` each (an account's deltas added up), in one statement. They need
/// no decision on a read balance, so no guard; the CHECK constraints still
/// refuse a negative available balance. The rows are locked in key order
/// first, as `hold_many` does, so batches cannot deadlock on each other.
pub(crate) async fn adjust_investors(conn: &mut PgConnection, changes: &[(&str, i64, i64)]) -> Result<()> {
    let mut totals: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for (id, balance, held) in changes {
        let total = totals.entry(id).or_default();
        total.0 += balance;
        total.1 += held;
    }
    let ids: Vec<&str> = totals.keys().copied().collect();
    let balances: Vec<i64> = totals.values().map(|(balance, _)| *balance).collect();
    let helds: Vec<i64> = totals.values().map(|(_, held)| *held).collect();
    lock_in_key_order(conn, "investor_accounts", &ids).await?;
    let updated = sqlx::query(
        "UPDATE investor_accounts a
         SET balance_minor = a.balance_minor + i.balance, held_minor = a.held_minor + i.held,
             version = a.version + 1, updated_at = now()
         FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS i(id, balance, held)
         WHERE a.id = i.id",
    )
    .bind(&ids)
    .bind(&balances)
    .bind(&helds)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    all_updated(updated, totals.len(), "investor accounts")
}

/// Credits fund accounts for deposits in one statement, `(account, amount)`
/// each (an account's amounts added up), the rows locked in key order
/// first. Every deposit into a fund updates its account's row, so it is the
/// last row a step takes (see `books`).
pub(crate) async fn credit_fund_accounts(conn: &mut PgConnection, credits: &[(&str, i64)]) -> Result<()> {
    let mut totals: BTreeMap<&str, i64> = BTreeMap::new();
    for (id, amount) in credits {
        *totals.entry(id).or_default() += amount;
    }
    let (ids, amounts): (Vec<&str>, Vec<i64>) = totals.iter().map(|(id, amount)| (*id, *amount)).unzip();
    lock_in_key_order(conn, "fund_accounts", &ids).await?;
    let updated = sqlx::query(
        "UPDATE fund_accounts a
         SET balance_minor = a.balance_minor + i.amount, version = a.version + 1, updated_at = now()
         FROM unnest($1::text[], $2::bigint[]) AS i(id, amount)
         WHERE a.id = i.id",
    )
    .bind(&ids)
    .bind(&amounts)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    all_updated(updated, totals.len(), "fund accounts")
}
