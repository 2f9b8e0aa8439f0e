//! The `bridge` binary as an operator uses it: separate processes, real
//! Postgres, real brokers, signals.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use bridge_pipeline::Topics;
use bridge_testkit::{BrokerKind, TestKit};

const BRIDGE: &str = env!("CARGO_BIN_EXE_bridge");

/// The environment that points a `bridge` process at the kit's database,
/// broker, topics and groups, plus `extra`.
fn kit_env(kit: &TestKit, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("DATABASE_URL", kit.database_url.clone()),
        ("KAFKA_BROKERS", kit.config.brokers.clone()),
        ("BRIDGE_TOPIC_PREFIX", kit.config.topics.prefix.clone()),
        ("BRIDGE_GROUP_PREFIX", kit.config.group_prefix.clone()),
    ];
    env.extend(extra.iter().map(|(name, value)| (*name, (*value).to_owned())));
    env
}

fn last_json_line(stdout: &[u8]) -> Result<serde_json::Value> {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().last().context("no output")?;
    serde_json::from_str(line).with_context(|| format!("last line is not JSON: {line}"))
}

async fn demo(kind: BrokerKind) -> Result<()> {
    // The kit gives a fresh database and, for the standalone broker, its
    // address; the demo picks its own namespace, topics and groups.
    let kit = TestKit::start(kind).await?;
    let mut command = tokio::process::Command::new(BRIDGE);
    command.args(["demo", "--transfers", "60"]).env("DATABASE_URL", &kit.database_url).env_remove("KAFKA_BROKERS");
    if kind == BrokerKind::Standalone {
        command.env("KAFKA_BROKERS", &kit.config.brokers);
    }
    let output = tokio::time::timeout(Duration::from_secs(300), command.output()).await??;
    ensure!(output.status.success(), "demo failed: {}", String::from_utf8_lossy(&output.stderr));
    let summary = last_json_line(&output.stdout)?;
    ensure!(summary["submitted"] == 60 && summary["in_flight"] == 0 && summary["invariants_ok"] == true, "{summary}");
    // With failures injected at the simulated bank, a refund can be declined
    // too: those transfers wait in manual review, which is a settled place.
    let settled: i64 = ["completed", "rejected", "failed", "reversed", "manual_review"]
        .iter()
        .map(|key| summary[key].as_i64().unwrap_or(-1))
        .sum();
    ensure!(settled == 60, "{summary}");
    ensure!(summary["rejected"].as_i64() > Some(0) && summary["completed"].as_i64() > Some(0), "{summary}");
    kit.assert_books_balance().await
}

/// `bridge --version` names the commit it was built from (the benchmark
/// records it as the code it measured).
#[test]
fn the_version_names_the_commit_built() -> Result<()> {
    let head = Command::new("git").args(["rev-parse", "--short", "HEAD"]).output()?;
    let commit =
        if head.status.success() { String::from_utf8(head.stdout)?.trim().to_owned() } else { "unknown".to_owned() };
    let version = bridge(&["--version"], &[], None)?;
    ensure!(
        version.trim() == format!("bridge {} ({commit})", env!("CARGO_PKG_VERSION")),
        "{version:?}, checked out at {commit}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_the_in_process_cluster() -> Result<()> {
    demo(BrokerKind::InProcess).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_the_standalone_broker() -> Result<()> {
    demo(BrokerKind::Standalone).await
}

/// migrate, seed, run, submit and reconcile as separate processes, and a
/// graceful stop on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_on_the_standalone_broker() -> Result<()> {
    let kit = TestKit::start(BrokerKind::Standalone).await?;
    let env = kit_env(&kit, &[("BRIDGE_TOPIC_PARTITIONS", "3"), ("BRIDGE_SIMULATED_SERVICES", "true")]);
    let run = |args: &[&str]| -> Result<std::process::Output> {
        let output = Command::new(BRIDGE).args(args).envs(env.iter().cloned()).output()?;
        ensure!(output.status.success(), "bridge {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        Ok(output)
    };
    run(&["migrate", "--topics"])?;
    run(&["seed", "--namespace", "ops", "--investors", "20"])?;

    // Logs go to a file: an undrained pipe would fill and block the process.
    let log_path = std::env::temp_dir().join(format!("bridge-run-{}.log", uuid::Uuid::new_v4()));
    let log = std::fs::File::create(&log_path)?;
    let pipeline =
        Command::new(BRIDGE).arg("run").envs(env.iter().cloned()).stdout(Stdio::null()).stderr(log).spawn()?;
    let submitted = run(&["submit", "--namespace", "ops", "--generate", "25"])?;
    let one =
        run(&["submit", "--investor", "ops-inv-00001", "--fund-account", "ops-fa-growth", "--amount-minor", "100000"])?;
    let ids: Vec<uuid::Uuid> = String::from_utf8(submitted.stdout)?
        .lines()
        .chain(String::from_utf8(one.stdout)?.lines())
        .map(uuid::Uuid::parse_str)
        .collect::<Result<_, _>>()?;
    ensure!(ids.len() == 26);
    let waited = kit.wait_terminal(&ids, Duration::from_secs(120)).await;

    // SIGTERM: the process finishes what it holds, commits offsets and exits 0.
    let status = Command::new("kill").args(["-TERM", &pipeline.id().to_string()]).status()?;
    ensure!(status.success());
    let exit = tokio::task::spawn_blocking(move || pipeline.wait_with_output()).await??;
    waited?;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    ensure!(exit.status.success(), "bridge run exited with {:?}: {log}", exit.status);
    ensure!(log.contains("Relay stopped") && log.contains("Consumer stopped"), "no graceful stop in the log: {log}");

    let report = run(&["reconcile"])?;
    ensure!(String::from_utf8_lossy(&report.stdout).contains("in flight: 0"));
    let report: serde_json::Value = serde_json::from_slice(&run(&["reconcile", "--json"])?.stdout)?;
    ensure!(report["ok"] == true && report["in_flight"] == 0, "{report}");
    let checks = report["checks"].as_array().context("checks")?;
    ensure!(!checks.is_empty() && checks.iter().all(|check| check["violations"] == 0), "{report}");

    // The event log, rebuilt from the status topic: whatever the notifier
    // had not logged when it stopped is fed through it; then all agree.
    run(&["rebuild", "--apply", "--idle-ms", "1500"])?;
    let rebuilt: serde_json::Value = serde_json::from_slice(&run(&["rebuild", "--idle-ms", "1500"])?.stdout)?;
    ensure!(rebuilt["comparison"]["missing_from_log"] == 0 && rebuilt["applied"] == 0, "{rebuilt}");
    ensure!(rebuilt["comparison"]["versions_never_published"] == 0, "{rebuilt}");
    kit.assert_books_balance().await
}

/// The dangerous window: the bank has debited the investor, the stage has
/// not committed yet, and the process dies (kill -9). The restarted stage
/// asks the bank again with the same idempotency key and gets the first
/// answer, so the investor is debited once; the simulator's books prove it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_killed_after_the_bank_acted_never_withdraws_twice() -> Result<()> {
    use bridge_sim::{FaultPlan, OperationFaults};

    let kit = TestKit::start(BrokerKind::Standalone).await?;
    kit.seed_investor("lena", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    // The bank acts at once but holds every withdrawal reply for 3 s.
    let plan = FaultPlan {
        withdrawal: OperationFaults { reply_delay_ms: 3_000, ..OperationFaults::default() },
        ..FaultPlan::none()
    };
    let simulator = kit.start_simulator(plan).await?;
    let env = kit_env(
        &kit,
        &[
            ("BRIDGE_TOPIC_PARTITIONS", "3"),
            ("BRIDGE_ACCOUNT_SERVICES_URL", simulator.url.as_str()),
            ("BRIDGE_ACCOUNT_SERVICE_TIMEOUT_MS", "10000"),
            ("BRIDGE_SESSION_TIMEOUT_MS", "6000"),
        ],
    );
    let logs = std::env::temp_dir().join(format!("bridge-kill-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&logs)?;
    let spawn_number = std::sync::atomic::AtomicUsize::new(0);
    let spawn = || -> Result<std::process::Child> {
        let number = spawn_number.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = std::fs::File::create(logs.join(format!("run-{number}.log")))?;
        Ok(Command::new(BRIDGE).arg("run").envs(env.iter().cloned()).stdout(Stdio::null()).stderr(log).spawn()?)
    };
    let read_logs = || std::fs::read_to_string(logs.join("run-1.log")).unwrap_or_default();

    let mut first = spawn()?;
    let id = kit.publish(&kit.request("lena", &fund_account, 1_234_00)).await?;
    let key = format!("bridge-{id}-withdrawal");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let acted: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sim_operations WHERE idempotency_key = $1)")
            .bind(&key)
            .fetch_one(&kit.pool)
            .await?;
        if acted {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "the bank never saw the withdrawal");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill()?; // SIGKILL: no cleanup, no offset commit, no reply read.
    first.wait()?;
    ensure!(kit.transfer(id).await?.state == bridge_domain::TransferState::Validated, "nothing committed yet");
    // As after a real crash, the dead process's group membership has to
    // expire before its partitions move; the standalone broker only notices
    // at the next join, so the replacement starts after the session timeout.
    tokio::time::sleep(Duration::from_millis(6_500)).await;

    let second = spawn()?;
    let waited = kit.wait_terminal(&[id], Duration::from_secs(120)).await;
    Command::new("kill").args(["-TERM", &second.id().to_string()]).status()?;
    let exit = tokio::task::spawn_blocking(move || second.wait_with_output()).await??;
    waited.with_context(|| format!("restarted process log:\n{}", read_logs()))?;
    ensure!(exit.status.success());
    simulator.stop().await?;
    let _ = std::fs::remove_dir_all(&logs);

    ensure!(kit.transfer(id).await?.state == bridge_domain::TransferState::Completed);
    let withdrawals: i64 = sqlx::query_scalar("SELECT count(*) FROM sim_operations WHERE operation = 'withdrawal'")
        .fetch_one(&kit.pool)
        .await?;
    let balance: i64 = sqlx::query_scalar("SELECT balance_minor FROM investor_accounts WHERE id = 'lena'")
        .fetch_one(&kit.pool)
        .await?;
    ensure!((withdrawals, balance) == (1, 10_000_00 - 1_234_00), "withdrawals {withdrawals}, balance {balance}");
    kit.assert_books_balance().await
}

/// Operators replay every stage topic from the beginning after the fact: the
/// replay reports every message as a duplicate (or as already dead-lettered)
/// and changes nothing. Then dead letters are listed, shown and redriven
/// through the normal path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_changes_nothing_and_dead_letters_can_be_redriven() -> Result<()> {
    let kit = TestKit::start(BrokerKind::Standalone).await?;
    kit.seed_investor("mia", 100_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let closed = kit.seed_fund("closed", 100_00, 10, 1_000_000_00).await?;
    kit.set_simulated_account_status(&closed, "closed").await?;
    let pipeline = kit.spawn_all();
    let mut ids = Vec::new();
    for amount in [1_000_00, 2_000_00, 50_00] {
        ids.push(kit.publish(&kit.request("mia", &fund_account, amount)).await?);
    }
    ids.push(kit.publish(&kit.request("mia", &closed, 500_00)).await?);
    let requested = kit.topics().requested();
    kit.publish_raw(&requested, Some(b"garbage"), b"not avro at all", &[]).await?;
    kit.wait_terminal(&ids, Duration::from_secs(90)).await?;
    for stage in bridge_pipeline::StageName::ALL {
        kit.wait_caught_up(stage, Duration::from_secs(90)).await?;
    }
    // The garbage's dead letter is committed; let the relay publish it.
    kit.wait_outbox_drained(Duration::from_secs(60)).await?;
    pipeline.stop().await?;
    let before = kit.effect_counts().await?;

    let env = kit_env(&kit, &[("BRIDGE_SIMULATED_SERVICES", "true")]);
    let bridge = |args: &[&str]| -> Result<Vec<serde_json::Value>> {
        let output = Command::new(BRIDGE).args(args).envs(env.iter().cloned()).output()?;
        ensure!(output.status.success(), "bridge {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout)?.lines().map(|line| Ok(serde_json::from_str(line)?)).collect()
    };

    // Requests: four plus the garbage. Validated: the three that passed (one
    // is below the fund's minimum). Withdrawn: the same three. Deposited:
    // two (the closed fund's deposit was declined and reversed).
    let topics = kit.topics();
    for (topic, expected) in
        [(topics.requested(), 5), (topics.validated(), 3), (topics.withdrawn(), 3), (topics.deposited(), 2)]
    {
        let report = bridge(&["replay", "--topic", &topic, "--idle-ms", "1500"])?.remove(0);
        ensure!(report["new"] == 0, "replay of {topic} applied something: {report}");
        let read = report["read"].as_u64().unwrap_or(0);
        let repeats = report["duplicates"].as_u64().unwrap_or(0) + report["dead_lettered"].as_u64().unwrap_or(0);
        // At-least-once publishing may have added copies, never fewer.
        ensure!(read >= expected && read == repeats, "{topic}: expected {expected} messages, {report}");
    }
    ensure!(kit.effect_counts().await? == before, "replay changed effects");
    let status = bridge(&["replay", "--topic", &topics.status()]);
    ensure!(status.is_err(), "the status topic has no stage to replay into");

    // Dead letters: one, the garbage.
    let dead_letter_topic = Topics::dead_letter(&requested);
    let listed = bridge(&["dlq", "list", "--idle-ms", "1500"])?;
    let entry = listed.iter().find(|entry| entry["topic"] == dead_letter_topic.as_str()).context("dlq topic listed")?;
    ensure!(entry["records"] == 1 && entry["by_error_class"]["bad_magic"] == 1, "{entry}");
    let shown = bridge(&["dlq", "show", "--topic", &dead_letter_topic, "--idle-ms", "1500"])?;
    ensure!(shown.len() == 1 && shown[0]["key"] == "garbage" && shown[0]["original_topic"] == requested.as_str());

    // Redrive goes through the normal path: the garbage is still garbage and
    // is dead-lettered again, from its new position.
    let pipeline = kit.spawn_all();
    let redriven = bridge(&["dlq", "redrive", "--topic", &dead_letter_topic, "--idle-ms", "1500"])?.remove(0);
    ensure!(redriven["redriven"] == 1, "{redriven}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // A second dead-letter record (the first is the original garbage's).
        let (_, _, written, _) = kit.effect_counts().await?;
        if written == 2 {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "redriven record not dead-lettered again ({written})");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And its row published.
    kit.wait_outbox_drained(Duration::from_secs(60)).await?;
    pipeline.stop().await?;
    kit.assert_books_balance().await
}

/// The demo against the simulator running as a separate process with a few
/// percent of every failure injected: every transfer settles (terminal or
/// manual review) and both sets of books check out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_against_the_simulator_as_a_separate_process() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    // Port 0: the simulator picks a free port and logs it.
    let mut simulator = Command::new(BRIDGE)
        .args(["sim", "--listen", "127.0.0.1:0", "--faults", "demo", "--seed", "5"])
        .env("DATABASE_URL", &kit.database_url)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = simulator.stderr.take().context("simulator stderr")?;
    let address = tokio::task::spawn_blocking(move || -> Option<String> {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stderr).lines();
        let address = lines.by_ref().map_while(Result::ok).find_map(|line| {
            line.split_whitespace().find_map(|field| field.strip_prefix("address=").map(str::to_owned))
        });
        // Keep draining so the simulator never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        address
    })
    .await?;
    let Some(address) = address else {
        simulator.kill()?;
        anyhow::bail!("simulator did not report its address");
    };
    let started = reqwest_free_health_check(&address).await;
    if let Err(error) = started {
        simulator.kill()?;
        return Err(error);
    }
    let output = tokio::process::Command::new(BRIDGE)
        .args(["demo", "--transfers", "80", "--account-services-url", &format!("http://{address}")])
        .env("DATABASE_URL", &kit.database_url)
        .env_remove("KAFKA_BROKERS")
        .output()
        .await;
    simulator.kill()?;
    simulator.wait()?;
    let output = output?;
    ensure!(output.status.success(), "demo failed: {}", String::from_utf8_lossy(&output.stderr));
    let summary = last_json_line(&output.stdout)?;
    ensure!(summary["in_flight"] == 0 && summary["invariants_ok"] == true, "{summary}");
    let settled: i64 = ["completed", "rejected", "failed", "reversed", "manual_review"]
        .iter()
        .map(|key| summary[key].as_i64().unwrap_or(-1))
        .sum();
    ensure!(settled == 80, "{summary}");
    // The simulator's books are in the same database: reconcile compares them.
    kit.assert_books_balance().await
}

/// `bridge sim` and `bridge run` as separate processes, wired to each other
/// by their command lines: the simulator accepts every withdrawal and
/// deposit as pending and announces each settlement by a signed callback to
/// the API that `bridge run` serves. No settlement runner runs, so only the
/// callbacks can finish the transfers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_callbacks_between_separate_processes() -> Result<()> {
    let kit = TestKit::start(BrokerKind::Standalone).await?;
    kit.seed_investor("ines", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let free_port = || -> Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
    let (simulator_address, api_address) =
        (format!("127.0.0.1:{}", free_port()?), format!("127.0.0.1:{}", free_port()?));
    let secret =
        bridge_sim::Secret::from_bytes(*uuid::Uuid::new_v4().as_bytes().repeat(2).first_chunk().context("32")?);
    let scratch = std::env::temp_dir().join(format!("bridge-callbacks-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&scratch)?;
    let plan = scratch.join("plan.json");
    std::fs::write(&plan, r#"{"withdrawal": {"settle_after_ms": 300}, "deposit": {"settle_after_ms": 300}}"#)?;

    let (callbacks_key, admin_key) = {
        let mut conn = kit.pool.acquire().await?;
        let callbacks = bridge_api::auth::create_key(&mut conn, "bank", &["callbacks".to_owned()], None).await?;
        let admin = bridge_api::auth::create_key(&mut conn, "ops", &["admin".to_owned()], None).await?;
        (callbacks.full_key, admin.full_key)
    };
    let mut simulator = Command::new(BRIDGE)
        .args(["sim", "--listen", &simulator_address, "--faults", plan.to_str().context("path")?])
        .args(["--callback-url", &format!("http://{api_address}")])
        .env("DATABASE_URL", &kit.database_url)
        .env("BRIDGE_SIM_CALLBACK_SECRET", secret.expose())
        .env("BRIDGE_SIM_CALLBACK_API_KEY", &callbacks_key)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(scratch.join("sim.log"))?)
        .spawn()?;
    let env = kit_env(
        &kit,
        &[
            ("BRIDGE_ACCOUNT_SERVICES_URL", &format!("http://{simulator_address}")),
            ("BRIDGE_API_LISTEN", &api_address),
            ("BRIDGE_INVESTOR_CALLBACK_SECRETS", &secret.expose()),
            ("BRIDGE_FUND_CALLBACK_SECRETS", &secret.expose()),
        ],
    );
    let run = Command::new(BRIDGE)
        .args(["run", "--stage", "validator", "--stage", "withdrawal", "--stage", "deposit", "--stage", "completion"])
        .arg("--relay")
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(scratch.join("run.log"))?)
        .spawn()?;
    let mut ids = Vec::new();
    for amount in [1_000_00, 2_000_00, 3_000_00] {
        ids.push(kit.publish(&kit.request("ines", &fund_account, amount)).await?);
    }
    let waited = kit.wait_terminal(&ids, Duration::from_secs(120)).await;
    let metrics = reqwest::Client::new()
        .get(format!("http://{api_address}/metrics"))
        .bearer_auth(&admin_key)
        .send()
        .await
        .and_then(|r| r.error_for_status());
    let metrics = match metrics {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(error) => error.to_string(),
    };
    Command::new("kill").args(["-TERM", &run.id().to_string()]).status()?;
    let exit = tokio::task::spawn_blocking(move || run.wait_with_output()).await??;
    simulator.kill()?;
    simulator.wait()?;
    let logs = || std::fs::read_to_string(scratch.join("run.log")).unwrap_or_default();
    waited.with_context(|| format!("run log:\n{}", logs()))?;
    ensure!(exit.status.success(), "bridge run failed:\n{}", logs());
    ensure!(metrics.contains("bridge_callbacks_total{result=\"applied\"} 6"), "{metrics}");
    for id in &ids {
        ensure!(kit.transfer(*id).await?.state == bridge_domain::TransferState::Completed);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    kit.assert_books_balance().await
}

/// Waits until something answers HTTP on `address` (the simulator started).
async fn reqwest_free_health_check(address: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(address).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply).await?;
            if reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        ensure!(std::time::Instant::now() < deadline, "simulator did not start on {address}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `bridge` with `args`, `env` and `stdin`; returns its stdout, or the
/// error with its stderr.
fn bridge(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(BRIDGE)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut input = child.stdin.take().context("stdin")?;
    input.write_all(stdin.unwrap_or_default().as_bytes())?;
    drop(input);
    let output = child.wait_with_output()?;
    ensure!(output.status.success(), "bridge {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8(output.stdout)?)
}

/// The account services' token lives only encrypted in Postgres: `bridge
/// run` reads it through `credential:<name>` and a simulator that demands
/// it completes the transfer; the token appears in no log line even at
/// debug level; rotation moves it to a new master key without touching the
/// value, after which the old key can go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_encrypted_at_rest_rotated_and_never_logged() -> Result<()> {
    let kit = TestKit::start(BrokerKind::Standalone).await?;
    kit.seed_investor("cleo", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let database = kit.database_url.clone();
    let token = format!("tok_{}", uuid::Uuid::new_v4().simple());
    let k1 = bridge(&["credentials", "generate-key", "k1"], &[], None)?.trim().to_owned();
    let k2 = bridge(&["credentials", "generate-key", "k2"], &[], None)?.trim().to_owned();
    let with_keys = |keys: &str| -> Vec<(&'static str, String)> {
        vec![("DATABASE_URL", database.clone()), ("BRIDGE_MASTER_KEYS", keys.to_owned())]
    };
    let run_with = |args: &[&str], pairs: &[(&'static str, String)], stdin: Option<&str>| {
        let env: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        bridge(args, &env, stdin)
    };

    run_with(&["credentials", "set", "account_services_token"], &with_keys(&k1), Some(&format!("{token}\n")))?;
    let (key_id, wrapped, sealed): (String, Vec<u8>, Vec<u8>) =
        sqlx::query_as("SELECT key_id, wrapped_key, ciphertext FROM credentials WHERE name = 'account_services_token'")
            .fetch_one(&kit.pool)
            .await?;
    ensure!(key_id == "k1");
    let dump = [wrapped, sealed].concat();
    ensure!(!dump.windows(token.len()).any(|window| window == token.as_bytes()), "plaintext at rest");
    let listed = run_with(&["credentials", "list"], &with_keys(&k1), None)?;
    ensure!(listed.contains("account_services_token (master key k1)") && !listed.contains(&token), "{listed}");

    // A simulator that answers only with the token.
    let free_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let simulator_address = format!("127.0.0.1:{free_port}");
    let mut simulator = Command::new(BRIDGE)
        .args(["sim", "--listen", &simulator_address])
        .env("DATABASE_URL", &kit.database_url)
        .env("BRIDGE_SIM_TOKEN", &token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    reqwest_free_health_check(&simulator_address).await?;
    let logs = std::env::temp_dir().join(format!("bridge-credentials-{}.log", uuid::Uuid::new_v4()));
    let mut env = kit_env(
        &kit,
        &[
            ("BRIDGE_ACCOUNT_SERVICES_URL", &format!("http://{simulator_address}")),
            ("BRIDGE_ACCOUNT_SERVICES_TOKEN", "credential:account_services_token"),
            ("RUST_LOG", "debug,rdkafka=info,sqlx=info,hyper_util=info,h2=info,rustls=info"),
        ],
    );
    env.push(("BRIDGE_MASTER_KEYS", k1.clone()));
    let run = Command::new(BRIDGE)
        .arg("run")
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&logs)?)
        .spawn()?;
    let id = kit.publish(&kit.request("cleo", &fund_account, 1_000_00)).await?;
    let waited = kit.wait_terminal(&[id], Duration::from_secs(120)).await;
    Command::new("kill").args(["-TERM", &run.id().to_string()]).status()?;
    let exit = tokio::task::spawn_blocking(move || run.wait_with_output()).await??;
    let log = std::fs::read_to_string(&logs).unwrap_or_default();
    let _ = std::fs::remove_file(&logs);
    waited.with_context(|| format!("run log:\n{log}"))?;
    ensure!(exit.status.success());
    ensure!(
        kit.transfer(id).await?.state == bridge_domain::TransferState::Completed,
        "the token did not open the bank"
    );
    ensure!(log.lines().count() > 20 && log.contains("DEBUG"), "too little logged to prove anything");
    ensure!(!log.contains(&token), "the token reached a log line");

    // Rotation: with both keys configured, every credential moves to k2;
    // afterwards k2 alone reads it and k1 alone no longer does.
    let rotated = run_with(&["credentials", "rotate"], &with_keys(&format!("{k2},{k1}")), None)?;
    ensure!(rotated.contains("1 credentials now sealed under master key k2"), "{rotated}");
    let (key_id, after): (String, Vec<u8>) =
        sqlx::query_as("SELECT key_id, ciphertext FROM credentials WHERE name = 'account_services_token'")
            .fetch_one(&kit.pool)
            .await?;
    ensure!(key_id == "k2" && after == dump[dump.len() - after.len()..], "the value was re-encrypted or not moved");
    let mut only_k2 = with_keys(&k2);
    only_k2.push(("BRIDGE_ACCOUNT_SERVICES_URL", format!("http://{simulator_address}")));
    only_k2.push(("BRIDGE_ACCOUNT_SERVICES_TOKEN", "credential:account_services_token".to_owned()));
    run_with(&["funds-sync"], &only_k2, None).context("k2 alone must read the rotated credential")?;
    let mut only_k1 = only_k2.clone();
    only_k1[1].1 = k1.clone();
    ensure!(run_with(&["funds-sync"], &only_k1, None).is_err(), "the retired key still opens the credential");
    simulator.kill()?;
    simulator.wait()?;
    Ok(())
}

/// `bridge run` dies (abort, as kill -9) at each moment that matters: after
/// a stage polled, inside its transaction, after its commit and before the
/// offset; in the relay after claiming and after the broker acknowledged;
/// in the notifier after sending. Each time a fresh process takes over.
/// Nothing is lost, nothing applies twice, every status event is published
/// and reaches the webhook (more than once is allowed, under one id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_killed_at_every_failpoint_lose_nothing() -> Result<()> {
    use bridge_testkit::receivers::{Behaviour, HttpReceiver};

    let kit = TestKit::start(BrokerKind::Standalone).await?;
    kit.seed_investor("kai", 100_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_00).await?;
    let receiver = HttpReceiver::start(Behaviour::default()).await?;
    let master_key = bridge(&["credentials", "generate-key", "k1"], &[], None)?.trim().to_owned();
    let keyring = bridge_secrets::Keyring::parse(&master_key)?;
    {
        let reference =
            bridge_testkit::sealed_secret(&kit.pool, &keyring, &bridge_sim::Secret::from_bytes([5; 32]).expose())
                .await?;
        let mut conn = kit.pool.acquire().await?;
        bridge_store::notifications::subscribe(
            &mut conn,
            &bridge_store::notifications::NewSubscription {
                subscriber_kind: "operator".into(),
                subscriber_id: None,
                states: Vec::new(),
                channel: "webhook".into(),
                target: format!("{}/hook", receiver.url),
                secret: Some(reference),
                sealed_target: None,
            },
        )
        .await?;
    }
    let base = kit_env(
        &kit,
        &[
            ("BRIDGE_SIMULATED_SERVICES", "true"),
            ("BRIDGE_SESSION_TIMEOUT_MS", "6000"),
            ("BRIDGE_NOTIFY_LEASE_MS", "2000"),
            // The receiver listens on loopback, allowed here on purpose.
            ("BRIDGE_NOTIFY_ALLOWED_HOSTS", "127.0.0.1"),
            ("BRIDGE_NOTIFY_RETRY_BASE_MS", "200"),
        ],
    );
    let mut all = Vec::new();
    for point in [
        "validator.after_poll",
        "stage.inside_tx",
        "withdrawal.after_commit",
        "relay.after_claim",
        "relay.after_produce",
        "notifier.mid_delivery",
    ] {
        let mut env = base.clone();
        env.push(("BRIDGE_MASTER_KEYS", master_key.clone()));
        let mut armed = env.clone();
        armed.push(("BRIDGE_FAILPOINTS", point.to_owned()));
        let doomed =
            Command::new(BRIDGE).arg("run").envs(armed).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
        let mut ids = Vec::new();
        for amount in [100_00, 200_00] {
            ids.push(kit.publish(&kit.request("kai", &fund_account, amount)).await?);
        }
        let exit = tokio::task::spawn_blocking(move || doomed.wait_with_output()).await??;
        let stderr = String::from_utf8_lossy(&exit.stderr);
        ensure!(
            !exit.status.success() && stderr.contains(&format!("failpoint {point}")),
            "{point} never struck: {stderr}"
        );
        // The dead member's partitions move once its session expires.
        tokio::time::sleep(Duration::from_millis(6_500)).await;
        let successor =
            Command::new(BRIDGE).arg("run").envs(env).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        let waited = kit.wait_terminal(&ids, Duration::from_secs(120)).await;
        // Let the notifier finish what is queued before stopping.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let pending: i64 =
                sqlx::query_scalar("SELECT count(*) FROM notification_deliveries WHERE status = 'pending'")
                    .fetch_one(&kit.pool)
                    .await?;
            let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM notification_log").fetch_one(&kit.pool).await?;
            let versions: i64 =
                sqlx::query_scalar("SELECT count(*) FROM transfer_versions").fetch_one(&kit.pool).await?;
            if pending == 0 && logged == versions {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "after {point}: {pending} deliveries pending, {logged} of {versions} logged"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Command::new("kill").args(["-TERM", &successor.id().to_string()]).status()?;
        let stopped = tokio::task::spawn_blocking(move || successor.wait_with_output()).await??;
        waited.with_context(|| format!("after {point}"))?;
        ensure!(stopped.status.success(), "successor after {point} did not stop cleanly");
        kit.assert_books_balance().await.with_context(|| format!("after {point}"))?;
        all.extend(ids);
    }
    for id in &all {
        ensure!(kit.transfer(*id).await?.state == bridge_domain::TransferState::Completed);
    }
    // Every version's status event reached the webhook, at least once; a
    // repeat carries the same webhook-id, so the receiver can drop it.
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM transfer_versions").fetch_one(&kit.pool).await?;
    let ids: std::collections::HashSet<String> =
        receiver.accepted().iter().filter_map(|request| request.header("webhook-id").map(str::to_owned)).collect();
    ensure!(ids.len() as i64 == versions, "{} distinct webhook ids for {versions} versions", ids.len());
    Ok(())
}

/// A zombie: the withdrawal stage of one process stalls with a message in
/// hand for longer than its poll interval, so the group gives its
/// partitions to a second process, and then it wakes up and carries on with
/// the stale message. The step still applies once (the bank is asked under
/// the same key, and the transfer's row lock and state decide), and the
/// zombie's offset for a partition it no longer owns is not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_consumer_resuming_after_a_rebalance_applies_nothing_twice() -> Result<()> {
    let kit = TestKit::start(BrokerKind::Standalone).await?;
    kit.seed_investor("zed", 100_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_00).await?;
    let env = kit_env(&kit, &[("BRIDGE_SIMULATED_SERVICES", "true"), ("BRIDGE_SESSION_TIMEOUT_MS", "6000")]);
    let logs = std::env::temp_dir().join(format!("bridge-zombie-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&logs)?;
    let spawn = |name: &str, failpoints: &str| -> Result<std::process::Child> {
        Ok(Command::new(BRIDGE)
            .args(["run", "--kafka-option", "max.poll.interval.ms=7000"])
            .envs(env.iter().cloned())
            .env("BRIDGE_FAILPOINTS", failpoints)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(logs.join(name))?)
            .spawn()?)
    };
    let zombie = spawn("zombie.log", "withdrawal.pause_after_poll:12000")?;
    let mut ids = Vec::new();
    for amount in [100_00, 200_00, 300_00, 400_00, 500_00] {
        ids.push(kit.publish(&kit.request("zed", &fund_account, amount)).await?);
    }
    let read = |name: &str| std::fs::read_to_string(logs.join(name)).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !read("zombie.log").contains("pausing") {
        ensure!(std::time::Instant::now() < deadline, "the zombie never paused:\n{}", read("zombie.log"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let successor = spawn("successor.log", "")?;
    let waited = kit.wait_terminal(&ids, Duration::from_secs(120)).await;
    // Let the zombie wake up and finish what it held.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !read("zombie.log").contains("resuming") {
        ensure!(std::time::Instant::now() < deadline, "the zombie never resumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for process in [&zombie, &successor] {
        Command::new("kill").args(["-TERM", &process.id().to_string()]).status()?;
    }
    let zombie = tokio::task::spawn_blocking(move || zombie.wait_with_output()).await??;
    let successor = tokio::task::spawn_blocking(move || successor.wait_with_output()).await??;
    let (zombie_log, successor_log) = (read("zombie.log"), read("successor.log"));
    let _ = std::fs::remove_dir_all(&logs);
    waited.with_context(|| format!("zombie:\n{zombie_log}\nsuccessor:\n{successor_log}"))?;
    ensure!(zombie.status.success() && successor.status.success(), "a process did not stop cleanly");
    // The zombie really outlived its membership.
    ensure!(zombie_log.contains("maximum poll interval"), "the zombie kept its partitions:\n{zombie_log}");
    for id in &ids {
        ensure!(kit.transfer(*id).await?.state == bridge_domain::TransferState::Completed);
    }
    let withdrawals: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sim_operations WHERE operation = 'withdrawal' AND outcome = 'settled'",
    )
    .fetch_one(&kit.pool)
    .await?;
    ensure!(withdrawals == 5, "{withdrawals} withdrawals at the bank");
    kit.assert_books_balance().await
}

/// `BRIDGE_LOG_FORMAT=json`: every line a process writes is one JSON object,
/// and the lines logged while a message is processed name its transfer and
/// the trace the upstream system started, so a log pipeline can follow one
/// transfer across processes. The same process answers probes and serves
/// its metrics on `--health-listen`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_process_logs_json_and_serves_its_metrics() -> Result<()> {
    let kit = TestKit::start(BrokerKind::Standalone).await?;
    kit.seed_investor("jo", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let health = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
    let env = kit_env(
        &kit,
        &[
            ("BRIDGE_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,bridge_pipeline=debug"),
            ("BRIDGE_HEALTH_LISTEN", health.as_str()),
        ],
    );
    let child = Command::new(BRIDGE)
        .args(["run", "--stage", "validator"])
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let id = kit.publish(&kit.request("jo", &fund_account, 1_000_00)).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !matches!(kit.transfer(id).await, Ok(t) if t.state == bridge_domain::TransferState::Validated) {
        ensure!(std::time::Instant::now() < deadline, "never validated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = reqwest::Client::new();
    ensure!(client.get(format!("http://{health}/readyz")).send().await?.status().is_success());
    // Lag comes from librdkafka's statistics, every 5 s: once they have
    // come, the partition that held the message shows nothing left to do.
    let lag_prefix =
        format!(r#"bridge_consumer_lag{{consumer="validator",topic="{}",partition="#, kit.topics().requested());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let metrics = client.get(format!("http://{health}/metrics")).send().await?.text().await?;
        if metrics.lines().any(|line| line.starts_with(&lag_prefix)) {
            break metrics;
        }
        ensure!(std::time::Instant::now() < deadline, "no consumer lag in:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let lags: Vec<&str> = metrics.lines().filter(|line| line.starts_with(&lag_prefix)).collect();
    ensure!(lags.iter().all(|line| line.ends_with(" 0")), "lag left after the only message was processed: {lags:?}");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    let output = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    ensure!(output.status.success());
    for expected in [
        r#"bridge_messages_total{consumer="validator",outcome="applied"} 1"#,
        r#"bridge_message_duration_seconds_count{consumer="validator"} 1"#,
    ] {
        ensure!(metrics.contains(expected), "{expected} not in:\n{metrics}");
    }
    let request = kit.read_topic(&kit.topics().requested()).await?;
    let traceparent = request[0].header("traceparent").context("the request carries a traceparent")?;
    let trace_id = traceparent.split('-').nth(1).context("traceparent has a trace id")?;

    let text = String::from_utf8(output.stderr)?;
    let mut about_the_message = 0;
    for line in text.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("a log line is not JSON: {line}"))?;
        ensure!(value["level"].is_string() && value["timestamp"].is_string(), "{line}");
        if value["message"] == "Message processed" {
            ensure!(value["span"]["transfer_id"] == id.to_string().as_str(), "{line}");
            ensure!(value["span"]["trace_id"] == trace_id, "{line}");
            ensure!(value["span"]["stage"] == "validator", "{line}");
            about_the_message += 1;
        }
    }
    ensure!(about_the_message == 1, "{about_the_message} lines about the message in:\n{text}");
    Ok(())
}

/// Settings come from flags, then environment variables, then the
/// `--config` file, then defaults; `bridge config` shows each with where it
/// came from, never shows a secret, and prints a file that reads back to the
/// same settings. A key no command knows is refused, and a real command
/// takes its settings from the file.
#[tokio::test]
async fn configuration_layers_file_environment_and_flags_and_redacts_secrets() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("bridge-config-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("bridge.toml");
    std::fs::write(
        &file,
        r#"
database-url = "postgres://bridge:file-password@db.example:5432/bridge"
topic_partitions = 12
session-timeout-ms = 7000
stage = ["validator", "deposit"]
account-services-token = "token-from-file"
simulated-services = true
"#,
    )?;
    let config = |args: &[&str], env: &[(&str, &str)]| -> Result<(bool, String, String)> {
        let output = Command::new(BRIDGE).arg("config").args(args).env_clear().envs(env.iter().copied()).output()?;
        Ok((
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    };
    let file_arg = file.to_string_lossy().into_owned();
    let (ok, shown, stderr) =
        config(&["--config", &file_arg, "--session-timeout-ms", "8000"], &[("BRIDGE_TOPIC_PARTITIONS", "3")])?;
    ensure!(ok, "bridge config failed: {stderr}");
    let line = |name: &str| -> Result<String> {
        shown
            .lines()
            .find(|line| line.trim_start_matches("# ").starts_with(&format!("{name} ")))
            .map(str::to_owned)
            .with_context(|| format!("no line for {name} in:\n{shown}"))
    };
    ensure!(!shown.contains("file-password") && !shown.contains("token-from-file"), "a secret leaked:\n{shown}");
    let database = line("database-url")?;
    ensure!(database.contains("bridge:<redacted>@db.example:5432/bridge") && database.contains("# file"), "{database}");
    ensure!(line("topic-partitions")?.starts_with("topic-partitions = 3 "), "environment beats the file");
    ensure!(line("topic-partitions")?.contains("environment; variable BRIDGE_TOPIC_PARTITIONS"), "{shown}");
    ensure!(line("session-timeout-ms")?.starts_with("session-timeout-ms = 8000 "), "the flag beats the file");
    ensure!(line("session-timeout-ms")?.contains("command line"), "{shown}");
    ensure!(line("stage")?.starts_with(r#"stage = ["validator", "deposit"]"#), "{}", line("stage")?);
    ensure!(line("account-services-token")?.contains("<redacted>"), "{}", line("account-services-token")?);
    ensure!(line("simulated-services")?.starts_with("simulated-services = true"), "{shown}");
    ensure!(
        line("fetch-wait-max-ms")?.starts_with("fetch-wait-max-ms = 20 ") && shown.contains("# default"),
        "{shown}"
    );
    ensure!(line("fetch-min-bytes")?.starts_with("fetch-min-bytes = 1 "), "{shown}");

    // What it printed is a configuration file that reads back the same
    // (the redacted lines are comments, so the secrets fall back to unset).
    let printed = dir.join("printed.toml");
    std::fs::write(&printed, &shown)?;
    let (ok, again, stderr) = config(&["--config", &printed.to_string_lossy()], &[])?;
    ensure!(ok, "the printed configuration does not read back: {stderr}");
    for name in [
        "topic-partitions",
        "session-timeout-ms",
        "stage",
        "simulated-services",
        "fetch-wait-max-ms",
        "fetch-min-bytes",
    ] {
        let value = |text: &str| {
            text.lines()
                .find(|line| line.starts_with(&format!("{name} ")))
                .and_then(|line| line.split(" # ").next())
                .map(|value| value.trim().to_owned())
        };
        ensure!(value(&shown) == value(&again), "{name}: {:?} then {:?}", value(&shown), value(&again));
    }

    // A typo is an error, not a silent default.
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "topic-partition = 3\n")?;
    let (ok, _, stderr) = config(&["--config", &typo.to_string_lossy()], &[])?;
    ensure!(!ok && stderr.contains("unknown setting \"topic-partition\""), "{stderr}");

    // A real command reads its database from the file.
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    let real = dir.join("real.toml");
    std::fs::write(&real, format!("database-url = {:?}\n", kit.database_url))?;
    let output = Command::new(BRIDGE).args(["migrate", "--config", &real.to_string_lossy()]).env_clear().output()?;
    ensure!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("migrated"),
        "migrate with a configuration file: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // A setting a command requires may come from the file too.
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        format!("database-url = {:?}\nname = \"from-file\"\nscopes = [\"admin\"]\n", kit.database_url),
    )?;
    let output =
        Command::new(BRIDGE).args(["keys", "create", "--config", &keys.to_string_lossy()]).env_clear().output()?;
    ensure!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).starts_with("brk_"),
        "keys create with its required settings in the file: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // In the file's database: the database setting belongs to `keys`, not
    // to `keys create`, and must still be taken from the file.
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE name = 'from-file'").fetch_one(&kit.pool).await?;
    ensure!(stored == 1, "{stored} keys named from-file in the file's database");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// With an OTLP endpoint configured, one trace holds a transfer's journey:
/// each stage's span is the child of the span that wrote the event it
/// consumed (the validator's of the request's own traceparent), and the
/// notifier's spans for the status events belong to the same trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_follow_a_transfer_through_every_stage_over_otlp() -> Result<()> {
    use bridge_testkit::receivers::{Behaviour, HttpReceiver};
    let kit = TestKit::start(BrokerKind::Standalone).await?;
    kit.seed_investor("otto", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let collector = HttpReceiver::start(Behaviour::default()).await?;
    let env = kit_env(
        &kit,
        &[
            ("BRIDGE_SIMULATED_SERVICES", "true"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_SERVICE_NAME", "bridge-under-test"),
        ],
    );
    let log_path = std::env::temp_dir().join(format!("bridge-traces-{}.log", uuid::Uuid::new_v4()));
    let child = Command::new(BRIDGE)
        .arg("run")
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let id = kit.publish(&kit.request("otto", &fund_account, 1_000_00)).await?;
    let mut waited = kit.wait_terminal(&[id], Duration::from_secs(90)).await;
    // The notifier reads the last status event a moment after it is written:
    // wait until it has logged all five.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while waited.is_ok() {
        let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM notification_log WHERE transfer_id = $1")
            .bind(id)
            .fetch_one(&kit.pool)
            .await?;
        if logged == 5 {
            break;
        }
        if std::time::Instant::now() > deadline {
            waited = Err(anyhow::anyhow!("the notifier logged {logged} of 5 status events"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    let exit = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    waited.with_context(|| format!("the transfer did not finish; log:\n{log}"))?;
    ensure!(exit.status.success(), "bridge run failed: {log}");

    let request = kit.read_topic(&kit.topics().requested()).await?;
    let traceparent = request[0].header("traceparent").context("the request carries a traceparent")?.to_owned();
    let parts: Vec<&str> = traceparent.split('-').collect();
    let (trace_id, request_span) = (parts[1], parts[2]);

    // Every exported span, from every export request (OTLP/HTTP JSON).
    struct Span {
        trace_id: String,
        span_id: String,
        parent: String,
        stage: String,
        transfer: String,
    }
    // An OTLP attribute list's string value under `key`.
    fn attribute<'a>(attributes: &'a serde_json::Value, key: &str) -> Option<&'a str> {
        attributes
            .as_array()
            .into_iter()
            .flatten()
            .find(|attribute| attribute["key"] == key)
            .and_then(|attribute| attribute["value"]["stringValue"].as_str())
    }
    let mut spans = Vec::new();
    let requests = collector.received();
    ensure!(!requests.is_empty(), "nothing was exported; log:\n{log}");
    for export in &requests {
        ensure!(export.path == "/v1/traces", "exported to {}", export.path);
        let body: serde_json::Value = serde_json::from_slice(&export.body)?;
        for resource in body["resourceSpans"].as_array().into_iter().flatten() {
            let service = attribute(&resource["resource"]["attributes"], "service.name");
            ensure!(service == Some("bridge-under-test"), "service name {service:?}");
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten().filter(|span| span["name"] == "message") {
                    // OpenTelemetry's messaging conventions: a consumer span
                    // (OTLP kind 5) processing a Kafka message.
                    let kafka = attribute(&span["attributes"], "messaging.system") == Some("kafka");
                    ensure!(span["kind"] == 5 && kafka, "not a Kafka consumer span: {span}");
                    let group = attribute(&span["attributes"], "messaging.consumer.group.name").unwrap_or_default();
                    ensure!(group.contains("bridge-"), "no consumer group: {span}");
                    spans.push(Span {
                        trace_id: span["traceId"].as_str().unwrap_or_default().to_owned(),
                        span_id: span["spanId"].as_str().unwrap_or_default().to_owned(),
                        parent: span["parentSpanId"].as_str().unwrap_or_default().to_owned(),
                        stage: attribute(&span["attributes"], "stage").unwrap_or_default().to_owned(),
                        transfer: attribute(&span["attributes"], "transfer_id").unwrap_or_default().to_owned(),
                    });
                }
            }
        }
    }
    // The relay's producer spans (OTLP kind 4), one per event it sent for
    // the transfer, in the transfer's trace.
    let mut sends = Vec::new();
    for export in &requests {
        let body: serde_json::Value = serde_json::from_slice(&export.body)?;
        for resource in body["resourceSpans"].as_array().into_iter().flatten() {
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    if span["name"] == "send"
                        && attribute(&span["attributes"], "transfer_id") == Some(id.to_string().as_str())
                    {
                        sends.push(span.clone());
                    }
                }
            }
        }
    }
    ensure!(!sends.is_empty(), "the relay exported no producer spans");
    for send in &sends {
        ensure!(send["kind"] == 4 && send["traceId"] == trace_id, "not a producer span of the trace: {send}");
    }
    let ours: Vec<&Span> = spans.iter().filter(|span| span.transfer == id.to_string()).collect();
    ensure!(ours.iter().all(|span| span.trace_id == trace_id), "a span of the transfer left its trace");
    let stage = |name: &str| -> Result<&Span> {
        let found: Vec<&&Span> = ours.iter().filter(|span| span.stage == name).collect();
        ensure!(found.len() == 1, "{} {name} spans", found.len());
        Ok(found[0])
    };
    let validator = stage("validator")?;
    ensure!(validator.parent == request_span, "the validator's span is not the request's child");
    let withdrawal = stage("withdrawal")?;
    ensure!(withdrawal.parent == validator.span_id, "withdrawal is not under the validator");
    let deposit = stage("deposit")?;
    ensure!(deposit.parent == withdrawal.span_id, "deposit is not under the withdrawal");
    let completion = stage("completion")?;
    ensure!(completion.parent == deposit.span_id, "completion is not under the deposit");
    // The notifier heard the five status events, each under the span that
    // wrote it.
    let writers: Vec<&str> = [validator, withdrawal, deposit, completion].iter().map(|s| s.span_id.as_str()).collect();
    let notified: Vec<&&Span> = ours.iter().filter(|span| span.stage == "notifier").collect();
    ensure!(notified.len() == 5, "{} notifier spans", notified.len());
    ensure!(
        notified.iter().all(|span| writers.contains(&span.parent.as_str())),
        "a notifier span has a foreign parent"
    );
    Ok(())
}

/// An upstream system as an operator sets it up: `bridge sources add`
/// registers it and prints its secret once, `bridge submit --source` signs
/// with it, and a `bridge run --require-signed-requests` process completes
/// its request, rejects an unsigned one, and refuses the source once
/// `bridge sources revoke` has revoked it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_source_signs_with_bridge_submit_until_it_is_revoked() -> Result<()> {
    let kit = TestKit::start(BrokerKind::Standalone).await?;
    kit.seed_investor("lena", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let master_keys = bridge(&["credentials", "generate-key", "k1"], &[], None)?.trim().to_owned();
    let mut env = kit_env(&kit, &[("BRIDGE_SIMULATED_SERVICES", "true"), ("BRIDGE_REQUIRE_SIGNED_REQUESTS", "true")]);
    env.push(("BRIDGE_MASTER_KEYS", master_keys));
    let env: Vec<(&str, &str)> = env.iter().map(|(name, value)| (*name, value.as_str())).collect();
    let secret = bridge(&["sources", "add", "crm", "--investors", "lena", "--funds", "fund"], &env, None)?;
    let secret = secret.trim().to_owned();
    ensure!(secret.starts_with("whsec_"), "{secret}");
    let listed = bridge(&["sources", "list"], &env, None)?;
    ensure!(listed.contains("\"crm\"") && !listed.contains(&secret), "{listed}");

    let mut run = Command::new(BRIDGE)
        .arg("run")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let submit = |signed: bool| -> Result<uuid::Uuid> {
        let mut args =
            vec!["submit", "--investor", "lena", "--fund-account", fund_account.as_str(), "--amount-minor", "1000000"];
        if signed {
            args.extend(["--source", "crm", "--source-secret", secret.as_str()]);
        }
        Ok(bridge(&args, &env, None)?.trim().parse()?)
    };
    let signed = submit(true)?;
    let unsigned = submit(false)?;
    kit.wait_terminal(&[signed, unsigned], Duration::from_secs(120)).await?;
    bridge(&["sources", "revoke", "crm"], &env, None)?;
    // A revocation reaches the running validator within its refresh.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let revoked = submit(true)?;
    kit.wait_terminal(&[revoked], Duration::from_secs(120)).await?;
    run.kill()?;
    run.wait()?;
    let states = kit.state_counts(&[signed, unsigned, revoked]).await?;
    ensure!(kit.transfer(signed).await?.state == bridge_domain::TransferState::Completed, "{states:?}");
    ensure!(kit.transfer(unsigned).await?.reason_code.as_deref() == Some("REQUEST_UNSIGNED"), "{states:?}");
    ensure!(kit.transfer(revoked).await?.reason_code.as_deref() == Some("SOURCE_NOT_ALLOWED"), "{states:?}");
    Ok(())
}

/// What an operator changes at the command line is in the audit log, with
/// who (BRIDGE_OPERATOR), what, the target and the outcome, failures
/// included; the log cannot be edited or emptied, even by Bridge's own
/// database user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_are_audited_and_the_audit_log_is_append_only() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    let env = [("DATABASE_URL", kit.database_url.as_str()), ("BRIDGE_OPERATOR", "alice")];
    let created = bridge(&["keys", "create", "--name", "ops-dashboard", "--scopes", "admin"], &env, None)?;
    let prefix = created.trim().split('_').nth(1).context("prefix")?.to_owned();
    bridge(&["keys", "revoke", &prefix], &env, None)?;
    ensure!(bridge(&["keys", "revoke", "00000000"], &env, None).is_err(), "revoking a missing key succeeded");
    bridge(&["keys", "list"], &env, None)?;

    let listed = bridge(&["audit", "--json"], &env, None)?;
    let records: Vec<serde_json::Value> =
        listed.lines().map(serde_json::from_str).collect::<Result<_, _>>().context("audit --json")?;
    let summary: Vec<(String, String, String)> = records
        .iter()
        .map(|record| {
            let field = |name: &str| record[name].as_str().unwrap_or_default().to_owned();
            (field("action"), field("target"), field("outcome"))
        })
        .collect();
    ensure!(summary.len() == 3, "reads are not audited, changes are: {summary:?}");
    ensure!(summary[2] == ("keys create".to_owned(), String::new(), "ok".to_owned()), "{summary:?}");
    ensure!(summary[1] == ("keys revoke".to_owned(), prefix.clone(), "ok".to_owned()), "{summary:?}");
    ensure!(summary[0].0 == "keys revoke" && summary[0].2.starts_with("error: No active key"), "{summary:?}");
    ensure!(records.iter().all(|record| record["actor"] == "alice (cli)" && record["source"] == "cli"), "{listed}");
    ensure!(!listed.contains(created.trim()), "the new key's secret reached the audit log");

    for tampering in ["UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log", "TRUNCATE audit_log"] {
        let refused = sqlx::query(tampering).execute(&kit.pool).await;
        ensure!(
            refused.as_ref().is_err_and(|error| error.to_string().contains("append-only")),
            "{tampering}: {refused:?}"
        );
    }
    Ok(())
}

/// `bridge investors attributes`: residence and accreditation set from the
/// command line, what was not given kept, a code that is not a country
/// refused, each change in the account's history under the operator's name
/// and in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn investors_attributes_are_set_from_the_command_line_and_kept_in_history() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("ivo", 1_000_00).await?;
    let env = [("DATABASE_URL", kit.database_url.as_str()), ("BRIDGE_OPERATOR", "alice")];
    let shown = bridge(&["investors", "show", "ivo"], &env, None)?;
    ensure!(shown.trim() == "ivo: residence none, accredited false, version 1", "{shown}");
    let set = bridge(&["investors", "attributes", "ivo", "--residence", "DE"], &env, None)?;
    ensure!(set.trim() == "ivo: residence DE, accredited false, version 2", "{set}");
    let set = bridge(&["investors", "attributes", "ivo", "--accredited", "true"], &env, None)?;
    ensure!(set.trim() == "ivo: residence DE, accredited true, version 3", "{set}");
    let same = bridge(&["investors", "attributes", "ivo", "--residence", "DE"], &env, None)?;
    ensure!(same.trim() == "ivo: residence DE, accredited true, version 3", "no change, no new version: {same}");
    ensure!(bridge(&["investors", "attributes", "ivo", "--residence", "XX"], &env, None).is_err(), "XX accepted");
    ensure!(bridge(&["investors", "attributes", "nobody", "--residence", "DE"], &env, None).is_err());
    let actors: Vec<String> = sqlx::query_scalar(
        "SELECT actor FROM model_history WHERE model = 'investor_accounts' AND key = 'ivo' AND version > 1 ORDER BY id",
    )
    .fetch_all(&kit.pool)
    .await?;
    ensure!(actors == ["cli:alice", "cli:alice"], "{actors:?}");
    let audited: Vec<(String, String)> =
        sqlx::query_as("SELECT target, outcome FROM audit_log WHERE action = 'investors attributes' ORDER BY id")
            .fetch_all(&kit.pool)
            .await?;
    ensure!(audited.len() == 5 && audited[0] == ("ivo".to_owned(), "ok".to_owned()), "{audited:?}");
    ensure!(audited[3].1.starts_with("error:") && audited[4].1.starts_with("error:"), "{audited:?}");
    Ok(())
}

/// `bridge credentials investor`: an investor's bank access stored from
/// standard input, shown only as metadata, resealed by key rotation like
/// every credential, and revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_investors_bank_access_is_set_shown_rotated_and_revoked_from_the_command_line() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("ivo", 1_000_00).await?;
    let old = bridge(&["credentials", "generate-key", "k1"], &[], None)?.trim().to_owned();
    let new = bridge(&["credentials", "generate-key", "k2"], &[], None)?.trim().to_owned();
    let both = format!("{new},{old}");
    let env = [("DATABASE_URL", kit.database_url.as_str()), ("BRIDGE_OPERATOR", "alice"), ("BRIDGE_MASTER_KEYS", &old)];
    let token = "obtok_ivo_5e1f9a";
    let set = bridge(
        &["credentials", "investor", "set", "ivo", "--consent-id", "c-ivo", "--scopes", "payments,balances"],
        &env,
        Some(token),
    )?;
    ensure!(!set.contains(token), "the token was printed: {set}");
    let shown: serde_json::Value =
        serde_json::from_str(&bridge(&["credentials", "investor", "show-metadata", "ivo"], &env, None)?)?;
    ensure!(
        shown["consent_id"] == "c-ivo" && shown["set_by"] == "cli:alice" && shown["revoked_at"].is_null(),
        "{shown}"
    );
    ensure!(shown["scopes"] == serde_json::json!(["payments", "balances"]), "{shown}");
    ensure!(bridge(&["credentials", "investor", "set", "nobody", "--consent-id", "c"], &env, Some(token)).is_err());

    let rotated = [("DATABASE_URL", kit.database_url.as_str()), ("BRIDGE_MASTER_KEYS", both.as_str())];
    bridge(&["credentials", "rotate"], &rotated, None)?;
    let key_id: String = sqlx::query_scalar("SELECT key_id FROM credentials WHERE name = 'investor-bank-access/ivo'")
        .fetch_one(&kit.pool)
        .await?;
    ensure!(key_id == "k2", "not resealed: {key_id}");
    let keyring = bridge_secrets::Keyring::parse(&new)?;
    let mut conn = kit.pool.acquire().await?;
    let opened = bridge_secrets::get(&mut conn, &keyring, "investor-bank-access/ivo").await?;
    ensure!(bridge_secrets::ExposeSecret::expose_secret(&opened) == token, "the resealed token differs");

    let revoked: serde_json::Value =
        serde_json::from_str(&bridge(&["credentials", "investor", "revoke", "ivo"], &env, None)?)?;
    ensure!(!revoked["revoked_at"].is_null(), "{revoked}");
    ensure!(bridge_store::credentials::get(&mut conn, "investor-bank-access/ivo").await?.is_none(), "token kept");
    let audited: Vec<String> =
        sqlx::query_scalar("SELECT action FROM audit_log WHERE action LIKE 'credentials investor%' ORDER BY id")
            .fetch_all(&kit.pool)
            .await?;
    ensure!(
        audited == ["credentials investor set", "credentials investor set", "credentials investor revoke"],
        "{audited:?}"
    );
    Ok(())
}
