//! `bridge-bench notify` measures the notifier's sender: deliveries per
//! second to local webhook receivers with 1, 10 and 100 targets, and again
//! with one extra target that takes a second to answer every request (it
//! must not lower the rate to the others). Events are queued straight into
//! a scratch database, so the figure is the delivery engine's own: claim,
//! sign, POST, record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use bridge_notify::{Notifier, NotifierConfig};
use bridge_pipeline::services::Services;
use bridge_pipeline::{Pipeline, PipelineConfig};
use bridge_store::notifications::{self, LoggedEvent, NewSubscription};
use bridge_store::PoolSettings;

#[derive(Args)]
pub struct NotifyBenchArgs {
    /// Postgres server; a scratch database is created on it and dropped.
    #[arg(long, env = "DATABASE_URL", default_value = crate::DEFAULT_DATABASE_URL)]
    database_url: String,
    /// Deliveries per run.
    #[arg(long, default_value_t = 5_000)]
    deliveries: usize,
    /// Target counts to run with, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    targets: Vec<usize>,
    /// Also run each count with one more target answering after 1 s.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    with_slow_target: bool,
}

#[derive(Serialize)]
struct Run {
    targets: usize,
    slow_target: bool,
    deliveries: usize,
    elapsed_ms: u128,
    deliveries_per_sec: u64,
    /// Requests the slow target had answered meanwhile.
    slow_target_answered: u64,
    peak_rss_mib: u64,
}

fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("VmHWM:")
                    .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .map_or(0, |kib| kib / 1024)
}

pub async fn run(args: NotifyBenchArgs) -> Result<()> {
    let (base, _) = args.database_url.rsplit_once('/').context("DATABASE_URL has no database name")?;
    let url = format!("{base}/bridge_bench_{}", &Uuid::new_v4().simple().to_string()[..12]);
    bridge_store::ensure_database(&url).await?;
    let result = notify_in(&url, &args).await;
    bridge_store::drop_database(&url).await?;
    let runs = result?;
    println!("| targets | slow target | deliveries | seconds | deliveries/s | slow target answered | peak RSS MiB |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: |");
    for run in &runs {
        println!(
            "| {} | {} | {} | {:.2} | {} | {} | {} |",
            run.targets,
            if run.slow_target { "yes" } else { "no" },
            run.deliveries,
            run.elapsed_ms as f64 / 1_000.0,
            run.deliveries_per_sec,
            run.slow_target_answered,
            run.peak_rss_mib
        );
    }
    println!("{}", serde_json::to_string(&runs)?);
    Ok(())
}

async fn notify_in(url: &str, args: &NotifyBenchArgs) -> Result<Vec<Run>> {
    let pool = bridge_store::connect(url, &PoolSettings { connections_max: 32, ..PoolSettings::default() }).await?;
    bridge_store::migrate(&pool).await?;
    let (receiver, slow_answered) = receiver().await?;
    let mut runs = Vec::new();
    for (round, &targets) in args.targets.iter().enumerate() {
        for slow in [false, true] {
            if slow && !args.with_slow_target {
                continue;
            }
            let namespace = format!("r{round}{}", if slow { "s" } else { "" });
            let before = slow_answered.load(Ordering::Relaxed);
            let mut run = one_run(&pool, &receiver, &namespace, targets, slow, args.deliveries).await?;
            run.slow_target_answered = slow_answered.load(Ordering::Relaxed) - before;
            eprintln!(
                "{} targets{}: {} deliveries/s",
                targets,
                if slow { " + a slow one" } else { "" },
                run.deliveries_per_sec
            );
            runs.push(run);
        }
    }
    Ok(runs)
}

async fn one_run(
    pool: &sqlx::PgPool,
    receiver: &str,
    namespace: &str,
    targets: usize,
    slow: bool,
    deliveries: usize,
) -> Result<Run> {
    let keyring = Arc::new(bridge_secrets::Keyring::parse(&bridge_secrets::Keyring::generate_entry("bench"))?);
    let mut conn = pool.acquire().await?;
    let value = bridge_secrets::SecretString::from(bridge_webhooks::Secret::from_bytes([7; 32]).expose());
    let secret = bridge_secrets::store_new(&mut conn, &keyring, "webhook-secret", &value).await?;
    let mut measured = Vec::new();
    for target in 0..targets {
        let subscription = NewSubscription {
            subscriber_kind: "investor".to_owned(),
            subscriber_id: Some(format!("{namespace}-{target}")),
            states: Vec::new(),
            channel: "webhook".to_owned(),
            target: format!("{receiver}/t/{namespace}/{target}"),
            secret: Some(secret.clone()),
            sealed_target: None,
        };
        measured.push(notifications::subscribe(&mut conn, &subscription).await?);
    }
    if slow {
        // Hears about every event of this run, one second per request.
        let subscription = NewSubscription {
            subscriber_kind: "fund".to_owned(),
            subscriber_id: Some(format!("{namespace}-fund")),
            states: Vec::new(),
            channel: "webhook".to_owned(),
            target: format!("{receiver}/slow-target"),
            secret: Some(secret.clone()),
            sealed_target: None,
        };
        notifications::subscribe(&mut conn, &subscription).await?;
    }
    let mut tx = pool.begin().await?;
    for index in 0..deliveries {
        let event_id = Uuid::new_v4();
        let transfer_id = Uuid::new_v4();
        let investor = format!("{namespace}-{}", index % targets);
        let event = serde_json::json!({
            "event_id": event_id.to_string(), "transfer_id": transfer_id.to_string(), "version": 1,
            "state": "requested", "previous_state": null, "terminal": false, "reason_code": null,
            "investor_account_id": investor, "fund_account_id": format!("{namespace}-fund"),
            "amount_minor": 100_00, "currency": "EUR", "reference": "", "occurred_at": 0,
        });
        let logged = LoggedEvent {
            event_id,
            transfer_id,
            version: 1,
            state: "requested".to_owned(),
            investor_account_id: investor,
            fund_account_id: format!("{namespace}-fund"),
            event,
            traceparent: None,
        };
        notifications::accept(&mut tx, &logged).await?;
    }
    tx.commit().await?;

    let pipeline = Pipeline::new(pool.clone(), PipelineConfig::new("unused:9092"), Services::none());
    let mut config = NotifierConfig { keyring: Some(keyring), ..NotifierConfig::default() };
    // The benchmark's receivers listen on loopback.
    config.channels.outbound =
        Arc::new(bridge_notify::outbound::OutboundPolicy::parse("127.0.0.1").map_err(anyhow::Error::msg)?);
    config.channels.request_timeout_ms = 5_000;
    let notifier = Arc::new(Notifier::new(pipeline.runtime().clone(), config)?);
    let shutdown = CancellationToken::new();
    let sender = {
        let (notifier, token) = (notifier.clone(), shutdown.clone());
        tokio::spawn(async move { notifier.run_sender(token).await })
    };
    // Timed by the database's clock, from start to the last delivery's
    // finish, so the polling below (kept slow, to leave the CPU to what is
    // measured) does not blur the figure.
    let started: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&mut *conn).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let delivered: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM notification_deliveries WHERE status = 'delivered' AND subscription_id = ANY($1)",
        )
        .bind(&measured)
        .fetch_one(&mut *conn)
        .await?;
        if delivered as usize >= deliveries {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "only {delivered} of {deliveries} delivered after 600 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let finished: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT max(finished_at) FROM notification_deliveries WHERE subscription_id = ANY($1)")
            .bind(&measured)
            .fetch_one(&mut *conn)
            .await?;
    let elapsed = (finished - started).to_std().unwrap_or_default();
    shutdown.cancel();
    sender.await??;
    // Leave nothing queued for the next run's sender.
    sqlx::query("DELETE FROM notification_deliveries").execute(&mut *conn).await?;
    sqlx::query("UPDATE notification_subscriptions SET enabled = false").execute(&mut *conn).await?;
    Ok(Run {
        targets,
        slow_target: slow,
        deliveries,
        elapsed_ms: elapsed.as_millis(),
        deliveries_per_sec: (deliveries as f64 / elapsed.as_secs_f64()) as u64,
        slow_target_answered: 0,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Local webhook receivers: `/t/...` answers at once, `/slow` after 1 s.
async fn receiver() -> Result<(String, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let slow_answered = Arc::new(AtomicU64::new(0));
    let counter = slow_answered.clone();
    let app = axum::Router::new()
        .route("/t/{namespace}/{target}", axum::routing::post(|| async { axum::http::StatusCode::NO_CONTENT }))
        .route(
            "/slow-target",
            axum::routing::post(move || {
                let counter = counter.clone();
                async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    counter.fetch_add(1, Ordering::Relaxed);
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, slow_answered))
}
