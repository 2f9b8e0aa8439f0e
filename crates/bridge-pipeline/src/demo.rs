//! Deterministic demo data: investors, funds, fund accounts, and a stream of
//! transfer requests of which a realistic share must be refused or fail.
//!
//! Everything is derived from a namespace and a seed, so the same arguments
//! always give the same accounts and requests, and separate runs (or tests)
//! in one database never collide.

use chrono::Utc;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sqlx::PgPool;
use uuid::Uuid;

use bridge_codec::TransferRequested;
use bridge_domain::{Currency, Money};
use bridge_store::accounts::{self, FundAccountSeed, FundSeed, InvestorSeed};
use bridge_store::simulator;

pub const CURRENCY: &str = "EUR";

/// One fund of the demo and what it is there to show.
struct FundPlan {
    suffix: &'static str,
    name: &'static str,
    minimum_investment_minor: i64,
    seats_max: i32,
    capacity_minor: i64,
    /// The fund administrator refuses deposits into this fund's account, so
    /// its transfers are reversed.
    account_closed: bool,
}

const FUNDS: [FundPlan; 4] = [
    FundPlan {
        suffix: "growth",
        name: "Global Growth Fund",
        minimum_investment_minor: 1_000_00,
        seats_max: 10_000,
        capacity_minor: 1_000_000_000_00,
        account_closed: false,
    },
    FundPlan {
        suffix: "income",
        name: "Steady Income Fund",
        minimum_investment_minor: 500_00,
        seats_max: 10_000,
        capacity_minor: 1_000_000_000_00,
        account_closed: false,
    },
    FundPlan {
        suffix: "venture",
        name: "Venture Opportunities (5 seats)",
        minimum_investment_minor: 25_000_00,
        seats_max: 5,
        capacity_minor: 10_000_000_00,
        account_closed: false,
    },
    FundPlan {
        suffix: "legacy",
        name: "Legacy Fund (account closed at administrator)",
        minimum_investment_minor: 100_00,
        seats_max: 10_000,
        capacity_minor: 1_000_000_000_00,
        account_closed: true,
    },
];

/// The demo universe in one namespace.
#[derive(Clone, Debug)]
pub struct DemoData {
    pub namespace: String,
    pub investors: Vec<InvestorSeed>,
    /// An investor whose bank account is frozen: withdrawals are declined.
    pub frozen_investor: String,
}

impl DemoData {
    pub fn new(namespace: &str, investor_count: usize, seed: u64) -> Self {
        let currency = Currency::parse(CURRENCY).expect("EUR is a currency");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut investors: Vec<InvestorSeed> = (0..investor_count.max(1))
            .map(|index| InvestorSeed {
                id: format!("{namespace}-inv-{index:05}"),
                // 500.00 to 200,000.00 EUR, so some investors run out.
                opening_balance: Money::new(rng.random_range(500_00..=200_000_00), currency),
            })
            .collect();
        let frozen_investor = format!("{namespace}-inv-frozen");
        investors
            .push(InvestorSeed { id: frozen_investor.clone(), opening_balance: Money::new(1_000_000_00, currency) });
        Self { namespace: namespace.to_owned(), investors, frozen_investor }
    }

    /// Every fund account of this namespace.
    pub fn fund_accounts(&self) -> Vec<String> {
        FUNDS.iter().map(|plan| self.fund_account(plan.suffix)).collect()
    }

    pub fn fund_account(&self, suffix: &str) -> String {
        format!("{}-fa-{suffix}", self.namespace)
    }

    pub fn fund_id(&self, suffix: &str) -> String {
        format!("{}-fund-{suffix}", self.namespace)
    }

    /// Writes the accounts and funds. Idempotent.
    pub async fn seed(&self, pool: &PgPool) -> bridge_store::Result<()> {
        let currency = Currency::parse(CURRENCY).expect("EUR is a currency");
        let mut tx = pool.begin().await?;
        for plan in &FUNDS {
            accounts::seed_fund(
                &mut tx,
                &FundSeed {
                    id: self.fund_id(plan.suffix),
                    name: plan.name.to_owned(),
                    currency,
                    minimum_investment_minor: plan.minimum_investment_minor,
                    seats_max: plan.seats_max,
                    capacity_minor: plan.capacity_minor,
                },
            )
            .await?;
            let account = self.fund_account(plan.suffix);
            accounts::seed_fund_account(
                &mut tx,
                &FundAccountSeed { id: account.clone(), fund_id: self.fund_id(plan.suffix), currency },
            )
            .await?;
            if plan.account_closed {
                simulator::set_account_status(&mut tx, &account, "closed").await?;
            }
        }
        for investor in &self.investors {
            accounts::seed_investor(&mut tx, investor).await?;
        }
        simulator::set_account_status(&mut tx, &self.frozen_investor, "frozen").await?;
        tx.commit().await?;
        Ok(())
    }

    /// `count` requests with fresh transfer ids. The mix: mostly ordinary
    /// investments; some below a fund's minimum; some into the five-seat
    /// venture fund, which fills up; some larger than the investor can pay;
    /// some from the frozen investor (withdrawal fails); some into the fund
    /// whose account is closed (deposit fails, investor refunded); and a few
    /// malformed requests (unknown account, wrong currency, zero amount).
    pub fn requests(&self, count: usize, seed: u64) -> Vec<TransferRequested> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_0f7e_57ed);
        let now_ms = Utc::now().timestamp_millis();
        let ordinary: Vec<&InvestorSeed> = self.investors.iter().filter(|inv| inv.id != self.frozen_investor).collect();
        (0..count)
            .map(|index| {
                let investor = ordinary.choose(&mut rng).expect("at least one investor").id.clone();
                let roll = rng.random_range(0..100);
                let (investor, fund, amount_minor, currency) = match roll {
                    0..=54 => {
                        let fund = if rng.random_bool(0.5) { "growth" } else { "income" };
                        (investor, fund, rng.random_range(1_000_00..=15_000_00), CURRENCY)
                    }
                    55..=62 => (investor, "growth", rng.random_range(1_00..1_000_00), CURRENCY),
                    63..=72 => (investor, "venture", rng.random_range(25_000_00..=40_000_00), CURRENCY),
                    73..=80 => (investor, "income", rng.random_range(150_000_00..=400_000_00), CURRENCY),
                    81..=85 => {
                        (self.frozen_investor.clone(), "income", rng.random_range(1_000_00..=5_000_00), CURRENCY)
                    }
                    86..=91 => (investor, "legacy", rng.random_range(1_000_00..=5_000_00), CURRENCY),
                    92..=93 => (format!("{}-inv-unknown", self.namespace), "growth", 2_000_00, CURRENCY),
                    94..=95 => (investor, "growth", 2_000_00, "USD"),
                    96 => (investor, "growth", 0, CURRENCY),
                    _ => (investor, "growth", rng.random_range(1_000_00..=3_000_00), CURRENCY),
                };
                // Fresh ids on every call: the same seed gives the same mix of
                // requests, but never re-publishes an earlier run's transfers
                // (which would be idempotent no-ops or conflicts).
                let transfer_id = Uuid::new_v4();
                TransferRequested {
                    transfer_id: transfer_id.to_string(),
                    investor_account_id: investor,
                    fund_account_id: self.fund_account(fund),
                    amount_minor,
                    currency: currency.to_owned(),
                    requested_at: now_ms,
                    reference: format!("{}-order-{index}", self.namespace),
                    source_system: "bridge-demo".to_owned(),
                }
            })
            .collect()
    }
}
