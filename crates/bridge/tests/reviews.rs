//! Manual review resolved by people: every resolution from the command line
//! and from the API, on transfers frozen before the withdrawal (funds held)
//! and before the deposit (money in transit), with four-eyes, two
//! operators racing, and repeated requests. The services are the simulator
//! over HTTP; the command line runs as a separate `bridge` process.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use uuid::Uuid;

use bridge_pipeline::runner::Part;
use bridge_sim::FaultPlan;
use bridge_testkit::{BrokerKind, TestKit};

const BRIDGE: &str = env!("CARGO_BIN_EXE_bridge");
const SETTLE: Duration = Duration::from_secs(120);

/// `bridge review ARGS` as operator `operator`; its JSON answer, and
/// whether it exited successfully.
fn review(kit: &TestKit, services_url: &str, operator: &str, args: &[&str]) -> Result<(bool, Value)> {
    review_dying_at(kit, services_url, operator, args, "")
}

/// `review`, the process dying at `failpoints` (as `kill -9` would).
fn review_dying_at(
    kit: &TestKit,
    services_url: &str,
    operator: &str,
    args: &[&str],
    failpoints: &str,
) -> Result<(bool, Value)> {
    let output = Command::new(BRIDGE)
        .env("BRIDGE_FAILPOINTS", failpoints)
        .arg("review")
        .args(args)
        .env("DATABASE_URL", &kit.database_url)
        .env("BRIDGE_TOPIC_PREFIX", &kit.config.topics.prefix)
        .env("BRIDGE_ACCOUNT_SERVICES_URL", services_url)
        .env("BRIDGE_OPERATOR", operator)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value = serde_json::from_str(&stdout).unwrap_or_else(|_| json!({"stdout": stdout}));
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success() || !stderr.contains("panicked"), "bridge review {args:?}: {stderr}");
    Ok((output.status.success(), value))
}

struct Client {
    http: reqwest::Client,
    url: String,
    key: String,
}

impl Client {
    async fn post(&self, path: &str, body: Value, idempotency_key: Option<&str>) -> Result<(u16, Value)> {
        let mut request = self.http.post(format!("{}{path}", self.url)).bearer_auth(&self.key).json(&body);
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    async fn get(&self, path: &str) -> Result<(u16, Value)> {
        let response = self.http.get(format!("{}{path}", self.url)).bearer_auth(&self.key).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }
}

async fn key(kit: &TestKit, name: &str, scopes: &[&str]) -> Result<String> {
    let scopes: Vec<String> = scopes.iter().map(|scope| (*scope).to_owned()).collect();
    let created = bridge_api::auth::create_key(&mut *kit.pool.acquire().await?, name, &scopes, None).await?;
    Ok(created.full_key)
}

/// Settled operations at the simulated services per transfer and step,
/// with the keys they settled under.
async fn settled(kit: &TestKit) -> Result<BTreeMap<(Uuid, String), Vec<String>>> {
    let rows: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT transfer_id, operation, idempotency_key FROM sim_operations WHERE outcome = 'settled' ORDER BY 1, 2",
    )
    .fetch_all(&kit.pool)
    .await?;
    let mut settled: BTreeMap<(Uuid, String), Vec<String>> = BTreeMap::new();
    for (transfer, operation, key) in rows {
        settled.entry((transfer, operation)).or_default().push(key);
    }
    Ok(settled)
}

async fn state_of(kit: &TestKit, id: Uuid) -> Result<String> {
    Ok(kit.transfer(id).await?.state.as_str().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_resolve_every_manual_review_from_the_command_line_and_the_api() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("stranger", 10_000_00).await?;
    kit.seed_investor("known", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 10_00, 100, 1_000_000_00).await?;
    // The bank does not know the first investor's account, the fund
    // administrator the fund's: a person must look at both kinds.
    kit.set_simulated_account_status("stranger", "unknown").await?;
    kit.set_simulated_account_status(&fund_account, "unknown").await?;
    let simulator = kit.start_simulator(FaultPlan::none()).await?;
    let pipeline = kit.spawn_with_services(&Part::all(), kit.http_services(&simulator.url, 5_000)?);

    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(kit.publish(&kit.request("stranger", &fund_account, 100_00)).await?);
    }
    let mut in_transit = Vec::new();
    for _ in 0..7 {
        in_transit.push(kit.publish(&kit.request("known", &fund_account, 100_00)).await?);
    }
    let all: Vec<Uuid> = held.iter().chain(&in_transit).copied().collect();
    kit.wait_terminal(&all, SETTLE).await?;
    let states = kit.state_counts(&all).await?;
    ensure!(states.get("manual_review:WITHDRAWAL_REFUSED") == Some(&5), "{states:?}");
    ensure!(states.get("manual_review:DEPOSIT_REFUSED") == Some(&7), "{states:?}");

    // The queue, as an operator sees it.
    let (ok, listed) = review(&kit, &simulator.url, "carol", &["list", "--json"])?;
    ensure!(ok && listed.as_array().map(Vec::len) == Some(12), "{listed}");
    let frozen: BTreeMap<String, usize> = listed.as_array().into_iter().flatten().fold(BTreeMap::new(), |mut n, r| {
        *n.entry(r["frozen_in"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
        n
    });
    ensure!(frozen == BTreeMap::from([("validated".into(), 5), ("withdrawn".into(), 7)]), "{frozen:?}");

    // The accounts fixed at the services.
    kit.set_simulated_account_status("stranger", "active").await?;
    kit.set_simulated_account_status(&fund_account, "active").await?;

    // From the command line.
    let cli = |id: Uuid, action: &str, extra: &[&str]| -> Result<(bool, Value)> {
        let id = id.to_string();
        let mut args = vec![action, id.as_str(), "--reason", "account fixed at the service, ticket OPS-1"];
        args.extend_from_slice(extra);
        review(&kit, &simulator.url, "carol", &args)
    };
    let (ok, done) = cli(held[0], "retry", &[])?;
    ensure!(ok && done["action"]["status"] == "done", "{done}");
    let (ok, done) = cli(held[1], "fail", &[])?;
    ensure!(ok && done["transfer"]["state"] == "failed", "{done}");
    // Nothing left the investor's account: there is no refund to record.
    let (ok, refused) = cli(held[2], "refunded", &["--reference", "RF-1"])?;
    ensure!(!ok && refused.get("action").is_none(), "{refused}");
    let (ok, done) = cli(in_transit[0], "complete", &["--reference", "FA-CONF-77"])?;
    ensure!(ok && done["transfer"]["state"] == "deposited", "{done}");
    let (ok, done) = cli(in_transit[1], "refunded", &["--reference", "BANK-RF-9"])?;
    ensure!(ok && done["transfer"]["state"] == "reversed", "{done}");
    let (ok, done) = cli(in_transit[4], "fail", &[])?;
    ensure!(ok && done["transfer"]["state"] == "reversed", "{done}");
    // Four-eyes from the command line: carol asks, carol cannot approve,
    // dave does.
    let id = held[4].to_string();
    let four_eyes = |operator: &str, args: &[&str]| {
        let mut args = args.to_vec();
        args.extend(["--review-approvals", "2"]);
        review(&kit, &simulator.url, operator, &args)
    };
    let (ok, asked) = four_eyes("carol", &["fail", &id, "--reason", "duplicate of another transfer"])?;
    ensure!(ok && asked["action"]["status"] == "awaiting_approval", "{asked}");
    let action = asked["action"]["id"].as_str().context("resolution id")?.to_owned();
    let (ok, _) = four_eyes("carol", &["approve", &action])?;
    ensure!(!ok, "carol approved her own resolution");
    let (ok, done) = four_eyes("dave", &["approve", &action])?;
    ensure!(ok && done["transfer"]["state"] == "failed", "{done}");
    // A reference is required where the resolution records an outside
    // operation.
    let (ok, _) = cli(in_transit[2], "complete", &[])?;
    ensure!(!ok, "complete without a reference was accepted");

    // From the API, as two operators with their own keys.
    let http = reqwest::Client::new();
    let api = kit.start_api(kit.http_services(&simulator.url, 5_000)?, bridge_api::ApiConfig::new()).await?;
    let mut four_eyes_config = bridge_api::ApiConfig::new();
    four_eyes_config.review_approvals = 2;
    let four_eyes = kit.start_api(kit.http_services(&simulator.url, 5_000)?, four_eyes_config).await?;
    let alice_key = key(&kit, "alice", &["operator"]).await?;
    let bob_key = key(&kit, "bob", &["operator"]).await?;
    let alice = Client { http: http.clone(), url: api.url.clone(), key: alice_key.clone() };
    let bob = Client { http: http.clone(), url: api.url.clone(), key: bob_key.clone() };
    let reader =
        Client { http: http.clone(), url: api.url.clone(), key: key(&kit, "reader", &["transfers:read"]).await? };
    let (status, _) = reader.get("/v1/reviews").await?;
    ensure!(status == 403, "a key without the operator scope listed reviews: {status}");
    let (status, listed) = alice.get("/v1/reviews").await?;
    ensure!(status == 200 && listed["reviews"].as_array().map(Vec::len) == Some(6), "{status} {listed}");

    let reason = json!({"reason": "checked with the bank, ticket OPS-2"});
    // Not applicable where it froze: 409 naming the state.
    let (status, body) = alice
        .post(&format!("/v1/reviews/{}/complete", held[2]), json!({"reason": "x", "reference": "FA-1"}), None)
        .await?;
    ensure!(status == 409 && body["frozen_in"] == "validated", "{status} {body}");
    // A new attempt: the first withdrawal key is voided at the bank, a new
    // one moves the money.
    let (status, body) = alice
        .post(
            &format!("/v1/reviews/{}/retry", held[2]),
            json!({"reason": "bank voided the first request", "new_attempt": true}),
            None,
        )
        .await?;
    ensure!(status == 200 && body["transfer"]["step_attempt"] == 1, "{status} {body}");
    // Four-eyes: alice asks, alice cannot approve, bob can.
    let alice_four = Client { http: http.clone(), url: four_eyes.url.clone(), key: alice_key.clone() };
    let bob_four = Client { http: http.clone(), url: four_eyes.url.clone(), key: bob_key.clone() };
    let (status, body) = alice_four.post(&format!("/v1/reviews/{}/fail", held[3]), reason.clone(), None).await?;
    ensure!(status == 202 && body["resolution"]["status"] == "awaiting_approval", "{status} {body}");
    ensure!(state_of(&kit, held[3]).await? == "manual_review", "ran before approval");
    let action = body["resolution"]["id"].as_str().context("resolution id")?.to_owned();
    let (status, _) = alice_four.post(&format!("/v1/reviews/resolutions/{action}/approve"), json!({}), None).await?;
    ensure!(status == 403, "the requester approved their own resolution: {status}");
    // A second resolution of the same review waits for the first.
    let (status, body) = bob_four.post(&format!("/v1/reviews/{}/retry", held[3]), reason.clone(), None).await?;
    ensure!(status == 409 && body["resolution"]["id"] == action.as_str(), "{status} {body}");
    let (status, body) = bob_four.post(&format!("/v1/reviews/resolutions/{action}/approve"), json!({}), None).await?;
    ensure!(status == 200 && body["transfer"]["state"] == "failed", "{status} {body}");
    ensure!(body["resolution"]["approved_by"].as_str().is_some_and(|by| by.starts_with("bob")), "{body}");

    let (status, body) = alice
        .post(
            &format!("/v1/reviews/{}/complete", in_transit[2]),
            json!({"reason": "confirmed by phone", "reference": "FA-CONF-78"}),
            None,
        )
        .await?;
    ensure!(status == 200 && body["transfer"]["state"] == "deposited", "{status} {body}");
    let (status, body) = bob
        .post(
            &format!("/v1/reviews/{}/refunded", in_transit[6]),
            json!({"reason": "bank returned the money", "reference": "BANK-RF-10"}),
            None,
        )
        .await?;
    ensure!(status == 200 && body["transfer"]["state"] == "reversed", "{status} {body}");
    // Two operators at once: one wins, the other is told what happened.
    let (refund, confirm) =
        (format!("/v1/reviews/{}/refunded", in_transit[3]), format!("/v1/reviews/{}/complete", in_transit[3]));
    let (first, second) = tokio::join!(
        alice.post(&refund, json!({"reason": "bank refunded", "reference": "RF-2"}), None),
        bob.post(&confirm, json!({"reason": "fund confirmed", "reference": "FA-2"}), None),
    );
    let mut statuses = [first?.0, second?.0];
    statuses.sort();
    ensure!(statuses == [200, 409], "{statuses:?}");
    // Idempotent under a key: the repeat answers with the same resolution.
    let retry = format!("/v1/reviews/{}/retry", in_transit[5]);
    let (status, first) = alice.post(&retry, reason.clone(), Some("retry-in-transit-5")).await?;
    ensure!(status == 200, "{status} {first}");
    let (status, again) = alice.post(&retry, reason.clone(), Some("retry-in-transit-5")).await?;
    ensure!(status == 200 && again["resolution"]["id"] == first["resolution"]["id"], "{status} {again}");
    // And once resolved, a transfer is no longer anyone's to resolve.
    let (status, body) = bob.post(&retry, reason.clone(), None).await?;
    ensure!(status == 409 && body["transfer"]["state"].is_string(), "{status} {body}");

    kit.wait_terminal(&all, SETTLE).await?;
    pipeline.stop().await?;
    let expected = [
        (held[0], "completed"),
        (held[1], "failed"),
        (held[2], "completed"),
        (held[3], "failed"),
        (held[4], "failed"),
        (in_transit[0], "completed"),
        (in_transit[1], "reversed"),
        (in_transit[2], "completed"),
        (in_transit[4], "reversed"),
        (in_transit[5], "completed"),
        (in_transit[6], "reversed"),
    ];
    for (id, state) in expected {
        ensure!(state_of(&kit, id).await? == state, "{id}: {} instead of {state}", state_of(&kit, id).await?);
    }
    let raced = state_of(&kit, in_transit[3]).await?;
    ensure!(raced == "reversed" || raced == "completed", "{raced}");

    // The history names who resolved it, why and the outside reference.
    let (status, story) = alice.get(&format!("/v1/reviews/{}", in_transit[0])).await?;
    ensure!(status == 200, "{story}");
    let by_carol = story["history"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|version| version["actor"] == "operator carol")
        .context("no version by carol")?;
    ensure!(by_carol["external_reference"] == "FA-CONF-77" && by_carol["state"] == "deposited", "{by_carol}");
    ensure!(story["ledger"].as_array().map(Vec::len) == Some(4), "{story}");

    // Nothing dead-lettered, and no step moved money twice: one settled
    // operation per step that ran at a service, none for what was recorded
    // as done outside.
    let (_, _, dead_letters, _) = kit.effect_counts().await?;
    ensure!(dead_letters == 0, "{dead_letters} dead letters");
    let settled = settled(&kit).await?;
    ensure!(settled.values().all(|keys| keys.len() == 1), "{settled:?}");
    let steps = |id: Uuid| -> Vec<&str> {
        settled.keys().filter(|(transfer, _)| *transfer == id).map(|(_, step)| step.as_str()).collect()
    };
    ensure!(steps(held[0]) == ["deposit", "withdrawal"], "{:?}", steps(held[0]));
    ensure!(steps(held[1]).is_empty() && steps(held[3]).is_empty(), "a failed transfer moved money");
    ensure!(
        settled[&(held[2], "withdrawal".to_owned())] == [format!("bridge-{}-withdrawal-1", held[2])],
        "{settled:?}"
    );
    ensure!(steps(in_transit[0]) == ["withdrawal"] && steps(in_transit[1]) == ["withdrawal"], "{settled:?}");
    ensure!(steps(in_transit[4]) == ["refund", "withdrawal"], "{:?}", steps(in_transit[4]));
    ensure!(steps(in_transit[5]) == ["deposit", "withdrawal"], "{:?}", steps(in_transit[5]));
    ensure!(steps(in_transit[6]) == ["withdrawal"], "{:?}", steps(in_transit[6]));
    let report = kit.reconcile().await?;
    ensure!(report.ok() && report.manual_review == 0 && report.in_flight == 0, "{report:?}");
    kit.assert_books_balance().await?;
    // Balances an operator's "refunded" or "complete" changed name the
    // operator in their history, not the process.
    let by_operators: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM model_history WHERE actor LIKE 'operator %' AND model IN ('investor_accounts', 'fund_accounts')",
    )
    .fetch_one(&kit.pool)
    .await?;
    ensure!(by_operators > 0, "no balance change is attributed to an operator");
    api.stop().await?;
    four_eyes.stop().await?;
    simulator.stop().await
}

/// The process resolving a review dies right after reopening the transfer,
/// before the step ran: the settlement runner carries the step out, and a
/// step the operator failed is found cancelled at the bank, never moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolution_whose_process_dies_after_reopening_is_finished_by_the_settlement_runner() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("stranger", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 10_00, 100, 1_000_000_00).await?;
    kit.set_simulated_account_status("stranger", "unknown").await?;
    let simulator = kit.start_simulator(FaultPlan::none()).await?;
    let pipeline = kit.spawn_with_services(&Part::all(), kit.http_services(&simulator.url, 5_000)?);
    let retried = kit.publish(&kit.request("stranger", &fund_account, 100_00)).await?;
    let failed = kit.publish(&kit.request("stranger", &fund_account, 200_00)).await?;
    kit.wait_terminal(&[retried, failed], SETTLE).await?;
    ensure!(state_of(&kit, retried).await? == "manual_review", "{}", state_of(&kit, retried).await?);
    kit.set_simulated_account_status("stranger", "active").await?;

    for (id, action) in [(retried, "retry"), (failed, "fail")] {
        let id = id.to_string();
        let args = [action, id.as_str(), "--reason", "account fixed"];
        let (ok, _) = review_dying_at(&kit, &simulator.url, "carol", &args, "review.after_reopen")?;
        ensure!(!ok, "the process was to die after reopening");
    }
    kit.wait_terminal(&[retried, failed], SETTLE).await?;
    pipeline.stop().await?;
    ensure!(state_of(&kit, retried).await? == "completed", "{}", state_of(&kit, retried).await?);
    ensure!(state_of(&kit, failed).await? == "failed", "{}", state_of(&kit, failed).await?);
    let settled = settled(&kit).await?;
    ensure!(settled.keys().filter(|(id, _)| *id == failed).count() == 0, "the failed step moved money: {settled:?}");
    ensure!(settled.values().all(|keys| keys.len() == 1), "{settled:?}");
    let report = kit.reconcile().await?;
    ensure!(report.ok() && report.in_flight == 0, "{report:?}");
    kit.assert_books_balance().await?;
    simulator.stop().await
}
