//! Long-running steps against the simulator over real HTTP: settlement by
//! signed callback or by polling (whichever comes first, once), deadlines and
//! their policies, and reservations that expire. Each scenario ends with the
//! reconcile check, which compares our books with the simulator's.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use uuid::Uuid;

use bridge_api::ApiConfig;
use bridge_domain::TransferState;
use bridge_pipeline::runner::{Part, StageName};
use bridge_pipeline::DeadlinePolicy;
use bridge_sim::{CallbackTarget, FaultPlan, OperationFaults, Secret};
use bridge_testkit::{BrokerKind, RunningApi, RunningSimulator, TestKit};

const SETTLE: Duration = Duration::from_secs(120);
const HOUR_MS: u64 = 3_600_000;

/// Every stage and the relay, without the settlement runner: what moves a
/// pending step here can only be a callback.
fn stages_and_relay() -> Vec<Part> {
    StageName::ALL.into_iter().map(Part::Stage).chain([Part::Relay]).collect()
}

fn secret() -> Secret {
    Secret::from_bytes(*Uuid::new_v4().as_bytes().repeat(2).first_chunk::<32>().expect("32 bytes"))
}

/// The API (calling the simulator) and the simulator (calling the API back),
/// wired to each other.
async fn api_and_simulator(kit: &TestKit, plan: FaultPlan, secret: &Secret) -> Result<(RunningApi, RunningSimulator)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let simulator_url = format!("http://{}", listener.local_addr()?);
    let mut config = ApiConfig::new();
    config.callback_secrets.insert("investor".to_owned(), vec![secret.clone()]);
    config.callback_secrets.insert("fund".to_owned(), vec![secret.clone()]);
    let api = kit.start_api(kit.http_services(&simulator_url, 2_000)?, config).await?;
    let key = key(kit, "callbacks").await?;
    let target = CallbackTarget { base_url: api.url.clone(), secret: secret.clone(), api_key: Some(key) };
    let simulator = kit.start_simulator_calling_back(listener, plan, target)?;
    Ok((api, simulator))
}

/// A new API key with one scope.
async fn key(kit: &TestKit, scope: &str) -> Result<String> {
    let mut conn = kit.pool.acquire().await?;
    Ok(bridge_api::auth::create_key(&mut conn, scope, &[scope.to_owned()], None).await?.full_key)
}

/// The value of one line of the API's Prometheus text.
async fn metric(kit: &TestKit, api: &RunningApi, line_prefix: &str) -> Result<i64> {
    let admin = key(kit, "admin").await?;
    let client = reqwest::Client::new();
    let text = client.get(format!("{}/metrics", api.url)).bearer_auth(admin).send().await?.text().await?;
    let line =
        text.lines().find(|line| line.starts_with(line_prefix)).with_context(|| format!("{line_prefix} in {text}"))?;
    Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
}

async fn state_and_reason(kit: &TestKit, id: Uuid) -> Result<(TransferState, Option<String>)> {
    let transfer = kit.transfer(id).await?;
    Ok((transfer.state, transfer.reason_code))
}

async fn sim_outcome(kit: &TestKit, key: &str) -> Result<Option<(String, String)>> {
    Ok(sqlx::query_as("SELECT outcome, reference FROM sim_operations WHERE idempotency_key = $1")
        .bind(key)
        .fetch_optional(&kit.pool)
        .await?)
}

/// With no settlement runner at all, signed callbacks alone carry pending
/// withdrawals, deposits and a refund to their final states.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callbacks_settle_pending_steps_without_polling() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("ines", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let closed = kit.seed_fund("closed", 100_00, 10, 1_000_000_00).await?;
    kit.set_simulated_account_status(&closed, "closed").await?;
    let slow = OperationFaults { settle_after_ms: 500, ..OperationFaults::default() };
    let plan = FaultPlan { withdrawal: slow, deposit: slow, refund: slow, ..FaultPlan::none() };
    let secret = secret();
    let (api, simulator) = api_and_simulator(&kit, plan, &secret).await?;
    let pipeline = kit.spawn_with_services(&stages_and_relay(), kit.http_services(&simulator.url, 2_000)?);

    let completed = kit.publish(&kit.request("ines", &fund_account, 3_000_00)).await?;
    let reversed = kit.publish(&kit.request("ines", &closed, 1_000_00)).await?;
    kit.wait_terminal(&[completed, reversed], SETTLE).await?;
    ensure!(kit.transfer(completed).await?.state == TransferState::Completed);
    ensure!(kit.transfer(reversed).await?.state == TransferState::Reversed);
    // Two withdrawals, a deposit, a declined deposit and its refund: five
    // operations, each pending first, each announced by a callback. The
    // declined deposit's callback starts the refund, which is pending in
    // turn; the refund's own callback then reverses the transfer.
    ensure!(metric(&kit, &api, "bridge_callbacks_total{result=\"applied\"}").await? == 4);
    ensure!(metric(&kit, &api, "bridge_callbacks_total{result=\"still_pending\"}").await? == 1);
    ensure!(metric(&kit, &api, "bridge_pending_steps ").await? == 0);
    // The history names who moved the money: the callback of each service,
    // with the message id it came under.
    let actors: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT state, actor, external_reference FROM transfer_versions
         WHERE transfer_id = $1 AND state IN ('withdrawn', 'deposited') ORDER BY version",
    )
    .bind(completed)
    .fetch_all(&kit.pool)
    .await?;
    ensure!(actors.len() == 2, "{actors:?}");
    for ((_, actor, reference), service) in actors.iter().zip(["investor", "fund"]) {
        ensure!(
            actor.as_deref() == Some(&format!("settlement callback from the {service} service")) && reference.is_some(),
            "{actors:?}"
        );
    }
    pipeline.stop().await?;
    simulator.stop().await?;
    api.stop().await?;
    kit.assert_books_balance().await
}

/// A money stage asks its service about a step once. A step that a batch
/// (or a lone message) found pending is taken one at a time with that
/// answer and recorded as pending, not asked about again under its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_the_service_holds_as_pending_is_asked_about_once() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_00).await?;
    let held = OperationFaults { settle_after_ms: HOUR_MS, ..OperationFaults::default() };
    let simulator = kit.start_simulator(FaultPlan { withdrawal: held, ..FaultPlan::none() }).await?;
    let pipeline = kit.spawn_with_services(&stages_and_relay(), kit.http_services(&simulator.url, 2_000)?);
    let pending = || async {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_steps WHERE step = 'withdrawal'")
            .fetch_one(&kit.pool)
            .await?;
        anyhow::Ok(count as usize)
    };
    let wait_pending = |expected: usize| async move {
        let deadline = Instant::now() + SETTLE;
        while pending().await? < expected {
            ensure!(Instant::now() < deadline, "only {} of {expected} withdrawals pending", pending().await?);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(())
    };
    // Eight one at a time, each a lane's lone message; then a burst of
    // sixteen, which the lanes take in batches.
    let mut ids = Vec::new();
    for investor in 0..24 {
        let investor = format!("inv-{investor}");
        kit.seed_investor(&investor, 1_000_00).await?;
        ids.push(kit.publish(&kit.request(&investor, &fund_account, 500_00)).await?);
        if ids.len() <= 8 {
            wait_pending(ids.len()).await?;
        }
    }
    wait_pending(ids.len()).await?;
    pipeline.stop().await?;
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT idempotency_key FROM sim_operations WHERE operation = 'withdrawal' ORDER BY idempotency_key",
    )
    .fetch_all(&kit.pool)
    .await?;
    ensure!(keys.len() == ids.len(), "{} withdrawals at the bank for {} transfers", keys.len(), ids.len());
    let asked: Vec<(String, u64)> = keys.iter().map(|key| (key.clone(), simulator.bank.requests(key))).collect();
    ensure!(asked.iter().all(|(_, requests)| *requests == 1), "requests per withdrawal: {asked:?}");
    simulator.stop().await
}

/// Each settlement is announced three times at once (as providers that
/// deliver at least once do) while the settlement runner polls the same
/// steps. Every step is applied once; every other arrival finds it applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callbacks_and_polling_racing_settle_each_step_once() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_00).await?;
    // Settling about when the runner first asks again (0.25-0.5 s after the
    // step went pending) puts polls and callbacks on top of each other.
    let slow = OperationFaults { settle_after_ms: 300, ..OperationFaults::default() };
    let plan = FaultPlan { withdrawal: slow, deposit: slow, callback_copies: 3, ..FaultPlan::none() };
    let secret = secret();
    let (api, simulator) = api_and_simulator(&kit, plan, &secret).await?;
    let pipeline = kit.spawn_with_services(&Part::all(), kit.http_services(&simulator.url, 2_000)?);

    let mut ids = Vec::new();
    for investor in 0..20 {
        let investor = format!("inv-{investor}");
        kit.seed_investor(&investor, 1_000_00).await?;
        ids.push(kit.publish(&kit.request(&investor, &fund_account, 500_00)).await?);
    }
    kit.wait_terminal(&ids, SETTLE).await?;
    // Let the last copies of the last callbacks arrive.
    let steps = 2 * ids.len() as i64;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (applied, already) = loop {
        let applied = metric(&kit, &api, "bridge_callbacks_total{result=\"applied\"}").await?;
        let already = metric(&kit, &api, "bridge_callbacks_total{result=\"already_applied\"}").await?;
        let pending = metric(&kit, &api, "bridge_callbacks_total{result=\"still_pending\"}").await?;
        if applied + already + pending >= 3 * steps {
            break (applied, already);
        }
        ensure!(Instant::now() < deadline, "callbacks missing: {applied} + {already} + {pending}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    pipeline.stop().await?;
    simulator.stop().await?;
    api.stop().await?;

    ensure!(applied <= steps, "{applied} callbacks applied {steps} steps");
    ensure!(already >= 2 * steps, "only {already} copies found their step applied");
    for id in &ids {
        ensure!(kit.transfer(*id).await?.state == TransferState::Completed);
    }
    // One version per state change, and one status event per version.
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM transfer_versions").fetch_one(&kit.pool).await?;
    ensure!(versions == 5 * ids.len() as i64, "{versions} versions");
    let status = kit.read_topic(&kit.topics().status()).await?;
    let distinct: std::collections::HashSet<_> =
        status.iter().filter_map(|message| message.header("ce_id").map(str::to_owned)).collect();
    ensure!(distinct.len() == 5 * ids.len(), "{} distinct status events", distinct.len());
    // One withdrawal and one deposit per transfer at the services, and
    // postings that match them (the reconcile check compares both books).
    let settled: i64 = sqlx::query_scalar("SELECT count(*) FROM sim_operations WHERE outcome = 'settled'")
        .fetch_one(&kit.pool)
        .await?;
    ensure!(settled == steps, "{settled} settled operations");
    kit.assert_books_balance().await
}

/// Only a correctly signed, fresh, first delivery is acted on, and even then
/// the service's own answer decides: a body claiming settlement of an
/// operation the bank still holds as pending changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callbacks_are_verified_and_never_trusted_blindly() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("ines", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let never = OperationFaults { settle_after_ms: HOUR_MS, ..OperationFaults::default() };
    let plan = FaultPlan { withdrawal: never, ..FaultPlan::none() };
    let secret = secret();
    let (api, simulator) = api_and_simulator(&kit, plan, &secret).await?;
    let pipeline = kit.spawn_with_services(&Part::all(), kit.http_services(&simulator.url, 2_000)?);
    let id = kit.publish(&kit.request("ines", &fund_account, 3_000_00)).await?;
    let key = bridge_domain::ids::idempotency_key(id, bridge_domain::Step::Withdrawal, 0);
    let deadline = Instant::now() + SETTLE;
    while sim_outcome(&kit, &key).await?.is_none() {
        ensure!(Instant::now() < deadline, "withdrawal never reached the bank");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let client = reqwest::Client::new();
    let body = serde_json::json!({"idempotency_key": key, "status": "settled", "reference": "forged"}).to_string();
    let callbacks_key = self::key(&kit, "callbacks").await?;
    let send = |service: &str, id: &str, timestamp: i64, signature: String| {
        client
            .post(format!("{}/v1/callbacks/{service}", api.url))
            .bearer_auth(&callbacks_key)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.clone())
            .send()
    };
    let now = bridge_testkit::unix_now();
    let other = Secret::from_bytes([9; 32]);
    ensure!(send("investor", "m1", now, other.sign("m1", now, body.as_bytes())).await?.status() == 401);
    let stale = now - 301;
    ensure!(send("investor", "m2", stale, secret.sign("m2", stale, body.as_bytes())).await?.status() == 401);
    ensure!(send("bank", "m3", now, secret.sign("m3", now, body.as_bytes())).await?.status() == 404);
    // A withdrawal key at the fund administrator's endpoint.
    ensure!(send("fund", "m4", now, secret.sign("m4", now, body.as_bytes())).await?.status() == 422);

    let first = send("investor", "m5", now, secret.sign("m5", now, body.as_bytes())).await?;
    ensure!(first.status() == 200);
    ensure!(first.json::<serde_json::Value>().await?["result"] == "still_pending");
    let replay = send("investor", "m5", now, secret.sign("m5", now, body.as_bytes())).await?;
    ensure!(replay.json::<serde_json::Value>().await?["result"] == "replayed");
    ensure!(kit.transfer(id).await?.state == TransferState::Validated, "a claim alone moved the transfer");
    ensure!(metric(&kit, &api, "bridge_callbacks_total{result=\"refused\"}").await? == 3);

    pipeline.stop().await?;
    simulator.stop().await?;
    api.stop().await?;
    kit.assert_books_balance().await
}

/// Runs one transfer whose withdrawal (or deposit) the bank never settles,
/// under `policy`, until the transfer stops moving.
async fn overdue(
    policy: DeadlinePolicy,
    adjust: impl FnOnce(&mut bridge_pipeline::PipelineConfig),
    plan: FaultPlan,
    until: impl Fn(TransferState) -> bool,
) -> Result<(TestKit, Uuid)> {
    let kit = TestKit::start_with(BrokerKind::InProcess, |config| {
        config.pending_deadline_policy = policy;
        config.pending_deadline_ms = 1_500;
        adjust(config);
    })
    .await?;
    kit.seed_investor("olga", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let simulator = kit.start_simulator(plan).await?;
    let pipeline = kit.spawn_with_services(&Part::all(), kit.http_services(&simulator.url, 2_000)?);
    let id = kit.publish(&kit.request("olga", &fund_account, 2_500_00)).await?;
    let deadline = Instant::now() + SETTLE;
    while !until(kit.transfer(id).await.map(|t| t.state).unwrap_or(TransferState::Requested)) {
        ensure!(Instant::now() < deadline, "transfer {id} stuck in {:?}", kit.transfer(id).await.ok().map(|t| t.state));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kit.wait_outbox_drained(SETTLE).await?;
    pipeline.stop().await?;
    simulator.stop().await?;
    Ok((kit, id))
}

/// manual_review: a withdrawal still pending past its deadline stops in
/// manual review, funds still held, visible on the status topic and in the
/// alert metric; the bank's operation is left for a person.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overdue_withdrawal_goes_to_manual_review() -> Result<()> {
    let never = OperationFaults { settle_after_ms: HOUR_MS, ..OperationFaults::default() };
    let plan = FaultPlan { withdrawal: never, ..FaultPlan::none() };
    let (kit, id) =
        overdue(DeadlinePolicy::ManualReview, |_| {}, plan, |state| state == TransferState::ManualReview).await?;
    ensure!(
        state_and_reason(&kit, id).await? == (TransferState::ManualReview, Some("WITHDRAWAL_DEADLINE_PASSED".into()))
    );
    let held: i64 =
        sqlx::query_scalar("SELECT held_minor FROM investor_accounts WHERE id = 'olga'").fetch_one(&kit.pool).await?;
    ensure!(held == 2_500_00, "hold released: {held}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_steps").fetch_one(&kit.pool).await?;
    ensure!(left == 0, "still polling a step handed to a person");
    let status = kit.read_topic(&kit.topics().status()).await?;
    let last = status.iter().filter(|m| m.key.as_deref() == Some(id.to_string().as_bytes())).count();
    ensure!(last == 3, "{last} status events (requested, validated, manual_review)");

    let api = kit.start_api(bridge_pipeline::services::Services::none(), ApiConfig::new()).await?;
    ensure!(metric(&kit, &api, "bridge_transfers_manual_review").await? == 1);
    api.stop().await?;
    kit.assert_books_balance().await
}

/// fail: a deposit the fund administrator keeps pending is cancelled there
/// once the runner has asked too often, and the investor is refunded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overdue_deposit_is_cancelled_and_refunded() -> Result<()> {
    let never = OperationFaults { settle_after_ms: HOUR_MS, ..OperationFaults::default() };
    let plan = FaultPlan { deposit: never, ..FaultPlan::none() };
    let (kit, id) = overdue(
        DeadlinePolicy::Fail,
        |config| {
            config.pending_deadline_ms = HOUR_MS;
            config.pending_attempts_max = 2;
        },
        plan,
        |state| state.is_terminal(),
    )
    .await?;
    ensure!(state_and_reason(&kit, id).await? == (TransferState::Reversed, Some("DEPOSIT_ATTEMPTS_EXHAUSTED".into())));
    let deposit = sim_outcome(&kit, &bridge_domain::ids::idempotency_key(id, bridge_domain::Step::Deposit, 0)).await?;
    ensure!(deposit == Some(("declined".into(), "CANCELLED".into())), "{deposit:?}");
    let refund = sim_outcome(&kit, &bridge_domain::ids::idempotency_key(id, bridge_domain::Step::Refund, 0)).await?;
    ensure!(refund.map(|(outcome, _)| outcome).as_deref() == Some("settled"));
    kit.assert_books_balance().await
}

/// keep_polling: past the deadline the runner keeps asking, and a
/// settlement that finally arrives completes the transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overdue_step_under_keep_polling_completes_when_it_settles() -> Result<()> {
    let late = OperationFaults { settle_after_ms: 5_000, ..OperationFaults::default() };
    let plan = FaultPlan { withdrawal: late, ..FaultPlan::none() };
    let (kit, id) = overdue(DeadlinePolicy::KeepPolling, |_| {}, plan, |state| state.is_terminal()).await?;
    ensure!(state_and_reason(&kit, id).await? == (TransferState::Completed, None));
    kit.assert_books_balance().await
}

/// A reservation whose withdrawal never happened expires: the withdrawal is
/// cancelled at the bank first (so a late withdrawal cannot move money), the
/// transfer fails with RESERVATION_EXPIRED on the status topic, and the seat
/// it held goes to the next investor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_reservations_free_their_seats() -> Result<()> {
    let mut kit = TestKit::start_with(BrokerKind::InProcess, |config| config.reservation_ttl_ms = 1_000).await?;
    kit.seed_investor("first", 10_000_00).await?;
    kit.seed_investor("second", 10_000_00).await?;
    let fund_account = kit.seed_fund("one-seat", 100_00, 1, 1_000_000_00).await?;
    let simulator = kit.start_simulator(FaultPlan::none()).await?;
    let services = kit.http_services(&simulator.url, 2_000)?;

    // No withdrawal stage: the first transfer's reservation waits in vain.
    let parts = [Part::Stage(StageName::Validator), Part::Relay, Part::Settlement];
    let pipeline = kit.spawn_with_services(&parts, services.clone());
    let expired = kit.publish(&kit.request("first", &fund_account, 1_000_00)).await?;
    kit.wait_terminal(&[expired], SETTLE).await?;
    ensure!(state_and_reason(&kit, expired).await? == (TransferState::Failed, Some("RESERVATION_EXPIRED".into())));
    let (actor, note): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT actor, note FROM transfer_versions WHERE transfer_id = $1 AND state = 'failed'")
            .bind(expired)
            .fetch_one(&kit.pool)
            .await?;
    ensure!(
        actor.as_deref() == Some("settlement runner") && note.as_deref() == Some("the reservation expired"),
        "{actor:?} {note:?}"
    );
    let key = bridge_domain::ids::idempotency_key(expired, bridge_domain::Step::Withdrawal, 0);
    ensure!(sim_outcome(&kit, &key).await? == Some(("declined".into(), "CANCELLED".into())));
    pipeline.stop().await?;

    // The withdrawal stage now receives the old event: the transfer has
    // failed, so it calls nobody, and the bank holds only the cancellation.
    kit.config.reservation_ttl_ms = HOUR_MS;
    let pipeline = kit.spawn_with_services(&Part::all(), services);
    kit.wait_caught_up(StageName::Withdrawal, SETTLE).await?;
    let second = kit.publish(&kit.request("second", &fund_account, 1_000_00)).await?;
    kit.wait_terminal(&[second], SETTLE).await?;
    pipeline.stop().await?;
    simulator.stop().await?;
    ensure!(kit.transfer(second).await?.state == TransferState::Completed, "the seat was not freed");
    ensure!(sim_outcome(&kit, &key).await? == Some(("declined".into(), "CANCELLED".into())));
    let status = kit.read_topic(&kit.topics().status()).await?;
    let expiry = status
        .iter()
        .filter(|m| m.key.as_deref() == Some(expired.to_string().as_bytes()))
        .filter_map(|m| m.payload.as_deref())
        .filter_map(|payload| bridge_codec::decode::<bridge_codec::TransferStatusChanged>(payload).ok())
        .find(|event| event.state == "failed");
    ensure!(expiry.and_then(|event| event.reason_code).as_deref() == Some("RESERVATION_EXPIRED"));
    kit.assert_books_balance().await
}

/// With a dozen withdrawals pending at once, the settlement runner never has
/// more than its limit of calls in flight at the bank, and does use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_settlement_runner_bounds_its_calls_per_service() -> Result<()> {
    let kit =
        TestKit::start_with(BrokerKind::InProcess, |config| config.settlement_concurrency_per_service = 2).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_00).await?;
    // Every call takes 200 ms, so calls the runner makes together overlap.
    let slow = OperationFaults { settle_after_ms: 2_500, latency_ms: 200, ..OperationFaults::default() };
    let simulator = kit.start_simulator(FaultPlan { withdrawal: slow, ..FaultPlan::none() }).await?;
    let services = kit.http_services(&simulator.url, 5_000)?;
    let stages = kit.spawn_with_services(&stages_and_relay(), services.clone());
    let mut ids = Vec::new();
    for investor in 0..12 {
        let investor = format!("inv-{investor}");
        kit.seed_investor(&investor, 1_000_00).await?;
        ids.push(kit.publish(&kit.request(&investor, &fund_account, 500_00)).await?);
    }
    let deadline = Instant::now() + SETTLE;
    loop {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_steps").fetch_one(&kit.pool).await?;
        if pending == 12 {
            break;
        }
        ensure!(Instant::now() < deadline, "{pending} withdrawals pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // From here on only the runner calls the bank about withdrawals.
    simulator.bank.reset_max_in_flight();
    let runner = kit.spawn_with_services(&[Part::Settlement], services);
    kit.wait_terminal(&ids, SETTLE).await?;
    let most = simulator.bank.max_in_flight(bridge_sim::Operation::Withdrawal);
    runner.stop().await?;
    stages.stop().await?;
    simulator.stop().await?;
    ensure!(most == 2, "{most} withdrawal calls in flight at once (limit 2)");
    kit.assert_books_balance().await
}
