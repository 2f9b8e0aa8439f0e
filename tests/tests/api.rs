//! The HTTP API as its clients use it: API keys, scopes, investor-bound
//! keys, Idempotency-Key, cursor pages, problem responses, rate limits.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use bridge_api::ApiConfig;
use bridge_pipeline::runner::Part;
use bridge_sim::InProcessServices;
use bridge_testkit::{BrokerKind, RunningApi, TestKit};

const SETTLE: Duration = Duration::from_secs(120);

async fn key(kit: &TestKit, scopes: &[&str], investor: Option<&str>) -> Result<String> {
    let mut conn = kit.pool.acquire().await?;
    let scopes: Vec<String> = scopes.iter().map(|scope| (*scope).to_owned()).collect();
    Ok(bridge_api::auth::create_key(&mut conn, "test", &scopes, investor).await?.full_key)
}

async fn api(kit: &TestKit, config: ApiConfig) -> Result<RunningApi> {
    kit.start_api(InProcessServices::services(kit.pool.clone()), config).await
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(api: &RunningApi) -> Self {
        Self { http: reqwest::Client::new(), base: api.url.clone() }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        idempotency: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value)> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(idempotency) = idempotency {
            request = request.header("idempotency-key", idempotency);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await?;
        let status = response.status();
        let problem = response
            .headers()
            .get("content-type")
            .is_some_and(|value| value.as_bytes().starts_with(b"application/problem+json"));
        let text = response.text().await?;
        ensure!(status.is_success() || problem, "{status} without a problem document: {text}");
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }
}

fn transfer_body(investor: &str, fund_account: &str, amount_minor: i64) -> Value {
    json!({"investor_account_id": investor, "fund_account_id": fund_account, "amount_minor": amount_minor, "currency": "EUR", "reference": "api test"})
}

async fn wait_state(client: &Client, key: &str, id: &str, terminal: &[&str]) -> Result<Value> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let (status, body) = client.call(Method::GET, &format!("/v1/transfers/{id}"), Some(key), None, None).await?;
        if status == StatusCode::OK && terminal.contains(&body["state"].as_str().unwrap_or_default()) {
            return Ok(body);
        }
        ensure!(Instant::now() < deadline, "transfer {id} stuck: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A transfer created and followed through the API alone: 202 and a status
/// URL, the same answer for a retried request, a problem for a reused key
/// with another body, then state, history, balance, fund and pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transfer_is_created_and_followed_through_the_api() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("ana", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let pipeline = kit.spawn(&Part::all());
    let api = api(&kit, ApiConfig::new()).await?;
    let client = Client::new(&api);
    let writer = key(&kit, &["transfers:write", "transfers:read"], None).await?;

    let body = transfer_body("ana", &fund_account, 2_500_00);
    let (status, created) =
        client.call(Method::POST, "/v1/transfers", Some(&writer), Some("order-1"), Some(&body)).await?;
    ensure!(status == StatusCode::ACCEPTED, "{status} {created}");
    let id = created["transfer_id"].as_str().context("transfer_id")?.to_owned();
    ensure!(created["status_url"] == format!("/v1/transfers/{id}"));
    let (status, again) =
        client.call(Method::POST, "/v1/transfers", Some(&writer), Some("order-1"), Some(&body)).await?;
    ensure!(status == StatusCode::ACCEPTED && again == created, "a retry answered {status} {again}");
    let other = transfer_body("ana", &fund_account, 2_600_00);
    let (status, _) = client.call(Method::POST, "/v1/transfers", Some(&writer), Some("order-1"), Some(&other)).await?;
    ensure!(status == StatusCode::CONFLICT, "{status}");

    let done = wait_state(&client, &writer, &id, &["completed"]).await?;
    ensure!(done["version"] == 5 && done["amount_minor"] == 2_500_00, "{done}");
    let (_, history) =
        client.call(Method::GET, &format!("/v1/transfers/{id}/history"), Some(&writer), None, None).await?;
    let states: Vec<&str> =
        history["versions"].as_array().context("versions")?.iter().filter_map(|v| v["state"].as_str()).collect();
    ensure!(states == ["requested", "validated", "withdrawn", "deposited", "completed"], "{states:?}");
    let (_, balance) = client.call(Method::GET, "/v1/investors/ana/balance", Some(&writer), None, None).await?;
    ensure!(
        balance["balance_minor"] == 7_500_00 && balance["held_minor"] == 0 && balance["available_minor"] == 7_500_00
    );
    let (_, fund) = client.call(Method::GET, "/v1/funds/fund", Some(&writer), None, None).await?;
    ensure!(fund["completed_minor"] == 2_500_00 && fund["seats_left"] == 9 && fund["reserved_minor"] == 0, "{fund}");

    // A request the validator refuses is created all the same, and the
    // refusal reads back with its reason.
    let body = transfer_body("ana", &fund_account, 50_000_00);
    let (_, refused) = client.call(Method::POST, "/v1/transfers", Some(&writer), Some("order-2"), Some(&body)).await?;
    let refused_id = refused["transfer_id"].as_str().context("id")?.to_owned();
    let refused = wait_state(&client, &writer, &refused_id, &["rejected"]).await?;
    ensure!(refused["reason_code"] == "INSUFFICIENT_FUNDS", "{refused}");
    let body = transfer_body("ana", &fund_account, 100_00);
    client.call(Method::POST, "/v1/transfers", Some(&writer), Some("order-3"), Some(&body)).await?;

    let (_, page) = client.call(Method::GET, "/v1/transfers?investor=ana&limit=2", Some(&writer), None, None).await?;
    ensure!(page["items"].as_array().map(Vec::len) == Some(2), "{page}");
    let cursor = page["next_cursor"].as_str().context("a second page")?;
    let (_, rest) = client
        .call(Method::GET, &format!("/v1/transfers?investor=ana&limit=2&cursor={cursor}"), Some(&writer), None, None)
        .await?;
    ensure!(rest["items"].as_array().map(Vec::len) == Some(1) && rest["next_cursor"].is_null(), "{rest}");
    let first = page["items"].as_array().context("items")?;
    ensure!(first.iter().chain(rest["items"].as_array().context("items")?).any(|t| t["id"] == id.as_str()));
    let (_, rejected) = client.call(Method::GET, "/v1/transfers?state=rejected", Some(&writer), None, None).await?;
    ensure!(rejected["items"].as_array().map(Vec::len) == Some(1));

    pipeline.stop().await?;
    api.stop().await?;
    kit.assert_books_balance().await
}

/// Sixteen identical requests at once create one transfer and all get the
/// same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_requests_at_once_create_one_transfer() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    let api = api(&kit, ApiConfig::new()).await?;
    let client = Client::new(&api);
    let writer = key(&kit, &["transfers:write"], None).await?;
    let body = transfer_body("ana", "fund-account", 1_000_00);
    let answers = futures::future::join_all(
        (0..16).map(|_| client.call(Method::POST, "/v1/transfers", Some(&writer), Some("same"), Some(&body))),
    )
    .await;
    let mut ids = std::collections::HashSet::new();
    for answer in answers {
        let (status, created) = answer?;
        ensure!(status == StatusCode::ACCEPTED, "{status} {created}");
        ids.insert(created["transfer_id"].as_str().unwrap_or_default().to_owned());
    }
    ensure!(ids.len() == 1, "{ids:?}");
    let (transfers, requests): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM transfers), (SELECT count(*) FROM outbox, unnest(topics) topic WHERE topic = $1)",
    )
    .bind(kit.topics().requested())
    .fetch_one(&kit.pool)
    .await?;
    ensure!((transfers, requests) == (1, 1), "{transfers} transfers, {requests} request events");
    api.stop().await
}

/// Every endpoint × every kind of caller, with the status each must get.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_endpoint_is_protected_as_the_matrix_says() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("ana", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let secret = bridge_sim::Secret::from_bytes([3; 32]);
    let mut config = ApiConfig::new();
    config.callback_secrets.insert("investor".to_owned(), vec![secret.clone()]);
    // The matrix presents refused credentials from one address on purpose.
    config.auth_failures_per_minute = 100_000;
    let api = api(&kit, config).await?;
    let client = Client::new(&api);
    let writer = key(&kit, &["transfers:write", "transfers:read"], None).await?;
    let (_, created) = client
        .call(
            Method::POST,
            "/v1/transfers",
            Some(&writer),
            Some("seed"),
            Some(&transfer_body("ana", &fund_account, 100_00)),
        )
        .await?;
    let id = created["transfer_id"].as_str().context("id")?.to_owned();

    let revoked = key(&kit, &["transfers:write", "transfers:read", "callbacks", "admin"], None).await?;
    {
        let mut conn = kit.pool.acquire().await?;
        let prefix = revoked.split('_').nth(1).context("prefix")?;
        ensure!(bridge_store::api::revoke_key(&mut conn, prefix).await?);
    }
    let mut callers: Vec<(&str, Option<String>)> = vec![
        ("none", None),
        ("wrong", Some("brk_00000000_bm90LWEta2V5LWF0LWFsbC1ub3QtYS1rZXktYXQtYWxs".to_owned())),
        ("malformed", Some("not-a-key".to_owned())),
        ("revoked", Some(revoked)),
        ("other investor", Some(key(&kit, &["transfers:write", "transfers:read"], Some("bob")).await?)),
        ("own investor", Some(key(&kit, &["transfers:write", "transfers:read"], Some("ana")).await?)),
    ];
    for scope in bridge_api::auth::SCOPES {
        callers.push((scope, Some(key(&kit, &[scope], None).await?)));
    }

    let callback_body = json!({"idempotency_key": bridge_domain::ids::idempotency_key(id.parse()?, bridge_domain::Step::Withdrawal, 0)});
    let dead_letters = bridge_pipeline::Topics::dead_letter(&kit.topics().requested());
    // (method, path, body, expected per caller in the order above, then
    // transfers:write, transfers:read, callbacks, admin).
    use StatusCode as S;
    let (u, f, n) = (S::UNAUTHORIZED, S::FORBIDDEN, S::NOT_FOUND);
    let post_body = transfer_body("ana", &fund_account, 100_00);
    let matrix: Vec<(Method, String, Option<Value>, [StatusCode; 10])> = vec![
        (Method::POST, "/v1/transfers".into(), Some(post_body), [u, u, u, u, f, S::ACCEPTED, S::ACCEPTED, f, f, f]),
        (Method::GET, format!("/v1/transfers/{id}"), None, [u, u, u, u, n, S::OK, f, S::OK, f, f]),
        (Method::GET, format!("/v1/transfers/{id}/history"), None, [u, u, u, u, n, S::OK, f, S::OK, f, f]),
        (Method::GET, "/v1/transfers?investor=ana".into(), None, [u, u, u, u, f, S::OK, f, S::OK, f, f]),
        (Method::GET, "/v1/investors/ana/balance".into(), None, [u, u, u, u, n, S::OK, f, S::OK, f, f]),
        (Method::GET, "/v1/funds/fund".into(), None, [u, u, u, u, S::OK, S::OK, f, S::OK, f, f]),
        (Method::GET, "/v1/investors/ana/history".into(), None, [u, u, u, u, n, S::OK, f, S::OK, f, f]),
        (Method::GET, "/v1/funds/fund/history".into(), None, [u, u, u, u, S::OK, S::OK, f, S::OK, f, f]),
        (Method::GET, "/v1/investors/ana/bank-access".into(), None, [u, u, u, u, n, n, n, f, f, n]),
        (
            Method::PUT,
            "/v1/investors/ana/attributes".into(),
            Some(json!({"residence_country": "DE", "accredited": true})),
            [u, u, u, u, f, f, f, f, f, S::OK],
        ),
        (Method::POST, "/v1/callbacks/investor".into(), Some(callback_body), [u, u, u, u, f, f, f, f, S::OK, f]),
        (Method::GET, "/metrics".into(), None, [u, u, u, u, f, f, f, f, f, S::OK]),
        (Method::GET, "/v1/admin/notifications/subscriptions".into(), None, [u, u, u, u, f, f, f, f, f, S::OK]),
        (Method::GET, "/v1/admin/audit".into(), None, [u, u, u, u, f, f, f, f, f, S::OK]),
        (Method::POST, "/v1/admin/notifications/redrive".into(), None, [u, u, u, u, f, f, f, f, f, S::OK]),
        (Method::GET, "/v1/admin/dead-letters".into(), None, [u, u, u, u, f, f, f, f, f, S::OK]),
        (Method::GET, format!("/v1/admin/dead-letters/{}", dead_letters), None, [u, u, u, u, f, f, f, f, f, S::OK]),
        (
            Method::POST,
            format!("/v1/admin/dead-letters/{}/redrive", dead_letters),
            Some(json!({"dry_run": true})),
            [u, u, u, u, f, f, f, f, f, S::OK],
        ),
        (
            Method::POST,
            "/v1/admin/notifications/subscriptions".into(),
            Some(json!({"subscriber_kind": "operator", "channel": "sms", "target": "+447700900123"})),
            [u, u, u, u, f, f, f, f, f, S::CREATED],
        ),
        (
            Method::POST,
            "/v1/admin/notifications/subscriptions/999999/disable".into(),
            None,
            [u, u, u, u, f, f, f, f, f, n],
        ),
        (
            Method::POST,
            "/v1/admin/notifications/subscriptions/999999/enable".into(),
            None,
            [u, u, u, u, f, f, f, f, f, n],
        ),
        (Method::GET, "/openapi.json".into(), None, [u, u, u, u, S::OK, S::OK, S::OK, S::OK, S::OK, S::OK]),
        (Method::GET, "/healthz".into(), None, [S::OK; 10]),
        (Method::GET, "/readyz".into(), None, [S::OK; 10]),
    ];
    let mut wrong = Vec::new();
    for (method, path, body, expected) in &matrix {
        for ((name, key), expected) in callers.iter().zip(expected) {
            let mut request = client.http.request(method.clone(), format!("{}{path}", client.base));
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            if let Some(body) = body {
                // Signed with this request's own webhook-id, so callbacks
                // are never refused as replays.
                let id = format!("matrix-{name}-{}", uuid::Uuid::new_v4());
                let text = body.to_string();
                let timestamp = bridge_testkit::unix_now();
                request = request
                    .header("content-type", "application/json")
                    .header("idempotency-key", format!("matrix-{name}"))
                    .header("webhook-id", &id)
                    .header("webhook-timestamp", timestamp.to_string())
                    .header("webhook-signature", secret.sign(&id, timestamp, text.as_bytes()))
                    .body(text);
            }
            let status = request.send().await?.status();
            if status != *expected {
                wrong.push(format!("{method} {path} as {name}: {status}, expected {expected}"));
            }
        }
    }
    ensure!(wrong.is_empty(), "{}", wrong.join("\n"));
    api.stop().await
}

/// Errors are problem documents, bodies are bounded, keys are rate limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_are_problems_bodies_are_bounded_and_keys_rate_limited() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    let mut config = ApiConfig::new();
    config.rate_per_second = 1;
    config.rate_burst = 5;
    let api = api(&kit, config).await?;
    let client = Client::new(&api);
    let writer = key(&kit, &["transfers:write", "transfers:read"], None).await?;
    let http = &client.http;
    let problem = |response: reqwest::Response| async move {
        let status = response.status();
        let kind = response.headers().get("content-type").map(|v| v.to_str().unwrap_or_default().to_owned());
        let body: Value = response.json().await.unwrap_or(Value::Null);
        (status, kind, body)
    };
    let url = |path: &str| format!("{}{path}", api.url);

    let (status, kind, body) = problem(
        http.post(url("/v1/transfers"))
            .bearer_auth(&writer)
            .header("idempotency-key", "k")
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await?,
    )
    .await;
    ensure!(
        status == 422 && kind.as_deref() == Some("application/problem+json") && body["status"] == 422,
        "{status} {body}"
    );
    let big = "x".repeat(100 * 1024);
    let (status, kind, _) = problem(
        http.post(url("/v1/transfers"))
            .bearer_auth(&writer)
            .header("idempotency-key", "k")
            .header("content-type", "application/json")
            .body(big)
            .send()
            .await?,
    )
    .await;
    ensure!(status == 413 && kind.as_deref() == Some("application/problem+json"), "{status}");
    let (status, kind, _) = problem(http.get(url("/v1/nothing-here")).bearer_auth(&writer).send().await?).await;
    ensure!(status == 404 && kind.as_deref() == Some("application/problem+json"), "{status}");
    let (status, _, body) = problem(http.get(url("/v1/transfers/not-a-uuid")).bearer_auth(&writer).send().await?).await;
    ensure!(status == 400 && !body.to_string().contains("uuid::"), "{status} {body}");

    // Five requests were the burst; within the same second the next ones
    // are refused with a Retry-After, and other keys are not affected.
    let mut limited = None;
    for _ in 0..5 {
        let response = http.get(url("/v1/funds/none")).bearer_auth(&writer).send().await?;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(response);
            break;
        }
    }
    let limited = limited.context("never rate limited")?;
    ensure!(limited.headers().get("retry-after").is_some());
    let other = key(&kit, &["transfers:read"], None).await?;
    ensure!(http.get(url("/v1/funds/none")).bearer_auth(&other).send().await?.status() == StatusCode::NOT_FOUND);
    api.stop().await
}

/// Operators inspect and redrive dead letters and manage notification
/// targets over the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_manage_dead_letters_and_notification_targets() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    let pipeline = kit.spawn(&Part::all());
    let mut config = ApiConfig::new();
    config.keyring = Some(bridge_testkit::keyring());
    let api = api(&kit, config).await?;
    let client = Client::new(&api);
    let admin = key(&kit, &["admin"], None).await?;

    let requested = kit.topics().requested();
    kit.publish_raw(&requested, Some(b"k"), b"\xc3\x01not avro", &[]).await?;
    let dead_letter_topic = bridge_pipeline::Topics::dead_letter(&requested);
    let deadline = Instant::now() + SETTLE;
    let listed = loop {
        let (status, listed) = client
            .call(Method::GET, &format!("/v1/admin/dead-letters/{dead_letter_topic}"), Some(&admin), None, None)
            .await?;
        ensure!(status == StatusCode::OK, "{status} {listed}");
        if listed["total"] == 1 {
            break listed;
        }
        ensure!(Instant::now() < deadline, "nothing dead-lettered: {listed}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let record = &listed["records"][0];
    ensure!(record["error_class"].is_string() && record["payload_bytes"] == 10 && record["key"] == "k", "{listed}");
    let (status, report) = client
        .call(
            Method::POST,
            &format!("/v1/admin/dead-letters/{dead_letter_topic}/redrive"),
            Some(&admin),
            None,
            Some(&json!({"dry_run": true})),
        )
        .await?;
    ensure!(
        status == StatusCode::OK && report["read"] == 1 && report["redriven"] == 1 && report["dry_run"] == true,
        "{report}"
    );
    let (status, _) =
        client.call(Method::GET, "/v1/admin/dead-letters/some-other-topic.dlq", Some(&admin), None, None).await?;
    ensure!(status == StatusCode::NOT_FOUND);

    let subscription = json!({"subscriber_kind": "operator", "channel": "webhook", "target": "https://ops.example.com/hook", "states": ["manual_review"]});
    let (status, created) = client
        .call(Method::POST, "/v1/admin/notifications/subscriptions", Some(&admin), None, Some(&subscription))
        .await?;
    ensure!(
        status == StatusCode::CREATED && created["signing_secret"].as_str().is_some_and(|s| s.starts_with("whsec_")),
        "{created}"
    );
    let id = created["id"].as_i64().context("id")?;
    // Only a reference to the encrypted store is kept with the subscription.
    let stored: Option<String> = sqlx::query_scalar("SELECT secret FROM notification_subscriptions WHERE id = $1")
        .bind(id)
        .fetch_one(&kit.pool)
        .await?;
    let shown = created["signing_secret"].as_str().unwrap_or_default();
    ensure!(stored.as_deref().is_some_and(|s| s.starts_with("credential:") && !s.contains(shown)), "{stored:?}");
    // A Slack URL is its own credential: sealed, and shown redacted.
    let slack = json!({"subscriber_kind": "operator", "channel": "slack", "target": "https://hooks.slack.com/services/T0001/B0002/XXXXsecretXXXX"});
    let (status, created_slack) =
        client.call(Method::POST, "/v1/admin/notifications/subscriptions", Some(&admin), None, Some(&slack)).await?;
    ensure!(status == StatusCode::CREATED, "{created_slack}");
    let (_, listed) =
        client.call(Method::GET, "/v1/admin/notifications/subscriptions", Some(&admin), None, None).await?;
    ensure!(!listed.to_string().contains("XXXXsecretXXXX"), "{listed}");
    ensure!(listed.to_string().contains("https://hooks.slack.com/services/…"), "{listed}");
    let stored: Vec<String> = sqlx::query_scalar("SELECT row_to_json(s)::text FROM notification_subscriptions s")
        .fetch_all(&kit.pool)
        .await?;
    ensure!(stored.iter().all(|row| !row.contains("XXXXsecretXXXX")), "{stored:?}");
    let bad = json!({"subscriber_kind": "operator", "channel": "sms", "target": "12345"});
    let (status, _) =
        client.call(Method::POST, "/v1/admin/notifications/subscriptions", Some(&admin), None, Some(&bad)).await?;
    ensure!(status == StatusCode::UNPROCESSABLE_ENTITY);
    // Targets inside the deployment, in the spellings that get past a
    // scheme check, and URLs hiding a host behind credentials.
    for target in [
        "http://127.0.0.1:5432/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/",
        "http://2130706433:18080/",
        "https://example.com@127.0.0.1:18080/",
        "https://user:password@hooks.example.com/",
        "http://localhost:8080/v1/admin/keys",
        "http://10.0.0.7/",
    ] {
        let internal = json!({"subscriber_kind": "operator", "channel": "webhook", "target": target});
        let (status, problem) = client
            .call(Method::POST, "/v1/admin/notifications/subscriptions", Some(&admin), None, Some(&internal))
            .await?;
        ensure!(status == StatusCode::UNPROCESSABLE_ENTITY, "{target} was accepted: {problem}");
    }
    let path = format!("/v1/admin/notifications/subscriptions/{id}/disable");
    ensure!(client.call(Method::POST, &path, Some(&admin), None, None).await?.0 == StatusCode::OK);
    // Each change, refused ones included, is in the audit log with the key
    // that made it.
    let (status, audit) = client.call(Method::GET, "/v1/admin/audit", Some(&admin), None, None).await?;
    ensure!(status == StatusCode::OK, "{audit}");
    let entries: Vec<(String, String)> = audit["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter(|item| item["actor"].as_str().is_some_and(|actor| actor.contains("(brk_")))
        .map(|item| {
            (
                item["action"].as_str().unwrap_or_default().to_owned(),
                item["outcome"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for expected in [
        ("POST /v1/admin/notifications/subscriptions".to_owned(), "201".to_owned()),
        ("POST /v1/admin/notifications/subscriptions".to_owned(), "422".to_owned()),
        (format!("POST {path}"), "200".to_owned()),
    ] {
        ensure!(entries.contains(&expected), "{expected:?} not in the audit log: {entries:?}");
    }
    let (_, list) = client.call(Method::GET, "/v1/admin/notifications/subscriptions", Some(&admin), None, None).await?;
    ensure!(
        list["items"][0]["enabled"] == false && list["items"][0]["disabled_reason"] == "disabled by an operator",
        "{list}"
    );
    let path = format!("/v1/admin/notifications/subscriptions/{id}/enable");
    ensure!(client.call(Method::POST, &path, Some(&admin), None, None).await?.0 == StatusCode::OK);
    let (_, list) = client.call(Method::GET, "/v1/admin/notifications/subscriptions", Some(&admin), None, None).await?;
    ensure!(list["items"][0]["enabled"] == true, "{list}");
    pipeline.stop().await?;
    api.stop().await
}

/// Behind an identity provider: JWTs with the pinned algorithm, issuer,
/// audience and an unexpired `exp` are accepted with their scopes and
/// investor binding; anything else is refused like a wrong key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jwt_bearer_tokens_are_checked_strictly() -> Result<()> {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("ana", 10_000_00).await?;
    kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let secret = b"an identity provider's shared secret, 32+ bytes long";
    let mut config = ApiConfig::new();
    config.jwt = Some(bridge_api::auth::JwtConfig::new("HS256", secret, "https://idp.example", "bridge")?);
    let api = api(&kit, config).await?;
    let client = Client::new(&api);
    let now = bridge_testkit::unix_now();
    let token = |alg: Algorithm, claims: Value| {
        encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret)).expect("encodes")
    };
    let good = json!({"sub": "svc-1", "iss": "https://idp.example", "aud": "bridge", "exp": now + 300, "scope": "transfers:read"});
    let status = |token: String| {
        let client = &client;
        async move { client.call(Method::GET, "/v1/funds/fund", Some(&token), None, None).await.map(|(s, _)| s) }
    };
    ensure!(status(token(Algorithm::HS256, good.clone())).await? == StatusCode::OK);
    let mut wrong_audience = good.clone();
    wrong_audience["aud"] = json!("someone-else");
    let mut wrong_issuer = good.clone();
    wrong_issuer["iss"] = json!("https://evil.example");
    let mut expired = good.clone();
    expired["exp"] = json!(now - 600);
    let mut no_expiry = good.clone();
    no_expiry.as_object_mut().context("object")?.remove("exp");
    let mut not_yet = good.clone();
    not_yet["nbf"] = json!(now + 3_600);
    let mut empty_subject = good.clone();
    empty_subject["sub"] = json!("");
    for (what, refused) in [
        ("not valid for an hour yet", token(Algorithm::HS256, not_yet)),
        ("an empty subject", token(Algorithm::HS256, empty_subject)),
        ("wrong audience", token(Algorithm::HS256, wrong_audience)),
        ("wrong issuer", token(Algorithm::HS256, wrong_issuer)),
        ("expired", token(Algorithm::HS256, expired)),
        ("no exp", token(Algorithm::HS256, no_expiry)),
        ("another algorithm", token(Algorithm::HS512, good.clone())),
        ("unsigned", {
            let signed = token(Algorithm::HS256, good.clone());
            let mut parts: Vec<&str> = signed.split('.').collect();
            let none = base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                br#"{"alg":"none","typ":"JWT"}"#,
            );
            parts[0] = &none;
            format!("{}.{}.", parts[0], parts[1])
        }),
    ] {
        ensure!(status(refused).await? == StatusCode::UNAUTHORIZED, "{what} was accepted");
    }
    let mut no_scope = good.clone();
    no_scope["scope"] = json!("transfers:write");
    ensure!(status(token(Algorithm::HS256, no_scope)).await? == StatusCode::FORBIDDEN);
    let mut bound = good;
    bound["bridge_investor"] = json!("bob");
    let (code, _) = client
        .call(Method::GET, "/v1/investors/ana/balance", Some(&token(Algorithm::HS256, bound)), None, None)
        .await?;
    ensure!(code == StatusCode::NOT_FOUND, "a token bound to bob read ana's balance: {code}");
    api.stop().await
}

/// Schemathesis (from PyPI, installed by scripts/schemathesis.sh) reads the
/// API's own OpenAPI document and throws generated requests, valid and
/// invalid, at every operation: no 5xx, and every response must match the
/// document (status codes, content types, bodies), and authentication must
/// be enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_matches_its_openapi_document_under_fuzzing() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("ana", 10_000_00).await?;
    kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let mut config = ApiConfig::new();
    config.rate_per_second = 100_000;
    config.rate_burst = 100_000;
    let api = api(&kit, config).await?;
    let all = key(&kit, &bridge_api::auth::SCOPES, None).await?;
    let client = Client::new(&api);
    let body = transfer_body("ana", "fund-account", 100_00);
    client.call(Method::POST, "/v1/transfers", Some(&all), Some("seed"), Some(&body)).await?;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/schemathesis.sh");
    let installed = tokio::process::Command::new(script).output().await?;
    ensure!(installed.status.success(), "schemathesis install failed: {}", String::from_utf8_lossy(&installed.stderr));
    let st = String::from_utf8(installed.stdout)?.trim().to_owned();
    let output = tokio::process::Command::new(&st)
        .args(["run", &format!("{}/openapi.json", api.url)])
        .args(["--header", &format!("Authorization: Bearer {all}")])
        .args(["--checks", "all", "--max-examples", "25", "--generation-deterministic", "--no-color"])
        // JSON Schema counts 1.0 as an integer; amounts must be written as
        // integers, so a request with amount_minor 1.0 is refused on purpose
        // (as payment APIs do) although the schema cannot say so.
        .args(["--exclude-checks", "positive_data_acceptance"])
        // Reading dead-letter topics waits for each partition to go quiet
        // (seconds per request); those endpoints have their own test.
        .args(["--exclude-path-regex", "^/v1/admin/dead-letters"])
        .output()
        .await?;
    api.stop().await?;
    let report = format!("{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    ensure!(output.status.success(), "schemathesis found problems:\n{report}");
    ensure!(report.contains("passed"), "schemathesis ran nothing:\n{report}");
    Ok(())
}

/// The holes a hostile or careless client found: the bearer scheme in any
/// case, no caching of answers, bodies that only say they are JSON are
/// read as JSON, invisible formatting characters and currencies no one
/// issues refused, and guessing keys throttled per address (429 with
/// Retry-After, counted) before it costs a lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_small_holes_are_closed_and_key_guessing_is_throttled() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("bo", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let mut config = ApiConfig::new();
    config.auth_failures_per_minute = 5;
    let api = api(&kit, config).await?;
    let client = Client::new(&api);
    let writer = key(&kit, &["transfers:write", "transfers:read"], None).await?;

    let answer = client
        .http
        .get(format!("{}/v1/transfers", client.base))
        .header("authorization", format!("bearer {writer}"))
        .send()
        .await?;
    ensure!(answer.status() == StatusCode::OK, "a lower-case bearer scheme was refused: {}", answer.status());
    ensure!(answer.headers().get("cache-control").is_some_and(|value| value == "no-store"), "{:?}", answer.headers());

    let body = transfer_body("bo", &fund_account, 100_00).to_string();
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let answer = client
            .http
            .post(format!("{}/v1/transfers", client.base))
            .bearer_auth(&writer)
            .header("idempotency-key", format!("ct-{content_type}"))
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await?;
        ensure!(answer.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE, "{content_type}: {}", answer.status());
    }
    let mut sneaky = transfer_body("bo", &fund_account, 100_00);
    sneaky["reference"] = json!("invoice \u{202E}fdp.exe");
    let mut unissued = transfer_body("bo", &fund_account, 100_00);
    unissued["currency"] = json!("ABC");
    for (what, body) in [("a bidi override", sneaky), ("currency ABC", unissued)] {
        let (status, problem) =
            client.call(Method::POST, "/v1/transfers", Some(&writer), Some(what), Some(&body)).await?;
        ensure!(status == StatusCode::UNPROCESSABLE_ENTITY, "{what}: {status} {problem}");
    }

    // Guessing: five wrong secrets for a real prefix, then the address is
    // refused before any lookup, even with the right key, for the minute.
    let prefix = writer.split('_').nth(1).context("prefix")?;
    let guess = format!("brk_{prefix}_bm90LXRoZS1zZWNyZXQtbm90LXRoZS1zZWNyZXQtbm90LXQ");
    for _ in 0..5 {
        let (status, _) = client.call(Method::GET, "/v1/transfers", Some(&guess), None, None).await?;
        ensure!(status == StatusCode::UNAUTHORIZED, "{status}");
    }
    let throttled = client.http.get(format!("{}/v1/transfers", client.base)).bearer_auth(&writer).send().await?;
    ensure!(throttled.status() == StatusCode::TOO_MANY_REQUESTS, "{}", throttled.status());
    ensure!(throttled.headers().contains_key("retry-after"), "no Retry-After");
    let metrics = bridge_pipeline::metrics::render();
    ensure!(metrics.contains(r#"bridge_api_auth_failures_total{reason="wrong_secret"} 5"#), "{metrics}");
    ensure!(metrics.contains(r#"bridge_api_auth_failures_total{reason="throttled"} 1"#), "{metrics}");
    api.stop().await
}

/// An investor's bank access through the API: written by the investor's
/// own app (a bound `transfers:write` key) or an admin, never read back
/// (only its metadata), refused for another investor, revoked by DELETE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_access_is_write_only_and_bound_to_its_investor() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("ana", 10_000_00).await?;
    kit.seed_investor("bob", 10_000_00).await?;
    let mut config = ApiConfig::new();
    config.keyring =
        Some(std::sync::Arc::new(bridge_secrets::Keyring::parse(&bridge_secrets::Keyring::generate_entry("k1"))?));
    let api = api(&kit, config).await?;
    let client = Client::new(&api);
    let ana = key(&kit, &["transfers:write", "transfers:read"], Some("ana")).await?;
    let reader = key(&kit, &["transfers:read"], Some("ana")).await?;
    let admin = key(&kit, &["admin"], None).await?;
    let token = "obtok_7c1d2e3f4a5b6c7d8e9f";
    let body = json!({"access_token": token, "consent_id": "consent-42", "scopes": ["payments"],
                      "expires_at": "2027-06-01T00:00:00Z"});

    let (status, shown) =
        client.call(Method::PUT, "/v1/investors/ana/bank-access", Some(&ana), None, Some(&body)).await?;
    ensure!(status == StatusCode::OK, "{status} {shown}");
    ensure!(shown["present"] == true && shown["consent_id"] == "consent-42", "{shown}");
    ensure!(!shown.to_string().contains(token), "the token came back: {shown}");
    let (status, _) = client.call(Method::PUT, "/v1/investors/bob/bank-access", Some(&ana), None, Some(&body)).await?;
    ensure!(status == StatusCode::NOT_FOUND, "another investor's access: {status}");
    let (status, _) =
        client.call(Method::PUT, "/v1/investors/ana/bank-access", Some(&reader), None, Some(&body)).await?;
    ensure!(status == StatusCode::FORBIDDEN, "a read-only key: {status}");
    let empty = json!({"access_token": "", "consent_id": "c"});
    let (status, _) = client.call(Method::PUT, "/v1/investors/ana/bank-access", Some(&ana), None, Some(&empty)).await?;
    ensure!(status == StatusCode::UNPROCESSABLE_ENTITY, "an empty token: {status}");

    let (status, shown) = client.call(Method::GET, "/v1/investors/ana/bank-access", Some(&admin), None, None).await?;
    ensure!(status == StatusCode::OK && shown["expires_at"] == "2027-06-01T00:00:00Z", "{status} {shown}");
    ensure!(!shown.to_string().contains(token), "the token came back: {shown}");
    let stored: Vec<u8> = sqlx::query_scalar("SELECT ciphertext FROM credentials WHERE name = $1")
        .bind(bridge_store::bank_access::credential_name("ana"))
        .fetch_one(&kit.pool)
        .await?;
    ensure!(!stored.windows(token.len()).any(|window| window == token.as_bytes()), "stored in clear");

    let (status, shown) = client.call(Method::DELETE, "/v1/investors/ana/bank-access", Some(&ana), None, None).await?;
    ensure!(status == StatusCode::OK && shown["present"] == false && !shown["revoked_at"].is_null(), "{shown}");
    let (status, _) = client.call(Method::DELETE, "/v1/investors/ana/bank-access", Some(&ana), None, None).await?;
    ensure!(status == StatusCode::NOT_FOUND, "revoked twice: {status}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM credentials WHERE name LIKE 'investor-bank-access/%'")
        .fetch_one(&kit.pool)
        .await?;
    ensure!(left == 0, "the revoked token is still stored");

    // An investor's attributes: setting them as they are writes nothing.
    let attributes = json!({"residence_country": "DE", "accredited": true});
    let path = "/v1/investors/ana/attributes";
    let (_, first) = client.call(Method::PUT, path, Some(&admin), None, Some(&attributes)).await?;
    let (_, again) = client.call(Method::PUT, path, Some(&admin), None, Some(&attributes)).await?;
    ensure!(first["version"] == again["version"], "{first} then {again}");
    // Changes to attributes and bank access are in the audit log.
    let audited: Vec<(String, String)> = sqlx::query_as(
        "SELECT action, outcome FROM audit_log WHERE action LIKE 'PUT /v1/investors/%'
            OR action LIKE 'DELETE /v1/investors/%' ORDER BY id",
    )
    .fetch_all(&kit.pool)
    .await?;
    let actions: Vec<&str> = audited.iter().map(|(action, _)| action.as_str()).collect();
    ensure!(actions.contains(&"DELETE /v1/investors/ana/bank-access"), "{audited:?}");
    ensure!(actions.iter().filter(|action| action.ends_with("/attributes")).count() == 2, "{audited:?}");
    ensure!(!format!("{audited:?}").contains(token), "the token reached the audit log");
    Ok(())
}
