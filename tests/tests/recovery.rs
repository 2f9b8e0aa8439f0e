//! Recovery from the database itself failing: a private PostgreSQL cluster
//! (so no other test is touched) crashes (`pg_ctl restart -m immediate`)
//! while transfers flow. Every session is cut, uncommitted work is lost,
//! the relay's leadership lock and its LISTEN connection go with them.
//! Afterwards nothing is lost and nothing applied twice.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use bridge_pipeline::runner::Part;
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
