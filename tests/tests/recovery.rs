//! Recovery from the database itself failing: a private PostgreSQL cluster
//! (so no other test is touched) crashes (`pg_ctl restart -m immediate`)
//! while transfers flow. Every session is cut, uncommitted work is lost,
//! the relay's leadership lock and its LISTEN connection go with them.
//! Afterwards nothing is lost and nothing applied twice.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use bridge_pipeline::runner::Part;
use bridge_pipeline::stages;
use bridge_store::local_cluster::TemporaryCluster;
use bridge_testkit::{BrokerKind, TestKit};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_crashing_under_load_loses_nothing() -> Result<()> {
    let cluster = std::sync::Arc::new(tokio::task::spawn_blocking(TemporaryCluster::start).await??);
    let kit =
        TestKit::start_on(BrokerKind::InProcess, &cluster.url, |config| config.retry_backoff_max_ms = 500).await?;
    for investor in 0..10 {
        kit.seed_investor(&format!("inv-{investor}"), 100_000_00).await?;
    }
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_00).await?;
    let pipeline = kit.spawn(&Part::all());
    let mut ids = Vec::new();
    let mut crashes = 0;
    let started = Instant::now();
    for round in 0..40 {
        for investor in 0..3 {
            let investor = format!("inv-{}", (round * 3 + investor) % 10);
            ids.push(kit.publish(&kit.request(&investor, &fund_account, 100_00 + round)).await?);
        }
        if round == 10 || round == 25 {
            // Mid-flow: the server dies and comes back from its WAL.
            let cluster = cluster.clone();
            let restart = tokio::task::spawn_blocking(move || cluster.restart_immediate());
            restart.await??;
            crashes += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kit.wait_terminal(&ids, Duration::from_secs(180)).await?;
    pipeline.stop().await?;
    eprintln!("{} transfers, {crashes} crashes, {:?}", ids.len(), started.elapsed());
    let report = kit.reconcile().await?;
    ensure!(report.in_flight == 0 && report.outbox_unpublished == 0, "{report:?}");
    kit.assert_books_balance().await
}

/// The standalone broker killed (SIGKILL) under load and kept down longer
/// than the producer's message timeout, then started again on the same log.
/// Records the relay sent into the outage time out: each is "maybe
/// published", stays unpublished in the outbox and is sent again, and the
/// consumers' inboxes absorb any copy that did land. Consumers resume from
/// their committed offsets. Nothing is lost or applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standalone_broker_killed_and_restarted_loses_nothing() -> Result<()> {
    use bridge_testkit::tansu::PrivateTansu;
    let mut broker = tokio::task::spawn_blocking(PrivateTansu::start).await??;
    let brokers = broker.brokers();
    let kit = TestKit::start_with(BrokerKind::Standalone, |config| {
        config.brokers = brokers;
        config.producer_message_timeout_ms = 3_000;
        config.retry_backoff_max_ms = 500;
        // tansu 0.6's SQLite engine panics when an idempotent producer comes
        // back with a bumped epoch (librdkafka bumps it after messages timed
        // out), which takes the broker down for good. Without broker-side
        // deduplication every retry may land twice: more duplicates for the
        // consumers' inboxes to absorb, which is what this test is about.
        config.kafka_overrides.push(("enable.idempotence".to_owned(), "false".to_owned()));
    })
    .await?;
    for investor in 0..6 {
        kit.seed_investor(&format!("inv-{investor}"), 100_000_00).await?;
    }
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_00).await?;
    let pipeline = kit.spawn(&Part::all());
    let mut ids = Vec::new();
    for round in 0..30 {
        let investor = format!("inv-{}", round % 6);
        ids.push(kit.publish(&kit.request(&investor, &fund_account, 100_00 + round)).await?);
    }
    // Let part of the flow through, so the outage cuts it mid-way.
    let deadline = Instant::now() + Duration::from_secs(60);
    while completed(&kit).await? < 5 {
        ensure!(Instant::now() < deadline, "nothing completed before the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.kill()?;
    eprintln!("broker killed with {} transfers completed", completed(&kit).await?);
    let outage = Instant::now();
    // Transfers keep arriving through the HTTP API's path while the broker is
    // away: recorded with their events in the outbox, which the relay cannot
    // deliver yet.
    let ctx = kit.pipeline().context().clone();
    for round in 30..40 {
        let request = kit.request(&format!("inv-{}", round % 6), &fund_account, 100_00 + round);
        let mut tx = kit.pool.begin().await?;
        let recorded = stages::record_api_request(&ctx, &mut tx, &request, None).await?;
        tx.commit().await?;
        ids.push(recorded.id);
    }
    // Down for longer than the producer's message timeout: what the relay
    // sent expires on the client, unacknowledged.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let failed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE last_error IS NOT NULL").fetch_one(&kit.pool).await?;
        if failed > 0 && outage.elapsed() > Duration::from_secs(6) {
            break;
        }
        ensure!(Instant::now() < deadline, "the relay never saw the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _broker = tokio::task::spawn_blocking(move || broker.resume().map(|()| broker)).await??;
    eprintln!("broker restarted after {:?}", outage.elapsed());
    for round in 40..50 {
        let investor = format!("inv-{}", round % 6);
        ids.push(kit.publish(&kit.request(&investor, &fund_account, 100_00 + round)).await?);
    }
    kit.wait_terminal(&ids, Duration::from_secs(180)).await?;
    kit.wait_outbox_drained(Duration::from_secs(60)).await?;
    pipeline.stop().await?;
    let report = kit.reconcile().await?;
    ensure!(report.in_flight == 0 && report.outbox_unpublished == 0, "{report:?}");
    // Every status change is on the topic at least once, under its one id.
    let status = kit.read_topic(&kit.topics().status()).await?;
    let distinct: std::collections::HashSet<_> = status.iter().filter_map(|m| m.header("ce_id")).collect();
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM transfer_versions").fetch_one(&kit.pool).await?;
    ensure!(distinct.len() as i64 == versions, "{} distinct status events for {versions} versions", distinct.len());
    kit.assert_books_balance().await
}

async fn completed(kit: &TestKit) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM transfers WHERE state = 'completed'").fetch_one(&kit.pool).await?)
}
