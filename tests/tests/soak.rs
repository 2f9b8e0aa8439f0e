//! The soak: transfers keep arriving while something goes wrong every few
//! seconds (the broker goes away and comes back, the pipeline is stopped or
//! crashes and restarts, requests are published twice, garbage arrives),
//! against the simulator over HTTP with its demo faults (declines, rate
//! limits, server errors, timeouts, lost replies, asynchronous settlement).
//! At the end every transfer is terminal or in manual review, and the books
//! (ours and the simulator's) balance.
//!
//! Reproducible from the printed seed: `BRIDGE_SOAK_SEED=<seed>`. Short by
//! default; `BRIDGE_SOAK_TRANSFERS=5000` for a long run.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use bridge_pipeline::runner::Part;
use bridge_sim::FaultPlan;
use bridge_testkit::{BrokerKind, TestKit};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_with_random_faults_ends_with_the_books_balanced() -> Result<()> {
    let seed: u64 = env_or("BRIDGE_SOAK_SEED", rand::rng().random());
    let transfers: usize = env_or("BRIDGE_SOAK_TRANSFERS", 300);
    eprintln!("soak seed {seed}, {transfers} transfers (rerun with BRIDGE_SOAK_SEED={seed})");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);

    let kit = TestKit::start_with(BrokerKind::InProcess, |config| {
        config.producer_message_timeout_ms = 2_000;
        config.retry_backoff_max_ms = 500;
    })
    .await?;
    let investors = 40;
    for investor in 0..investors {
        kit.seed_investor(&format!("inv-{investor}"), 50_000_00).await?;
    }
    let funds = [
        kit.seed_fund("alpha", 100_00, 30, 1_000_000_00).await?,
        kit.seed_fund("beta", 1_000_00, 1_000, 100_000_00).await?,
    ];
    let simulator = kit.start_simulator(FaultPlan::demo(seed)).await?;
    let services = kit.http_services(&simulator.url, 1_000)?;
    let mut pipeline = Some(kit.spawn_with_services(&Part::all(), services.clone()));

    let mut ids = Vec::new();
    let mut published = Vec::new();
    let mut next_fault = Instant::now() + Duration::from_millis(rng.random_range(1_000..3_000));
    let mut faults = Vec::new();
    // Requests arrive at about 20 a second, and the faults keep coming until
    // at least four have struck.
    while ids.len() < transfers || faults.len() < 4 {
        for _ in 0..rng.random_range(1..5).min(transfers - ids.len()) {
            let investor = format!("inv-{}", rng.random_range(0..investors));
            let fund = &funds[rng.random_range(0..funds.len())];
            let request = kit.request(&investor, fund, rng.random_range(50_00..5_000_00));
            ids.push(kit.publish(&request).await?);
            published.push(request);
        }
        if Instant::now() >= next_fault {
            next_fault = Instant::now() + Duration::from_millis(rng.random_range(1_500..4_000));
            let fault = rng.random_range(0..5);
            faults.push(fault);
            match fault {
                0 => {
                    // The broker goes away for longer than the producer's
                    // message timeout.
                    kit.set_broker_up(false)?;
                    tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..3_000))).await;
                    kit.set_broker_up(true)?;
                }
                1 => {
                    if let Some(running) = pipeline.take() {
                        running.stop().await?;
                    }
                    pipeline = Some(kit.spawn_with_services(&Part::all(), services.clone()));
                }
                2 => {
                    if let Some(running) = pipeline.take() {
                        running.crash().await;
                    }
                    pipeline = Some(kit.spawn_with_services(&Part::all(), services.clone()));
                }
                3 => {
                    let again = &published[rng.random_range(0..published.len())];
                    kit.publish(again).await?;
                }
                _ => {
                    let garbage: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
                    kit.publish_raw(&kit.topics().requested(), Some(b"garbage"), &garbage, &[]).await?;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(125)).await;
    }
    eprintln!("soak faults (0 broker down, 1 restart, 2 crash, 3 duplicate, 4 garbage): {faults:?}");
    kit.set_broker_up(true)?;
    let waited = kit.wait_terminal(&ids, Duration::from_secs(60 + transfers as u64 / 5)).await;
    if let Some(running) = pipeline.take() {
        running.stop().await?;
    }
    simulator.stop().await?;
    waited?;
    let report = kit.reconcile().await?;
    eprintln!(
        "soak end: in flight {}, manual review {}, pending {}, unpublished {}",
        report.in_flight, report.manual_review, report.pending_steps, report.outbox_unpublished
    );
    ensure!(report.in_flight == 0, "{} transfers still in flight", report.in_flight);
    kit.assert_books_balance().await
}
