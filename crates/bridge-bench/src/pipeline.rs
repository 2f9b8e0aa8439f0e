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
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, TopicPartitionList};
use serde::Serialize;
use uuid::Uuid;

use bridge_codec::{decode, encode, TransferRequested, TransferStatusChanged};
use bridge_domain::{Currency, Money};
use bridge_pipeline::{kafka, upstream, PipelineConfig, StageName, Topics};
use bridge_store::accounts::{self, FundAccountSeed, FundSeed, InvestorSeed};
use bridge_store::PoolSettings;

/// The pgbench script: one stage-shaped transaction (see the file).
const PGBENCH_SETUP: &str = include_str!("../../../bench/pgbench/setup.sql");
const PGBENCH_STAGE: &str = include_str!("../../../bench/pgbench/stage.sql");

#[derive(Args)]
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
    partitions: i32,
    processes_per_stage: usize,
    funds: usize,
    investors: usize,
    offered_rate: u32,
    transfers: usize,
    elapsed_secs: f64,
    offered_per_sec: f64,
    completed_per_sec: f64,
    outcomes: HashMap<String, usize>,
    end_to_end_ms: Percentiles,
    stage_ms: Vec<(String, Percentiles)>,
    db_transactions_per_transfer: f64,
    lag_max: HashMap<String, i64>,
    processes: Vec<ProcessUsage>,
    invariants_ok: bool,
    violations: Vec<String>,
    pgbench: Vec<PgbenchPoint>,
    pgbench_ceiling_tps: Option<f64>,
    /// Completed transfers/s over the ceiling's transactions/s.
    ratio_to_ceiling: Option<f64>,
    samples: Vec<Sample>,
}

pub async fn run(args: PipelineBenchArgs) -> Result<()> {
    let id = Uuid::new_v4().simple().to_string()[..10].to_owned();
    let (base, _) = args.database_url.rsplit_once('/').context("DATABASE_URL has no database name")?;
    let url = format!("{base}/bridge_bench_{id}");
    bridge_store::ensure_database(&url).await?;
    let result = run_in(&args, &url, &id).await;
    if let Err(error) = bridge_store::drop_database(&url).await {
        eprintln!("Could not drop the scratch database {url}: {error:#}");
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

async fn run_in(args: &PipelineBenchArgs, url: &str, id: &str) -> Result<BenchResult> {
    let pool = bridge_store::connect(url, &PoolSettings { connections_max: 8, ..PoolSettings::default() }).await?;
    bridge_store::migrate(&pool).await?;
    let prefix = format!("bench{id}.");
    let mut config = PipelineConfig::new(&args.brokers);
    config.topics = Topics::new(&prefix);
    config.group_prefix = prefix.clone();
    config.topic_partitions = args.partitions;
    kafka::ensure_topics(&config).await?;
    let (investors, fund_accounts) = seed(&pool, args.investors, args.funds, args.transfers + args.warmup).await?;

    let mut children = Children::spawn(args, url, &prefix)?;
    let tracks: Tracks = Arc::default();
    let follower = follow_status(&config, tracks.clone())?;

    // Warm-up: consumer groups join and settle; nothing of it is measured.
    let producer = kafka::upstream_producer(&config)?;
    let warmup: Vec<TransferRequested> = requests(&investors, &fund_accounts, args.warmup);
    eprintln!("Warm-up: {} transfers while the consumer groups settle", warmup.len());
    publish_all(&producer, &config.topics, &warmup, 0, &tracks).await?;
    wait_terminal(&tracks, &warmup, Duration::from_secs(180), &mut children).await?;

    let xacts_before = transactions(&pool).await?;
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
        let (lag_reader, latest_lag, lag_stop) = (LagReader::new(&config)?, latest_lag.clone(), lag_stop.clone());
        std::thread::spawn(move || {
            while !lag_stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(lag) = lag_reader.lag() {
                    *latest_lag.lock().expect("lag lock") = lag;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
    }
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
    let processes = children.stop();

    let mut outcomes: HashMap<String, usize> = HashMap::new();
    let mut end_to_end = Vec::new();
    let stage_names = [
        ("published → validated", None, "validated"),
        ("validated → withdrawn", Some("validated"), "withdrawn"),
        ("withdrawn → deposited", Some("withdrawn"), "deposited"),
        ("deposited → completed", Some("deposited"), "completed"),
    ];
    let mut per_stage: Vec<Vec<f64>> = vec![Vec::new(); stage_names.len()];
    for id in &ids {
        let track = &tracks[id];
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
        partitions: args.partitions,
        processes_per_stage: args.processes_per_stage,
        funds: args.funds,
        investors: args.investors,
        offered_rate: args.rate,
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
        db_transactions_per_transfer: xacts as f64 / ids.len() as f64,
        lag_max,
        processes,
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
            let mut tracking = tracks.lock().expect("tracks lock");
            let track = tracking.tracks.entry(id).or_default();
            track.states.entry(event.state.clone()).or_insert(event.occurred_at);
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

/// Committed transactions of the scratch database so far.
async fn transactions(pool: &sqlx::PgPool) -> Result<i64> {
    // The statistics are sent at the end of each transaction by every
    // backend; clearing this backend's snapshot makes the read current.
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_stat_clear_snapshot()").execute(&mut *conn).await?;
    Ok(sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(&mut *conn)
        .await?)
}

/// Consumer lag of every stage's group.
struct LagReader {
    readers: Vec<(String, BaseConsumer, String)>,
    partitions: i32,
}

impl LagReader {
    fn new(config: &PipelineConfig) -> Result<Self> {
        let mut readers = Vec::new();
        for stage in StageName::ALL {
            let group = stage.group_id(config);
            let mut client = rdkafka::ClientConfig::new();
            client
                .set("bootstrap.servers", &config.brokers)
                .set("broker.address.family", "v4")
                .set("group.id", &group)
                .set("enable.auto.commit", "false");
            readers.push((stage.as_str().to_owned(), client.create()?, stage.input_topic(&config.topics)));
        }
        Ok(Self { readers, partitions: config.topic_partitions })
    }

    fn lag(&self) -> Result<HashMap<String, i64>> {
        let timeout = Duration::from_secs(2);
        let mut lags = HashMap::new();
        for (name, consumer, topic) in &self.readers {
            let mut list = TopicPartitionList::new();
            for partition in 0..self.partitions {
                list.add_partition(topic, partition);
            }
            let committed = consumer.committed_offsets(list, timeout)?;
            let mut lag = 0;
            for element in committed.elements() {
                let (_, high) = consumer.fetch_watermarks(topic, element.partition(), timeout)?;
                let position = element.offset().to_raw().filter(|offset| *offset >= 0).unwrap_or(0);
                lag += (high - position).max(0);
            }
            lags.insert(name.clone(), lag);
        }
        Ok(lags)
    }
}

/// The pipeline's processes, and what they used.
struct Children {
    processes: Vec<(String, Child)>,
    usage: HashMap<String, (f64, f64)>,
    /// CPU seconds of every counted process (see [`Children::readings`])
    /// when the measured run started. CPU is counted from there, so that the
    /// set-up and the warm-up do not weigh on a short run's figures; peak
    /// RSS is the lifetime's.
    cpu_at_start: HashMap<String, f64>,
    /// When the measured run started.
    started: Instant,
}

/// The `bridge` binary to run the pipeline with: `BRIDGE_BINARY`, or the
/// one built beside this benchmark.
fn bridge_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("BRIDGE_BINARY") {
        return Ok(PathBuf::from(path));
    }
    let beside = std::env::current_exe()?.with_file_name("bridge");
    ensure!(
        beside.exists(),
        "no bridge binary at {}; build it (cargo build --release -p bridge) or set BRIDGE_BINARY",
        beside.display()
    );
    Ok(beside)
}

impl Children {
    fn spawn(args: &PipelineBenchArgs, url: &str, prefix: &str) -> Result<Self> {
        let exe = bridge_binary()?;
        let logs = args.out_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let mut processes = Vec::new();
        for copy in 0..args.processes_per_stage {
            let mut parts: Vec<(String, Vec<&str>)> = StageName::ALL
                .iter()
                .map(|stage| (format!("{}-{copy}", stage.as_str()), vec!["--stage", stage.as_str()]))
                .collect();
            parts.push((format!("relay-{copy}"), vec!["--relay"]));
            for (name, flags) in parts {
                let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
                let child = Command::new(&exe)
                    .arg("run")
                    .args(&flags)
                    .arg("--simulated-services")
                    .env("DATABASE_URL", url)
                    .env("KAFKA_BROKERS", &args.brokers)
                    .env("BRIDGE_TOPIC_PREFIX", prefix)
                    .env("BRIDGE_GROUP_PREFIX", prefix)
                    .env("BRIDGE_TOPIC_PARTITIONS", args.partitions.to_string())
                    .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()))
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .with_context(|| format!("Failed to start {name}"))?;
                processes.push((name, child));
            }
        }
        Ok(Self { processes, usage: HashMap::new(), cpu_at_start: HashMap::new(), started: Instant::now() })
    }

    /// Marks the start of the measured run.
    fn start_measuring(&mut self) {
        self.cpu_at_start = self.readings().into_iter().map(|(name, cpu, _)| (name, cpu)).collect();
        self.started = Instant::now();
    }

    /// (name, CPU seconds so far, peak RSS MiB) of every process the run
    /// counts: the pipeline's, this one, and all of the database's and the
    /// broker's (their RSS is not summed: 0).
    fn readings(&mut self) -> Vec<(String, f64, f64)> {
        self.sample();
        let mut readings: Vec<(String, f64, f64)> = self
            .processes
            .iter()
            .filter_map(|(name, _)| self.usage.get(name).map(|(cpu, rss)| (name.clone(), *cpu, *rss)))
            .collect();
        if let Some((cpu, rss)) = proc_usage(std::process::id()) {
            readings.push((BENCH_PROCESS.to_owned(), cpu, rss));
        }
        readings.extend(outside_cpu().into_iter().map(|(name, cpu)| (format!("{name} (all processes)"), cpu, 0.0)));
        readings
    }

    fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.processes {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited with {status}; see its log");
            }
        }
        Ok(())
    }

    /// Records each process's CPU time and peak RSS while it is alive.
    fn sample(&mut self) {
        for (name, child) in &self.processes {
            if let Some(usage) = proc_usage(child.id()) {
                self.usage.insert(name.clone(), usage);
            }
        }
    }

    fn stop(mut self) -> Vec<ProcessUsage> {
        let readings = self.readings();
        let wall = self.started.elapsed().as_secs_f64();
        for (_, child) in &mut self.processes {
            // SIGTERM: each finishes its message, commits offsets and exits.
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        }
        for (_, child) in &mut self.processes {
            let _ = child.wait();
        }
        readings
            .into_iter()
            .map(|(name, cpu, rss)| {
                let cpu = cpu - self.cpu_at_start.get(&name).copied().unwrap_or(0.0);
                ProcessUsage { name, cpu_seconds: cpu, cpu_share_of_run: cpu / wall, peak_rss_mib: rss }
            })
            .collect()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The name this process's usage is reported under.
const BENCH_PROCESS: &str = "bench (load generator and status follower)";

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// (CPU seconds, peak RSS MiB) of a process, from /proc.
fn proc_usage(pid: u32) -> Option<(f64, f64)> {
    let cpu = proc_cpu(Path::new(&format!("/proc/{pid}/stat")), false)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let peak_kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((cpu, peak_kib / 1024.0))
}

/// CPU seconds of a process from its `stat` file; with `reaped_children`,
/// also those of the children it has waited for.
fn proc_cpu(stat: &Path, reaped_children: bool) -> Option<f64> {
    let text = std::fs::read_to_string(stat).ok()?;
    // Fields after the command name (which may hold spaces) start at ")":
    // utime, stime, cutime, cstime are the 12th to 15th of them.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let last = if reaped_children { 14 } else { 12 };
    let ticks: Option<f64> = fields.get(11..=last)?.iter().map(|field| field.parse::<f64>().ok()).sum();
    Some(ticks? / TICKS_PER_SEC)
}

/// CPU seconds used so far by every postgres and tansu process on the
/// machine (the database and the broker the run shares the cores with).
/// A Postgres backend that ends during the run (a pool replacing a
/// connection past its lifetime, 30 minutes in sqlx) leaves the live
/// processes, and its time would be lost from the sum; once the postmaster
/// has waited for it, that time is in the postmaster's children's times,
/// which are counted too.
fn outside_cpu() -> HashMap<String, f64> {
    let mut totals: HashMap<String, f64> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return totals };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else { continue };
        let comm = comm.trim();
        let name = if comm.starts_with("postgres") {
            "postgres"
        } else if comm.starts_with("tansu") {
            "tansu"
        } else {
            continue;
        };
        if let Some(cpu) = proc_cpu(&path.join("stat"), true) {
            *totals.entry(name.to_owned()).or_default() += cpu;
        }
    }
    totals
}

fn git_commit() -> Option<String> {
    let output = Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// pgbench with the stage-shaped transaction at 1 to 32 clients.
async fn pgbench(server_base: &str, seconds: u32) -> Result<Vec<PgbenchPoint>> {
    let url = format!("{server_base}/bridge_pgbench_{}", &Uuid::new_v4().simple().to_string()[..10]);
    bridge_store::ensure_database(&url).await?;
    let dir = std::env::temp_dir().join(format!("bridge-pgbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (setup, script) = (dir.join("setup.sql"), dir.join("stage.sql"));
    std::fs::write(&setup, PGBENCH_SETUP)?;
    std::fs::write(&script, PGBENCH_STAGE)?;
    let result = (|| -> Result<Vec<PgbenchPoint>> {
        let status =
            Command::new("psql").args(["-q", "-v", "ON_ERROR_STOP=1", "-d", &url, "-f"]).arg(&setup).status()?;
        ensure!(status.success(), "psql could not set up the pgbench tables");
        let mut points = Vec::new();
        for clients in [1u32, 2, 4, 8, 16, 32] {
            eprintln!("pgbench: {clients} clients for {seconds} s");
            let output = Command::new("pgbench")
                .args(["-n", "-j", "2", "-c", &clients.to_string(), "-T", &seconds.to_string(), "-f"])
                .arg(&script)
                .arg(&url)
                .output()
                .context("Failed to run pgbench (Debian package postgresql-client)")?;
            let text = String::from_utf8_lossy(&output.stdout);
            ensure!(output.status.success(), "pgbench failed: {}", String::from_utf8_lossy(&output.stderr));
            let tps = text
                .lines()
                .find_map(|line| line.strip_prefix("tps = "))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|value| value.parse().ok())
                .context("pgbench printed no tps")?;
            points.push(PgbenchPoint { clients, tps });
        }
        Ok(points)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    bridge_store::drop_database(&url).await?;
    result
}

fn print_summary(result: &BenchResult) {
    println!("| measure | value |");
    println!("| --- | ---: |");
    let offered =
        if result.offered_rate == 0 { "as fast as possible".to_owned() } else { format!("{}/s", result.offered_rate) };
    println!("| offered load | {offered} (achieved {:.0}/s) |", result.offered_per_sec);
    println!("| transfers | {} in {:.1} s |", result.transfers, result.elapsed_secs);
    println!("| completed transfers/s | {:.0} |", result.completed_per_sec);
    let e = &result.end_to_end_ms;
    println!("| end-to-end ms p50 / p95 / p99 / max | {:.0} / {:.0} / {:.0} / {:.0} |", e.p50, e.p95, e.p99, e.max);
    for (name, p) in &result.stage_ms {
        println!("| {name} ms p50 / p99 | {:.0} / {:.0} |", p.p50, p.p99);
    }
    println!("| database transactions per transfer | {:.1} |", result.db_transactions_per_transfer);
    for process in &result.processes {
        println!(
            "| {}: CPU s (share of run) / peak RSS MiB | {:.1} ({:.0} %) / {:.0} |",
            process.name,
            process.cpu_seconds,
            process.cpu_share_of_run * 100.0,
            process.peak_rss_mib
        );
    }
    let mut lags: Vec<_> = result.lag_max.iter().collect();
    lags.sort();
    for (group, lag) in lags {
        println!("| max consumer lag, {group} | {lag} |");
    }
    if let (Some(ceiling), Some(ratio)) = (result.pgbench_ceiling_tps, result.ratio_to_ceiling) {
        println!("| pgbench ceiling (stage transaction) tps | {ceiling:.0} |");
        println!("| completed transfers/s ÷ ceiling | {ratio:.3} |");
    }
    println!("| invariants | {} |", if result.invariants_ok { "hold" } else { "VIOLATED" });
}

fn plot(result: &BenchResult) -> String {
    use crate::plot::{svg, Panel, Series};
    let throughput = result.samples.iter().map(|s| (s.second, s.completed_per_sec)).collect();
    let p50 = result.samples.iter().map(|s| (s.second, s.latency_p50_ms)).collect();
    let p99 = result.samples.iter().map(|s| (s.second, s.latency_p99_ms)).collect();
    let colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
    let lag = StageName::ALL
        .iter()
        .zip(colours)
        .map(|(stage, colour)| Series {
            name: stage.as_str(),
            colour,
            points: result
                .samples
                .iter()
                .map(|s| (s.second, s.lag.get(stage.as_str()).copied().unwrap_or(0) as f64))
                .collect(),
        })
        .collect();
    let offered = if result.offered_rate == 0 { "max".to_owned() } else { format!("{}/s", result.offered_rate) };
    svg(
        &format!(
            "bridge bench pipeline: {} transfers, offered {offered}, {} process(es) per stage, {:.0} completed/s",
            result.transfers, result.processes_per_stage, result.completed_per_sec
        ),
        &[
            Panel {
                title: "completed transfers per second",
                unit: "1/s",
                series: vec![Series { name: "completed", colour: "#1f77b4", points: throughput }],
            },
            Panel {
                title: "end-to-end latency of transfers finishing in each second",
                unit: "ms",
                series: vec![
                    Series { name: "p50", colour: "#2ca02c", points: p50 },
                    Series { name: "p99", colour: "#d62728", points: p99 },
                ],
            },
            Panel { title: "consumer lag per stage", unit: "messages", series: lag },
        ],
    )
}

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

    #[test]
    fn reads_cpu_time_of_a_process() {
        let (cpu, rss) = proc_usage(std::process::id()).expect("this process is in /proc");
        assert!(cpu >= 0.0 && rss > 0.0);
    }

    /// The time of a child that has ended and been waited for stays in the
    /// count with `reaped_children`, and only then.
    #[test]
    fn counts_the_time_of_children_that_have_ended() {
        let stat = Path::new("/proc/self/stat");
        let (own, all) = (proc_cpu(stat, false).unwrap(), proc_cpu(stat, true).unwrap());
        // About a second of CPU in a child shell.
        let status = Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); done"])
            .status()
            .expect("sh runs");
        assert!(status.success());
        let (own_after, all_after) = (proc_cpu(stat, false).unwrap(), proc_cpu(stat, true).unwrap());
        let children = (all_after - own_after) - (all - own);
        assert!(children >= 0.2, "children's time grew by {children} s");
        assert!(own_after - own < 0.2, "this process's own time grew by {} s", own_after - own);
    }
}
