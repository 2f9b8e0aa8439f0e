//! `bridge demo`: the whole job on embedded defaults.
//!
//! Seeds a fresh namespace of investors and funds, publishes N transfer
//! requests (plus a few re-publications, as a retrying client would send),
//! runs every stage and the relay in this process, against the account-service
//! simulator over HTTP with a few percent of injected failures of every kind,
//! until every transfer is terminal or in manual review, checks invariants
//! I1–I6 (the simulator's books included) and prints one JSON line.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use futures_util::{stream, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::mocking::MockCluster;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use bridge_domain::TransferState;
use bridge_pipeline::demo::DemoData;
use bridge_pipeline::http_services::{HttpAccountServices, HttpServicesConfig};
use bridge_pipeline::runner::Part;
use bridge_pipeline::{kafka, upstream, Pipeline, PipelineConfig, Topics};
use bridge_store::{reconcile, PoolSettings};

use crate::local_postgres;

#[derive(Args)]
pub struct DemoArgs {
    /// Number of transfer requests to submit.
    #[arg(long, default_value_t = 100)]
    transfers: usize,
    /// Number of demo investors.
    #[arg(long, default_value_t = 200)]
    investors: usize,
    /// Seed of the deterministic data generator.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Give up if transfers are not all terminal after this long.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Postgres URL; by default the local server, else a temporary cluster.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Kafka bootstrap servers; by default an in-process Kafka cluster.
    #[arg(long, env = "KAFKA_BROKERS")]
    brokers: Option<String>,
    /// Account services to call (e.g. a `bridge sim` started elsewhere). By
    /// default the demo serves the simulator itself over HTTP on a local port.
    #[arg(long, env = "BRIDGE_ACCOUNT_SERVICES_URL")]
    account_services_url: Option<String>,
    /// Failures the built-in simulator injects: `demo` (a few percent of
    /// every kind: declines, rate limits, server errors, timeouts, lost
    /// replies), `none`, or a JSON fault plan file.
    #[arg(long, default_value = "demo")]
    faults: String,
    /// After the run, keep the pipeline and the operator console running at
    /// this address (e.g. 127.0.0.1:8080) until Ctrl-C, and print an
    /// operator key to sign in with. A few investors' bank accounts are
    /// unknown to the simulated bank during the run, so their transfers
    /// wait in manual review; the accounts are fixed afterwards, so a retry
    /// from the console goes through.
    #[arg(long, value_name = "ADDRESS")]
    console: Option<std::net::SocketAddr>,
}

/// Investors the simulated bank does not know during a run with the
/// console (their transfers wait for a person).
const UNKNOWN_TO_THE_BANK: usize = 3;

#[derive(Serialize)]
struct Summary {
    submitted: usize,
    completed: i64,
    rejected: i64,
    failed: i64,
    reversed: i64,
    manual_review: i64,
    in_flight: i64,
    /// Service operations that were pending first and settled later, by
    /// callback or by polling.
    settled_asynchronously: i64,
    /// Status events in the notifier's event log, and webhook deliveries
    /// the demo's receiver accepted with a valid signature.
    notifications_logged: i64,
    webhooks_verified: u64,
    invariants_ok: bool,
    elapsed_ms: u128,
}

pub async fn run(args: DemoArgs) -> Result<bool> {
    let started = Instant::now();
    let (database_url, _temporary_cluster) =
        local_postgres::resolve(args.database_url, crate::DEFAULT_DATABASE_URL).await?;
    let pool = bridge_store::connect(&database_url, &PoolSettings::default()).await?;
    bridge_store::migrate(&pool).await.context("Failed to migrate")?;

    // The in-process cluster lives as long as this function; it is not Send,
    // so it stays on this task while the pipeline runs on others.
    let mut mock_cluster = None;
    let kafka_label = args.brokers.clone().unwrap_or_else(|| "in-process cluster".to_owned());
    let brokers = match args.brokers {
        Some(brokers) => brokers,
        None => {
            let cluster = MockCluster::new(1).context("Failed to start the in-process Kafka cluster")?;
            let servers = cluster.bootstrap_servers();
            mock_cluster = Some(cluster);
            servers
        }
    };

    // A fresh namespace per run: accounts, topics and groups of earlier runs
    // in the same database or cluster are left untouched.
    let namespace = format!("demo-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let mut config = PipelineConfig::new(&brokers);
    config.topics = Topics::new(format!("{namespace}."));
    config.group_prefix = format!("{namespace}.");
    config.topic_partitions = 6;
    config.relay_poll_interval_ms = 100;
    if let Some(cluster) = &mock_cluster {
        // The in-process cluster does not serve the CreateTopics admin
        // request; it has its own call for it.
        for topic in config.topics.all() {
            cluster
                .create_topic(&topic, config.topic_partitions, 1)
                .with_context(|| format!("Failed to create topic {topic}"))?;
        }
    } else {
        kafka::ensure_topics(&config).await?;
    }

    let data = DemoData::new(&namespace, args.investors, args.seed);
    data.seed(&pool).await.context("Failed to seed demo data")?;
    eprintln!(
        "Bridge demo: namespace {namespace}, {} investors, 4 funds, {} transfers, Kafka {}, Postgres {}",
        data.investors.len(),
        args.transfers,
        kafka_label,
        redact(&database_url),
    );

    let shutdown = CancellationToken::new();
    // The account services are always reached over real HTTP: either the
    // ones named on the command line, or the simulator served from here.
    // The built-in simulator announces asynchronous settlements by signed
    // callbacks to this process's API, as a bank would.
    let simulator_listener = match &args.account_services_url {
        Some(_) => None,
        None => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await?),
    };
    let services_url = match (&args.account_services_url, &simulator_listener) {
        (Some(url), _) => url.clone(),
        (None, Some(listener)) => format!("http://{}", listener.local_addr()?),
        (None, None) => unreachable!("a listener is bound when no URL is given"),
    };
    let api_address = args.console.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let api_listener =
        tokio::net::TcpListener::bind(api_address).await.with_context(|| format!("Cannot listen on {api_address}"))?;
    let api_url = format!("http://{}", api_listener.local_addr()?);
    let callback_secret = bridge_webhooks::Secret::from_bytes(rand_bytes());
    match &simulator_listener {
        Some(_) => eprintln!(
            "Account services: simulator at {services_url} (faults: {}), settlement callbacks to {api_url}",
            args.faults
        ),
        None => eprintln!("Account services: {services_url}"),
    }
    let services = HttpAccountServices::services(HttpServicesConfig {
        investor_base_url: services_url.clone(),
        fund_base_url: services_url.clone(),
        token: None,
        // Shorter than the simulator's injected hang, so timeouts happen.
        timeout_ms: 1_000,
    })?;
    let pipeline = Pipeline::new(pool.clone(), config.clone(), services);
    let mut api_config = bridge_api::ApiConfig::new();
    for service in ["investor", "fund"] {
        api_config.callback_secrets.insert(service.to_owned(), vec![callback_secret.clone()]);
    }
    let api = tokio::spawn(bridge_api::serve(
        api_listener,
        bridge_api::router(pipeline.context().clone(), api_config),
        shutdown.clone(),
    ));
    let simulator = match simulator_listener {
        Some(listener) => {
            let plan = crate::fault_plan(&args.faults, args.seed)?;
            let key = {
                let mut conn = pool.acquire().await?;
                bridge_api::auth::create_key(
                    &mut conn,
                    &format!("{namespace} simulator"),
                    &["callbacks".to_owned()],
                    None,
                )
                .await?
            };
            let target = bridge_sim::CallbackTarget {
                base_url: api_url.clone(),
                secret: callback_secret,
                api_key: Some(key.full_key),
            };
            let bank = std::sync::Arc::new(bridge_sim::Bank::new(pool.clone(), plan).with_callbacks(target));
            let router = bridge_sim::http::router(bank, None);
            Some(tokio::spawn(bridge_sim::http::serve(listener, router, shutdown.clone())))
        }
        None => None,
    };
    let running = {
        let pipeline = pipeline.clone();
        let token = shutdown.clone();
        tokio::spawn(async move { pipeline.run(&Part::all(), token).await })
    };
    // Every status change of this run's transfers goes to a webhook of each
    // fund, received here and checked against its signature.
    let (receiver_url, verified) = start_webhook_receiver(&callback_secret_for_hooks(), shutdown.clone()).await?;
    // The demo's master key lives only in this process; the funds' webhook
    // secret is stored encrypted under it, as in a deployment.
    let keyring =
        std::sync::Arc::new(bridge_secrets::Keyring::parse(&bridge_secrets::Keyring::generate_entry("demo"))?);
    let mut subscriptions = Vec::new();
    {
        let mut conn = pool.acquire().await?;
        let value = bridge_secrets::SecretString::from(callback_secret_for_hooks().expose());
        let reference = bridge_secrets::store_new(&mut conn, &keyring, &format!("{namespace}-webhook"), &value).await?;
        for fund_account in data.fund_accounts() {
            let subscription = bridge_store::notifications::NewSubscription {
                subscriber_kind: "fund".to_owned(),
                subscriber_id: Some(fund_account.clone()),
                states: Vec::new(),
                channel: "webhook".to_owned(),
                target: format!("{receiver_url}/funds/{fund_account}"),
                secret: Some(reference.clone()),
                sealed_target: None,
            };
            subscriptions.push(bridge_store::notifications::subscribe(&mut conn, &subscription).await?);
        }
    }
    let notifier = {
        let mut config = bridge_notify::NotifierConfig { keyring: Some(keyring.clone()), ..Default::default() };
        // The demo's own receiver listens on loopback, which notifications
        // may reach only when allowed.
        config.channels.outbound = std::sync::Arc::new(
            bridge_notify::outbound::OutboundPolicy::parse("127.0.0.1").map_err(anyhow::Error::msg)?,
        );
        let notifier = bridge_notify::Notifier::new(pipeline.runtime().clone(), config)?;
        let token = shutdown.clone();
        tokio::spawn(async move { notifier.run(token).await })
    };

    let requests = data.requests(args.transfers, args.seed);
    // With the console, a few investors' accounts are unknown to the
    // simulated bank while the run goes on: their withdrawals are refused
    // and the transfers wait for a person.
    let unknown_to_the_bank: Vec<String> = match (&args.console, &simulator) {
        (Some(_), Some(_)) => {
            let mut chosen: Vec<String> = Vec::new();
            for request in &requests {
                if chosen.len() < UNKNOWN_TO_THE_BANK
                    && request.investor_account_id != data.frozen_investor
                    && !chosen.contains(&request.investor_account_id)
                {
                    chosen.push(request.investor_account_id.clone());
                }
            }
            let mut conn = pool.acquire().await?;
            for investor in &chosen {
                bridge_store::simulator::set_account_status(&mut conn, investor, "unknown").await?;
            }
            eprintln!(
                "For the console: the simulated bank does not know {} during the run; their withdrawals are refused \
                 and the transfers wait in manual review",
                chosen.join(", ")
            );
            chosen
        }
        _ => Vec::new(),
    };
    let ids: Vec<Uuid> =
        requests.iter().map(|request| Uuid::parse_str(&request.transfer_id)).collect::<Result<_, _>>()?;
    // Every 50th request is published twice, as a client retrying after a
    // lost acknowledgement would; it must still move money once.
    let duplicates = requests.iter().step_by(50).cloned();
    let producer = kafka::upstream_producer(&config)?;
    let outcomes: Vec<Result<()>> = stream::iter(requests.iter().cloned().chain(duplicates))
        .map(|request| {
            let producer = &producer;
            let topics = &config.topics;
            async move { upstream::publish_request(producer, topics, &request).await }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    outcomes.into_iter().collect::<Result<Vec<()>>>().context("Failed to publish requests")?;

    let progress = ProgressBar::new(args.transfers as u64);
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} settled  {msg}")
            .expect("static template"),
    );
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut counts;
    loop {
        let mut conn = pool.acquire().await?;
        counts = state_counts(&mut conn, &ids).await?;
        let settled: i64 = counts
            .iter()
            .filter(|(state, _)| state.is_terminal() || state.needs_person())
            .map(|(_, count)| count)
            .sum();
        let unpublished = bridge_store::outbox::unpublished_count(&mut conn).await?;
        // Every version of every transfer is a status event the notifier
        // must log and deliver.
        let notified = logged_events(&mut conn, &ids).await? == versions(&mut conn, &ids).await?
            && undelivered(&mut conn, &subscriptions).await? == 0;
        progress.set_position(settled as u64);
        progress.set_message(describe(&counts));
        if settled as usize == args.transfers && unpublished == 0 && notified {
            break;
        }
        if Instant::now() > deadline || running.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    progress.finish();

    let tasks = Tasks { shutdown, running, notifier, simulator, api };
    // Without the console everything stops now; with it, after Ctrl-C.
    let (tasks, mut stopped) = match args.console {
        None => (None, Some(tasks.stop().await?)),
        Some(_) => (Some(tasks), None),
    };

    let mut conn = pool.acquire().await?;
    let report = reconcile::run(&mut conn).await?;
    for check in &report.checks {
        let mark = if check.violations == 0 { "ok  " } else { "FAIL" };
        eprintln!("  {mark} {} {}", check.invariant, check.name);
    }
    let count = |state: TransferState| counts.iter().find(|(s, _)| *s == state).map_or(0, |(_, n)| *n);
    let settled_total: i64 =
        counts.iter().filter(|(state, _)| state.is_terminal() || state.needs_person()).map(|(_, n)| n).sum();
    let summary = Summary {
        submitted: args.transfers,
        completed: count(TransferState::Completed),
        rejected: count(TransferState::Rejected),
        failed: count(TransferState::Failed),
        reversed: count(TransferState::Reversed),
        manual_review: count(TransferState::ManualReview),
        in_flight: args.transfers as i64 - settled_total,
        settled_asynchronously: asynchronous_operations(&mut conn, &ids).await?,
        notifications_logged: logged_events(&mut conn, &ids).await?,
        webhooks_verified: verified.load(std::sync::atomic::Ordering::Relaxed),
        invariants_ok: report.ok(),
        elapsed_ms: started.elapsed().as_millis(),
    };
    let reasons = rejection_reasons(&mut conn, &ids).await?;
    eprintln!("  reasons: {reasons:?}");
    println!("{}", serde_json::to_string(&summary)?);
    if let (Some(address), Some(tasks)) = (args.console, tasks) {
        for investor in &unknown_to_the_bank {
            bridge_store::simulator::set_account_status(&mut conn, investor, "active").await?;
        }
        let key = bridge_api::auth::create_key(
            &mut conn,
            &format!("{namespace} operator"),
            &["operator".to_owned(), "admin".to_owned()],
            None,
        )
        .await?;
        drop(conn);
        eprintln!(
            "Operator console: http://{address}/console\nSign in with the API key {}\n{} transfers wait in manual review \
             (their investors' bank accounts are fixed now, so a retry goes through). Ctrl-C stops.",
            key.full_key, summary.manual_review,
        );
        tokio::signal::ctrl_c().await?;
        stopped = Some(tasks.stop().await?);
    }
    let (run_result, notify_result) = stopped.expect("stopped above");
    Ok(summary.invariants_ok && summary.in_flight == 0 && run_result.is_ok() && notify_result.is_ok())
}

/// The demo's running parts.
struct Tasks {
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<Result<()>>,
    notifier: tokio::task::JoinHandle<Result<()>>,
    simulator: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    api: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Tasks {
    /// Stops them all; how the pipeline and the notifier ended.
    async fn stop(self) -> Result<(Result<()>, Result<()>)> {
        self.shutdown.cancel();
        let run_result = self.running.await.context("Pipeline task panicked")?;
        let notify_result = self.notifier.await.context("Notifier task panicked")?;
        if let Some(server) = self.simulator {
            server.await.context("Simulator task panicked")?.context("Simulator failed")?;
        }
        self.api.await.context("API task panicked")?.context("API failed")?;
        if let Err(error) = &run_result {
            eprintln!("Pipeline stopped with an error: {error:#}");
        }
        if let Err(error) = &notify_result {
            eprintln!("Notifier stopped with an error: {error:#}");
        }
        Ok((run_result, notify_result))
    }
}

/// A fresh signing secret for this run's callbacks.
fn rand_bytes() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(Uuid::new_v4().as_bytes());
    bytes[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    bytes
}

fn redact(url: &str) -> String {
    match url.split_once('@') {
        Some((credentials, host)) if credentials.contains(':') && credentials.matches(':').count() > 1 => {
            format!("postgres://***@{host}")
        }
        _ => url.to_owned(),
    }
}

async fn state_counts(conn: &mut sqlx::PgConnection, ids: &[Uuid]) -> Result<Vec<(TransferState, i64)>> {
    Ok(bridge_store::transfers::count_by_state(conn, Some(ids)).await?)
}

fn describe(counts: &[(TransferState, i64)]) -> String {
    counts.iter().map(|(state, count)| format!("{state}={count}")).collect::<Vec<_>>().join(" ")
}

/// The secret the demo's fund webhooks are signed with (fixed per process).
fn callback_secret_for_hooks() -> bridge_webhooks::Secret {
    static SECRET: std::sync::OnceLock<bridge_webhooks::Secret> = std::sync::OnceLock::new();
    SECRET.get_or_init(|| bridge_webhooks::Secret::from_bytes(rand_bytes())).clone()
}

/// A webhook receiver standing in for the funds' systems: counts the
/// deliveries whose Standard Webhooks signature verifies, refuses others.
async fn start_webhook_receiver(
    secret: &bridge_webhooks::Secret,
    shutdown: CancellationToken,
) -> Result<(String, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
    use axum::http::{HeaderMap, StatusCode};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let verified = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (count, secret) = (verified.clone(), secret.clone());
    let app = axum::Router::new().route(
        "/funds/{account}",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let (count, secret) = (count.clone(), secret.clone());
            async move {
                let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
                let signed = bridge_webhooks::SignedHeaders {
                    id: header(bridge_webhooks::ID_HEADER),
                    timestamp: header(bridge_webhooks::TIMESTAMP_HEADER),
                    signature: header(bridge_webhooks::SIGNATURE_HEADER),
                };
                let now = chrono::Utc::now().timestamp();
                match bridge_webhooks::verify(&[secret], signed, &body, now, bridge_webhooks::DEFAULT_TOLERANCE_SECS) {
                    Ok(_) => {
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        StatusCode::NO_CONTENT
                    }
                    Err(_) => StatusCode::UNAUTHORIZED,
                }
            }
        }),
    );
    tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
    });
    Ok((url, verified))
}

async fn undelivered(conn: &mut sqlx::PgConnection, subscriptions: &[i64]) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM notification_deliveries WHERE status = 'pending' AND subscription_id = ANY($1)",
    )
    .bind(subscriptions)
    .fetch_one(conn)
    .await?)
}

async fn versions(conn: &mut sqlx::PgConnection, ids: &[Uuid]) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT coalesce(sum(version), 0)::bigint FROM transfers WHERE id = ANY($1)")
        .bind(ids)
        .fetch_one(conn)
        .await?)
}

async fn logged_events(conn: &mut sqlx::PgConnection, ids: &[Uuid]) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM notification_log WHERE transfer_id = ANY($1)")
        .bind(ids)
        .fetch_one(conn)
        .await?)
}

async fn asynchronous_operations(conn: &mut sqlx::PgConnection, ids: &[Uuid]) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM sim_operations WHERE settles_at IS NOT NULL AND transfer_id = ANY($1)")
        .bind(ids)
        .fetch_one(conn)
        .await?)
}

async fn rejection_reasons(conn: &mut sqlx::PgConnection, ids: &[Uuid]) -> Result<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state || ':' || reason_code, count(*) FROM transfers
         WHERE id = ANY($1) AND reason_code IS NOT NULL GROUP BY 1",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}
