//! Every stage applies a partition's queued messages in one set-based
//! transaction (the money stages after asking their service about them
//! concurrently); a batch holding a repeat, garbage, a transfer in the wrong
//! state or a step its service did not settle falls back to one message at
//! a time, and nothing applies twice or is lost.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bridge_pipeline::runner::Part;
use bridge_pipeline::{StageName, Topics};
use bridge_testkit::{BrokerKind, TestKit};
use uuid::Uuid;

const SETTLE: Duration = Duration::from_secs(120);

fn counts(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
    pairs.iter().map(|(state, count)| ((*state).to_owned(), *count)).collect()
}

/// Waits until the transfers' states are `expected` and the outbox is
/// drained, so every event they announce is on its topic.
async fn wait_states(kit: &TestKit, ids: &[Uuid], expected: &BTreeMap<String, i64>) -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let states = kit.state_counts(ids).await?;
        if &states == expected {
            return kit.wait_outbox_drained(SETTLE).await;
        }
        ensure!(Instant::now() < deadline, "states {states:?}, waiting for {expected:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the first dead letter of `topic` and returns them all.
async fn wait_dead_letters(kit: &TestKit, topic: &str) -> Result<Vec<bridge_pipeline::message::Inbound>> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let dead = kit.read_topic(&Topics::dead_letter(topic)).await?;
        if !dead.is_empty() || Instant::now() > deadline {
            return Ok(dead);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Publishes a copy of the `index`th message of `topic` and a message that
/// does not decode after it.
async fn publish_repeat_and_garbage(kit: &TestKit, topic: &str, index: usize) -> Result<()> {
    let backlog = kit.read_topic(topic).await?;
    let repeat = backlog.get(index).ok_or_else(|| anyhow::anyhow!("{} messages on {topic}", backlog.len()))?;
    kit.publish_raw(topic, repeat.key.as_deref(), repeat.payload.as_deref().unwrap_or_default(), &repeat.headers)
        .await?;
    kit.publish_raw(topic, Some(b"garbage"), b"not avro", &[]).await
}

/// Distinct status events in each state.
async fn status_events_by_state(kit: &TestKit) -> Result<BTreeMap<String, usize>> {
    let status = kit.read_topic(&kit.topics().status()).await?;
    let mut ids = std::collections::HashSet::new();
    let mut by_state = BTreeMap::new();
    for event in status.iter().filter_map(|message| {
        bridge_codec::decode::<bridge_codec::TransferStatusChanged>(message.payload.as_deref()?).ok()
    }) {
        if ids.insert(event.event_id) {
            *by_state.entry(event.state).or_default() += 1;
        }
    }
    Ok(by_state)
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
async fn queued_completions_apply_in_batches_past_held_fund_rows_and_bad_batches_fall_back() -> Result<()> {
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
    wait_states(&kit, &ids, &counts(&[("deposited", 60)])).await?;
    // A repeat of a deposited event and a message that does not decode, in
    // the backlog: their batches must fall back, not fail or double-apply.
    let deposited_topic = kit.topics().deposited();
    ensure!(kit.read_topic(&deposited_topic).await?.len() == 60, "deposited events missing");
    publish_repeat_and_garbage(&kit, &deposited_topic, 7).await?;

    // A completion changes neither a fund's allocated total nor its seats,
    // so it must not wait for the fund's row: with both funds' rows locked
    // throughout, as a validation into them holds them until it commits,
    // every transfer still completes.
    let mut validation = kit.pool.begin().await?;
    sqlx::query("SELECT 1 FROM funds WHERE id IN ('a', 'b') FOR UPDATE").execute(&mut *validation).await?;
    let completion = kit.spawn(&[Part::Stage(StageName::Completion), Part::Relay]);
    kit.wait_terminal(&ids, SETTLE).await.context("completions while the funds' rows are held")?;
    validation.rollback().await?;
    let dead = wait_dead_letters(&kit, &deposited_topic).await?;
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
    let completions = status_events_by_state(&kit).await?.get("completed").copied();
    ensure!(completions == Some(60), "{completions:?} distinct completed events");
    kit.assert_books_balance().await
}

/// At a paced load a lane finds one message queued. Such lone messages
/// share their stage's next transaction while one is in flight, instead of
/// each running a transaction of its own beside it: with a completion held
/// in flight (its allocation locked), completions arriving one by one wait,
/// then go together.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lone_messages_wait_for_their_stages_transaction_in_flight_and_then_share_one() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    for investor in 0..9 {
        kit.seed_investor(&format!("inv-{investor}"), 1_000_000_00).await?;
    }
    let fund = kit.seed_fund("fund", 100_00, 100, 100_000_000_00).await?;
    let upstream = kit.spawn(&[
        Part::Stage(StageName::Validator),
        Part::Stage(StageName::Withdrawal),
        Part::Stage(StageName::Deposit),
        Part::Relay,
    ]);
    let held = kit.publish(&kit.request("inv-0", &fund, 1_000_00)).await?;
    wait_states(&kit, &[held], &counts(&[("deposited", 1)])).await?;
    let mut lock = kit.pool.begin().await?;
    sqlx::query("SELECT 1 FROM allocations WHERE investor_account_id = 'inv-0' FOR UPDATE").execute(&mut *lock).await?;
    let completion = kit.spawn(&[Part::Stage(StageName::Completion)]);
    // Its transaction reaches the lock and waits there, in flight.
    let deadline = Instant::now() + SETTLE;
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&kit.pool)
        .await?;
        if waiting > 0 {
            break;
        }
        ensure!(Instant::now() < deadline, "the held completion never reached the lock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // One at a time, so each reaches its completion lane alone.
    let mut lone = Vec::new();
    for investor in 1..9 {
        let id = kit.publish(&kit.request(&format!("inv-{investor}"), &fund, 1_000_00)).await?;
        lone.push(id);
        let deadline = Instant::now() + SETTLE;
        loop {
            let states = kit.state_counts(&[id]).await?;
            if states.contains_key("deposited") || states.contains_key("completed") {
                break;
            }
            ensure!(Instant::now() < deadline, "transfer {id}: {states:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        kit.wait_outbox_drained(SETTLE).await?;
    }
    // The completion consumer fetches within milliseconds; none of them
    // may complete beside the transaction in flight.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let states = kit.state_counts(&lone).await?;
    ensure!(states == counts(&[("deposited", 8)]), "while a completion was in flight: {states:?}");

    lock.rollback().await?;
    let mut all = lone.clone();
    all.push(held);
    kit.wait_terminal(&all, SETTLE).await?;
    completion.stop().await?;
    upstream.stop().await?;
    // The completions of the partitions other than the held one's waited
    // together; the next transaction took them all (the last update of a
    // transfer's row is its completion).
    let shared: i64 = sqlx::query_scalar(
        "SELECT max(n) FROM (SELECT count(*) AS n FROM transfers WHERE id = ANY($1) GROUP BY xmin::text) t",
    )
    .bind(&lone)
    .fetch_one(&kit.pool)
    .await?;
    ensure!(shared >= 2, "the lone completions went in transactions of at most {shared}");
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
    let dead = wait_dead_letters(&kit, &requested_topic).await?;
    kit.wait_outbox_drained(SETTLE).await?;
    pipeline.stop().await?;

    let ordinary_states = kit.state_counts(&ordinary).await?;
    ensure!(ordinary_states == counts(&[("completed", 31)]), "{ordinary_states:?}");
    let tight_states = kit.state_counts(&tight).await?;
    ensure!(tight_states == counts(&[("completed", 1), ("rejected:INSUFFICIENT_FUNDS", 1)]), "{tight_states:?}");
    let seat_states = kit.state_counts(&seats).await?;
    ensure!(seat_states == counts(&[("completed", 2), ("rejected:FUND_FULL", 1)]), "{seat_states:?}");
    let capacity_states = kit.state_counts(&capacity).await?;
    ensure!(
        capacity_states == counts(&[("completed", 2), ("rejected:FUND_CAPACITY_EXCEEDED", 1)]),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_money_steps_apply_in_batches_and_unsettled_ones_go_one_by_one() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    for investor in 0..8 {
        kit.seed_investor(&format!("inv-{investor}"), 1_000_000_00).await?;
    }
    kit.seed_investor("frozen", 1_000_000_00).await?;
    let open = kit.seed_fund("open", 100_00, 100, 100_000_000_00).await?;
    let closed = kit.seed_fund("closed", 100_00, 100, 100_000_000_00).await?;
    // The investor's bank declines withdrawals from "frozen"; the fund's
    // administrator declines deposits into "closed", so those are refunded.
    kit.set_simulated_account_status("frozen", "frozen").await?;
    kit.set_simulated_account_status(&closed, "closed").await?;

    // Validate everything first, so each money stage finds its input queued.
    let validator = kit.spawn(&[Part::Stage(StageName::Validator), Part::Relay]);
    let mut ordinary = Vec::new();
    for index in 0..120 {
        let request = kit.request(&format!("inv-{}", index % 8), &open, 1_000_00 + index as i64);
        ordinary.push(kit.publish(&request).await?);
    }
    let mut declined = Vec::new();
    for _ in 0..2 {
        declined.push(kit.publish(&kit.request("frozen", &open, 500_00)).await?);
    }
    let mut refunded = Vec::new();
    for investor in 0..2 {
        refunded.push(kit.publish(&kit.request(&format!("inv-{investor}"), &closed, 700_00)).await?);
    }
    let all: Vec<Uuid> = [&ordinary, &declined, &refunded].into_iter().flatten().copied().collect();
    wait_states(&kit, &all, &counts(&[("validated", 124)])).await?;
    let validated_topic = kit.topics().validated();
    publish_repeat_and_garbage(&kit, &validated_topic, 3).await?;

    let withdrawal = kit.spawn(&[Part::Stage(StageName::Withdrawal)]);
    wait_states(&kit, &all, &counts(&[("withdrawn", 122), ("failed:ACCOUNT_FROZEN", 2)])).await?;
    let withdrawn_topic = kit.topics().withdrawn();
    publish_repeat_and_garbage(&kit, &withdrawn_topic, 5).await?;

    let rest = kit.spawn(&[Part::Stage(StageName::Deposit), Part::Stage(StageName::Completion)]);
    wait_states(
        &kit,
        &all,
        &counts(&[("completed", 120), ("failed:ACCOUNT_FROZEN", 2), ("reversed:ACCOUNT_CLOSED", 2)]),
    )
    .await?;
    let dead_validated = wait_dead_letters(&kit, &validated_topic).await?;
    let dead_withdrawn = wait_dead_letters(&kit, &withdrawn_topic).await?;
    kit.wait_outbox_drained(SETTLE).await?;
    rest.stop().await?;
    withdrawal.stop().await?;
    validator.stop().await?;

    for dead in [&dead_validated, &dead_withdrawn] {
        ensure!(
            dead.len() == 1 && dead[0].payload.as_deref() == Some(b"not avro".as_slice()),
            "{} dead letters",
            dead.len()
        );
    }
    // Versions: five for a completed transfer; requested, validated, failed
    // for a declined withdrawal; requested … withdrawn, reversed for a
    // refunded deposit. The repeats applied nothing.
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM transfer_versions WHERE transfer_id = ANY($1)")
        .bind(&all)
        .fetch_one(&kit.pool)
        .await?;
    ensure!(versions == 120 * 5 + 2 * 3 + 2 * 4, "{versions} versions");
    // The services were asked for exactly the steps there were: a batch
    // asks only about transfers waiting for its step, and a step asked
    // again (after a batch fell back) is the same operation under its key.
    let operations: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT operation, outcome, count(*) FROM sim_operations GROUP BY 1, 2 ORDER BY 1, 2")
            .fetch_all(&kit.pool)
            .await?;
    let expected_operations = [
        ("deposit", "declined", 2),
        ("deposit", "settled", 120),
        ("refund", "settled", 2),
        ("withdrawal", "declined", 2),
        ("withdrawal", "settled", 122),
    ];
    ensure!(
        operations
            .iter()
            .map(|(operation, outcome, count)| (operation.as_str(), outcome.as_str(), *count))
            .eq(expected_operations),
        "{operations:?}"
    );
    // The batch path ran: a lane's first message goes alone and the rest of
    // its backlog queues behind it, and a decline, a repeat or garbage in a
    // batch no longer keeps the batch's other steps from applying in it.
    for stage in ["withdrawal", "deposit"] {
        let (batches, messages) = (batch_metric(stage, "count"), batch_metric(stage, "sum"));
        eprintln!("{stage}: {messages} messages applied in {batches} batches");
        ensure!(
            batches > 0 && messages > batches && messages <= 122,
            "{stage}: {messages} messages applied in {batches} batches"
        );
    }
    // Each outcome announced once on the status topic.
    let by_state = status_events_by_state(&kit).await?;
    let announced = |state: &str| by_state.get(state).copied().unwrap_or_default();
    ensure!(
        (announced("withdrawn"), announced("deposited"), announced("completed")) == (122, 120, 120)
            && (announced("failed"), announced("reversed")) == (2, 2),
        "{by_state:?}"
    );
    let withdrawn_events = kit.read_topic(&withdrawn_topic).await?.len();
    ensure!(withdrawn_events == 122 + 2, "{withdrawn_events} messages on the withdrawn topic (122 and the two added)");
    kit.assert_books_balance().await
}

/// A transfer as a request records it, for the store-level tests below.
fn requested_transfer(index: usize) -> bridge_store::transfers::Transfer {
    bridge_store::transfers::Transfer {
        id: Uuid::new_v4(),
        investor_account_id: format!("investor-{index}"),
        fund_account_id: "fund-account".to_owned(),
        fund_id: None,
        amount_minor: 100,
        currency: "EUR".to_owned(),
        reference: String::new(),
        source_system: String::new(),
        requested_at: chrono::Utc::now(),
        state: bridge_domain::TransferState::Requested,
        reason_code: None,
        version: 1,
        traceparent: None,
        step_attempt: 0,
    }
}

/// A step's statements over a batch's arrays are prepared once per
/// connection, and the step's transaction has Postgres plan each once, a
/// generic plan kept for every later execution. A process
/// that started on a nearly empty `transfers` table and has advanced a few
/// batches must still find a later batch's rows through the primary key
/// once the table has grown: a plan kept from its first executions, made
/// for a table of two rows, would be a hash join over a sequential scan
/// that reads the whole table for every batch.
#[tokio::test]
async fn a_batch_statement_keeps_one_plan_made_on_a_small_table_which_reads_the_grown_table_by_key() -> Result<()> {
    use bridge_domain::TransferEvent;
    use bridge_store::transfers;
    use sqlx::Row;

    let (url, pool) = bridge_testkit::scratch_database(&bridge_testkit::database_server()).await?;
    bridge_store::migrate(&pool).await?;
    // One connection, so every execution below uses its prepared statements.
    let pool =
        bridge_store::connect(&url, &bridge_store::PoolSettings { connections_max: 1, acquire_timeout_ms: 30_000 })
            .await?;
    let mut requested = Vec::new();
    for index in 0..2 {
        let transfer = requested_transfer(index);
        let mut conn = pool.acquire().await?;
        requested.push(transfers::insert_requested(&mut conn, &transfer).await?);
    }
    // More executions than Postgres plans afresh before it weighs keeping
    // a generic plan (five), each rolled back so the table stays small.
    for _ in 0..8 {
        let mut tx = bridge_store::begin_step_transaction(&pool).await?;
        let next = transfers::next_versions(&requested, &TransferEvent::Validated)?;
        let postings = bridge_store::ledger::Postings::default();
        let writes = transfers::StepWrites { settles: None, postings: &postings, outbox: &[] };
        transfers::advance_step(&mut tx, &requested, &next, &[None, None], writes).await?;
        tx.rollback().await?;
    }
    let mut tx = bridge_store::begin_step_transaction(&pool).await?;
    sqlx::query(
        "INSERT INTO transfers (id, investor_account_id, fund_account_id, amount_minor, currency, requested_at,
                                state, version)
         SELECT gen_random_uuid(), 'investor-' || n, 'fund-account', 100, 'EUR', now(), 'requested', 1
         FROM generate_series(1, 20000) AS n",
    )
    .execute(&mut *tx)
    .await?;
    let (name, generic, custom): (String, i64, i64) = sqlx::query_as(
        "SELECT name, generic_plans, custom_plans FROM pg_prepared_statements
         WHERE statement LIKE '%UPDATE transfers t SET state = input.state%'
           AND statement NOT LIKE '%pg_prepared_statements%'",
    )
    .fetch_one(&mut *tx)
    .await?;
    // Planned once, for all eight: left to choose, Postgres plans the first
    // five afresh, and keeps doing so for short arrays.
    ensure!(custom == 0 && generic == 8, "the advance was planned afresh {custom} times, generically {generic}");
    let [first, second] = [requested[0].id, requested[1].id];
    let explain = format!(
        "EXPLAIN EXECUTE {name}('{{{first},{second}}}', '{{1,1}}', '{{requested,requested}}', \
         '{{validated,validated}}', '{{NULL,NULL}}', '{{{first},{second}}}', '{{false,false}}', \
         '{{NULL,NULL}}', '{{NULL,NULL}}', '{{NULL,NULL}}', NULL{})",
        // No postings, no outbox row: fourteen empty arrays.
        ", '{}'".repeat(14)
    );
    let plan: Vec<String> = sqlx::raw_sql(&explain)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|row| row.try_get::<String, _>(0))
        .collect::<Result<_, _>>()?;
    let plan = plan.join("\n");
    ensure!(
        plan.contains("Index Scan using transfers_pkey on transfers") && !plan.contains("Seq Scan on transfers"),
        "the advance of two transfers in a table of 20,002 is planned as\n{plan}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_two_consumers_hold_at_once_is_recorded_once_and_the_second_finds_it_applied() -> Result<()> {
    use bridge_store::transfers;

    let (_, pool) = bridge_testkit::scratch_database(&bridge_testkit::database_server()).await?;
    bridge_store::migrate(&pool).await?;
    let mut ids = Vec::new();
    for index in 0..2 {
        let transfer = requested_transfer(index);
        transfers::insert_requested(&mut *pool.acquire().await?, &transfer).await?;
        ids.push(transfer.id);
    }
    ids.sort();
    let events: Vec<String> = ids.iter().map(|id| format!("event-{id}")).collect();

    // The first consumer's batch holds both transfers and records both
    // messages; the second was given the second message alone, as a lone
    // message after a partition moved.
    let mut first = bridge_store::begin_step_transaction(&pool).await?;
    let (locked, recorded) = transfers::lock_for_messages(&mut first, &ids, "withdrawal", &events).await?;
    ensure!(locked.len() == 2 && recorded == 2, "the first consumer locked {locked:?} and recorded {recorded}");
    let second = {
        let (pool, id, event) = (pool.clone(), ids[1], events[1].clone());
        tokio::spawn(async move {
            let mut tx = bridge_store::begin_step_transaction(&pool).await?;
            let answer = transfers::lock_for_messages(&mut tx, &[id], "withdrawal", &[event]).await?;
            tx.rollback().await?;
            anyhow::Ok(answer)
        })
    };
    // The second waits for the first: its transfers are locked, its inbox
    // row uncommitted.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
        )
        .fetch_one(&pool)
        .await?;
        if waiting > 0 {
            break;
        }
        ensure!(!second.is_finished() && Instant::now() < deadline, "the second consumer never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(!second.is_finished(), "the second consumer went past a transfer the first holds");
    first.commit().await?;
    let (locked, recorded) = second.await??;
    ensure!(
        locked.len() == 1 && recorded == 0,
        "after the first committed the second locked {locked:?} and recorded {recorded}"
    );
    Ok(())
}
