//! Recovery by replay after a restore, as `docs/OPERATIONS.md` tells an
//! operator to do it: transfers run, the database is backed up with
//! `pg_dump`, more transfers run (some pending at the bank and settled by
//! signed callbacks), the database is lost and the backup restored, every
//! stage topic is replayed from the backup's time with `bridge replay
//! --all-stages`, and the settlement runner finishes what the bank still
//! holds. The books must equal those of the run that was never lost, and
//! the bank (whose books live in a database of their own, as another
//! company's would) must show no second operation.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use sqlx::PgPool;
use uuid::Uuid;

use bridge_pipeline::runner::Part;
use bridge_pipeline::Pipeline;
use bridge_sim::{CallbackTarget, FaultPlan, OperationFaults, Secret};
use bridge_store::PoolSettings;
use bridge_testkit::{BrokerKind, TestKit};

const BRIDGE: &str = env!("CARGO_BIN_EXE_bridge");
const SETTLE: Duration = Duration::from_secs(180);

/// Every transfer's state and version.
async fn transfers(pool: &PgPool) -> Result<BTreeMap<Uuid, (String, i64)>> {
    let rows: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT id, state, version FROM transfers").fetch_all(pool).await?;
    Ok(rows.into_iter().map(|(id, state, version)| (id, (state, version))).collect())
}

/// Every ledger account's balance, and every investor's balance and hold.
async fn books(pool: &PgPool) -> Result<(BTreeMap<String, i64>, BTreeMap<String, (i64, i64)>)> {
    let ledger: Vec<(String, i64)> = sqlx::query_as(
        "SELECT account, sum(CASE WHEN direction = 'credit' THEN amount_minor ELSE -amount_minor END)::bigint
         FROM ledger_entries GROUP BY account",
    )
    .fetch_all(pool)
    .await?;
    let investors: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT id, balance_minor, held_minor FROM investor_accounts").fetch_all(pool).await?;
    Ok((ledger.into_iter().collect(), investors.into_iter().map(|(id, balance, held)| (id, (balance, held))).collect()))
}

/// The bank's settled operations per transfer and operation.
async fn bank_operations(bank: &PgPool) -> Result<BTreeMap<(Uuid, String), i64>> {
    let rows: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT transfer_id, operation, count(*) FROM sim_operations WHERE outcome = 'settled' GROUP BY 1, 2",
    )
    .fetch_all(bank)
    .await?;
    Ok(rows.into_iter().map(|(transfer, operation, count)| ((transfer, operation), count)).collect())
}

async fn wait_settled(pool: &PgPool, expected: usize) -> Result<()> {
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let (settled, in_flight): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state IN ('completed', 'rejected', 'failed', 'reversed', 'manual_review')),
                    count(*) FILTER (WHERE state NOT IN ('completed', 'rejected', 'failed', 'reversed', 'manual_review'))
             FROM transfers",
        )
        .fetch_one(pool)
        .await?;
        if settled as usize == expected && in_flight == 0 {
            return Ok(());
        }
        ensure!(std::time::Instant::now() < deadline, "{settled} of {expected} settled, {in_flight} in flight");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let output = Command::new(program).args(args).envs(env.iter().copied()).output()?;
    ensure!(output.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

async fn restore_and_replay(kind: BrokerKind) -> Result<()> {
    let kit = TestKit::start(kind).await?;
    let settings = PoolSettings { connections_max: 8, acquire_timeout_ms: 30_000 };
    let bank_url = format!("{}_bank", kit.database_url);
    bridge_store::ensure_database(&bank_url).await?;
    let bank_pool = bridge_store::connect(&bank_url, &settings).await?;
    bridge_store::migrate(&bank_pool).await?;

    // A third of the withdrawals and deposits are pending at first and
    // settle a second later, announced by a signed callback to the API.
    let slow = OperationFaults { settle_after_ms: 1_000, pending_bp: 3_300, ..OperationFaults::default() };
    let plan = FaultPlan { withdrawal: slow, deposit: slow, ..FaultPlan::none() };
    let secret = Secret::from_bytes(*Uuid::new_v4().as_bytes().repeat(2).first_chunk::<32>().expect("32 bytes"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bank_address = format!("http://{}", listener.local_addr()?);
    let mut api_config = bridge_api::ApiConfig::new();
    api_config.callback_secrets.insert("investor".to_owned(), vec![secret.clone()]);
    api_config.callback_secrets.insert("fund".to_owned(), vec![secret.clone()]);
    let api = kit.start_api(kit.http_services(&bank_address, 5_000)?, api_config).await?;
    let callbacks_key =
        bridge_api::auth::create_key(&mut *kit.pool.acquire().await?, "bank", &["callbacks".to_owned()], None)
            .await?
            .full_key;
    let target = CallbackTarget { base_url: api.url.clone(), secret, api_key: Some(callbacks_key) };
    let bank = Arc::new(bridge_sim::Bank::new(bank_pool.clone(), plan).with_callbacks(target));
    let stop_bank = tokio_util::sync::CancellationToken::new();
    tokio::spawn(bridge_sim::http::serve(listener, bridge_sim::http::router(bank, None), stop_bank.clone()));

    for investor in 0..8 {
        kit.seed_investor(&format!("inv-{investor}"), 1_000_000_00).await?;
    }
    let fund_account = kit.seed_fund("fund", 50_00, 100, 1_000_000_000_00).await?;
    // The stages and the relay; pending steps are settled by callbacks.
    let parts = [
        Part::Stage(bridge_pipeline::StageName::Validator),
        Part::Stage(bridge_pipeline::StageName::Withdrawal),
        Part::Stage(bridge_pipeline::StageName::Deposit),
        Part::Stage(bridge_pipeline::StageName::Completion),
        Part::Relay,
    ];
    let pipeline = kit.spawn_with_services(&parts, kit.http_services(&bank_address, 5_000)?);
    let submit = |count: usize, salt: usize| {
        let kit = &kit;
        let fund_account = fund_account.clone();
        async move {
            for index in 0..count {
                // Every seventh is below the fund's minimum: rejected, the
                // same way on replay.
                let amount = if (index + salt).is_multiple_of(7) { 10_00 } else { 100_00 + index as i64 };
                kit.publish(&kit.request(&format!("inv-{}", index % 8), &fund_account, amount)).await?;
            }
            anyhow::Ok(())
        }
    };
    submit(20, 0).await?;
    wait_settled(&kit.pool, 20).await?;

    // The backup. Replay starts a little before it: what the backup holds
    // is found a repeat.
    let replay_from = chrono::Utc::now() - chrono::Duration::seconds(2);
    let dump = std::env::temp_dir().join(format!("bridge-backup-{}.dump", Uuid::new_v4()));
    let dump_path = dump.to_str().context("temp path")?;
    run("pg_dump", &["--format=custom", "--file", dump_path, &kit.database_url], &[])?;

    submit(30, 3).await?;
    wait_settled(&kit.pool, 50).await?;
    kit.wait_outbox_drained(SETTLE).await?;
    pipeline.stop().await?;
    let truth = transfers(&kit.pool).await?;
    let true_books = books(&kit.pool).await?;
    let operations = bank_operations(&bank_pool).await?;
    // Some steps after the backup were pending at the bank and settled by
    // its callbacks.
    let pending_after_backup: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sim_operations WHERE outcome = 'settled' AND settles_at IS NOT NULL AND created_at > $1",
    )
    .bind(replay_from)
    .fetch_one(&bank_pool)
    .await?;
    ensure!(pending_after_backup > 0, "no step was pending after the backup");
    ensure!(operations.values().all(|count| *count == 1), "{operations:?}");

    // The database is lost; the backup restored into a new one.
    let restored_url = format!("{}_restored", kit.database_url);
    bridge_store::ensure_database(&restored_url).await?;
    run("pg_restore", &["--no-owner", "--dbname", &restored_url, dump_path], &[])?;
    std::fs::remove_file(&dump)?;
    let restored = bridge_store::connect(&restored_url, &settings).await?;
    ensure!(transfers(&restored).await?.len() == 20, "the backup holds the first 20 transfers");

    // Replay, as an operator would, against the same bank. librdkafka's
    // in-process cluster cannot find offsets by time (its ListOffsets
    // answers -1 for any timestamp), so there every topic is replayed from
    // its beginning: safe too, as repeats change nothing.
    let replay_from = replay_from.to_rfc3339();
    let mut args = vec!["replay", "--all-stages"];
    if kind == BrokerKind::Standalone {
        args.extend(["--from-time", replay_from.as_str()]);
    }
    let report = run(
        BRIDGE,
        &args,
        &[
            ("DATABASE_URL", &restored_url),
            ("KAFKA_BROKERS", &kit.config.brokers),
            ("BRIDGE_TOPIC_PREFIX", &kit.config.topics.prefix),
            ("BRIDGE_GROUP_PREFIX", &kit.config.group_prefix),
            ("BRIDGE_ACCOUNT_SERVICES_URL", &bank_address),
        ],
    )?;
    ensure!(report.lines().count() == 4, "one report per stage: {report}");
    // What the bank still held as pending when the stage asked again is
    // finished by the settlement runner.
    let services = kit.http_services(&bank_address, 5_000)?;
    let recovered = Pipeline::new(restored.clone(), kit.config.clone(), services);
    let stop = tokio_util::sync::CancellationToken::new();
    let runner = {
        let stop = stop.clone();
        tokio::spawn(async move { recovered.run(&[Part::Settlement], stop).await })
    };
    wait_settled(&restored, 50).await?;
    stop.cancel();
    runner.await??;

    ensure!(transfers(&restored).await? == truth, "the restored books differ from the run never lost:\n{report}");
    ensure!(books(&restored).await? == true_books, "ledger or balances differ");
    ensure!(bank_operations(&bank_pool).await? == operations, "the bank acted again");
    let report = bridge_store::reconcile::run(&mut *restored.acquire().await?).await?;
    ensure!(report.ok() && report.in_flight == 0, "{report:?}");
    stop_bank.cancel();
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_and_a_replay_recover_the_books_on_the_in_process_cluster() -> Result<()> {
    restore_and_replay(BrokerKind::InProcess).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_and_a_replay_recover_the_books_on_the_standalone_broker() -> Result<()> {
    restore_and_replay(BrokerKind::Standalone).await
}
