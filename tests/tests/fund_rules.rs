//! A fund's own criteria as data: rules published by the fund administrator
//! with its terms (over HTTP, through the simulator), stored with the fund
//! and versioned with it, and evaluated by the validator with one reason
//! code per rule; investors' residence and accreditation are attributes
//! with their own history.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use uuid::Uuid;

use bridge_domain::{CountryCode, InvestorAttributes, RuleSet, TransferState};
use bridge_pipeline::runner::Part;
use bridge_sim::FaultPlan;
use bridge_store::fund_terms::FundTerms;
use bridge_testkit::{BrokerKind, TestKit};

const SETTLE: Duration = Duration::from_secs(120);

async fn set_attributes(kit: &TestKit, investor: &str, residence: Option<&str>, accredited: bool) -> Result<()> {
    let mut conn = kit.pool.acquire().await?;
    let residence = residence.map(CountryCode::parse).transpose()?;
    bridge_store::accounts::set_investor_attributes(
        &mut conn,
        investor,
        InvestorAttributes { residence, accredited },
        None,
    )
    .await?
    .context("no such investor")?;
    Ok(())
}

async fn publish_terms(kit: &TestKit, fund: &str, rules: serde_json::Value) -> Result<()> {
    let mut conn = kit.pool.acquire().await?;
    let terms = FundTerms {
        currency: "EUR".to_owned(),
        minimum_investment_minor: 100_00,
        seats_max: 10,
        capacity_minor: 1_000_000_00,
        rules: RuleSet::default(),
    };
    bridge_store::simulator::set_fund_terms(&mut conn, fund, &terms).await?;
    // As the administrator publishes them, checked only by Bridge.
    sqlx::query("UPDATE sim_funds SET rules = $2 WHERE id = $1").bind(fund).bind(rules).execute(&mut *conn).await?;
    Ok(())
}

/// Publishes one request and waits for it to end: the investor's requests
/// are decided in this order.
async fn decide(kit: &TestKit, investor: &str, fund_account: &str, amount_minor: i64) -> Result<(Uuid, String)> {
    let id = kit.publish(&kit.request(investor, fund_account, amount_minor)).await?;
    kit.wait_terminal(&[id], SETTLE).await?;
    let transfer = kit.transfer(id).await?;
    let outcome = match transfer.state {
        TransferState::Completed => "completed".to_owned(),
        _ => transfer.reason_code.unwrap_or_else(|| transfer.state.as_str().to_owned()),
    };
    Ok((id, outcome))
}

/// A fund that takes only residents of Germany and France and at most
/// 1,500.00 per investor: requests rejected and accepted with their reason
/// codes end to end, the rules read from the administrator over HTTP and
/// kept in the fund's history, and rules that contradict themselves
/// refused without touching the fund's current ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn residence_and_per_investor_rules_decide_requests_end_to_end() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    for investor in ["dora", "uma", "nils", "eva"] {
        kit.seed_investor(investor, 100_000_00).await?;
    }
    set_attributes(&kit, "dora", Some("DE"), false).await?;
    set_attributes(&kit, "eva", Some("FR"), true).await?;
    set_attributes(&kit, "uma", Some("US"), true).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let fund: String = sqlx::query_scalar("SELECT fund_id FROM fund_accounts WHERE id = $1")
        .bind(&fund_account)
        .fetch_one(&kit.pool)
        .await?;
    let simulator = kit.start_simulator(FaultPlan::none()).await?;
    let services = kit.http_services(&simulator.url, 2_000)?;
    let pipeline = bridge_pipeline::Pipeline::new(kit.pool.clone(), kit.config.clone(), services.clone());

    let rules = json!([
        {"rule": "residence_in", "countries": ["FR", "DE"]},
        {"rule": "maximum_per_investor", "maximum_minor": 1_500_00},
    ]);
    publish_terms(&kit, &fund, rules.clone()).await?;
    let report = bridge_pipeline::fund_terms::sync(pipeline.context()).await?;
    ensure!(report.updated == [fund.clone()] && report.failed.is_empty(), "{report:?}");
    let (stored, actor): (serde_json::Value, String) = sqlx::query_as(
        "SELECT after->'rules', actor FROM model_history WHERE model = 'funds' AND key = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(&fund)
    .fetch_one(&kit.pool)
    .await?;
    ensure!(RuleSet::parse(&stored.to_string())? == RuleSet::parse(&rules.to_string())?, "{stored}");
    ensure!(actor == "fund terms sync", "{actor}");

    let running = kit.spawn_with_services(&Part::all(), services.clone());
    let mut outcomes = Vec::new();
    for (investor, amount) in [
        ("dora", 1_000_00),
        ("dora", 1_000_00),
        ("dora", 500_00),
        ("uma", 1_000_00),
        ("nils", 1_000_00),
        ("eva", 1_500_00),
        ("eva", 1),
    ] {
        let (_, outcome) = decide(&kit, investor, &fund_account, amount).await?;
        outcomes.push(format!("{investor} {amount}: {outcome}"));
    }
    ensure!(
        outcomes
            == [
                "dora 100000: completed",
                "dora 100000: INVESTOR_LIMIT_EXCEEDED",
                "dora 50000: completed",
                "uma 100000: RESIDENCE_NOT_ALLOWED",
                "nils 100000: RESIDENCE_NOT_ALLOWED",
                "eva 150000: completed",
                "eva 1: BELOW_MINIMUM_INVESTMENT",
            ],
        "{outcomes:#?}"
    );

    // The administrator adds accreditation and a closing date in the past:
    // the fund takes no more money, and says so before anything else.
    publish_terms(
        &kit,
        &fund,
        json!([
            {"rule": "residence_in", "countries": ["FR", "DE"]},
            {"rule": "accredited_only"},
        ]),
    )
    .await?;
    ensure!(bridge_pipeline::fund_terms::sync(pipeline.context()).await?.updated == [fund.as_str()]);
    let (_, dora) = decide(&kit, "dora", &fund_account, 200_00).await?;
    ensure!(dora == "ACCREDITATION_REQUIRED", "{dora}");
    set_attributes(&kit, "dora", Some("DE"), true).await?;
    let (_, dora) = decide(&kit, "dora", &fund_account, 200_00).await?;
    ensure!(dora == "completed", "{dora}");
    publish_terms(&kit, &fund, json!([{"rule": "closes_at", "at": "2026-01-01T00:00:00Z"}])).await?;
    ensure!(bridge_pipeline::fund_terms::sync(pipeline.context()).await?.updated == [fund.as_str()]);
    let (_, dora) = decide(&kit, "dora", &fund_account, 200_00).await?;
    ensure!(dora == "FUND_CLOSED", "{dora}");

    // Rules that contradict themselves are refused as a whole; the fund
    // keeps the ones it had and the other funds are still read.
    publish_terms(&kit, &fund, json!([{"rule": "residence_in", "countries": ["XX"]}, {"rule": "accredited_only"}]))
        .await?;
    let report = bridge_pipeline::fund_terms::sync(pipeline.context()).await?;
    ensure!(
        report.updated.is_empty() && report.failed.len() == 1 && report.failed[0].1.contains("ISO 3166"),
        "{report:?}"
    );
    let kept: serde_json::Value =
        sqlx::query_scalar("SELECT rules FROM funds WHERE id = $1").bind(&fund).fetch_one(&kit.pool).await?;
    ensure!(kept == json!([{"rule": "closes_at", "at": "2026-01-01T00:00:00Z"}]), "{kept}");

    running.stop().await?;
    simulator.stop().await?;

    // Investors' attributes have their history, like every other change to
    // the account.
    let mut conn = kit.pool.acquire().await?;
    let history = bridge_store::history::history(&mut conn, "investor_accounts", "dora", 1_000, None).await?;
    let attributes = |row: &Option<serde_json::Value>| {
        row.as_ref().map(|row| (row["residence_country"].as_str().map(str::to_owned), row["accredited"] == true))
    };
    let residences: Vec<(Option<String>, bool)> = history
        .iter()
        .rev()
        .filter(|entry| entry.before.is_none() || attributes(&entry.before) != attributes(&entry.after))
        .filter_map(|entry| attributes(&entry.after))
        .collect();
    drop(conn);
    ensure!(
        residences == [(None, false), (Some("DE".to_owned()), false), (Some("DE".to_owned()), true)],
        "{residences:?}"
    );
    let report = kit.reconcile().await?;
    ensure!(report.ok(), "{:?}", report.violations());
    kit.assert_books_balance().await
}

/// Requests of one investor in many partitions at once, under a maximum per
/// investor: however the validators interleave (batches, single messages,
/// lanes deciding concurrently on the same total), the investor never holds
/// more than the maximum, and every request that fitted was taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_never_exceed_the_maximum_per_investor() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("ivy", 100_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let fund: String = sqlx::query_scalar("SELECT fund_id FROM fund_accounts WHERE id = $1")
        .bind(&fund_account)
        .fetch_one(&kit.pool)
        .await?;
    sqlx::query("UPDATE funds SET rules = $2, version = version + 1 WHERE id = $1")
        .bind(&fund)
        .bind(json!([{"rule": "maximum_per_investor", "maximum_minor": 1_500_00}]))
        .execute(&kit.pool)
        .await?;
    // Two pipelines, as two `bridge run` processes splitting the
    // partitions, each running two validator transactions at a time, fed
    // while they run: single messages and small batches of one investor
    // are decided side by side on the same total.
    let mut config = kit.config.clone();
    config.batches_in_flight = 2;
    let token = tokio_util::sync::CancellationToken::new();
    let processes: Vec<_> = (0..2)
        .map(|_| {
            let services = bridge_sim::InProcessServices::services(kit.pool.clone());
            let pipeline = bridge_pipeline::Pipeline::new(kit.pool.clone(), config.clone(), services);
            let token = token.clone();
            tokio::spawn(async move { pipeline.run(&Part::all(), token).await })
        })
        .collect();
    let requests: Vec<_> = (0..60).map(|_| kit.request("ivy", &fund_account, 100_00)).collect();
    let publishing = requests.iter().map(|request| kit.publish(request));
    let ids: Vec<Uuid> = futures::future::try_join_all(publishing).await?;
    kit.wait_terminal(&ids, SETTLE).await?;
    token.cancel();
    for process in processes {
        process.await??;
    }
    let mut completed = 0;
    for id in &ids {
        let transfer = kit.transfer(*id).await?;
        match transfer.state {
            TransferState::Completed => completed += 1,
            TransferState::Rejected => {
                ensure!(transfer.reason_code.as_deref() == Some("INVESTOR_LIMIT_EXCEEDED"), "{transfer:?}")
            }
            other => anyhow::bail!("{id} ended {other}"),
        }
    }
    ensure!(completed == 15, "{completed} of 100.00 each taken under a 1,500.00 maximum");
    let held: i64 = sqlx::query_scalar(
        "SELECT reserved_minor + completed_minor FROM allocations WHERE fund_id = $1 AND investor_account_id = 'ivy'",
    )
    .bind(&fund)
    .fetch_one(&kit.pool)
    .await?;
    ensure!(held == 1_500_00, "{held}");
    kit.assert_books_balance().await
}
