//! Investor accounts, funds, fund accounts and allocations keep their
//! history in the database: every change writes the row before and after,
//! with who made it, in the same transaction; the history (and transfers')
//! can only be appended to; and a write based on a version that is no
//! longer current is refused rather than silently overwriting.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::Value;

use bridge_testkit::{BrokerKind, TestKit};

const SETTLE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_model_keeps_an_append_only_history_and_refuses_stale_versions() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("vic", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let fund: String = sqlx::query_scalar("SELECT fund_id FROM fund_accounts WHERE id = $1")
        .bind(&fund_account)
        .fetch_one(&kit.pool)
        .await?;
    // A rejected request beside it moves no money: no history entry names it.
    let rejected = kit.publish(&kit.request("vic", &fund_account, 1)).await?;
    let id = kit.publish(&kit.request("vic", &fund_account, 1_000_00)).await?;
    let pipeline = kit.spawn_all();
    kit.wait_terminal(&[id, rejected], SETTLE).await?;
    pipeline.stop().await?;
    ensure!(kit.transfer(id).await?.state.as_str() == "completed");

    let models = [
        ("investor_accounts", "id = 'vic'".to_owned(), "vic".to_owned()),
        ("funds", format!("id = '{fund}'"), fund.clone()),
        ("fund_accounts", format!("id = '{fund_account}'"), fund_account.clone()),
        ("allocations", format!("fund_id = '{fund}' AND investor_account_id = 'vic'"), format!("{fund}/vic")),
    ];
    for (model, _, key) in &models {
        let history: Vec<(i64, String, Option<Value>, Option<Value>)> = sqlx::query_as(
            "SELECT version, actor, before, after FROM model_history WHERE model = $1 AND key = $2 ORDER BY id",
        )
        .bind(model)
        .bind(key)
        .fetch_all(&kit.pool)
        .await?;
        ensure!(history.len() >= 2, "{model} {key}: {} history entries", history.len());
        ensure!(history[0].2.is_none(), "{model}: the first entry is the insert");
        for pair in history.windows(2) {
            ensure!(pair[1].0 == pair[0].0 + 1, "{model} {key}: versions {} then {}", pair[0].0, pair[1].0);
            ensure!(pair[1].2 == pair[0].3, "{model} {key}: an entry's before is not the previous after");
        }
        ensure!(history.iter().all(|entry| !entry.1.is_empty()), "{model}: an entry without actor");
        let current: Value = sqlx::query_scalar(&format!(
            "SELECT to_jsonb(m) FROM {model} m WHERE {}",
            models.iter().find(|(name, _, _)| name == model).map(|(_, filter, _)| filter.clone()).unwrap_or_default()
        ))
        .fetch_one(&kit.pool)
        .await?;
        ensure!(
            history.last().and_then(|entry| entry.3.clone()) == Some(current),
            "{model}: current row is not the last entry"
        );
    }

    // Each change a step made names its transfer; a change without one (the
    // fund's creation) names none, and a key bound to another investor
    // sees none of vic's transfers in the fund's history.
    let mut conn = kit.pool.acquire().await?;
    let investor = bridge_store::history::history(&mut conn, "investor_accounts", "vic", 100, Some("vic")).await?;
    let (made, created): (Vec<_>, Vec<_>) = investor.iter().partition(|entry| entry.version > 1);
    ensure!(!made.is_empty() && made.iter().all(|entry| entry.transfers == [id]), "{investor:?}");
    ensure!(kit.transfer(rejected).await?.state.as_str() == "rejected");
    ensure!(created.iter().all(|entry| entry.transfers.is_empty()), "{created:?}");
    let fund_history = bridge_store::history::history(&mut conn, "funds", &fund, 100, None).await?;
    ensure!(fund_history.iter().any(|entry| entry.transfers == [id]), "{fund_history:?}");
    let others = bridge_store::history::history(&mut conn, "funds", &fund, 100, Some("someone-else")).await?;
    ensure!(others.iter().all(|entry| entry.transfers.is_empty()), "{others:?}");
    drop(conn);

    // A stale version is refused on each model, and the newer row stays.
    for (model, filter, _) in &models {
        let read: i64 =
            sqlx::query_scalar(&format!("SELECT version FROM {model} WHERE {filter}")).fetch_one(&kit.pool).await?;
        sqlx::query(&format!("UPDATE {model} SET version = version + 1, updated_at = now() WHERE {filter}"))
            .execute(&kit.pool)
            .await?;
        let stale = sqlx::query(&format!("UPDATE {model} SET version = $1, updated_at = now() WHERE {filter}"))
            .bind(read + 1)
            .execute(&kit.pool)
            .await;
        let code = stale.as_ref().err().and_then(|error| error.as_database_error()).and_then(|error| error.code());
        ensure!(code.as_deref() == Some("40001"), "{model}: a stale write was not refused: {stale:?}");
        let now: i64 =
            sqlx::query_scalar(&format!("SELECT version FROM {model} WHERE {filter}")).fetch_one(&kit.pool).await?;
        ensure!(now == read + 1, "{model}: the newer version was overwritten");
    }

    // A transaction can name its actor: the fund-terms sync does.
    let mut tx = kit.pool.begin().await?;
    bridge_store::set_actor(&mut tx, "fund terms sync").await?;
    let terms = bridge_store::fund_terms::FundTerms {
        currency: "EUR".to_owned(),
        minimum_investment_minor: 200_00,
        seats_max: 10,
        capacity_minor: 1_000_000_00,
        rules: Default::default(),
    };
    bridge_store::fund_terms::apply_fund_terms(&mut tx, &fund, &terms).await?;
    tx.commit().await?;
    let actor: String = sqlx::query_scalar(
        "SELECT actor FROM model_history WHERE model = 'funds' AND key = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(&fund)
    .fetch_one(&kit.pool)
    .await?;
    ensure!(actor == "fund terms sync", "{actor}");

    // Appending is the only write to either history.
    for tampering in [
        "UPDATE model_history SET actor = 'mallory'",
        "DELETE FROM model_history",
        "TRUNCATE model_history",
        "UPDATE transfer_versions SET state = 'rejected'",
        "DELETE FROM transfer_versions",
        "TRUNCATE transfer_versions CASCADE",
    ] {
        let refused = sqlx::query(tampering).execute(&kit.pool).await;
        ensure!(
            refused.as_ref().is_err_and(|error| error.to_string().contains("append-only")),
            "{tampering}: {refused:?}"
        );
    }
    let report = kit.reconcile().await?;
    ensure!(report.ok(), "{:?}", report.violations());
    Ok(())
}
