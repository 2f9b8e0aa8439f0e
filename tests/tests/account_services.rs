//! The pipeline against the account-service simulator served over real HTTP,
//! with the failures of the real world injected. After each scenario the
//! simulator's books and ours must agree to the minor unit (the reconcile
//! check compares them) and every transfer must be terminal or in manual
//! review. These scenarios are about the HTTP edge, so they run on the
//! in-process broker only.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use uuid::Uuid;

use bridge_domain::TransferState;
use bridge_pipeline::runner::Part;
use bridge_sim::{FaultPlan, OperationFaults};
use bridge_testkit::{BrokerKind, TestKit};

const SETTLE: Duration = Duration::from_secs(120);

async fn settled_operations(kit: &TestKit) -> Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT operation, count(*) FROM sim_operations WHERE outcome = 'settled' GROUP BY operation ORDER BY operation",
    )
    .fetch_all(&kit.pool)
    .await?)
}

/// Transient failures on more than half of all calls: rate limits, server
/// errors, hangs past the client's timeout and lost replies. Every transfer
/// still completes, and each step moved money exactly once at the services.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failures_and_lost_replies_move_money_once() -> Result<()> {
    let kit = TestKit::start_with(BrokerKind::InProcess, |config| config.retry_backoff_max_ms = 200).await?;
    for investor in 0..4 {
        kit.seed_investor(&format!("inv-{investor}"), 100_000_00).await?;
    }
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_00).await?;
    let faults = OperationFaults {
        rate_limited_bp: 1_500,
        server_error_bp: 1_500,
        timeout_bp: 500,
        unknown_outcome_bp: 2_000,
        ..OperationFaults::default()
    };
    let plan =
        FaultPlan { seed: 11, withdrawal: faults, refund: faults, deposit: faults, hang_ms: 400, ..FaultPlan::none() };
    let simulator = kit.start_simulator(plan).await?;
    let pipeline = kit.spawn_with_services(&Part::all(), kit.http_services(&simulator.url, 250)?);

    let mut ids = Vec::new();
    for index in 0..16 {
        ids.push(kit.publish(&kit.request(&format!("inv-{}", index % 4), &fund_account, 1_000_00 + index)).await?);
    }
    kit.wait_terminal(&ids, SETTLE).await?;
    pipeline.stop().await?;
    simulator.stop().await?;

    let states = kit.state_counts(&ids).await?;
    ensure!(states.get("completed") == Some(&16), "{states:?}");
    ensure!(settled_operations(&kit).await? == [("deposit".to_owned(), 16), ("withdrawal".to_owned(), 16)]);
    // The calls' metrics: every step settled once, and the injected faults
    // show as calls that found the service unavailable.
    let metrics = bridge_pipeline::metrics::render();
    let count = |service: &str, operation: &str, outcome: &str| -> u64 {
        let prefix = format!(
            r#"bridge_external_call_duration_seconds_count{{service="{service}",operation="{operation}",outcome="{outcome}"}} "#
        );
        metrics.lines().find_map(|line| line.strip_prefix(&prefix)).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    ensure!(count("investor", "withdrawals", "settled") == 16, "{metrics}");
    ensure!(count("fund", "remittances", "settled") == 16, "{metrics}");
    let unavailable = count("investor", "withdrawals", "unavailable") + count("fund", "remittances", "unavailable");
    ensure!(unavailable > 0, "faults were injected but no call counts as unavailable:\n{metrics}");
    kit.assert_books_balance().await
}

/// The simulator with its books in memory, as load runs serve it: the same
/// failures and settlements later, every transfer completes, and the
/// services list, page by page, exactly the operations our ledger records.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn books_in_memory_honour_keys_and_list_every_operation_in_pages() -> Result<()> {
    let kit = TestKit::start_with(BrokerKind::InProcess, |config| config.retry_backoff_max_ms = 200).await?;
    for investor in 0..4 {
        kit.seed_investor(&format!("inv-{investor}"), 100_000_00).await?;
    }
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_00).await?;
    let faults = OperationFaults {
        rate_limited_bp: 1_000,
        server_error_bp: 1_000,
        unknown_outcome_bp: 2_000,
        settle_after_ms: 200,
        pending_bp: 3_000,
        ..OperationFaults::default()
    };
    let plan = FaultPlan { seed: 5, withdrawal: faults, refund: faults, deposit: faults, ..FaultPlan::none() };
    let simulator = kit.start_simulator_in_memory(plan).await?;
    let pipeline = kit.spawn_with_services(&Part::all(), kit.http_services(&simulator.url, 1_000)?);
    let mut ids = Vec::new();
    for index in 0..16 {
        ids.push(kit.publish(&kit.request(&format!("inv-{}", index % 4), &fund_account, 1_000_00 + index)).await?);
    }
    kit.wait_terminal(&ids, SETTLE).await?;
    pipeline.stop().await?;
    let states = kit.state_counts(&ids).await?;
    ensure!(states.get("completed") == Some(&16), "{states:?}");
    ensure!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sim_operations").fetch_one(&kit.pool).await? == 0,
        "books in memory wrote to the database"
    );

    let client = reqwest::Client::new();
    let mut listed = Vec::new();
    for service in ["investor", "fund"] {
        let mut after = String::new();
        loop {
            let page: serde_json::Value = client
                .get(format!("{}/{service}/v1/operations", simulator.url))
                .query(&[("after", after.as_str()), ("limit", "5")])
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let operations = page["operations"].as_array().context("a page of operations")?.clone();
            ensure!(operations.len() <= 5, "a page larger than asked for: {}", operations.len());
            let Some(last) = operations.last() else { break };
            after = last["idempotency_key"].as_str().context("a key")?.to_owned();
            listed.extend(operations.into_iter().map(|operation| (service, operation)));
        }
    }
    simulator.stop().await?;
    ensure!(listed.len() == 32, "two operations per transfer, each listed once: {}", listed.len());
    for (service, operation) in &listed {
        let kind = operation["operation"].as_str().context("an operation")?;
        ensure!((*service == "fund") == (kind == "deposit"), "{service} listed a {kind}");
        ensure!(operation["status"] == "settled", "{operation}");
        let key = operation["idempotency_key"].as_str().context("a key")?;
        let transfer_id = bridge_domain::ids::parse_idempotency_key(key).map(|(id, _)| id);
        // The reconcile check compares the services' books with the ledger.
        sqlx::query(
            "INSERT INTO sim_operations
                 (idempotency_key, operation, account_id, amount_minor, currency, outcome, reference, transfer_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(key)
        .bind(kind)
        .bind(operation["account_id"].as_str())
        .bind(operation["amount_minor"].as_i64())
        .bind(operation["currency"].as_str())
        .bind(operation["status"].as_str())
        .bind(operation["reference"].as_str())
        .bind(transfer_id)
        .execute(&kit.pool)
        .await?;
    }
    ensure!(settled_operations(&kit).await? == [("deposit".to_owned(), 16), ("withdrawal".to_owned(), 16)]);
    kit.assert_books_balance().await
}

/// Every reply is lost after the service acted: the adapter must find each
/// result by its idempotency key rather than act again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_reply_lost_is_resolved_by_looking_up_the_key() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("judy", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let closed = kit.seed_fund("closed", 100_00, 10, 1_000_000_00).await?;
    kit.set_simulated_account_status(&closed, "closed").await?;
    let lost = OperationFaults { unknown_outcome_bp: 10_000, ..OperationFaults::default() };
    let plan = FaultPlan { seed: 3, withdrawal: lost, refund: lost, deposit: lost, hang_ms: 0, ..FaultPlan::none() };
    let simulator = kit.start_simulator(plan).await?;
    let pipeline = kit.spawn_with_services(&Part::all(), kit.http_services(&simulator.url, 2_000)?);

    let completed = kit.publish(&kit.request("judy", &fund_account, 2_000_00)).await?;
    let reversed = kit.publish(&kit.request("judy", &closed, 500_00)).await?;
    kit.wait_terminal(&[completed, reversed], SETTLE).await?;
    pipeline.stop().await?;
    simulator.stop().await?;

    ensure!(kit.transfer(completed).await?.state == TransferState::Completed);
    ensure!(kit.transfer(reversed).await?.state == TransferState::Reversed);
    ensure!(
        settled_operations(&kit).await?
            == [("deposit".to_owned(), 1), ("refund".to_owned(), 1), ("withdrawal".to_owned(), 2)]
    );
    kit.assert_books_balance().await
}

/// Declines of every kind are permanent: withdrawals fail (hold released),
/// deposits are reversed (investor refunded), and a declined refund lands in
/// manual review.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn declines_are_compensated_or_reviewed() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    for investor in 0..6 {
        kit.seed_investor(&format!("inv-{investor}"), 1_000_000_00).await?;
    }
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_000_00).await?;
    let plan = FaultPlan {
        seed: 5,
        withdrawal: OperationFaults {
            insufficient_funds_bp: 1_500,
            account_frozen_bp: 1_000,
            limit_exceeded_bp: 1_000,
            ..OperationFaults::default()
        },
        deposit: OperationFaults { account_closed_bp: 2_500, ..OperationFaults::default() },
        refund: OperationFaults { account_closed_bp: 3_000, ..OperationFaults::default() },
        ..FaultPlan::none()
    };
    let simulator = kit.start_simulator(plan).await?;
    let pipeline = kit.spawn_with_services(&Part::all(), kit.http_services(&simulator.url, 2_000)?);
    // Fixed transfer ids: the simulator decides declines from the seed and
    // the idempotency key, so the same ids always take the same paths.
    let mut ids = Vec::new();
    for index in 0..60u128 {
        let mut request = kit.request(&format!("inv-{}", index % 6), &fund_account, 1_000_00);
        request.transfer_id = Uuid::from_u128(0x5eed_0000 + index).to_string();
        ids.push(kit.publish(&request).await?);
    }
    kit.wait_terminal(&ids, SETTLE).await?;
    pipeline.stop().await?;
    simulator.stop().await?;

    let states = kit.state_counts(&ids).await?;
    let get = |key: &str| states.get(key).copied().unwrap_or(0);
    let failed = get("failed:INSUFFICIENT_FUNDS") + get("failed:ACCOUNT_FROZEN") + get("failed:LIMIT_EXCEEDED");
    let reversed = get("reversed:ACCOUNT_CLOSED");
    let reviewed = get("manual_review:DEPOSIT_ACCOUNT_CLOSED_REFUND_ACCOUNT_CLOSED");
    ensure!(get("completed") + failed + reversed + reviewed == 60, "{states:?}");
    ensure!(failed > 0 && reversed > 0 && reviewed > 0 && get("completed") > 0, "every path taken: {states:?}");
    let report = kit.reconcile().await?;
    ensure!(report.manual_review == reviewed && report.in_flight == 0, "{report:?}");
    kit.assert_books_balance().await
}

/// The services are down when the transfer arrives and come up later: the
/// stage waits and retries with the same keys, then finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_service_delays_but_loses_nothing() -> Result<()> {
    let kit = TestKit::start_with(BrokerKind::InProcess, |config| config.retry_backoff_max_ms = 300).await?;
    kit.seed_investor("kim", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    // Bound but not answering: connections queue and every call times out.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let pipeline = kit.spawn_with_services(&Part::all(), kit.http_services(&format!("http://{address}"), 500)?);
    let id = kit.publish(&kit.request("kim", &fund_account, 700_00)).await?;

    // Validation needs no outside service; the withdrawal waits.
    let deadline = std::time::Instant::now() + SETTLE;
    while kit.transfer(id).await.map(|transfer| transfer.state).ok() != Some(TransferState::Validated) {
        ensure!(std::time::Instant::now() < deadline, "transfer never validated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(kit.transfer(id).await?.state == TransferState::Validated, "nothing moves while the bank is down");

    let simulator = kit.start_simulator_with(listener, FaultPlan::none())?;
    kit.wait_terminal(&[id], SETTLE).await?;
    pipeline.stop().await?;
    simulator.stop().await?;
    ensure!(kit.transfer(id).await?.state == TransferState::Completed);
    kit.assert_books_balance().await
}

/// The simulator behaves like a payment API towards any client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_honours_idempotency_keys_like_a_payment_api() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    let simulator = kit.start_simulator(FaultPlan::none()).await?;
    let client = reqwest::Client::new();
    let url = format!("{}/investor/v1/withdrawals", simulator.url);
    let body = serde_json::json!({"account_id": "acc-1", "amount_minor": 1500, "currency": "EUR"});
    let send = |key: Option<&str>, body: serde_json::Value| {
        let mut request = client.post(&url).json(&body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send()
    };
    let first = send(Some("key-1"), body.clone()).await?;
    ensure!(first.status() == 201);
    let first: serde_json::Value = first.json().await?;
    let again: serde_json::Value = send(Some("key-1"), body.clone()).await?.json().await?;
    ensure!(first == again, "the same key returns the same result: {first} vs {again}");
    let mut different = body.clone();
    different["amount_minor"] = 1501.into();
    ensure!(send(Some("key-1"), different).await?.status() == 409);
    ensure!(send(None, body.clone()).await?.status() == 400);
    let lookup = client.get(format!("{}/investor/v1/operations/key-1", simulator.url)).send().await?;
    ensure!(lookup.status() == 200 && lookup.json::<serde_json::Value>().await? == first);
    let missing = client.get(format!("{}/investor/v1/operations/nope", simulator.url)).send().await?;
    ensure!(missing.status() == 404);
    let debits: i64 = sqlx::query_scalar("SELECT count(*) FROM sim_operations").fetch_one(&kit.pool).await?;
    ensure!(debits == 1, "debited once");
    // The services list what they hold, each its own operations.
    let list = |service: &str| client.get(format!("{}/{service}/v1/operations?after=", simulator.url)).send();
    let investor: serde_json::Value = list("investor").await?.error_for_status()?.json().await?;
    ensure!(investor == serde_json::json!({ "operations": [first] }), "{investor}");
    let fund: serde_json::Value = list("fund").await?.error_for_status()?.json().await?;
    ensure!(fund == serde_json::json!({ "operations": [] }), "{fund}");
    simulator.stop().await
}

/// Bank transfers are accepted as pending and settle later. Pending is not a
/// result: the step waits for the final answer (settled, or declined and then
/// compensated) and moves money once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pending_operations_wait_for_their_final_outcome() -> Result<()> {
    let kit = TestKit::start_with(BrokerKind::InProcess, |config| config.retry_backoff_max_ms = 300).await?;
    kit.seed_investor("omar", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let closed = kit.seed_fund("closed", 100_00, 10, 1_000_000_00).await?;
    kit.set_simulated_account_status(&closed, "closed").await?;
    // Long enough that the checks below run well before anything settles.
    let slow = OperationFaults { settle_after_ms: 8_000, ..OperationFaults::default() };
    let plan = FaultPlan { seed: 9, withdrawal: slow, refund: slow, deposit: slow, hang_ms: 0, ..FaultPlan::none() };
    let simulator = kit.start_simulator(plan).await?;
    let pipeline = kit.spawn_with_services(&Part::all(), kit.http_services(&simulator.url, 2_000)?);

    let completed = kit.publish(&kit.request("omar", &fund_account, 3_000_00)).await?;
    let reversed = kit.publish(&kit.request("omar", &closed, 1_000_00)).await?;

    // While the bank holds the withdrawal as pending, the step is recorded
    // durably and the withdrawal stage's partitions move on: its consumer
    // group commits past the event although nothing has settled yet.
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pending_steps WHERE step = 'withdrawal' AND transfer_id = $1")
                .bind(completed)
                .fetch_one(&kit.pool)
                .await?;
        if pending == 1 {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "withdrawal never recorded as pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kit.wait_caught_up(bridge_pipeline::StageName::Withdrawal, Duration::from_secs(30)).await?;
    ensure!(kit.transfer(completed).await?.state == TransferState::Validated, "settled too early for this test");

    kit.wait_terminal(&[completed, reversed], SETTLE).await?;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_steps").fetch_one(&kit.pool).await?;
    ensure!(left == 0, "{left} pending steps left behind");
    pipeline.stop().await?;
    simulator.stop().await?;

    ensure!(kit.transfer(completed).await?.state == TransferState::Completed);
    ensure!(kit.transfer(reversed).await?.state == TransferState::Reversed);
    // Every operation went through pending, and none is pending any more.
    let (operations, were_pending, still_pending): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(settles_at), count(*) FILTER (WHERE outcome = 'pending') FROM sim_operations",
    )
    .fetch_one(&kit.pool)
    .await?;
    ensure!((operations, were_pending, still_pending) == (5, 5, 0), "{operations} {were_pending} {still_pending}");
    ensure!(
        settled_operations(&kit).await?
            == [("deposit".to_owned(), 1), ("refund".to_owned(), 1), ("withdrawal".to_owned(), 2)]
    );
    kit.assert_books_balance().await
}

/// Fund criteria, seats and capacity come from the fund administrator over
/// HTTP: new terms apply to the next request, unknown funds are reported,
/// and terms below what is already reserved are refused, not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fund_terms_come_from_the_fund_administrator() -> Result<()> {
    use bridge_store::fund_terms::FundTerms;
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("fay", 100_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    kit.seed_fund("stranger", 100_00, 10, 1_000_000_00).await?;
    let simulator = kit.start_simulator(FaultPlan::none()).await?;
    let services = kit.http_services(&simulator.url, 2_000)?;
    let pipeline = bridge_pipeline::Pipeline::new(kit.pool.clone(), kit.config.clone(), services.clone());
    let publish_terms = |minimum, seats, capacity| {
        let pool = kit.pool.clone();
        async move {
            let mut conn = pool.acquire().await?;
            let terms = FundTerms {
                currency: "EUR".to_owned(),
                minimum_investment_minor: minimum,
                seats_max: seats,
                capacity_minor: capacity,
                rules: Default::default(),
            };
            bridge_store::simulator::set_fund_terms(&mut conn, "fund", &terms).await?;
            anyhow::Ok(())
        }
    };
    ensure!(kit.currency.as_str() == "EUR", "the kit seeds EUR funds");

    publish_terms(5_000_00, 10, 1_000_000_00).await?;
    let report = bridge_pipeline::fund_terms::sync(pipeline.context()).await?;
    ensure!(report.updated == ["fund"] && report.unknown == ["stranger"], "{report:?}");
    ensure!(bridge_pipeline::fund_terms::sync(pipeline.context()).await?.updated.is_empty(), "applied twice");

    let running = kit.spawn_with_services(&Part::all(), services);
    let small = kit.publish(&kit.request("fay", &fund_account, 1_000_00)).await?;
    let large = kit.publish(&kit.request("fay", &fund_account, 6_000_00)).await?;
    kit.wait_terminal(&[small, large], SETTLE).await?;
    running.stop().await?;
    ensure!(kit.transfer(small).await?.reason_code.as_deref() == Some("BELOW_MINIMUM_INVESTMENT"));
    ensure!(kit.transfer(large).await?.state == TransferState::Completed);

    // 6,000.00 is committed: a capacity of 5,000.00 cannot be taken.
    publish_terms(5_000_00, 10, 5_000_00).await?;
    let report = bridge_pipeline::fund_terms::sync(pipeline.context()).await?;
    ensure!(report.refused.len() == 1 && report.updated.is_empty(), "{report:?}");
    let capacity: i64 =
        sqlx::query_scalar("SELECT capacity_minor FROM funds WHERE id = 'fund'").fetch_one(&kit.pool).await?;
    ensure!(capacity == 1_000_000_00);
    simulator.stop().await?;
    kit.assert_books_balance().await
}

/// Two requests under one idempotency key racing at the simulator's books:
/// the second starts while the first is stored but not yet committed, waits
/// for it, and must answer with what the first stored, not fail and not
/// store a second operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_racing_an_uncommitted_one_under_its_key_gets_the_stored_operation() -> Result<()> {
    use bridge_store::simulator::{record_once, SimOperation};
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    let operation = |reference: &str| SimOperation {
        idempotency_key: "key-race".to_owned(),
        operation: "withdrawal".to_owned(),
        account_id: "acc-1".to_owned(),
        amount_minor: 1500,
        currency: "EUR".to_owned(),
        outcome: "settled".to_owned(),
        reference: reference.to_owned(),
    };
    let mut first = kit.pool.begin().await?;
    let stored = record_once(&mut first, &operation("first"), 0).await?;
    let pool = kit.pool.clone();
    let second = tokio::spawn(async move {
        let mut conn = pool.acquire().await?;
        record_once(&mut conn, &operation("second"), 0).await
    });
    // Until the first commits, the second waits on the key.
    let waiting = async {
        loop {
            let blocked: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE '%sim_operations%'",
            )
            .fetch_one(&kit.pool)
            .await?;
            if blocked > 0 {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), waiting).await??;
    first.commit().await?;
    let answer = second.await??;
    ensure!(answer == stored, "the racing request got {answer:?}, the first stored {stored:?}");
    let stored_count: i64 = sqlx::query_scalar("SELECT count(*) FROM sim_operations").fetch_one(&kit.pool).await?;
    ensure!(stored_count == 1, "{stored_count} operations stored under one key");
    Ok(())
}

/// What a refusal says decides what happens, and nothing is dead-lettered:
/// a 401 (our credential is wrong) holds the money steps in Kafka until the
/// credential is fixed, then they go on; a 404 for an account the bank does
/// not know hands that transfer to a person with its funds held. No
/// operation reaches the bank twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_wait_for_a_fix_or_go_to_a_person_and_are_never_dead_lettered() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    for investor in 0..3 {
        kit.seed_investor(&format!("inv-{investor}"), 1_000_000_00).await?;
    }
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_000_00).await?;
    bridge_store::simulator::set_account_status(&mut *kit.pool.acquire().await?, "inv-2", "unknown").await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let bank = std::sync::Arc::new(bridge_sim::Bank::new(kit.pool.clone(), FaultPlan::none()));
    let stop_bank = tokio_util::sync::CancellationToken::new();
    let router = bridge_sim::http::router(bank, Some("the-right-token".to_owned()));
    tokio::spawn(bridge_sim::http::serve(listener, router, stop_bank.clone()));
    let services = |token: &str| {
        bridge_pipeline::http_services::HttpAccountServices::services(
            bridge_pipeline::http_services::HttpServicesConfig {
                investor_base_url: url.clone(),
                fund_base_url: url.clone(),
                token: Some(token.to_owned()),
                timeout_ms: 2_000,
            },
        )
    };

    // A rotated credential nobody updated.
    let pipeline = kit.spawn_with_services(&Part::all(), services("a-stale-token")?);
    let mut ids = Vec::new();
    for index in 0..6 {
        ids.push(kit.publish(&kit.request(&format!("inv-{}", index % 3), &fund_account, 1_000_00)).await?);
    }
    let deadline = std::time::Instant::now() + SETTLE;
    while kit.state_counts(&ids).await?.get("validated").copied().unwrap_or(0) < 6 {
        ensure!(std::time::Instant::now() < deadline, "not validated: {:?}", kit.state_counts(&ids).await?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The withdrawal stage asks again and again meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let states = kit.state_counts(&ids).await?;
    let (_, _, dead_letters, operations) = kit.effect_counts().await?;
    ensure!(states.get("validated") == Some(&6), "{states:?}");
    ensure!(dead_letters == 0 && operations == 0, "dead letters {dead_letters}, operations {operations}");
    pipeline.stop().await?;

    // The credential fixed: the steps still in Kafka go on.
    let pipeline = kit.spawn_with_services(&Part::all(), services("the-right-token")?);
    kit.wait_terminal(&ids, SETTLE).await?;
    pipeline.stop().await?;
    stop_bank.cancel();
    let states = kit.state_counts(&ids).await?;
    ensure!(states.get("completed") == Some(&4), "{states:?}");
    ensure!(states.get("manual_review:WITHDRAWAL_REFUSED") == Some(&2), "{states:?}");
    let (_, _, dead_letters, _) = kit.effect_counts().await?;
    ensure!(dead_letters == 0, "{dead_letters} dead letters");
    // Each settled step once; the unknown account's withdrawals never acted.
    ensure!(
        settled_operations(&kit).await? == [("deposit".to_owned(), 4), ("withdrawal".to_owned(), 4)],
        "{:?}",
        settled_operations(&kit).await?
    );
    let report = kit.reconcile().await?;
    ensure!(report.manual_review == 2 && report.in_flight == 0 && report.ok(), "{report:?}");
    kit.assert_books_balance().await
}

/// Serves the simulated bank on `address` (bound again after an earlier
/// server there stopped), requiring `token`.
async fn serve_bank(
    kit: &TestKit,
    address: std::net::SocketAddr,
    token: &str,
) -> Result<tokio_util::sync::CancellationToken> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let listener = loop {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => break listener,
            // The server before it may take a moment to let the port go.
            Err(_) if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(error) => return Err(error.into()),
        }
    };
    let bank = std::sync::Arc::new(bridge_sim::Bank::new(kit.pool.clone(), FaultPlan::none()));
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(bridge_sim::http::serve(
        listener,
        bridge_sim::http::router(bank, Some(token.to_owned())),
        stop.clone(),
    ));
    Ok(stop)
}

async fn readiness(url: &str) -> Result<(u16, String)> {
    let response = reqwest::get(format!("{url}/readyz")).await?;
    Ok((response.status().as_u16(), response.text().await?))
}

/// A service that answers for our credentials or configuration (a route
/// that is not there, a token it refuses) opens that service's circuit: the
/// money steps wait in Kafka, readiness says why and the metric shows it,
/// nothing is dead-lettered and nothing moves; the same running stage goes
/// on once the service accepts its calls again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_refusing_our_credentials_or_configuration_opens_its_circuit_until_fixed() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("inv", 1_000_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_000_00).await?;
    let address = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let url = format!("http://{address}");
    let mut stop_bank = serve_bank(&kit, address, "our-token").await?;
    let services = |base: &str, token: &str| {
        bridge_pipeline::http_services::HttpAccountServices::services(
            bridge_pipeline::http_services::HttpServicesConfig {
                investor_base_url: base.to_owned(),
                fund_base_url: base.to_owned(),
                token: Some(token.to_owned()),
                timeout_ms: 2_000,
            },
        )
    };
    let circuit_metric = || {
        bridge_pipeline::metrics::render()
            .lines()
            .find(|line| line.starts_with("bridge_account_service_circuit_open{service=\"investor\"}"))
            .map(str::to_owned)
    };
    let waiting_three = |ids: Vec<Uuid>| {
        let kit = &kit;
        async move {
            let deadline = std::time::Instant::now() + SETTLE;
            while kit.state_counts(&ids).await?.get("validated").copied().unwrap_or(0) < 3 {
                ensure!(std::time::Instant::now() < deadline, "not validated: {:?}", kit.state_counts(&ids).await?);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(())
        }
    };

    // A base URL with a path the service does not serve: our configuration.
    let misconfigured = services(&format!("{url}/retired"), "our-token")?;
    let pipeline = kit.spawn_with_services(&Part::all(), misconfigured.clone());
    let api = kit.start_api(misconfigured, bridge_api::ApiConfig::new()).await?;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(kit.publish(&kit.request("inv", &fund_account, 1_000_00)).await?);
    }
    waiting_three(ids.clone()).await?;
    let deadline = std::time::Instant::now() + SETTLE;
    let (status, detail) = loop {
        let (status, detail) = readiness(&api.url).await?;
        if status == 503 || std::time::Instant::now() > deadline {
            break (status, detail);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(status == 503 && detail.contains("investor") && detail.contains("no such endpoint"), "{status} {detail}");
    ensure!(circuit_metric().is_some_and(|line| line.ends_with(" 1")), "{:?}", circuit_metric());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, _, dead_letters, operations) = kit.effect_counts().await?;
    ensure!(dead_letters == 0 && operations == 0, "dead letters {dead_letters}, operations {operations}");
    ensure!(kit.state_counts(&ids).await?.get("validated") == Some(&3), "{:?}", kit.state_counts(&ids).await?);
    pipeline.stop().await?;
    api.stop().await?;

    // Deployed with the right URL, but a token the bank has stopped
    // accepting.
    let stale = services(&url, "our-old-token")?;
    let pipeline = kit.spawn_with_services(&Part::all(), stale.clone());
    let api = kit.start_api(stale, bridge_api::ApiConfig::new()).await?;
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let (status, detail) = readiness(&api.url).await?;
        if status == 503 && detail.contains("401") {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "{status} {detail}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, _, dead_letters, operations) = kit.effect_counts().await?;
    ensure!(dead_letters == 0 && operations == 0, "dead letters {dead_letters}, operations {operations}");

    // The bank accepts our token again: the running stage goes on.
    stop_bank.cancel();
    stop_bank = serve_bank(&kit, address, "our-old-token").await?;
    kit.wait_terminal(&ids, SETTLE).await?;
    let states = kit.state_counts(&ids).await?;
    ensure!(states.get("completed") == Some(&3), "{states:?}");
    let (status, detail) = readiness(&api.url).await?;
    ensure!(status == 200, "{status} {detail}");
    ensure!(circuit_metric().is_some_and(|line| line.ends_with(" 0")), "{:?}", circuit_metric());
    let (_, _, dead_letters, _) = kit.effect_counts().await?;
    ensure!(dead_letters == 0, "{dead_letters} dead letters");
    ensure!(
        settled_operations(&kit).await? == [("deposit".to_owned(), 3), ("withdrawal".to_owned(), 3)],
        "{:?}",
        settled_operations(&kit).await?
    );
    pipeline.stop().await?;
    api.stop().await?;
    stop_bank.cancel();
    kit.assert_books_balance().await
}

/// A decline whose code is configured to be asked again: the transfer
/// keeps its funds held and the bank is asked again later under a new
/// idempotency key, up to the configured attempts; it completes if the
/// bank says yes meanwhile and fails with the bank's code if it never does.
/// Nothing is dead-lettered, and each key is used once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn declines_configured_to_retry_are_asked_again_under_new_keys() -> Result<()> {
    let kit = TestKit::start_with(BrokerKind::InProcess, |config| {
        config.decline_retries = "ACCOUNT_FROZEN:3:1500".parse().expect("valid");
    })
    .await?;
    kit.seed_investor("thawing", 1_000_000_00).await?;
    kit.seed_investor("frozen", 1_000_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_000_00).await?;
    kit.set_simulated_account_status("thawing", "frozen").await?;
    kit.set_simulated_account_status("frozen", "frozen").await?;
    let pipeline = kit.spawn_all();
    let thawing = kit.publish(&kit.request("thawing", &fund_account, 1_000_00)).await?;
    let frozen = kit.publish(&kit.request("frozen", &fund_account, 1_000_00)).await?;
    // The first decline moves the keys to a new attempt; the account is
    // thawed before the next.
    let deadline = std::time::Instant::now() + SETTLE;
    while kit.transfer(thawing).await.map(|transfer| transfer.step_attempt).unwrap_or(0) < 1 {
        ensure!(std::time::Instant::now() < deadline, "no retry scheduled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(kit.transfer(thawing).await?.state == TransferState::Validated, "failed at the first decline");
    kit.set_simulated_account_status("thawing", "active").await?;
    kit.wait_terminal(&[thawing, frozen], SETTLE).await?;
    pipeline.stop().await?;

    let states = kit.state_counts(&[thawing, frozen]).await?;
    ensure!(states.get("completed") == Some(&1) && states.get("failed:ACCOUNT_FROZEN") == Some(&1), "{states:?}");
    ensure!(kit.transfer(thawing).await?.state == TransferState::Completed, "{states:?}");
    let withdrawals: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT transfer_id, idempotency_key, outcome FROM sim_operations WHERE operation = 'withdrawal'
         ORDER BY transfer_id, created_at",
    )
    .fetch_all(&kit.pool)
    .await?;
    let of = |id: Uuid| withdrawals.iter().filter(|(transfer, ..)| *transfer == id).collect::<Vec<_>>();
    // The frozen account: the first key and three more, each declined once.
    let keys: Vec<&str> = of(frozen).iter().map(|(_, key, _)| key.as_str()).collect();
    let expected: Vec<String> = (0..4)
        .map(|attempt| bridge_domain::ids::idempotency_key(frozen, bridge_domain::Step::Withdrawal, attempt))
        .collect();
    ensure!(keys == expected, "{keys:?}");
    ensure!(of(frozen).iter().all(|(_, _, outcome)| outcome == "declined"), "{withdrawals:?}");
    // The thawed one: declined, then settled under a new key.
    let outcomes: Vec<&str> = of(thawing).iter().map(|(_, _, outcome)| outcome.as_str()).collect();
    ensure!(outcomes.first() == Some(&"declined") && outcomes.last() == Some(&"settled"), "{outcomes:?}");
    ensure!(outcomes.iter().filter(|outcome| **outcome == "settled").count() == 1, "{outcomes:?}");
    let (_, _, dead_letters, _) = kit.effect_counts().await?;
    ensure!(dead_letters == 0, "{dead_letters} dead letters");
    let report = kit.reconcile().await?;
    ensure!(report.ok(), "{report:?}");
    kit.assert_books_balance().await
}

/// A money step's call carries the transfer's W3C trace context, so the
/// service's own spans join the transfer's trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_steps_send_their_trace_context_to_the_service() -> Result<()> {
    let receiver =
        bridge_testkit::receivers::HttpReceiver::start(bridge_testkit::receivers::Behaviour::default()).await?;
    let services = bridge_pipeline::http_services::HttpAccountServices::services(
        bridge_pipeline::http_services::HttpServicesConfig {
            investor_base_url: receiver.url.clone(),
            fund_base_url: receiver.url.clone(),
            token: None,
            timeout_ms: 2_000,
        },
    )?;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let movement = bridge_pipeline::services::MoneyMovement {
        idempotency_key: "bridge-trace-test".to_owned(),
        transfer_id: Uuid::new_v4(),
        account_id: "inv".to_owned(),
        amount: bridge_domain::Money::new(100, bridge_domain::Currency::parse("EUR")?),
        traceparent: Some(traceparent.to_owned()),
        bank_access: None,
    };
    // The receiver is no bank: whatever it answers, the request was made.
    let _ = services.investor.withdraw(&movement).await;
    let received = receiver.received();
    let first = received.first().context("no request reached the service")?;
    ensure!(first.header("traceparent") == Some(traceparent), "{:?}", first.headers);
    Ok(())
}
