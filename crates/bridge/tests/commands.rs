//! The `bridge` binary as an operator uses it: separate processes, real
//! Postgres, real brokers, signals.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use bridge_testkit::{BrokerKind, TestKit};

const BRIDGE: &str = env!("CARGO_BIN_EXE_bridge");

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
    let settled: i64 =
        ["completed", "rejected", "failed", "reversed"].iter().map(|key| summary[key].as_i64().unwrap_or(-1)).sum();
    ensure!(settled == 60, "{summary}");
    ensure!(summary["rejected"].as_i64() > Some(0) && summary["completed"].as_i64() > Some(0), "{summary}");
    kit.assert_books_balance().await
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
    let env = [
        ("DATABASE_URL", kit.database_url.as_str()),
        ("KAFKA_BROKERS", kit.config.brokers.as_str()),
        ("BRIDGE_TOPIC_PREFIX", kit.config.topics.prefix.as_str()),
        ("BRIDGE_GROUP_PREFIX", kit.config.group_prefix.as_str()),
        ("BRIDGE_TOPIC_PARTITIONS", "3"),
    ];
    let run = |args: &[&str]| -> Result<std::process::Output> {
        let output = Command::new(BRIDGE).args(args).envs(env).output()?;
        ensure!(output.status.success(), "bridge {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        Ok(output)
    };
    run(&["migrate", "--topics"])?;
    run(&["seed", "--namespace", "ops", "--investors", "20"])?;

    // Logs go to a file: an undrained pipe would fill and block the process.
    let log_path = std::env::temp_dir().join(format!("bridge-run-{}.log", uuid::Uuid::new_v4()));
    let log = std::fs::File::create(&log_path)?;
    let pipeline = Command::new(BRIDGE).arg("run").envs(env).stdout(Stdio::null()).stderr(log).spawn()?;
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
    ensure!(log.contains("Relay stopped") && log.contains("Stage stopped"), "no graceful stop in the log: {log}");

    let report = run(&["reconcile"])?;
    ensure!(String::from_utf8_lossy(&report.stdout).contains("in flight: 0"));
    kit.assert_books_balance().await
}
