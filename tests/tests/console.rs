//! The operator console in a real browser: headless Chromium driven over
//! WebDriver (chromedriver), against the API serving the pipeline's
//! database, the simulated services over HTTP and a Kafka cluster. Two
//! operators and a viewer sign in with their own keys; the test finds a
//! transfer, reads its timeline, resolves a manual review with four-eyes,
//! redrives a dead letter, enables a notification target, and checks each
//! result on the page and in the database. Requests without a session, with
//! a wrong CSRF token or from another site are refused. Screenshots of every
//! page land in `target/console/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use uuid::Uuid;

use bridge_pipeline::runner::Part;
use bridge_sim::FaultPlan;
use bridge_testkit::{BrokerKind, TestKit};

const SETTLE: Duration = Duration::from_secs(120);

/// chromedriver as a child process, and a headless Chromium session on it.
struct Browser {
    client: Client,
    driver: Child,
}

impl Browser {
    async fn start() -> Result<Self> {
        let driver_path = std::env::var("BRIDGE_TEST_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let chromium = std::env::var("BRIDGE_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        ensure!(
            std::path::Path::new(&driver_path).exists() && std::path::Path::new(&chromium).exists(),
            "{driver_path} or {chromium} is missing: scripts/browser.sh installs Debian's chromium and chromium-driver"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let driver = Command::new(&driver_path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {driver_path}"))?;
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1360,1100", "--force-device-scale-factor=1"],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            match ClientBuilder::new(connector.clone())
                .capabilities(capabilities.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(client) => break client,
                Err(error) if Instant::now() < deadline => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => bail!("no WebDriver session: {error}"),
            }
        };
        Ok(Self { client, driver })
    }

    /// Clicks what `locator` finds and waits for the page it leads to:
    /// the old document gone (its root element stale), the new one loaded.
    /// A click returns before a navigation it starts is done; reading the
    /// page any earlier could read the old one.
    async fn follow(&self, locator: Locator<'_>) -> Result<()> {
        let element = self.client.find(locator).await?;
        self.navigate(|| async { Ok(element.click().await?) }).await
    }

    /// Types `text` into the field and presses Enter, which submits its
    /// form; waits for the page it leads to.
    async fn submit_typing(&self, locator: Locator<'_>, text: &str) -> Result<()> {
        let field = self.client.find(locator).await?;
        let typed = format!("{text}{}", char::from(Key::Enter));
        self.navigate(|| async { Ok(field.send_keys(&typed).await?) }).await
    }

    async fn navigate<F, Fut>(&self, act: F) -> Result<()>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let old = self.client.find(Locator::Css("html")).await?;
        act().await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while old.tag_name().await.is_ok() {
            ensure!(Instant::now() < deadline, "the page did not change");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        loop {
            let ready = self.client.execute("return document.readyState", Vec::new()).await;
            if ready.as_ref().is_ok_and(|state| state == "complete") {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "the page did not load: {ready:?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn text(&self) -> Result<String> {
        Ok(self.client.find(Locator::Css("body")).await?.text().await?)
    }

    async fn heading(&self) -> Result<String> {
        Ok(self.client.find(Locator::Css("h1")).await?.text().await?)
    }

    async fn screenshot(&self, name: &str) -> Result<()> {
        let directory = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console");
        std::fs::create_dir_all(&directory)?;
        std::fs::write(directory.join(format!("{name}.png")), self.client.screenshot().await?)?;
        Ok(())
    }

    /// Signs in by keyboard alone: the key typed into the focused field,
    /// Enter to send.
    async fn sign_in(&self, base: &str, key: &str) -> Result<()> {
        self.client.goto(&format!("{base}/console/login")).await?;
        self.submit_typing(Locator::Id("api_key"), key).await?;
        ensure!(self.heading().await? == "Overview", "not signed in: {}", self.text().await?);
        Ok(())
    }

    async fn sign_out(&self) -> Result<()> {
        self.follow(Locator::Css("form.signout button")).await?;
        ensure!(self.heading().await? == "Sign in", "not signed out: {}", self.text().await?);
        Ok(())
    }

    /// Every visible form control has a label: its own `label for`, or a
    /// label around it.
    async fn every_control_is_labelled(&self, page: &str) -> Result<()> {
        for control in self.client.find_all(Locator::Css("input:not([type=hidden]), select, textarea")).await? {
            let id = control.attr("id").await?;
            let by_for = match &id {
                Some(id) => !self.client.find_all(Locator::Css(&format!("label[for='{id}']"))).await?.is_empty(),
                None => false,
            };
            let wrapped = !control.find_all(Locator::XPath("ancestor::label")).await?.is_empty();
            let name = control.attr("name").await?.unwrap_or_default();
            ensure!(by_for || wrapped, "{page}: the control {name:?} has no label");
        }
        for button in self.client.find_all(Locator::Css("button")).await? {
            let text = button.text().await?;
            let label = button.attr("aria-label").await?.unwrap_or_default();
            ensure!(!text.trim().is_empty() || !label.is_empty(), "{page}: a button without a name");
        }
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

async fn key(kit: &TestKit, name: &str, scopes: &[&str]) -> Result<String> {
    let scopes: Vec<String> = scopes.iter().map(|scope| (*scope).to_owned()).collect();
    Ok(bridge_api::auth::create_key(&mut *kit.pool.acquire().await?, name, &scopes, None).await?.full_key)
}

/// A session made without the browser: its cookie and its CSRF token.
async fn session(http: &reqwest::Client, base: &str, key: &str) -> Result<(String, String)> {
    let response = http.post(format!("{base}/console/login")).form(&[("api_key", key)]).send().await?;
    ensure!(response.status() == 303, "sign-in answered {}", response.status());
    let set_cookie = response.headers().get("set-cookie").context("no cookie")?.to_str()?.to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        ensure!(set_cookie.contains(attribute), "the session cookie lacks {attribute}: {set_cookie}");
    }
    let cookie = set_cookie.split(';').next().context("cookie")?.to_owned();
    let page = http.get(format!("{base}/console")).header("cookie", &cookie).send().await?.text().await?;
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .context("no CSRF token on the page")?
        .to_owned();
    Ok((cookie, csrf))
}

async fn wait_for<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + SETTLE;
    while !check().await? {
        ensure!(Instant::now() < deadline, "{what}: not within {SETTLE:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_work_the_console_in_a_real_browser() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("stranger", 10_000_00).await?;
    kit.seed_investor("known", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 10_00, 100, 1_000_000_00).await?;
    // The bank does not know the first investor's account: a person must
    // look at those transfers.
    kit.set_simulated_account_status("stranger", "unknown").await?;
    let simulator = kit.start_simulator(FaultPlan::none()).await?;
    let pipeline = kit.spawn_with_services(&Part::all(), kit.http_services(&simulator.url, 5_000)?);
    let mut config = bridge_api::ApiConfig::new();
    config.review_approvals = 2;
    let api = kit.start_api(kit.http_services(&simulator.url, 5_000)?, config).await?;
    let base = api.url.clone();

    let held = [
        kit.publish(&kit.request("stranger", &fund_account, 120_00)).await?,
        kit.publish(&kit.request("stranger", &fund_account, 130_00)).await?,
    ];
    let mut fine = Vec::new();
    for _ in 0..3 {
        fine.push(kit.publish(&kit.request("known", &fund_account, 100_00)).await?);
    }
    let all: Vec<Uuid> = held.iter().chain(&fine).copied().collect();
    kit.wait_terminal(&all, SETTLE).await?;
    let requested = kit.topics().requested();
    kit.publish_raw(&requested, Some(b"garbage-key"), b"\xc3\x01not avro at all", &[]).await?;
    let dead_letter_topic = bridge_pipeline::Topics::dead_letter(&requested);
    let config = kit.config.clone();
    let dead_letters = || {
        let (config, topic) = (config.clone(), dead_letter_topic.clone());
        async move {
            let range = bridge_pipeline::reader::Range {
                topic,
                partitions: Vec::new(),
                from: None,
                to: None,
                idle_ms: 500,
                appended_before: None,
            };
            bridge_pipeline::dead_letters::show(&config, &range, |_| Ok(())).await
        }
    };
    wait_for("the garbage dead-lettered", || async { Ok(dead_letters().await? == 1) }).await?;
    // A notification target an operator had switched off.
    let subscription = {
        let mut conn = kit.pool.acquire().await?;
        let new = bridge_store::notifications::NewSubscription {
            subscriber_kind: "operator".into(),
            subscriber_id: None,
            states: vec!["manual_review".into()],
            channel: "email".into(),
            target: "ops@example.com".into(),
            secret: None,
            sealed_target: None,
        };
        let id = bridge_store::notifications::subscribe(&mut conn, &new).await?;
        bridge_store::notifications::set_enabled(&mut conn, id, false, Some("disabled by an operator")).await?;
        id
    };

    // A Slack target from before targets were sealed (the whole URL in the
    // clear), disabled with an error text that quotes it.
    sqlx::query(
        "INSERT INTO notification_subscriptions (subscriber_kind, channel, target, enabled, disabled_reason)
         VALUES ('operator', 'slack', $1, false, $2)",
    )
    .bind("https://hooks.slack.com/services/T0001/B0002/XXsecretXX")
    .bind("request failed: error sending request for url (https://hooks.slack.com/services/T0001/B0002/XXsecretXX)")
    .execute(&kit.pool)
    .await?;

    let alice = key(&kit, "alice", &["operator"]).await?;
    let bob = key(&kit, "bob", &["operator"]).await?;
    let vic = key(&kit, "vic", &["viewer"]).await?;
    let reader = key(&kit, "app", &["transfers:read"]).await?;

    let browser = Browser::start().await?;
    let page = &browser.client;

    // Without a session the console sends you to sign in.
    page.goto(&format!("{base}/console/transfers")).await?;
    ensure!(page.current_url().await?.path() == "/console/login", "not sent to sign in");
    browser.every_control_is_labelled("sign-in").await?;
    browser.screenshot("sign-in").await?;
    // A key that is not valid, and a valid key without a console scope.
    for (wrong, expected) in
        [("brk_00000000_nope", "not valid"), (reader.as_str(), "none of the viewer, operator or admin scopes")]
    {
        browser.submit_typing(Locator::Id("api_key"), wrong).await?;
        let text = browser.text().await?;
        ensure!(text.contains(expected), "{text}");
    }

    // Alice signs in: the overview.
    browser.sign_in(&base, &alice).await?;
    ensure!(browser.heading().await? == "Overview");
    let overview = browser.text().await?;
    for expected in
        ["Transfers per state", "manual_review", "Consumer lag per stage", "validator", "Dead letters per topic"]
    {
        ensure!(overview.contains(expected), "the overview lacks {expected:?}: {overview}");
    }
    ensure!(overview.contains("bridge.transfers.requested.v1.dlq"), "{overview}");
    ensure!(overview.contains("disabled"), "the disabled target is not on the overview: {overview}");
    ensure!(!page.source().await?.contains("XXsecretXX"), "a Slack URL's secret is on the overview");
    browser.every_control_is_labelled("overview").await?;
    browser.screenshot("overview").await?;

    // Find the transfers in manual review by investor and state.
    browser.follow(Locator::LinkText("Transfers")).await?;
    page.find(Locator::Css("input[name=investor]")).await?.send_keys("stranger").await?;
    page.find(Locator::Css("select[name=state]")).await?.select_by_value("manual_review").await?;
    browser.follow(Locator::Css("form.search button")).await?;
    page.wait().for_element(Locator::Css("table.list tbody tr")).await?;
    let rows = page.find_all(Locator::Css("table.list tbody tr")).await?;
    ensure!(rows.len() == 2, "{} rows for the investor's transfers in review", rows.len());
    browser.every_control_is_labelled("search").await?;
    browser.screenshot("transfers").await?;
    let target = held[0];
    browser.follow(Locator::LinkText(&target.to_string())).await?;
    page.wait().for_element(Locator::Css("ol.timeline")).await?;
    let story = browser.text().await?;
    for expected in [
        "WITHDRAWAL_REFUSED",
        "Version 1",
        "by the pipeline (intake: the validator, or the API)",
        "120.00 EUR",
        &format!("bridge-{target}-withdrawal"),
        "Resolve",
    ] {
        ensure!(story.contains(expected), "the transfer's page lacks {expected:?}: {story}");
    }
    browser.every_control_is_labelled("transfer").await?;
    browser.screenshot("transfer-in-review").await?;

    // The account is fixed at the bank; alice asks for a retry, which
    // waits for a second operator.
    kit.set_simulated_account_status("stranger", "active").await?;
    page.find(Locator::Id("action-retry")).await?.click().await?;
    page.find(Locator::Id("reason")).await?.send_keys("bank fixed the account, ticket OPS-7").await?;
    browser.follow(Locator::Css("form.resolve button")).await?;
    page.wait().for_element(Locator::Css("p[role=status]")).await?;
    let after = browser.text().await?;
    ensure!(after.contains("waits for a second operator"), "{after}");
    let (status, requested_by): (String, String) =
        sqlx::query_as("SELECT status, requested_by FROM review_actions WHERE transfer_id = $1")
            .bind(target)
            .fetch_one(&kit.pool)
            .await?;
    ensure!(status == "awaiting_approval" && requested_by.starts_with("alice"), "{status} {requested_by}");
    ensure!(kit.transfer(target).await?.state.as_str() == "manual_review", "ran before approval");
    // She cannot approve her own resolution.
    browser.follow(Locator::Css("form[action$='/approve'] button")).await?;
    let refused = browser.text().await?;
    ensure!(refused.contains("needs a second operator"), "{refused}");
    page.goto(&format!("{base}/console/transfers/{target}")).await?;
    browser.screenshot("transfer-awaiting-approval").await?;
    browser.sign_out().await?;

    // Bob approves it; the retry runs and the transfer completes.
    browser.sign_in(&base, &bob).await?;
    browser.follow(Locator::LinkText("Manual review")).await?;
    let queue = browser.text().await?;
    ensure!(queue.contains("2 transfers waiting") && queue.contains("under way or awaiting approval"), "{queue}");
    browser.screenshot("manual-review").await?;
    browser.follow(Locator::LinkText(&target.to_string())).await?;
    browser.follow(Locator::Css("form[action$='/approve'] button")).await?;
    page.wait().for_element(Locator::Css("p[role=status]")).await?;
    ensure!(browser.text().await?.contains("Approved"), "{}", browser.text().await?);
    wait_for("the approved retry completes the transfer", || async {
        Ok(kit.transfer(target).await?.state.as_str() == "completed")
    })
    .await?;
    page.goto(&format!("{base}/console/transfers/{target}")).await?;
    let story = browser.text().await?;
    for expected in ["approved by bob", "asked by alice", "bank fixed the account", "completed"] {
        ensure!(story.contains(expected), "the timeline lacks {expected:?}: {story}");
    }
    browser.screenshot("transfer-resolved").await?;

    // A dead letter, decoded where it can be, redriven after a
    // confirmation that says what will happen.
    browser.follow(Locator::LinkText("Dead letters")).await?;
    browser.follow(Locator::LinkText(&dead_letter_topic)).await?;
    page.wait().for_element(Locator::Css("article.record")).await?;
    let records = browser.text().await?;
    ensure!(records.contains("does not decode; hex") && records.contains("garbage-key"), "{records}");
    ensure!(records.contains("c3016e6f74206176726f"), "the payload's bytes are not shown: {records}");
    browser.screenshot("dead-letters").await?;
    browser.follow(Locator::Css("article.record form button")).await?;
    let confirm = browser.text().await?;
    ensure!(confirm.contains("This publishes 1 record") && confirm.contains(&requested), "{confirm}");
    browser.screenshot("redrive-confirm").await?;
    let buttons = page.find_all(Locator::Css("main form[method=post] button")).await?;
    ensure!(buttons.len() == 1, "{} forms posting on the confirmation", buttons.len());
    browser.follow(Locator::Css("main form[method=post] button")).await?;
    page.wait().for_element(Locator::Css("p[role=status]")).await?;
    // The garbage went back to its topic and, failing again, came back.
    wait_for("the redriven record dead-lettered again", || async { Ok(dead_letters().await? == 2) }).await?;
    let audited: Vec<(String, String, String)> =
        sqlx::query_as("SELECT actor, action, outcome FROM audit_log WHERE target = $1")
            .bind(format!("dead-letters:{dead_letter_topic}"))
            .fetch_all(&kit.pool)
            .await?;
    ensure!(audited.len() == 1 && audited[0].0.starts_with("bob") && audited[0].2 == "1 redriven", "{audited:?}");
    ensure!(browser.text().await?.contains("console redrive"), "the redrive is not in the topic's history");

    // A disabled notification target, enabled again.
    browser.follow(Locator::LinkText("Notifications")).await?;
    ensure!(browser.text().await?.contains("disabled by an operator"));
    let source = page.source().await?;
    ensure!(!source.contains("XXsecretXX") && source.contains("https://hooks.slack.com/services/…"), "{source}");
    browser.every_control_is_labelled("notifications").await?;
    browser.screenshot("notifications").await?;
    browser
        .follow(Locator::Css(&format!("form[action='/console/notifications/{subscription}/enable'] button")))
        .await?;
    page.wait().for_element(Locator::Css("p[role=status]")).await?;
    let enabled: bool = sqlx::query_scalar("SELECT enabled FROM notification_subscriptions WHERE id = $1")
        .bind(subscription)
        .fetch_one(&kit.pool)
        .await?;
    ensure!(enabled, "the target is still disabled");
    browser.sign_out().await?;

    // A viewer sees everything and is offered no action.
    browser.sign_in(&base, &vic).await?;
    page.goto(&format!("{base}/console/transfers/{}", held[1])).await?;
    let viewed = browser.text().await?;
    ensure!(viewed.contains("WITHDRAWAL_REFUSED") && viewed.contains("Resolving takes the operator scope"), "{viewed}");
    ensure!(page.find_all(Locator::Css("form.resolve")).await?.is_empty(), "a viewer got the resolve form");
    // No page shows a key's secret part.
    for secret in [&alice, &bob, &vic] {
        // brk_<prefix>_<secret>: the secret is base64url and may itself
        // hold underscores, so it is everything after the second one.
        let secret_part = secret.splitn(3, '_').nth(2).context("a key's secret")?;
        ensure!(secret_part.len() >= 40, "{secret_part:?} is not a whole secret");
        ensure!(!page.source().await?.contains(secret_part), "a key's secret is on the page");
    }
    browser.sign_out().await?;
    browser.client.clone().close().await?;

    // Outside the browser: what the console refuses.
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let resolve_url = format!("{base}/console/transfers/{}/resolve", held[1]);
    let form = |csrf: &str| {
        vec![
            ("csrf", csrf.to_owned()),
            ("form_key", Uuid::new_v4().to_string()),
            ("action", "fail".to_owned()),
            ("reason", "forged".to_owned()),
        ]
    };
    // No session.
    let response = http.post(&resolve_url).form(&form("x")).send().await?;
    ensure!(response.status() == 403, "without a session: {}", response.status());
    let (cookie, csrf) = session(&http, &base, &alice).await?;
    let response = http.get(format!("{base}/console")).header("cookie", &cookie).send().await?;
    let policy = response.headers().get("content-security-policy").context("no CSP")?.to_str()?.to_owned();
    ensure!(policy.contains("default-src 'none'") && policy.contains("frame-ancestors 'none'"), "{policy}");
    ensure!(!policy.contains("script-src"), "{policy}");
    // A damaged form is refused with a page, not a bare text.
    let response = http.post(&resolve_url).header("cookie", &cookie).form(&[("reason", "x")]).send().await?;
    let kind = response.headers().get("content-type").and_then(|value| value.to_str().ok()).unwrap_or_default();
    ensure!(response.status() == 422 && kind.starts_with("text/html"), "{} {kind}", response.status());
    // A wrong CSRF token.
    let response = http.post(&resolve_url).header("cookie", &cookie).form(&form("not-the-token")).send().await?;
    ensure!(response.status() == 403, "with a wrong CSRF token: {}", response.status());
    // The right token, from another site.
    let response = http
        .post(&resolve_url)
        .header("cookie", &cookie)
        .header("origin", "https://evil.example")
        .header("sec-fetch-site", "cross-site")
        .form(&form(&csrf))
        .send()
        .await?;
    ensure!(response.status() == 403, "from another site: {}", response.status());
    // A viewer with a valid session and token.
    let (viewer_cookie, viewer_csrf) = session(&http, &base, &vic).await?;
    let response = http.post(&resolve_url).header("cookie", &viewer_cookie).form(&form(&viewer_csrf)).send().await?;
    ensure!(response.status() == 403, "a viewer resolved: {}", response.status());
    ensure!(kit.transfer(held[1]).await?.state.as_str() == "manual_review", "a refused request changed the transfer");
    let asked: i64 = sqlx::query_scalar("SELECT count(*) FROM review_actions WHERE transfer_id = $1")
        .bind(held[1])
        .fetch_one(&kit.pool)
        .await?;
    ensure!(asked == 0, "a refused request recorded a resolution");
    // The refusals are in the audit log with who tried.
    let refusals: Vec<(String, String)> = sqlx::query_as(
        "SELECT actor, outcome FROM audit_log WHERE target = $1 AND outcome LIKE 'refused%' ORDER BY id",
    )
    .bind(format!("transfer:{}", held[1]))
    .fetch_all(&kit.pool)
    .await?;
    ensure!(
        refusals.iter().any(|(actor, outcome)| actor.starts_with("alice") && outcome == "refused: wrong CSRF token")
            && refusals.iter().any(|(actor, outcome)| actor.starts_with("vic") && outcome == "refused: scope"),
        "{refusals:?}"
    );
    // A revoked key's session ends at once.
    let prefix = alice.split('_').nth(1).context("prefix")?;
    bridge_store::api::revoke_key(&mut *kit.pool.acquire().await?, prefix).await?;
    let response = http.get(format!("{base}/console")).header("cookie", &cookie).send().await?;
    ensure!(
        response.status() == 303 && response.headers().get("location").is_some_and(|to| to == "/console/login"),
        "a revoked key's session still works: {}",
        response.status()
    );

    pipeline.stop().await?;
    api.stop().await
}
