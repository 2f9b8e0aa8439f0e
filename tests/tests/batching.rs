//! The validator and the completion stage apply a partition's queued
//! messages in one set-based transaction; a batch holding a repeat, garbage,
//! or a transfer in the wrong state falls back to one message at a time,
//! and nothing applies twice or is lost.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use bridge_pipeline::runner::Part;
use bridge_pipeline::{StageName, Topics};
use bridge_testkit::{BrokerKind, TestKit};
use uuid::Uuid;

const SETTLE: Duration = Duration::from_secs(120);

async fn wait_all_deposited(kit: &TestKit, ids: &[Uuid]) -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let deposited: i64 =
            sqlx::query_scalar("SELECT count(*) FROM transfers WHERE id = ANY($1) AND state = 'deposited'")
                .bind(ids)
                .fetch_one(&kit.pool)
                .await?;
        if deposited == ids.len() as i64 {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{deposited} of {} deposited", ids.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn batch_metric(consumer: &str, suffix: &str) -> u64 {
    let prefix = format!(r#"bridge_batch_size_{suffix}{{consumer="{consumer}"}} "#);
    bridge_pipeline::metrics::render()
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_completions_apply_in_batches_and_bad_batches_fall_back() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    for investor in 0..8 {
        kit.seed_investor(&format!("inv-{investor}"), 1_000_000_00).await?;
    }
    let funds = [
        kit.seed_fund("a", 100_00, 100, 100_000_000_00).await?,
        kit.seed_fund("b", 100_00, 100, 100_000_000_00).await?,
    ];
    // Everything but completion, so deposited events queue up.
    let upstream = kit.spawn(&[
        Part::Stage(StageName::Validator),
        Part::Stage(StageName::Withdrawal),
        Part::Stage(StageName::Deposit),
        Part::Relay,
    ]);
    let mut ids = Vec::new();
    for index in 0..60 {
        let request = kit.request(&format!("inv-{}", index % 8), &funds[index % 2], 1_000_00 + index as i64);
        ids.push(kit.publish(&request).await?);
    }
    wait_all_deposited(&kit, &ids).await?;
    kit.wait_outbox_drained(SETTLE).await?;
    // A repeat of a deposited event and a message that does not decode, in
    // the backlog: their batches must fall back, not fail or double-apply.
    let deposited_topic = kit.topics().deposited();
    let backlog = kit.read_topic(&deposited_topic).await?;
    ensure!(backlog.len() == 60, "{} deposited events", backlog.len());
    let repeat = &backlog[7];
    kit.publish_raw(
        &deposited_topic,
        repeat.key.as_deref(),
        repeat.payload.as_deref().unwrap_or_default(),
        &repeat.headers,
    )
    .await?;
    kit.publish_raw(&deposited_topic, Some(b"garbage"), b"not avro", &[]).await?;

    let completion = kit.spawn(&[Part::Stage(StageName::Completion), Part::Relay]);
    kit.wait_terminal(&ids, SETTLE).await?;
    let dead = {
        let deadline = Instant::now() + SETTLE;
        loop {
            let dead = kit.read_topic(&Topics::dead_letter(&deposited_topic)).await?;
            if !dead.is_empty() || Instant::now() > deadline {
                break dead;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    kit.wait_outbox_drained(SETTLE).await?;
    completion.stop().await?;
    upstream.stop().await?;

    let completed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM transfers WHERE id = ANY($1) AND state = 'completed'")
            .bind(&ids)
            .fetch_one(&kit.pool)
            .await?;
    ensure!(completed == 60, "{completed} of 60 completed");
    // Exactly five versions each (requested … completed): the repeat
    // applied nothing.
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM transfer_versions WHERE transfer_id = ANY($1)")
        .bind(&ids)
        .fetch_one(&kit.pool)
        .await?;
    ensure!(versions == 300, "{versions} versions for 60 transfers");
    ensure!(
        dead.len() == 1 && dead[0].payload.as_deref() == Some(b"not avro".as_slice()),
        "{} dead letters",
        dead.len()
    );
    // Batches did happen, and carried more than one message each on average.
    let (batches, messages) = (batch_metric("completion", "count"), batch_metric("completion", "sum"));
    eprintln!("completion: {messages} messages applied in {batches} batches");
    ensure!(batches >= 1 && messages > batches, "{batches} batches with {messages} messages");
    ensure!(messages <= 60, "{messages} messages applied in batches, more than there were transfers");
    // The status topic has each completion once.
    let status = kit.read_topic(&kit.topics().status()).await?;
    let completions = status
        .iter()
        .filter_map(|message| {
            bridge_codec::decode::<bridge_codec::TransferStatusChanged>(message.payload.as_deref()?).ok()
        })
        .filter(|event| event.state == "completed")
        .map(|event| event.event_id)
        .collect::<std::collections::HashSet<_>>();
    ensure!(completions.len() == 60, "{} distinct completed events", completions.len());
    kit.assert_books_balance().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_requests_validate_in_batches_as_one_at_a_time_would() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    for investor in 0..6 {
        kit.seed_investor(&format!("inv-{investor}"), 1_000_000_00).await?;
    }
    kit.seed_investor("tight", 1_500_00).await?;
    let open = kit.seed_fund("open", 100_00, 100, 100_000_000_00).await?;
    let small = kit.seed_fund("small", 100_00, 2, 100_000_000_00).await?;
    let capped = kit.seed_fund("capped", 100_00, 100, 2_500_00).await?;

    // The whole backlog is published before the validator starts, so its
    // lanes find it queued. Each group below decides differently depending
    // on what the requests before it took, whichever order they come in.
    let mut ordinary = Vec::new();
    for index in 0..30 {
        let request = kit.request(&format!("inv-{}", index % 6), &open, 1_000_00 + index as i64);
        ordinary.push(kit.publish(&request).await?);
    }
    let repeated = kit.request("inv-5", &open, 777_00);
    ordinary.push(kit.publish(&repeated).await?);
    // One balance for two requests.
    let mut tight = Vec::new();
    for _ in 0..2 {
        tight.push(kit.publish(&kit.request("tight", &open, 1_000_00)).await?);
    }
    // Two seats for three investors.
    let mut seats = Vec::new();
    for investor in 0..3 {
        seats.push(kit.publish(&kit.request(&format!("inv-{investor}"), &small, 200_00)).await?);
    }
    // Room for two of three.
    let mut capacity = Vec::new();
    for _ in 0..3 {
        capacity.push(kit.publish(&kit.request("inv-3", &capped, 1_000_00)).await?);
    }
    // A repeat and a message that does not decode, in the backlog.
    kit.publish(&repeated).await?;
    let requested_topic = kit.topics().requested();
    kit.publish_raw(&requested_topic, Some(b"garbage"), b"not avro", &[]).await?;

    let pipeline = kit.spawn(&[
        Part::Stage(StageName::Validator),
        Part::Stage(StageName::Withdrawal),
        Part::Stage(StageName::Deposit),
        Part::Stage(StageName::Completion),
        Part::Relay,
    ]);
    let all: Vec<Uuid> = [&ordinary, &tight, &seats, &capacity].into_iter().flatten().copied().collect();
    kit.wait_terminal(&all, SETTLE).await?;
    let dead = {
        let deadline = Instant::now() + SETTLE;
        loop {
            let dead = kit.read_topic(&Topics::dead_letter(&requested_topic)).await?;
            if !dead.is_empty() || Instant::now() > deadline {
                break dead;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    kit.wait_outbox_drained(SETTLE).await?;
    pipeline.stop().await?;

    let expect = |pairs: &[(&str, i64)]| pairs.iter().map(|(state, count)| ((*state).to_owned(), *count)).collect();
    let ordinary_states = kit.state_counts(&ordinary).await?;
    ensure!(ordinary_states == expect(&[("completed", 31)]), "{ordinary_states:?}");
    let tight_states = kit.state_counts(&tight).await?;
    ensure!(tight_states == expect(&[("completed", 1), ("rejected:INSUFFICIENT_FUNDS", 1)]), "{tight_states:?}");
    let seat_states = kit.state_counts(&seats).await?;
    ensure!(seat_states == expect(&[("completed", 2), ("rejected:FUND_FULL", 1)]), "{seat_states:?}");
    let capacity_states = kit.state_counts(&capacity).await?;
    ensure!(
        capacity_states == expect(&[("completed", 2), ("rejected:FUND_CAPACITY_EXCEEDED", 1)]),
        "{capacity_states:?}"
    );
    // Five versions for each completed transfer, two for each rejected one:
    // the repeat applied nothing.
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM transfer_versions WHERE transfer_id = ANY($1)")
        .bind(&all)
        .fetch_one(&kit.pool)
        .await?;
    ensure!(versions == 36 * 5 + 3 * 2, "{versions} versions");
    ensure!(
        dead.len() == 1 && dead[0].payload.as_deref() == Some(b"not avro".as_slice()),
        "{} dead letters",
        dead.len()
    );
    let (batches, messages) = (batch_metric("validator", "count"), batch_metric("validator", "sum"));
    eprintln!("validator: {messages} messages applied in {batches} batches");
    ensure!(batches >= 1 && messages > batches, "{batches} batches with {messages} messages");
    ensure!(messages <= all.len() as u64, "{messages} messages applied in batches, more than there were requests");
    // Each transfer's first status event once, with its decision after it.
    let status = kit.read_topic(&kit.topics().status()).await?;
    let mut seen = std::collections::HashMap::<String, Vec<i64>>::new();
    for event in status.iter().filter_map(|message| {
        bridge_codec::decode::<bridge_codec::TransferStatusChanged>(message.payload.as_deref()?).ok()
    }) {
        seen.entry(event.transfer_id.clone()).or_default().push(event.version);
    }
    for id in &all {
        let versions = seen.get(&id.to_string()).cloned().unwrap_or_default();
        ensure!(versions.starts_with(&[1, 2]), "transfer {id}: status versions {versions:?}");
    }
    kit.assert_books_balance().await
}
