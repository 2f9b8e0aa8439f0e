//! Investor accounts, funds, fund accounts and allocations keep their
//! history in the database: every change is recorded in the same
//! transaction, with who made it, and reads back as the row before and
//! after it; the history (and transfers')
//! can only be appended to; and a write based on a version that is no
//! longer current is refused rather than silently overwriting.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
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
        for pair in history.windows(2) {
            ensure!(pair[1].0 == pair[0].0 + 1, "{model} {key}: versions {} then {}", pair[0].0, pair[1].0);
        }
        // The table stores each row once, after its change; the reader
        // gives each entry the row before it, the previous entry's after,
        // also when the previous entry is beyond the limit it was asked for.
        ensure!(history.iter().all(|entry| entry.2.is_none()), "{model} {key}: an entry stored its before");
        ensure!(history.iter().all(|entry| !entry.1.is_empty()), "{model}: an entry without actor");
        let mut conn = kit.pool.acquire().await?;
        let read = bridge_store::history::history(&mut conn, model, key, 1_000, None).await?;
        let oldest_first: Vec<_> = read.iter().rev().collect();
        ensure!(oldest_first.len() == history.len(), "{model} {key}: {} entries read", read.len());
        ensure!(oldest_first[0].before.is_none(), "{model}: the first entry is the insert");
        for (entry, stored) in oldest_first.iter().zip(&history) {
            ensure!(entry.version == stored.0 && entry.after == stored.3, "{model} {key}: read {entry:?}");
        }
        for pair in oldest_first.windows(2) {
            ensure!(pair[1].before == pair[0].after, "{model} {key}: an entry's before is not the previous after");
        }
        let newest = bridge_store::history::history(&mut conn, model, key, 1, None).await?;
        ensure!(
            newest.len() == 1 && newest[0].before == history[history.len() - 2].3,
            "{model} {key}: the newest entry alone lacks its before: {newest:?}"
        );
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
    // No transfer is deleted: its versions name it (migration 0032).
    for deleting in ["DELETE FROM transfers", "TRUNCATE transfers CASCADE"] {
        let refused = sqlx::query(deleting).execute(&kit.pool).await;
        ensure!(
            refused.as_ref().is_err_and(|error| error.to_string().contains("never deleted")),
            "{deleting}: {refused:?}"
        );
    }
    let report = kit.reconcile().await?;
    ensure!(report.ok(), "{:?}", report.violations());
    Ok(())
}

/// A history written before updates stored only their row after
/// (migration 0031) reads on across the upgrade: the entries written
/// before keep the before they stored, and the first entry written after
/// it reads its before from the last one written before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_written_before_updates_stored_only_their_after_reads_on_across_the_upgrade() -> Result<()> {
    let (_, pool) = bridge_testkit::scratch_database(&bridge_testkit::database_server()).await?;
    bridge_testkit::migrate_before(&pool, "0031").await?;

    let hold = "UPDATE investor_accounts SET held_minor = held_minor + 1, version = version + 1 WHERE id = 'ada'";
    let mut conn = pool.acquire().await?;
    let seed = bridge_store::accounts::InvestorSeed {
        id: "ada".to_owned(),
        opening_balance: bridge_domain::Money::new(100_00, bridge_domain::Currency::parse("EUR")?),
    };
    bridge_store::accounts::seed_investor(&mut conn, &seed).await?;
    for _ in 0..2 {
        sqlx::query(hold).execute(&mut *conn).await?;
    }
    bridge_store::migrate(&pool).await?;
    for _ in 0..2 {
        sqlx::query(hold).execute(&mut *conn).await?;
    }

    let stored: Vec<(i64, Option<Value>, Option<Value>)> = sqlx::query_as(
        "SELECT version, before, after FROM model_history WHERE model = 'investor_accounts' AND key = 'ada' ORDER BY id",
    )
    .fetch_all(&mut *conn)
    .await?;
    let befores: Vec<bool> = stored.iter().map(|entry| entry.1.is_some()).collect();
    ensure!(befores == [false, true, true, false, false], "which entries stored a before: {befores:?}");
    let read = bridge_store::history::history(&mut conn, "investor_accounts", "ada", 1_000, None).await?;
    let oldest_first: Vec<_> = read.iter().rev().collect();
    ensure!(oldest_first.len() == stored.len(), "{read:?}");
    for (entry, (version, before, after)) in oldest_first.iter().zip(&stored) {
        ensure!(entry.version == *version && entry.after == *after, "{entry:?}");
        if before.is_some() {
            ensure!(entry.before == *before, "an entry written before the upgrade lost its before: {entry:?}");
        }
    }
    ensure!(oldest_first[0].before.is_none(), "the insert has no before");
    for pair in oldest_first.windows(2) {
        ensure!(pair[1].before == pair[0].after, "version {}: its before is not the previous after", pair[1].version);
    }
    Ok(())
}

/// The models' history has one index, its primary key on (model, key,
/// id), which is how it is read (by key, newest first); the ledger has no
/// index on its account, which no query reads by (migration 0034). Entries
/// written before the upgrade are read with those after it, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_is_keyed_by_model_key_and_entry_across_the_upgrade() -> Result<()> {
    let (_, pool) = bridge_testkit::scratch_database(&bridge_testkit::database_server()).await?;
    bridge_testkit::migrate_before(&pool, "0034").await?;

    let mut conn = pool.acquire().await?;
    let hold = |id: &str| {
        format!("UPDATE investor_accounts SET held_minor = held_minor + 1, version = version + 1 WHERE id = '{id}'")
    };
    for id in ["ada", "bo"] {
        let seed = bridge_store::accounts::InvestorSeed {
            id: id.to_owned(),
            opening_balance: bridge_domain::Money::new(100_00, bridge_domain::Currency::parse("EUR")?),
        };
        bridge_store::accounts::seed_investor(&mut conn, &seed).await?;
    }
    for _ in 0..2 {
        for id in ["ada", "bo"] {
            sqlx::query(&hold(id)).execute(&mut *conn).await?;
        }
    }
    bridge_store::migrate(&pool).await?;
    for _ in 0..2 {
        for id in ["bo", "ada"] {
            sqlx::query(&hold(id)).execute(&mut *conn).await?;
        }
    }

    for id in ["ada", "bo"] {
        let read = bridge_store::history::history(&mut conn, "investor_accounts", id, 1_000, None).await?;
        let versions: Vec<i64> = read.iter().map(|entry| entry.version).collect();
        ensure!(versions == [5, 4, 3, 2, 1], "{id}'s history, newest first: {versions:?}");
        for pair in read.windows(2) {
            ensure!(
                pair[0].before == pair[1].after,
                "{id} version {}: before is not the previous after",
                pair[0].version
            );
        }
    }

    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT tablename::text, indexdef FROM pg_indexes
         WHERE tablename IN ('model_history', 'ledger_entries') ORDER BY 1, 2",
    )
    .fetch_all(&mut *conn)
    .await?;
    let history: Vec<&str> =
        indexes.iter().filter(|(table, _)| table == "model_history").map(|(_, def)| def.as_str()).collect();
    ensure!(
        history == ["CREATE UNIQUE INDEX model_history_pkey ON public.model_history USING btree (model, key, id)"],
        "model_history's indexes: {history:?}"
    );
    let ledger: Vec<&str> =
        indexes.iter().filter(|(table, _)| table == "ledger_entries").map(|(_, def)| def.as_str()).collect();
    ensure!(ledger.len() == 2 && !ledger.iter().any(|def| def.contains("(account)")), "ledger's indexes: {ledger:?}");
    Ok(())
}

/// A fund's reserved and completed totals become one allocated total, the
/// part of its capacity taken (migration 0035): the fund keeps their sum,
/// the split reads the same from its investors' allocations, the fund's
/// history records the row's new shape once, and its limits still hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_funds_reserved_and_completed_totals_become_one_allocated_total_across_the_upgrade() -> Result<()> {
    let (_, pool) = bridge_testkit::scratch_database(&bridge_testkit::database_server()).await?;
    bridge_testkit::migrate_before(&pool, "0035").await?;

    let mut conn = pool.acquire().await?;
    let eur = bridge_domain::Currency::parse("EUR")?;
    for id in ["ada", "bo"] {
        let seed = bridge_store::accounts::InvestorSeed {
            id: id.to_owned(),
            opening_balance: bridge_domain::Money::new(100_00, eur),
        };
        bridge_store::accounts::seed_investor(&mut conn, &seed).await?;
    }
    let fund = bridge_store::accounts::FundSeed {
        id: "growth".to_owned(),
        name: "Growth".to_owned(),
        currency: eur,
        minimum_investment_minor: 1,
        seats_max: 5,
        capacity_minor: 1_000,
    };
    bridge_store::accounts::seed_fund(&mut conn, &fund).await?;
    sqlx::query(
        "INSERT INTO allocations (fund_id, investor_account_id, reserved_minor, completed_minor)
         VALUES ('growth', 'ada', 300, 0), ('growth', 'bo', 100, 500)",
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE funds SET reserved_minor = 400, completed_minor = 500, investors_count = 2, version = version + 1
         WHERE id = 'growth'",
    )
    .execute(&mut *conn)
    .await?;
    bridge_store::migrate(&pool).await?;

    let allocated: i64 =
        sqlx::query_scalar("SELECT allocated_minor FROM funds WHERE id = 'growth'").fetch_one(&mut *conn).await?;
    ensure!(allocated == 900, "allocated {allocated}");
    let overview = bridge_store::api::fund(&mut conn, "growth").await?.context("the fund")?;
    ensure!(
        (overview.reserved_minor, overview.completed_minor, overview.investors_count) == (400, 500, 2),
        "{overview:?}"
    );

    let read = bridge_store::history::history(&mut conn, "funds", "growth", 1_000, None).await?;
    let versions: Vec<i64> = read.iter().map(|entry| entry.version).collect();
    ensure!(versions == [3, 2, 1], "the fund's history, newest first: {versions:?}");
    let newest = &read[0];
    let row: Value =
        sqlx::query_scalar("SELECT to_jsonb(f) FROM funds f WHERE id = 'growth'").fetch_one(&mut *conn).await?;
    ensure!(newest.actor == "migration 0035" && newest.after.as_ref() == Some(&row), "{newest:?}");
    ensure!(newest.before.as_ref().and_then(|before| before.get("completed_minor")) == Some(&Value::from(500)));

    // The capacity still binds: the fund has 100 left.
    let over = sqlx::query("UPDATE funds SET allocated_minor = 1001, version = version + 1 WHERE id = 'growth'")
        .execute(&mut *conn)
        .await;
    ensure!(over.is_err(), "a fund over its capacity was stored");
    Ok(())
}
