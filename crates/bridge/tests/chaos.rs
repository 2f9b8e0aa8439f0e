//! Chaos, the way a deployment fails: every part of the pipeline in a
//! process of its own (each stage, a second member of the money stages'
//! groups alongside the settlement runner, the relay, the notifier and the
//! simulated bank), and one of them, chosen at random, killed with SIGKILL
//! every few seconds while transfers keep arriving. Afterwards every
//! transfer is final or in manual review, our books and the bank's agree
//! (`bridge reconcile`'s checks), no operation reached the bank twice, and
//! every status change was logged and notified.
//!
//! Reproducible schedule from the printed seed: `BRIDGE_CHAOS_SEED=<seed>`.
//! Short by default; `BRIDGE_CHAOS_KILLS=200` for a long run, and
//! `BRIDGE_CHAOS_BINARY` to run another build of `bridge` (a release one).
//!
//! On the in-process cluster (served over TCP by this test's process) a
//! killed process is started again at once, as a supervisor would: the
//! group coordinator, like Kafka's, notices the dead member when its
//! session times out. tansu 0.6's coordinator notices a dead member only
//! when another one talks to it, and a generation whose leader died
//! unnoticed hands every live member an empty assignment and never asks
//! them to join again: the group stops until some member joins or leaves.
//! On the standalone broker a killed consumer is therefore started again
//! only once its session has timed out, when the new member's join removes
//! the dead one; the bank and the relay, which are in no group, restart at
//! once. A group that stopped all the same would leave transfers where
//! nothing moves them, which the test reports: the fault is not hidden,
//! only not provoked.
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use uuid::Uuid;

use bridge_testkit::receivers::{Behaviour, HttpReceiver};
use bridge_testkit::{both_brokers, BrokerKind, TestKit};

fn bridge() -> String {
    std::env::var("BRIDGE_CHAOS_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_bridge").to_owned())
}

/// The dead member's session: shorter than the default, so the standalone
/// broker's restarts come sooner.
const SESSION_TIMEOUT_MS: u64 = 6_000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// One process of the deployment: what it runs, and its log.
struct Slot {
    name: &'static str,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// Whether it consumes in a consumer group (the bank and the relay do
    /// not).
    group_member: bool,
    /// When a killed process may be started again.
    restart_at: Option<Instant>,
    kills: u32,
}

impl Slot {
    fn start(&mut self, env: &[(String, String)]) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(bridge())
            .args(&self.args)
            .envs(env.iter().map(|(name, value)| (name.as_str(), value.as_str())))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("Failed to start {}", self.name))?;
        self.child = Some(child);
        self.restart_at = None;
        Ok(())
    }

    fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
            self.kills += 1;
        }
        Ok(())
    }

    /// SIGTERM, and whether it then stopped cleanly.
    fn stop(&mut self) -> Result<bool> {
        let Some(mut child) = self.child.take() else { return Ok(true) };
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn chaos(kind: BrokerKind) -> Result<()> {
    let seed: u64 = env_or("BRIDGE_CHAOS_SEED", rand::rng().random());
    let kills: u32 = env_or("BRIDGE_CHAOS_KILLS", 10);
    eprintln!("chaos seed {seed}, {kills} kills on {kind:?} (rerun with BRIDGE_CHAOS_SEED={seed})");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);

    let kit = TestKit::start_with(kind, |config| config.session_timeout_ms = SESSION_TIMEOUT_MS as u32).await?;
    let investors = 40;
    for investor in 0..investors {
        kit.seed_investor(&format!("inv-{investor}"), 100_000_00).await?;
    }
    let funds = [
        kit.seed_fund("alpha", 100_00, 35, 10_000_000_00).await?,
        kit.seed_fund("beta", 100_00, 1_000, 100_000_000_00).await?,
    ];
    let receiver = HttpReceiver::start(Behaviour::default()).await?;
    {
        let mut conn = kit.pool.acquire().await?;
        bridge_store::notifications::subscribe(
            &mut conn,
            &bridge_store::notifications::NewSubscription {
                subscriber_kind: "operator".into(),
                subscriber_id: None,
                states: Vec::new(),
                channel: "slack".into(),
                target: format!("{}/slack", receiver.url),
                secret: None,
                sealed_target: None,
            },
        )
        .await?;
    }

    let sim_port = free_port()?;
    let env: Vec<(String, String)> = [
        ("DATABASE_URL", kit.database_url.clone()),
        ("KAFKA_BROKERS", kit.config.brokers.clone()),
        ("BRIDGE_TOPIC_PREFIX", kit.config.topics.prefix.clone()),
        ("BRIDGE_GROUP_PREFIX", kit.config.group_prefix.clone()),
        ("BRIDGE_TOPIC_PARTITIONS", kit.config.topic_partitions.to_string()),
        ("BRIDGE_SESSION_TIMEOUT_MS", SESSION_TIMEOUT_MS.to_string()),
        ("BRIDGE_ACCOUNT_SERVICES_URL", format!("http://127.0.0.1:{sim_port}")),
        ("BRIDGE_ACCOUNT_SERVICE_TIMEOUT_MS", "1000".to_owned()),
        ("BRIDGE_NOTIFY_LEASE_MS", "2000".to_owned()),
        // The receiver listens on loopback, allowed here on purpose.
        ("BRIDGE_NOTIFY_ALLOWED_HOSTS", "127.0.0.1".to_owned()),
        ("BRIDGE_NOTIFY_RETRY_BASE_MS", "200".to_owned()),
        ("BRIDGE_DB_CONNECTIONS_MAX", "4".to_owned()),
        ("BRIDGE_FETCH_MIN_BYTES", kit.config.fetch_min_bytes.to_string()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();

    let logs = std::env::temp_dir().join(format!("bridge-chaos-{seed}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&logs)?;
    let args = |line: &str| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let mut slots: Vec<Slot> = [
        ("bank", args(&format!("sim --faults demo --seed {seed} --listen 127.0.0.1:{sim_port}"))),
        ("validator", args("run --stage validator")),
        ("withdrawal", args("run --stage withdrawal")),
        ("deposit", args("run --stage deposit")),
        ("completion", args("run --stage completion")),
        // The settlement runner's process is a second member of both money
        // stages' groups, so killing either moves partitions with work in
        // flight.
        ("settlement", args("run --settlement --stage withdrawal --stage deposit")),
        ("relay", args("run --relay")),
        ("notifier", args("notify")),
    ]
    .into_iter()
    .map(|(name, args)| Slot {
        name,
        log: logs.join(format!("{name}.log")),
        args,
        group_member: !matches!(name, "bank" | "relay"),
        child: None,
        restart_at: None,
        kills: 0,
    })
    .collect();
    for slot in &mut slots {
        slot.start(&env)?;
    }

    let result = run_chaos(&kit, kind, &mut rng, &mut slots, &env, kills, investors, &funds).await;
    let mut unclean = Vec::new();
    for slot in &mut slots {
        if !slot.stop()? {
            unclean.push(slot.name);
        }
    }
    let kills_by_process: BTreeMap<&str, u32> = slots.iter().map(|slot| (slot.name, slot.kills)).collect();
    eprintln!("chaos seed {seed}: kills {kills_by_process:?}");
    let result = result.and_then(|ids| {
        ensure!(unclean.is_empty(), "{unclean:?} did not stop cleanly on SIGTERM");
        Ok(ids)
    });
    let checked = match result {
        Ok(ids) => check(&kit, &ids, &receiver).await,
        Err(error) => Err(error),
    };
    if let Err(error) = checked {
        let tails: Vec<String> =
            slots.iter().map(|slot| format!("--- {} (last lines)\n{}", slot.name, slot.tail(15))).collect();
        bail!("chaos seed {seed} on {kind:?}: {error:#}\nlogs in {}\n{}", logs.display(), tails.join("\n"));
    }
    let _ = std::fs::remove_dir_all(&logs);
    Ok(())
}

/// Submits transfers while killing processes; returns the ids submitted
/// once everything is final again.
#[allow(clippy::too_many_arguments)]
async fn run_chaos(
    kit: &TestKit,
    kind: BrokerKind,
    rng: &mut ChaCha8Rng,
    slots: &mut [Slot],
    env: &[(String, String)],
    kills: u32,
    investors: usize,
    funds: &[String],
) -> Result<Vec<Uuid>> {
    let restart_after = match kind {
        BrokerKind::InProcess => Duration::ZERO,
        BrokerKind::Standalone => Duration::from_millis(SESSION_TIMEOUT_MS + 1_000),
    };
    let mut ids = Vec::new();
    let mut published = Vec::new();
    // A burst first, as when an upstream system catches up: long queues in
    // every lane, large batches and large relay claims while the first
    // processes die.
    for _ in 0..env_or("BRIDGE_CHAOS_BURST", 200) {
        let investor = format!("inv-{}", rng.random_range(0..investors));
        let fund = &funds[rng.random_range(0..funds.len())];
        let request = kit.request(&investor, fund, rng.random_range(100_00..2_000_00));
        ids.push(kit.publish(&request).await?);
        published.push(request);
    }
    let mut killed = 0;
    let mut next_kill = Instant::now() + Duration::from_millis(rng.random_range(1_000..3_000));
    while killed < kills {
        // About 16 requests a second, an occasional one published twice.
        for _ in 0..rng.random_range(1..4) {
            let investor = format!("inv-{}", rng.random_range(0..investors));
            let fund = &funds[rng.random_range(0..funds.len())];
            let request = kit.request(&investor, fund, rng.random_range(100_00..2_000_00));
            ids.push(kit.publish(&request).await?);
            published.push(request);
        }
        if rng.random_range(0..20) == 0 {
            kit.publish(&published[rng.random_range(0..published.len())]).await?;
        }
        let now = Instant::now();
        for slot in slots.iter_mut() {
            if slot.restart_at.is_some_and(|at| at <= now) {
                slot.start(env)?;
            }
        }
        if now >= next_kill {
            next_kill = now + Duration::from_millis(rng.random_range(1_000..3_000));
            let victim = rng.random_range(0..slots.len());
            let slot = &mut slots[victim];
            if slot.child.is_some() {
                slot.kill()?;
                killed += 1;
                if restart_after.is_zero() || !slot.group_member {
                    slot.start(env)?;
                } else {
                    slot.restart_at = Some(Instant::now() + restart_after);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(125)).await;
    }
    // Every process up again, then everything must come to rest.
    for slot in slots.iter_mut() {
        if let Some(at) = slot.restart_at {
            tokio::time::sleep(at.saturating_duration_since(Instant::now())).await;
            slot.start(env)?;
        }
    }
    if let Err(error) = kit.wait_terminal(&ids, Duration::from_secs(120 + ids.len() as u64 / 10)).await {
        let stuck: Vec<(Uuid, String, i64, bool, i64)> = sqlx::query_as(
            "SELECT t.id, t.state, t.version, EXISTS (SELECT 1 FROM pending_steps p WHERE p.transfer_id = t.id),
                    (SELECT count(*) FROM sim_operations s WHERE s.idempotency_key LIKE 'bridge-' || t.id || '-%')
             FROM transfers t WHERE t.state NOT IN ('completed', 'rejected', 'failed', 'reversed', 'manual_review')
             ORDER BY t.updated_at LIMIT 10",
        )
        .fetch_all(&kit.pool)
        .await?;
        bail!("{error:#}\nnot final (id, state, version, pending step, bank operations): {stuck:?}");
    }
    // The notifier catches up with the status events.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (logged, versions, undelivered): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM notification_log), (SELECT count(*) FROM transfer_versions),
                    (SELECT count(*) FROM notification_deliveries WHERE status <> 'delivered')",
        )
        .fetch_one(&kit.pool)
        .await?;
        if logged == versions && undelivered == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "notifier behind: {logged} of {versions} status events logged, {undelivered} deliveries not delivered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(ids)
}

async fn check(kit: &TestKit, ids: &[Uuid], receiver: &HttpReceiver) -> Result<()> {
    let states = kit.state_counts(ids).await?;
    eprintln!("chaos end states: {states:?}");
    let report = kit.reconcile().await?;
    if !report.ok() {
        let stuck: Vec<(Uuid, String, i32)> = sqlx::query_as(
            "SELECT id, state, version FROM transfers
             WHERE state NOT IN ('completed', 'rejected', 'failed', 'reversed') ORDER BY updated_at LIMIT 10",
        )
        .fetch_all(&kit.pool)
        .await?;
        bail!("Invariant violations: {:#?}\nnot final: {stuck:?}", report.violations());
    }
    ensure!(report.in_flight == 0, "{} transfers still in flight", report.in_flight);
    // Each operation reached the bank once: its keys are derived from
    // (transfer, step), and no step was carried out under two keys.
    let repeated: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT transfer_id::text, operation, count(*) FROM sim_operations
         GROUP BY 1, 2 HAVING count(*) > 1",
    )
    .fetch_all(&kit.pool)
    .await?;
    ensure!(repeated.is_empty(), "operations carried out more than once at the bank: {repeated:?}");
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM transfer_versions").fetch_one(&kit.pool).await?;
    let delivered = receiver.accepted().len() as i64;
    ensure!(delivered >= versions, "{delivered} notifications received for {versions} status changes");
    let unique: HashMap<Uuid, ()> = ids.iter().map(|id| (*id, ())).collect();
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM transfers WHERE id = ANY($1)").bind(ids).fetch_one(&kit.pool).await?;
    ensure!(recorded as usize == unique.len(), "{recorded} of {} submitted transfers recorded", unique.len());
    Ok(())
}

both_brokers!(chaos);
