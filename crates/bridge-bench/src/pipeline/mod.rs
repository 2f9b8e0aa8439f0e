//! `bridge-bench pipeline`: the whole pipeline under an open-loop load.
//!
//! It creates a scratch database and topics, starts the pipeline as separate
//! `bridge run` processes (one per stage, or several with
//! `--processes-per-stage`, plus the relay), and publishes transfer requests
//! to the request topic at a fixed offered rate with Poisson arrivals, or as
//! fast as the producer takes them. The account services are the in-process
//! simulator (zero latency), so what is measured is Bridge, Kafka and
//! Postgres. It follows every transfer on the status topic and reports
//! throughput, end-to-end and per-stage latency, database transactions per
//! transfer, consumer lag over time, CPU and peak RSS per process, checks
//! the books with the reconcile check, and then measures this machine's
//! Postgres ceiling with pgbench running one stage-shaped transaction.
//! Results go to a JSON file and an SVG plot.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use rand::Rng;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use serde::Serialize;
use uuid::Uuid;

use bridge_codec::{decode, encode, TransferRequested, TransferStatusChanged};
use bridge_domain::{Currency, Money};
use bridge_pipeline::{kafka, upstream, PipelineConfig, StageName, Topics};
use bridge_store::accounts::{self, FundAccountSeed, FundSeed, InvestorSeed};
use bridge_store::PoolSettings;
// The tests' in-process cluster: a broker whose cost does not grow with its
// log, for growth runs. It keeps only about 5 MB per partition and drops
// the oldest beyond that, so such a run must be paced at a rate the
// pipeline keeps up with.
use bridge_testkit::InProcessCluster;

/// The pgbench script: one stage-shaped transaction (see the file).
const PGBENCH_SETUP: &str = include_str!("../../../../bench/pgbench/setup.sql");
const PGBENCH_STAGE: &str = include_str!("../../../../bench/pgbench/stage.sql");

#[derive(Args, Clone)]
pub struct PipelineBenchArgs {
    /// Postgres server; a scratch database is created on it and dropped.
    #[arg(long, env = "DATABASE_URL", default_value = crate::DEFAULT_DATABASE_URL)]
    database_url: String,
    /// Kafka bootstrap servers (the standalone broker for a headline run).
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    brokers: String,
    /// Transfers to measure (after a warm-up of `--warmup`).
    #[arg(long, default_value_t = 20_000)]
    transfers: usize,
    /// Offered load in transfers per second, Poisson arrivals; 0 publishes
    /// as fast as the producer accepts.
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Transfers run through before measuring, so consumer groups have
    /// settled and caches are warm.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// `bridge run` processes per stage (and relays: one publishes, the
    /// others stand by).
    #[arg(long, default_value_t = 1)]
    processes_per_stage: usize,
    /// Investors the load is spread over.
    #[arg(long, default_value_t = 2_000)]
    investors: usize,
    /// Funds the load is spread over. Every transfer into a fund updates the
    /// fund's row, so one fund serialises its validations and completions.
    #[arg(long, default_value_t = 20)]
    funds: usize,
    /// Where the JSON result and the SVG plot are written.
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
    /// Measure the Postgres ceiling with pgbench after the run.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pgbench: bool,
    /// Seconds per pgbench client count.
    #[arg(long, default_value_t = 10)]
    pgbench_seconds: u32,
    /// Give up when the run has not finished after this many seconds.
    #[arg(long, default_value_t = 1_800)]
    timeout_secs: u64,
    /// Where the simulated bank and fund administrator keep their books:
    /// `own`, a scratch database of their own on the same server (a real
    /// bank's books are not in Bridge's database; their Postgres CPU is
    /// reported apart), `shared`, Bridge's database, or `memory`, the
    /// `bridge sim` process's memory (with `--account-services http`): the
    /// bank's bookkeeping off this machine's database, as in a deployment.
    #[arg(long, value_enum, default_value_t = SimulatorBooks::Own)]
    simulator_books: SimulatorBooks,
    /// Longest wait of a consumer's fetch at the broker, for the pipeline's
    /// processes and the benchmark's own reader of the status topic alike.
    #[arg(long, env = "BRIDGE_FETCH_WAIT_MAX_MS", default_value_t = bridge_pipeline::config::defaults::FETCH_WAIT_MAX_MS)]
    fetch_wait_max_ms: u32,
    /// Bytes a consumer's fetch asks the broker to gather before it answers
    /// (see `bridge run --help`), for every consumer as above.
    #[arg(long, env = "BRIDGE_FETCH_MIN_BYTES", default_value_t = bridge_pipeline::config::defaults::FETCH_MIN_BYTES)]
    fetch_min_bytes: u32,
    /// Run on librdkafka's in-process cluster, served from this process
    /// (its CPU is then the load generator's), instead of `--brokers`: a
    /// broker whose cost does not grow with its log, for growth runs. Pace
    /// such a run (`--rate`) below what the pipeline keeps up with: the
    /// cluster keeps only about 5 MB per partition.
    #[arg(long)]
    in_process_broker: bool,
    /// How the stages reach the account services (the simulator, with no
    /// latency): `in-process`, inside the withdrawal and deposit processes,
    /// whose CPU then includes the simulated banks' work; or `http`, a
    /// `bridge sim` process of its own called over HTTP, as a deployment
    /// calls its banks (its CPU reported apart).
    #[arg(long, value_enum, default_value_t = AccountServices::InProcess)]
    account_services: AccountServices,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SimulatorBooks {
    Own,
    Shared,
    Memory,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountServices {
    InProcess,
    Http,
}

/// What the status follower has seen, shared with the publisher and the
/// once-a-second sampler. The sampler reads the two running figures, not
/// the tracks: going over every transfer each second cost the benchmark
/// CPU in proportion to the run's size, on the cores the pipeline uses.
#[derive(Default)]
struct Tracking {
    tracks: HashMap<Uuid, Track>,
    /// Transfers that reached a terminal state (or manual review).
    finished: usize,
    /// End-to-end latencies (ms) of the transfers finished since the
    /// sampler last took them.
    recent: Vec<f64>,
}

type Tracks = Arc<Mutex<Tracking>>;

/// What one transfer did, as seen on the status topic.
#[derive(Default, Clone)]
struct Track {
    published_at: Option<Instant>,
    published_ms: i64,
    /// occurred_at (ms) of each state's status event.
    states: HashMap<String, i64>,
    /// Per status event, in ms: from its `occurred_at` (taken inside the
    /// step's transaction, before its commit) to the relay's send (the
    /// message's create time), and from the send to this process's
    /// receipt (the broker and a consumer's fetch).
    relayed: Vec<(i64, i64)>,
    terminal: Option<(Instant, String)>,
}

#[derive(Serialize, Default, Clone)]
struct Percentiles {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
    count: usize,
}

impl Percentiles {
    fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1];
        Self { p50: at(0.50), p95: at(0.95), p99: at(0.99), max: values[values.len() - 1], count: values.len() }
    }
}

#[derive(Serialize, Clone)]
struct Sample {
    second: f64,
    completed_per_sec: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    /// Sum over partitions of (high watermark - committed offset), per group.
    lag: HashMap<String, i64>,
}

#[derive(Serialize, Clone)]
struct ProcessUsage {
    name: String,
    cpu_seconds: f64,
    cpu_share_of_run: f64,
    peak_rss_mib: f64,
}

#[derive(Serialize)]
struct PgbenchPoint {
    clients: u32,
    tps: f64,
}

#[derive(Serialize)]
struct BenchResult {
    started_at: String,
    git_commit: Option<String>,
    brokers: String,
    in_process_broker: bool,
    partitions: i32,
    processes_per_stage: usize,
    funds: usize,
    investors: usize,
    offered_rate: u32,
    simulator_books: SimulatorBooks,
    account_services: AccountServices,
    fetch_wait_max_ms: u32,
    fetch_min_bytes: u32,
    /// `TOKIO_WORKER_THREADS` as the pipeline's processes (and this one)
    /// inherited it; absent: tokio's default, one worker per core.
    tokio_worker_threads: Option<String>,
    transfers: usize,
    elapsed_secs: f64,
    offered_per_sec: f64,
    completed_per_sec: f64,
    outcomes: HashMap<String, usize>,
    end_to_end_ms: Percentiles,
    stage_ms: Vec<(String, Percentiles)>,
    /// Each status event's time from its step (`occurred_at`) to the
    /// relay's send: the rest of the step's transaction, its commit, the
    /// relay's wake-up and claim. Part of every hop.
    status_relay_ms: Percentiles,
    /// Each status event's time from the relay's send to a consumer's
    /// receipt (this process's): the broker's acknowledgement and a fetch,
    /// which waits out the broker's fetch wait. Part of every hop.
    status_delivery_ms: Percentiles,
    db_transactions_per_transfer: f64,
    /// Rows each table of Bridge's database gained, changed and lost per
    /// transfer (from Postgres's statistics), most first.
    rows_per_transfer: Vec<TableRows>,
    lag_max: HashMap<String, i64>,
    processes: Vec<ProcessUsage>,
    cpu_ms_per_transfer: CpuBy,
    /// Share of one core each part used over `IDLE_SECS` with no transfer
    /// in flight: consumers' fetches, the broker answering them, polls. At
    /// a paced load every transfer carries a share of it.
    idle_cpu_share_of_core: CpuBy,
    invariants_ok: bool,
    violations: Vec<String>,
    pgbench: Vec<PgbenchPoint>,
    pgbench_ceiling_tps: Option<f64>,
    /// Completed transfers/s over the ceiling's transactions/s.
    ratio_to_ceiling: Option<f64>,
    samples: Vec<Sample>,
}

pub async fn run(args: PipelineBenchArgs) -> Result<()> {
    ensure!(
        args.simulator_books != SimulatorBooks::Memory || args.account_services == AccountServices::Http,
        "--simulator-books memory keeps the books in a `bridge sim` process: add --account-services http"
    );
    let id = Uuid::new_v4().simple().to_string()[..10].to_owned();
    let (base, _) = args.database_url.rsplit_once('/').context("DATABASE_URL has no database name")?;
    let url = format!("{base}/bridge_bench_{id}");
    let simulator_url = (args.simulator_books == SimulatorBooks::Own).then(|| format!("{base}/bridge_bench_{id}_sim"));
    bridge_store::ensure_database(&url).await?;
    if let Some(simulator_url) = &simulator_url {
        bridge_store::ensure_database(simulator_url).await?;
    }
    let result = run_in(&args, &url, simulator_url.as_deref(), &id).await;
    for url in std::iter::once(&url).chain(simulator_url.as_ref()) {
        if let Err(error) = bridge_store::drop_database(url).await {
            eprintln!("Could not drop the scratch database {url}: {error:#}");
        }
    }
    let mut result = result?;
    if args.pgbench {
        let points = pgbench(base, args.pgbench_seconds).await?;
        let ceiling = points.iter().map(|point| point.tps).fold(0.0, f64::max);
        result.pgbench_ceiling_tps = Some(ceiling);
        result.ratio_to_ceiling = Some(result.completed_per_sec / ceiling);
        result.pgbench = points;
    }
    std::fs::create_dir_all(&args.out_dir)?;
    let stem = format!("pipeline-{}", chrono::Utc::now().format("%Y%m%dT%H%M%S"));
    let json_path = args.out_dir.join(format!("{stem}.json"));
    let svg_path = args.out_dir.join(format!("{stem}.svg"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&result)?)?;
    std::fs::write(&svg_path, plot(&result))?;
    print_summary(&result);
    println!("Result: {}\nPlot:   {}", json_path.display(), svg_path.display());
    ensure!(result.invariants_ok, "the books do not balance: {:?}", result.violations);
    Ok(())
}

async fn run_in(args: &PipelineBenchArgs, url: &str, simulator_url: Option<&str>, id: &str) -> Result<BenchResult> {
    let pool = bridge_store::connect(url, &PoolSettings { connections_max: 8, ..PoolSettings::default() }).await?;
    bridge_store::migrate(&pool).await?;
    let simulator_pool = match simulator_url {
        Some(url) => {
            let pool =
                bridge_store::connect(url, &PoolSettings { connections_max: 2, ..PoolSettings::default() }).await?;
            bridge_store::migrate(&pool).await?;
            Some(pool)
        }
        None => None,
    };
    let prefix = format!("bench{id}.");
    let topics = Topics::new(&prefix);
    // Declared before the pipeline's processes, so it outlives them.
    let in_process =
        if args.in_process_broker { Some(InProcessCluster::start(topics.all(), args.partitions)?) } else { None };
    let mut args = args.clone();
    if let Some((_, servers)) = &in_process {
        args.brokers = servers.clone();
    }
    let args = &args;
    let mut config = PipelineConfig::new(&args.brokers);
    config.topics = topics;
    config.group_prefix = prefix.clone();
    config.topic_partitions = args.partitions;
    config.fetch_wait_max_ms = args.fetch_wait_max_ms;
    config.fetch_min_bytes = args.fetch_min_bytes;
    kafka::ensure_topics(&config).await?;
    let (investors, fund_accounts) = seed(&pool, args.investors, args.funds, args.transfers + args.warmup).await?;

    let mut children = Children::spawn(args, url, simulator_url, &prefix)?;
    let tracks: Tracks = Arc::default();
    let follower = follow_status(&config, tracks.clone())?;

    // Warm-up: consumer groups join and settle; nothing of it is measured.
    let producer = kafka::upstream_producer(&config)?;
    let warmup: Vec<TransferRequested> = requests(&investors, &fund_accounts, args.warmup);
    eprintln!("Warm-up: {} transfers while the consumer groups settle", warmup.len());
    publish_all(&producer, &config.topics, &warmup, 0, &tracks).await?;
    wait_terminal(&tracks, &warmup, Duration::from_secs(180), &mut children).await?;

    let xacts_before = transactions(&pool).await?;
    let rows_before = row_changes(&pool).await?;
    // The warm-up's transfers, all finished by now, are not measured.
    let finished_before = {
        let mut tracking = tracks.lock().expect("tracks lock");
        tracking.recent.clear();
        tracking.finished
    };
    let measured = requests(&investors, &fund_accounts, args.transfers);
    // Lag is read on a thread of its own: its round trips to the broker
    // must not stretch the one-second sampling below.
    let latest_lag: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let lag_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (lag_reader, latest_lag, lag_stop) =
            (bridge_pipeline::lag::LagReader::new(&config)?, latest_lag.clone(), lag_stop.clone());
        std::thread::spawn(move || {
            while !lag_stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(lags) = lag_reader.read(Duration::from_secs(2)) {
                    *latest_lag.lock().expect("lag lock") =
                        lags.into_iter().map(|stage| (stage.stage.to_owned(), stage.lag)).collect();
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
    }
    if let Some(simulator) = &simulator_pool {
        children.simulator_backends = backends(simulator).await?;
    }
    let idle_cpu_share_of_core = idle_cpu(&mut children).await;
    children.start_measuring();
    let started = Instant::now();
    let started_wall = chrono::Utc::now();
    let publisher = {
        let (producer, topics, measured, tracks) =
            (producer.clone(), config.topics.clone(), measured.clone(), tracks.clone());
        let rate = args.rate;
        tokio::spawn(async move { publish_all(&producer, &topics, &measured, rate, &tracks).await })
    };
    let ids: Vec<Uuid> = measured.iter().map(|r| Uuid::parse_str(&r.transfer_id).expect("fresh uuid")).collect();
    let progress = indicatif::ProgressBar::new(ids.len() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut samples = Vec::new();
    let mut last_done = 0usize;
    let mut last_sample = started;
    let deadline = started + Duration::from_secs(args.timeout_secs);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        children.sample();
        let now = Instant::now();
        let (done, window) = {
            let mut tracking = tracks.lock().expect("tracks lock");
            (tracking.finished - finished_before, std::mem::take(&mut tracking.recent))
        };
        let window = Percentiles::of(window);
        let lag = latest_lag.lock().expect("lag lock").clone();
        samples.push(Sample {
            second: started.elapsed().as_secs_f64(),
            completed_per_sec: (done - last_done) as f64 / now.duration_since(last_sample).as_secs_f64(),
            latency_p50_ms: window.p50,
            latency_p99_ms: window.p99,
            lag,
        });
        last_done = done;
        last_sample = now;
        progress.set_position(done as u64);
        progress.set_message(format!(
            "{:.0}/s, p99 {:.0} ms",
            samples.last().map_or(0.0, |s| s.completed_per_sec),
            window.p99
        ));
        if done == ids.len() {
            break;
        }
        children.check_alive()?;
        if now > deadline {
            bail!("only {done} of {} transfers finished within {} s", ids.len(), args.timeout_secs);
        }
    }
    progress.finish();
    lag_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let published_by = publisher.await??;
    let tracks = tracks.lock().expect("tracks lock").tracks.clone();
    let last_terminal = ids.iter().filter_map(|id| tracks[id].terminal.as_ref().map(|(at, _)| *at)).max();
    let elapsed = last_terminal.map_or(started.elapsed(), |at| at.duration_since(started));
    let xacts = transactions(&pool).await? - xacts_before;
    follower.abort();
    if let Some(simulator) = &simulator_pool {
        // Backends that ended meanwhile are counted as Postgres's.
        let now: std::collections::HashSet<u32> = backends(simulator).await?;
        children.simulator_backends.retain(|pid| now.contains(pid));
    }
    let processes = children.measured();
    // Read before the simulator stops, as its books die with it.
    let simulator_operations = match (args.simulator_books, &children.simulator_url) {
        (SimulatorBooks::Memory, Some(url)) => Some(list_simulator_operations(url).await?),
        _ => None,
    };
    children.stop();
    // Read once the pipeline's connections have closed: a backend sends
    // its last second's statistics when it ends, moments after its client.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows_per_transfer = rows_per_transfer(&rows_before, &row_changes(&pool).await?, ids.len());
    let usage: Vec<(String, f64)> = processes.iter().map(|p| (p.name.clone(), p.cpu_seconds)).collect();
    let cpu_ms_per_transfer = cpu_by(&usage, 1_000.0 / ids.len().max(1) as f64);

    let mut outcomes: HashMap<String, usize> = HashMap::new();
    let mut end_to_end = Vec::new();
    let stage_names = [
        ("published → validated", None, "validated"),
        ("validated → withdrawn", Some("validated"), "withdrawn"),
        ("withdrawn → deposited", Some("withdrawn"), "deposited"),
        ("deposited → completed", Some("deposited"), "completed"),
    ];
    let mut per_stage: Vec<Vec<f64>> = vec![Vec::new(); stage_names.len()];
    let (mut relayed, mut delivered) = (Vec::new(), Vec::new());
    for id in &ids {
        let track = &tracks[id];
        for (relay, delivery) in &track.relayed {
            relayed.push(*relay as f64);
            delivered.push(*delivery as f64);
        }
        if let (Some(sent), Some((at, state))) = (track.published_at, &track.terminal) {
            *outcomes.entry(state.clone()).or_default() += 1;
            end_to_end.push(at.duration_since(sent).as_secs_f64() * 1_000.0);
        }
        for (index, (_, from, to)) in stage_names.iter().enumerate() {
            let from_ms = match from {
                Some(state) => track.states.get(*state).copied(),
                None => Some(track.published_ms),
            };
            if let (Some(from_ms), Some(to_ms)) = (from_ms, track.states.get(*to)) {
                per_stage[index].push((to_ms - from_ms) as f64);
            }
        }
    }
    let report = {
        let mut conn = pool.acquire().await?;
        if let Some(simulator) = &simulator_pool {
            // The reconcile check compares the services' operations with
            // the ledger, in one database.
            copy_simulator_operations(simulator, &mut conn).await?;
        }
        if let Some(operations) = &simulator_operations {
            insert_simulator_operations(operations, &mut conn).await?;
        }
        bridge_store::reconcile::run(&mut conn).await?
    };
    let violations: Vec<String> = report.violations().iter().map(|check| format!("{check:?}")).collect();
    let lag_max = samples.iter().flat_map(|s| s.lag.iter()).fold(HashMap::new(), |mut max, (group, lag)| {
        let entry = max.entry(group.clone()).or_insert(0);
        *entry = (*entry).max(*lag);
        max
    });
    Ok(BenchResult {
        started_at: started_wall.to_rfc3339(),
        git_commit: git_commit(),
        brokers: args.brokers.clone(),
        in_process_broker: args.in_process_broker,
        partitions: args.partitions,
        processes_per_stage: args.processes_per_stage,
        funds: args.funds,
        investors: args.investors,
        offered_rate: args.rate,
        simulator_books: args.simulator_books,
        account_services: args.account_services,
        fetch_wait_max_ms: args.fetch_wait_max_ms,
        fetch_min_bytes: args.fetch_min_bytes,
        tokio_worker_threads: std::env::var("TOKIO_WORKER_THREADS").ok(),
        transfers: ids.len(),
        elapsed_secs: elapsed.as_secs_f64(),
        offered_per_sec: ids.len() as f64 / published_by.as_secs_f64().max(0.001),
        completed_per_sec: ids.len() as f64 / elapsed.as_secs_f64(),
        outcomes,
        end_to_end_ms: Percentiles::of(end_to_end),
        stage_ms: stage_names
            .iter()
            .zip(per_stage)
            .map(|((name, _, _), values)| ((*name).to_owned(), Percentiles::of(values)))
            .collect(),
        status_relay_ms: Percentiles::of(relayed),
        status_delivery_ms: Percentiles::of(delivered),
        db_transactions_per_transfer: xacts as f64 / ids.len() as f64,
        rows_per_transfer,
        lag_max,
        processes,
        cpu_ms_per_transfer,
        idle_cpu_share_of_core,
        invariants_ok: report.ok() && report.in_flight == 0,
        violations,
        pgbench: Vec::new(),
        pgbench_ceiling_tps: None,
        ratio_to_ceiling: None,
        samples,
    })
}

/// Investors with more than enough money, and funds with a seat for each of
/// them: every measured transfer is meant to complete.
async fn seed(
    pool: &sqlx::PgPool,
    investors: usize,
    funds: usize,
    transfers: usize,
) -> Result<(Vec<String>, Vec<String>)> {
    let eur = Currency::parse("EUR").expect("EUR");
    let mut tx = pool.begin().await?;
    let mut fund_accounts = Vec::with_capacity(funds);
    for index in 0..funds.max(1) {
        let (fund_id, account_id) = (format!("bench-fund-{index:03}"), format!("bench-fa-{index:03}"));
        accounts::seed_fund(
            &mut tx,
            &FundSeed {
                id: fund_id.clone(),
                name: format!("Benchmark Fund {index}"),
                currency: eur,
                minimum_investment_minor: 1_00,
                seats_max: investors as i32,
                capacity_minor: 1_000_000_000_000_00,
            },
        )
        .await?;
        accounts::seed_fund_account(&mut tx, &FundAccountSeed { id: account_id.clone(), fund_id, currency: eur })
            .await?;
        fund_accounts.push(account_id);
    }
    // Ten times what the average investor spends, so none runs out.
    let balance = (transfers as i64 / investors as i64 + 2) * 10 * 1_000_00;
    let mut ids = Vec::with_capacity(investors);
    for index in 0..investors {
        let id = format!("bench-inv-{index:06}");
        accounts::seed_investor(&mut tx, &InvestorSeed { id: id.clone(), opening_balance: Money::new(balance, eur) })
            .await?;
        ids.push(id);
    }
    tx.commit().await?;
    Ok((ids, fund_accounts))
}

fn requests(investors: &[String], fund_accounts: &[String], count: usize) -> Vec<TransferRequested> {
    let mut rng = rand::rng();
    let now_ms = chrono::Utc::now().timestamp_millis();
    (0..count)
        .map(|index| TransferRequested {
            transfer_id: Uuid::new_v4().to_string(),
            investor_account_id: investors[rng.random_range(0..investors.len())].clone(),
            fund_account_id: fund_accounts[rng.random_range(0..fund_accounts.len())].clone(),
            amount_minor: rng.random_range(1_00..=1_000_00),
            currency: "EUR".to_owned(),
            requested_at: now_ms,
            reference: format!("bench-{index}"),
            source_system: "bridge-bench".to_owned(),
        })
        .collect()
}

/// Publishes `requests` open-loop: each at its scheduled time (Poisson
/// arrivals at `rate` per second), never waiting for earlier ones to be
/// acknowledged, or back to back when `rate` is 0. Returns when the last
/// was handed to the producer.
async fn publish_all(
    producer: &FutureProducer,
    topics: &Topics,
    requests: &[TransferRequested],
    rate: u32,
    tracks: &Tracks,
) -> Result<Duration> {
    let started = Instant::now();
    let topic = topics.requested();
    let mut due = started;
    let mut acks = futures_util::stream::FuturesUnordered::new();
    for request in requests {
        if rate > 0 {
            // Exponential gaps make a Poisson process.
            let uniform: f64 = rand::rng().random_range(f64::MIN_POSITIVE..1.0);
            due += Duration::from_secs_f64(-uniform.ln() / f64::from(rate));
            tokio::time::sleep_until(due.into()).await;
        }
        let id = Uuid::parse_str(&request.transfer_id)?;
        let payload = encode(request)?;
        let headers_list = upstream::request_headers(request);
        let mut headers = OwnedHeaders::new_with_capacity(headers_list.len());
        for (key, value) in &headers_list {
            headers = headers.insert(Header { key, value: Some(value) });
        }
        {
            let mut tracking = tracks.lock().expect("tracks lock");
            let track = tracking.tracks.entry(id).or_default();
            track.published_at = Some(Instant::now());
            track.published_ms = now_ms();
        }
        let mut record =
            FutureRecord::to(&topic).key(request.transfer_id.as_bytes()).payload(&payload).headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    acks.push(delivery);
                    break;
                }
                Err((_, returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
        // Collect acknowledgements as they come, so the set stays small.
        while let Some(Some(ack)) = futures_util::FutureExt::now_or_never(futures_util::StreamExt::next(&mut acks)) {
            ack.context("delivery cancelled")?.map_err(|(error, _)| error)?;
        }
    }
    let published = started.elapsed();
    while let Some(ack) = futures_util::StreamExt::next(&mut acks).await {
        ack.context("delivery cancelled")?.map_err(|(error, _)| error)?;
    }
    Ok(published)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Reads the status topic from the start and records every transfer's
/// states; a terminal state (or manual review) ends its track.
fn follow_status(config: &PipelineConfig, tracks: Tracks) -> Result<tokio::task::JoinHandle<()>> {
    let group = format!("{}bench-follower-{}", config.group_prefix, Uuid::new_v4());
    let consumer = kafka::consumer(config, "bench-follower", &group)?;
    consumer.subscribe(&[&config.topics.status()])?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(message) = consumer.recv().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Some(Ok(event)) = message.payload().map(decode::<TransferStatusChanged>) else { continue };
            let Ok(id) = Uuid::parse_str(&event.transfer_id) else { continue };
            let now = Instant::now();
            let received_ms = now_ms();
            let mut tracking = tracks.lock().expect("tracks lock");
            let track = tracking.tracks.entry(id).or_default();
            track.states.entry(event.state.clone()).or_insert(event.occurred_at);
            if let Some(sent_ms) = message.timestamp().to_millis() {
                track.relayed.push((sent_ms - event.occurred_at, received_ms - sent_ms));
            }
            if (event.terminal || event.state == "manual_review") && track.terminal.is_none() {
                track.terminal = Some((now, event.state));
                let latency = track.published_at.map(|sent| now.duration_since(sent).as_secs_f64() * 1_000.0);
                tracking.finished += 1;
                tracking.recent.extend(latency);
            }
        }
    }))
}

async fn wait_terminal(
    tracks: &Tracks,
    requests: &[TransferRequested],
    timeout: Duration,
    children: &mut Children,
) -> Result<()> {
    let ids: Vec<Uuid> = requests.iter().filter_map(|r| Uuid::parse_str(&r.transfer_id).ok()).collect();
    let deadline = Instant::now() + timeout;
    loop {
        let done = {
            let tracking = tracks.lock().expect("tracks lock");
            ids.iter().filter(|id| tracking.tracks.get(id).is_some_and(|t| t.terminal.is_some())).count()
        };
        if done == ids.len() {
            return Ok(());
        }
        children.check_alive()?;
        ensure!(Instant::now() < deadline, "warm-up: only {done} of {} transfers finished", ids.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The commit the `bridge` binary being measured was built from, as its
/// `--version` says ("bridge 0.1.0 (abc1234)"): the checkout's commit would
/// be wrong for a saved build measured against another.
fn git_commit() -> Option<String> {
    let output = Command::new(processes::bridge_binary().ok()?).arg("--version").output().ok()?;
    let version = String::from_utf8_lossy(&output.stdout);
    let commit = version.trim().strip_suffix(')')?.rsplit_once('(')?.1;
    (output.status.success() && commit != "unknown").then(|| commit.to_owned())
}

mod database;
mod pgbench;
mod processes;
mod report;

use database::{
    backends, copy_simulator_operations, insert_simulator_operations, list_simulator_operations, row_changes,
    rows_per_transfer, transactions, TableRows,
};
use pgbench::pgbench;
use processes::{cpu_by, idle_cpu, Children, CpuBy};
use report::{plot, print_summary};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p95, p.p99, p.max, p.count), (50.0, 95.0, 99.0, 100.0, 100));
        let one = Percentiles::of(vec![7.0]);
        assert_eq!((one.p50, one.p99, one.max), (7.0, 7.0, 7.0));
        assert_eq!(Percentiles::of(Vec::new()).count, 0);
    }
}
