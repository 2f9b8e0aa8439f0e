//! Double-entry postings. A posting moves `amount` from one ledger account to
//! another as exactly one debit and one credit row, so the ledger balances by
//! construction (invariant I1). An account's balance is credits minus debits.

use sqlx::PgConnection;
use uuid::Uuid;

use bridge_domain::Money;

use crate::Result;

/// Ledger account names. One naming scheme, used by postings and by the
/// reconciler alike.
pub fn investor_account(id: &str) -> String {
    format!("investor:{id}")
}

pub fn fund_account(id: &str) -> String {
    format!("fund:{id}")
}

/// Money that has left the investor's bank and not yet reached the fund.
pub const IN_TRANSIT: &str = "clearing:in_transit";

/// Where opening balances of seeded accounts come from.
pub const OPENING_BALANCES: &str = "equity:opening_balances";

pub struct Posting<'a> {
    pub transfer_id: Option<Uuid>,
    /// The transfer step this posting belongs to ("withdrawal", "deposit",
    /// "refund"); unique per transfer.
    pub step: &'a str,
    pub debit_account: &'a str,
    pub credit_account: &'a str,
    pub amount: Money,
}

pub async fn post(conn: &mut PgConnection, posting: &Posting<'_>) -> Result<()> {
    let posting_id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO ledger_entries (posting_id, transfer_id, step, account, direction, amount_minor, currency)
         VALUES ($1, $2, $3, $4, 'debit', $6, $7), ($1, $2, $3, $5, 'credit', $6, $7)",
    )
    .bind(posting_id)
    .bind(posting.transfer_id)
    .bind(posting.step)
    .bind(posting.debit_account)
    .bind(posting.credit_account)
    .bind(posting.amount.amount_minor)
    .bind(posting.amount.currency.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

/// Postings gathered column by column, to be written in one statement: by
/// [`post_many`], or by a step's own statement
/// (`transfers::advance_step`), which saves the round trip.
#[derive(Clone, Debug, Default)]
pub struct Postings {
    posting_ids: Vec<Uuid>,
    transfer_ids: Vec<Option<Uuid>>,
    steps: Vec<String>,
    debits: Vec<String>,
    credits: Vec<String>,
    amounts: Vec<i64>,
    currencies: Vec<String>,
}

impl Postings {
    pub fn push(&mut self, posting: &Posting<'_>) {
        self.posting_ids.push(Uuid::new_v4());
        self.transfer_ids.push(posting.transfer_id);
        self.steps.push(posting.step.to_owned());
        self.debits.push(posting.debit_account.to_owned());
        self.credits.push(posting.credit_account.to_owned());
        self.amounts.push(posting.amount.amount_minor);
        self.currencies.push(posting.amount.currency.as_str().to_owned());
    }

    pub fn is_empty(&self) -> bool {
        self.posting_ids.is_empty()
    }

    /// The statement that inserts them, a debit and a credit row each, with
    /// its seven parameters numbered from `first` (bound by [`Self::bind`]).
    pub(crate) fn insert_sql(first: usize) -> String {
        let p: Vec<String> = (first..first + 7).map(|n| format!("${n}")).collect();
        format!(
            "INSERT INTO ledger_entries (posting_id, transfer_id, step, account, direction, amount_minor, currency)
             SELECT p.posting_id, p.transfer_id, p.step, side.account, side.direction, p.amount_minor, p.currency
             FROM unnest({}::uuid[], {}::uuid[], {}::text[], {}::text[], {}::text[], {}::bigint[], {}::text[])
                      AS p(posting_id, transfer_id, step, debit_account, credit_account, amount_minor, currency)
             CROSS JOIN LATERAL (VALUES (p.debit_account, 'debit'), (p.credit_account, 'credit'))
                      AS side(account, direction)",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6]
        )
    }

    pub(crate) fn bind<'q>(&'q self, query: crate::PgQuery<'q>) -> crate::PgQuery<'q> {
        query
            .bind(&self.posting_ids)
            .bind(&self.transfer_ids)
            .bind(&self.steps)
            .bind(&self.debits)
            .bind(&self.credits)
            .bind(&self.amounts)
            .bind(&self.currencies)
    }
}

/// Writes `postings` in one statement (prepared: see the crate's note).
pub async fn post_many(conn: &mut PgConnection, postings: &Postings) -> Result<()> {
    if postings.is_empty() {
        return Ok(());
    }
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let sql = SQL.get_or_init(|| Postings::insert_sql(1));
    postings.bind(sqlx::query(sql)).execute(conn).await?;
    Ok(())
}

/// One ledger line of a transfer, for people reading its story.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    pub step: String,
    pub account: String,
    pub direction: String,
    pub amount_minor: i64,
    pub currency: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A transfer's ledger lines, in the order they were posted.
pub async fn of_transfer(conn: &mut PgConnection, transfer_id: uuid::Uuid) -> Result<Vec<Entry>> {
    let rows: Vec<(String, String, String, i64, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT step, account, direction, amount_minor, currency::text, created_at
         FROM ledger_entries WHERE transfer_id = $1 ORDER BY id",
    )
    .bind(transfer_id)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(step, account, direction, amount_minor, currency, created_at)| Entry {
            step,
            account,
            direction,
            amount_minor,
            currency,
            created_at,
        })
        .collect())
}
