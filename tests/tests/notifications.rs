//! The notifier against real local receivers: an HTTP server that records
//! what it gets (and fails on command), a Twilio-shaped SMS endpoint on the
//! same server, and an SMTP sink. Signatures are checked with HMAC-SHA256
//! computed here, independently of the code that signs them.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use base64::Engine;
use hmac::{Hmac, Mac};

use bridge_notify::outbound::OutboundPolicy;
use bridge_notify::{NotifierConfig, SmsProvider, SmtpServer};
use bridge_pipeline::runner::Part;
use bridge_store::notifications::{self, LoggedEvent, NewSubscription};
use bridge_testkit::receivers::{Behaviour, HttpReceiver, Received, SmtpSink};
use bridge_testkit::{BrokerKind, TestKit};

const SETTLE: Duration = Duration::from_secs(120);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The keyring every test's notifier opens signing secrets with.
fn keyring() -> std::sync::Arc<bridge_secrets::Keyring> {
    static KEYRING: std::sync::OnceLock<std::sync::Arc<bridge_secrets::Keyring>> = std::sync::OnceLock::new();
    KEYRING.get_or_init(bridge_testkit::keyring).clone()
}

async fn subscribe(
    kit: &TestKit,
    kind: &str,
    id: Option<&str>,
    channel: &str,
    target: &str,
    states: &[&str],
) -> Result<i64> {
    let secret = match channel {
        "webhook" => Some(bridge_testkit::sealed_secret(&kit.pool, &keyring(), SECRET).await?),
        _ => None,
    };
    let mut conn = kit.pool.acquire().await?;
    Ok(notifications::subscribe(
        &mut conn,
        &NewSubscription {
            subscriber_kind: kind.to_owned(),
            subscriber_id: id.map(str::to_owned),
            states: states.iter().map(|state| (*state).to_owned()).collect(),
            channel: channel.to_owned(),
            target: target.to_owned(),
            secret,
            sealed_target: None,
        },
    )
    .await?)
}

fn quick(config: &mut NotifierConfig) {
    config.keyring = Some(keyring());
    // The receivers here run on loopback, which this environment's
    // operator allows on purpose (BRIDGE_NOTIFY_ALLOWED_HOSTS).
    config.channels.outbound = std::sync::Arc::new(OutboundPolicy::parse("127.0.0.1").expect("allow-list"));
    config.retry_base_ms = 200;
    config.poll_interval_ms = 20;
    config.channels.request_timeout_ms = 1_000;
}

async fn counts(kit: &TestKit, subscription: i64) -> Result<(i64, i64, i64)> {
    let mut conn = kit.pool.acquire().await?;
    let counts = notifications::delivery_counts(&mut conn, Some(subscription)).await?;
    let get = |status: &str| counts.iter().find(|(s, _)| s == status).map_or(0, |(_, n)| *n);
    Ok((get("pending"), get("delivered"), get("dead")))
}

/// Waits until `subscription` has `delivered` deliveries delivered and
/// `dead` dead, nothing pending.
async fn wait_deliveries(kit: &TestKit, subscription: i64, delivered: i64, dead: i64) -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = counts(kit, subscription).await?;
        if now == (0, delivered, dead) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "subscription {subscription}: (pending, delivered, dead) {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Standard Webhooks, computed from the specification rather than with the
/// signing crate: base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
fn verify_independently(request: &Received) -> Result<()> {
    let key = base64::engine::general_purpose::STANDARD.decode(SECRET.trim_start_matches("whsec_"))?;
    let id = request.header("webhook-id").context("webhook-id")?;
    let timestamp = request.header("webhook-timestamp").context("webhook-timestamp")?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key)?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(&request.body);
    let expected = format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
    let signatures = request.header("webhook-signature").context("webhook-signature")?;
    ensure!(signatures.split(' ').any(|signature| signature == expected), "{signatures} != {expected}");
    let age = bridge_testkit::unix_now() - timestamp.parse::<i64>()?;
    ensure!((0..300).contains(&age), "timestamp {age} s old");
    Ok(())
}

fn json(request: &Received) -> Result<serde_json::Value> {
    Ok(serde_json::from_slice(&request.body)?)
}

/// One transfer to completion: the investor's webhook hears every change in
/// order, correctly signed; the fund's Slack channel, an operator's phone
/// and the investor's inbox hear of the completion; the event log has all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_channel_delivers() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("ivy", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let (webhook, slack, sms) = (
        HttpReceiver::start(Behaviour::default()).await?,
        HttpReceiver::start(Behaviour::default()).await?,
        HttpReceiver::start(Behaviour::default()).await?,
    );
    let smtp = SmtpSink::start().await?;
    let hook = subscribe(&kit, "investor", Some("ivy"), "webhook", &format!("{}/hooks/ivy", webhook.url), &[]).await?;
    let channel = format!("{}/services/T0/B0/x", slack.url);
    let chat = subscribe(&kit, "fund", Some(&fund_account), "slack", &channel, &["completed"]).await?;
    let phone = subscribe(&kit, "operator", None, "sms", "+447700900123", &["completed"]).await?;
    let mail = subscribe(&kit, "investor", Some("ivy"), "email", "ivy@example.com", &["completed"]).await?;
    // Someone else's subscription hears nothing of ivy's transfer.
    let other =
        subscribe(&kit, "investor", Some("someone-else"), "webhook", &format!("{}/hooks/x", webhook.url), &[]).await?;

    let mut config = NotifierConfig::default();
    quick(&mut config);
    config.channels.sms = Some(SmsProvider {
        base_url: sms.url.clone(),
        account_sid: "AC123".to_owned(),
        auth_token: "token".to_owned(),
        from: "+15005550006".to_owned(),
    });
    config.channels.smtp = Some(SmtpServer {
        host: "127.0.0.1".to_owned(),
        port: smtp.port,
        from: "Bridge <bridge@example.com>".to_owned(),
    });
    let notifier = kit.spawn_notifier(config)?;
    let pipeline = kit.spawn(&Part::all());
    let id = kit.publish(&kit.request("ivy", &fund_account, 2_500_00)).await?;
    kit.wait_terminal(&[id], SETTLE).await?;
    for (subscription, expected) in [(hook, 5), (chat, 1), (phone, 1), (mail, 1), (other, 0)] {
        wait_deliveries(&kit, subscription, expected, 0).await?;
    }
    pipeline.stop().await?;
    notifier.stop().await?;
    let metrics = bridge_pipeline::metrics::render();
    for (channel, count) in [("webhook", 5), ("slack", 1), ("sms", 1), ("email", 1)] {
        let line =
            format!(r#"bridge_notification_deliveries_total{{channel="{channel}",outcome="delivered"}} {count}"#);
        ensure!(metrics.contains(&line), "{line} not in:\n{metrics}");
    }

    let hooks = webhook.accepted();
    ensure!(hooks.len() == 5, "{} webhook requests", hooks.len());
    // Each webhook carries the transfer's trace on (W3C traceparent).
    let requested = kit.read_topic(&kit.topics().requested()).await?;
    let trace_id = requested[0].header("traceparent").and_then(|value| value.split('-').nth(1)).context("trace id")?;
    for hook in &hooks {
        let traceparent = hook.header("traceparent").context("a webhook without a traceparent")?;
        ensure!(traceparent.split('-').nth(1) == Some(trace_id), "{traceparent} is not in trace {trace_id}");
    }
    let mut versions = Vec::new();
    for request in &hooks {
        verify_independently(request)?;
        let body = json(request)?;
        ensure!(body["type"] == format!("transfer.{}", body["data"]["state"].as_str().unwrap_or_default()));
        ensure!(body["data"]["transfer_id"] == id.to_string() && request.path == "/hooks/ivy");
        ensure!(request.header("webhook-id") == body["data"]["event_id"].as_str());
        versions.push(body["data"]["version"].as_i64().unwrap_or_default());
    }
    ensure!(versions == [1, 2, 3, 4, 5], "out of order: {versions:?}");

    let chats = slack.accepted();
    ensure!(chats.len() == 1 && json(&chats[0])?["text"].as_str().unwrap_or_default().contains("2500.00 EUR"));

    let texts = sms.accepted();
    ensure!(texts.len() == 1 && texts[0].path == "/2010-04-01/Accounts/AC123/Messages.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("AC123:token");
    ensure!(texts[0].header("authorization") == Some(format!("Basic {auth}").as_str()));
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&texts[0].body)?;
    let field = |name: &str| form.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
    ensure!(field("To") == Some("+447700900123") && field("From") == Some("+15005550006"));
    ensure!(field("Body").is_some_and(|body| body.contains("complete") && body.len() <= 160), "{form:?}");

    let mails = smtp.mails();
    ensure!(mails.len() == 1 && mails[0].to == ["ivy@example.com"], "{mails:?}");
    let data = &mails[0].data;
    ensure!(data.contains("Subject: Transfer completed"), "{data}");
    ensure!(data.contains("text/plain") && data.contains("text/html"), "{data}");

    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM notification_log WHERE transfer_id = $1")
        .bind(id)
        .fetch_one(&kit.pool)
        .await?;
    ensure!(logged == 5, "{logged} events in the log");
    Ok(())
}

/// A receiver that fails three times is retried on a growing schedule and
/// then succeeds; one that fails every time ends dead-lettered; one that
/// failed every attempt and was then fixed is redriven and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_back_off_and_dead_letters_are_redriven() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("rob", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let flaky = HttpReceiver::start(Behaviour { fail_first: 3, ..Behaviour::default() }).await?;
    let fixed_later = HttpReceiver::start(Behaviour { fail_first: 4, ..Behaviour::default() }).await?;
    let broken = HttpReceiver::start(Behaviour { always_fail: true, ..Behaviour::default() }).await?;
    let flaky_id = subscribe(&kit, "operator", None, "webhook", &format!("{}/h", flaky.url), &["completed"]).await?;
    let fixed_id =
        subscribe(&kit, "operator", None, "webhook", &format!("{}/h", fixed_later.url), &["completed"]).await?;
    let broken_id = subscribe(&kit, "operator", None, "webhook", &format!("{}/h", broken.url), &["completed"]).await?;
    let mut config = NotifierConfig::default();
    quick(&mut config);
    config.attempts_max = 4;
    let notifier = kit.spawn_notifier(config)?;
    let pipeline = kit.spawn(&Part::all());
    let id = kit.publish(&kit.request("rob", &fund_account, 1_000_00)).await?;
    kit.wait_terminal(&[id], SETTLE).await?;
    wait_deliveries(&kit, flaky_id, 1, 0).await?;
    wait_deliveries(&kit, fixed_id, 0, 1).await?;
    wait_deliveries(&kit, broken_id, 0, 1).await?;

    let attempts = flaky.received();
    ensure!(attempts.len() == 4 && attempts[3].status == 200, "{} attempts", attempts.len());
    let gaps: Vec<Duration> = attempts.windows(2).map(|pair| pair[1].at - pair[0].at).collect();
    // Doubling from 200 ms with jitter (half to all): 100-200, 200-400,
    // 400-800 ms, plus polling.
    ensure!(gaps[2] > gaps[0] && gaps[2] >= Duration::from_millis(400), "no backoff: {gaps:?}");
    ensure!(broken.received().len() == 4 && fixed_later.received().len() == 4);

    let redriven = {
        let mut conn = kit.pool.acquire().await?;
        notifications::redrive(&mut conn, Some(fixed_id)).await?
    };
    ensure!(redriven == 1);
    wait_deliveries(&kit, fixed_id, 1, 0).await?;
    wait_deliveries(&kit, broken_id, 0, 1).await?;
    ensure!(fixed_later.accepted().len() == 1 && broken.received().len() == 4, "redrive touched another target");
    pipeline.stop().await?;
    notifier.stop().await
}

/// Delivered rows are pruned once past their retention, and only those:
/// dead deliveries stay for an operator, and every event stays in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delivered_notifications_are_pruned_after_their_retention() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("pat", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let healthy = HttpReceiver::start(Behaviour::default()).await?;
    let broken = HttpReceiver::start(Behaviour { always_fail: true, ..Behaviour::default() }).await?;
    let healthy_id = subscribe(&kit, "investor", Some("pat"), "webhook", &format!("{}/h", healthy.url), &[]).await?;
    let broken_id = subscribe(&kit, "operator", None, "webhook", &format!("{}/h", broken.url), &["completed"]).await?;
    let notifier_with = |retention_ms: u64| {
        let mut config = NotifierConfig::default();
        quick(&mut config);
        config.attempts_max = 2;
        config.delivered_retention_ms = retention_ms;
        config.prune_interval_ms = 20;
        kit.spawn_notifier(config)
    };
    let pipeline = kit.spawn(&Part::all());

    // Within their retention, delivered rows stay while pruning runs.
    let notifier = notifier_with(3_600_000)?;
    let first = kit.publish(&kit.request("pat", &fund_account, 1_000_00)).await?;
    kit.wait_terminal(&[first], SETTLE).await?;
    wait_deliveries(&kit, healthy_id, 5, 0).await?;
    wait_deliveries(&kit, broken_id, 0, 1).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(counts(&kit, healthy_id).await? == (0, 5, 0), "pruned within the retention");
    notifier.stop().await?;

    // Past it, they go; the dead ones and the event log stay.
    let notifier = notifier_with(0)?;
    let second = kit.publish(&kit.request("pat", &fund_account, 2_000_00)).await?;
    kit.wait_terminal(&[second], SETTLE).await?;
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = (healthy.accepted().len(), counts(&kit, healthy_id).await?, counts(&kit, broken_id).await?);
        if now == (10, (0, 0, 0), (0, 0, 2)) {
            break;
        }
        ensure!(Instant::now() < deadline, "(sent, healthy, broken) {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM notification_log WHERE transfer_id = ANY($1)")
        .bind([first, second])
        .fetch_one(&kit.pool)
        .await?;
    ensure!(logged == 10, "{logged} events in the log");
    pipeline.stop().await?;
    notifier.stop().await
}

/// A target that hangs past the request timeout, with its queue full,
/// while another target is healthy: the healthy one gets everything while
/// the hanging one has not got through its first few attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_target_does_not_slow_the_others() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_00).await?;
    let hanging = HttpReceiver::start(Behaviour { delay_ms: 5_000, ..Behaviour::default() }).await?;
    let healthy = HttpReceiver::start(Behaviour::default()).await?;
    let hanging_id = subscribe(&kit, "operator", None, "webhook", &format!("{}/h", hanging.url), &[]).await?;
    let healthy_id = subscribe(&kit, "operator", None, "webhook", &format!("{}/h", healthy.url), &[]).await?;
    let mut config = NotifierConfig::default();
    quick(&mut config);
    let notifier = kit.spawn_notifier(config)?;
    let pipeline = kit.spawn(&Part::all());
    let mut ids = Vec::new();
    let started = Instant::now();
    for investor in 0..10 {
        let investor = format!("inv-{investor}");
        kit.seed_investor(&investor, 1_000_00).await?;
        ids.push(kit.publish(&kit.request(&investor, &fund_account, 500_00)).await?);
    }
    kit.wait_terminal(&ids, SETTLE).await?;
    wait_deliveries(&kit, healthy_id, 50, 0).await?;
    let healthy_done = started.elapsed();
    let (pending, delivered, dead) = counts(&kit, hanging_id).await?;
    let last = healthy.accepted().iter().map(|request| request.at - started).max().unwrap_or_default();
    eprintln!(
        "healthy target: 50 deliveries done {healthy_done:?} after the first request (last at {last:?}); \
         hanging target meanwhile: {} attempts, (pending, delivered, dead) = ({pending}, {delivered}, {dead})",
        hanging.received().len()
    );
    ensure!((pending, delivered, dead) == (50, 0, 0), "hanging target ({pending}, {delivered}, {dead})");
    // One delivery at a time per target: the hanging target's queue has
    // had only its head tried.
    let tried: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notification_deliveries WHERE subscription_id = $1 AND attempts > 0")
            .bind(hanging_id)
            .fetch_one(&kit.pool)
            .await?;
    ensure!(tried == 1, "{tried} of the hanging target's deliveries tried");
    pipeline.stop().await?;
    notifier.stop().await
}

/// A delivery queued by a transaction that drew the lower id but commits
/// later does not overtake a target's head: while a transaction that could
/// still queue ahead of the head is open, the target waits; then its queue
/// runs in its writers' order, one delivery in flight at a time. A redriven
/// delivery joins the back of its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delivery_committed_late_does_not_overtake_the_head() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    let target = subscribe(&kit, "operator", None, "email", "ops@example.com", &[]).await?;
    let event = || LoggedEvent {
        event_id: uuid::Uuid::new_v4(),
        transfer_id: uuid::Uuid::new_v4(),
        version: 1,
        state: "completed".to_owned(),
        investor_account_id: "inv".to_owned(),
        fund_account_id: "fund".to_owned(),
        event: serde_json::json!({}),
        traceparent: None,
    };
    let (early, late, third) = (event(), event(), event());
    let accept = |event: &LoggedEvent| {
        let (pool, event) = (kit.pool.clone(), event.clone());
        async move {
            let mut tx = pool.begin().await?;
            ensure!(notifications::accept(&mut tx, &event).await? == Some(1));
            tx.commit().await?;
            Ok(())
        }
    };
    let mut conn = kit.pool.acquire().await?;

    // `early` draws the first delivery id and stays open while `late`
    // commits behind it.
    let mut open = kit.pool.begin().await?;
    ensure!(notifications::accept(&mut open, &early).await? == Some(1));
    accept(&late).await?;
    let claimed = notifications::claim_heads(&mut conn, 10, 60_000).await?;
    ensure!(claimed.is_empty(), "claimed {:?} while an older writer was open", events_of(&claimed));
    open.commit().await?;

    let head = claim_one(&mut conn).await?;
    ensure!(head.event_id == early.event_id && head.subscription_id == target, "the head is not the first writer's");
    let claimed = notifications::claim_heads(&mut conn, 10, 60_000).await?;
    ensure!(claimed.is_empty(), "claimed {:?} while the head was in flight", events_of(&claimed));
    notifications::mark_delivered(&mut conn, &head).await?;
    let next = claim_one(&mut conn).await?;
    ensure!(next.event_id == late.event_id, "the second writer's delivery is not next");

    notifications::mark_failed(&mut conn, &next, "gone", None, 3_600_000).await?;
    accept(&third).await?;
    ensure!(notifications::redrive(&mut conn, Some(target)).await? == 1);
    let mut order = Vec::new();
    for _ in 0..2 {
        let head = claim_one(&mut conn).await?;
        notifications::mark_delivered(&mut conn, &head).await?;
        order.push(head.event_id);
    }
    ensure!(order == [third.event_id, late.event_id], "after the redrive the queue ran {order:?}");
    Ok(())
}

fn events_of(claimed: &[notifications::ClaimedDelivery]) -> Vec<uuid::Uuid> {
    claimed.iter().map(|delivery| delivery.event_id).collect()
}

/// The one head due: waits while transactions older than its writer, in
/// any database of the server, are still open.
async fn claim_one(conn: &mut sqlx::PgConnection) -> Result<notifications::ClaimedDelivery> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut claimed = notifications::claim_heads(conn, 10, 60_000).await?;
        ensure!(claimed.len() <= 1, "claimed {:?} at once from one target", events_of(&claimed));
        if let Some(head) = claimed.pop() {
            return Ok(head);
        }
        ensure!(Instant::now() < deadline, "no head became due");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A status event delivered again (here: published twice) notifies nobody
/// twice; an undecodable one goes to the status dead-letter topic and does
/// not stall the notifier.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redelivered_status_event_notifies_nobody_twice() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("dan", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let receiver = HttpReceiver::start(Behaviour::default()).await?;
    let hook = subscribe(&kit, "operator", None, "webhook", &format!("{}/h", receiver.url), &[]).await?;
    let mut config = NotifierConfig::default();
    quick(&mut config);
    let notifier = kit.spawn_notifier(config)?;
    let pipeline = kit.spawn(&Part::all());
    let id = kit.publish(&kit.request("dan", &fund_account, 1_000_00)).await?;
    kit.wait_terminal(&[id], SETTLE).await?;
    wait_deliveries(&kit, hook, 5, 0).await?;

    let status_topic = kit.topics().status();
    let status = kit.read_topic(&status_topic).await?;
    ensure!(status.len() >= 5);
    for message in &status {
        let payload = message.payload.as_deref().unwrap_or_default();
        kit.publish_raw(&status_topic, message.key.as_deref(), payload, &message.headers).await?;
    }
    kit.publish_raw(&status_topic, Some(id.to_string().as_bytes()), b"\xc3\x01garbage", &[]).await?;
    let group = format!("{}bridge-notifier", kit.config.group_prefix);
    kit.wait_group_caught_up(&group, &status_topic, SETTLE).await?;
    pipeline.stop().await?;
    notifier.stop().await?;

    ensure!(receiver.received().len() == 5, "{} requests", receiver.received().len());
    let distinct: std::collections::HashSet<_> =
        receiver.received().iter().filter_map(|request| request.header("webhook-id").map(str::to_owned)).collect();
    ensure!(distinct.len() == 5);
    let dead_letters = kit.read_topic(&bridge_pipeline::Topics::dead_letter(&status_topic)).await?;
    ensure!(dead_letters.len() == 1, "{} dead letters", dead_letters.len());
    ensure!(dead_letters[0].payload.as_deref() == Some(b"\xc3\x01garbage".as_slice()));
    Ok(())
}

/// A target that keeps failing is switched off after `disable_after_ms`,
/// its deliveries wait, and once an operator enables it they go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_target_is_disabled_until_enabled() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("eve", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let receiver = HttpReceiver::start(Behaviour { fail_first: 3, ..Behaviour::default() }).await?;
    let hook = subscribe(&kit, "operator", None, "webhook", &format!("{}/h", receiver.url), &["completed"]).await?;
    let mut config = NotifierConfig::default();
    quick(&mut config);
    config.disable_after_ms = 250;
    let notifier = kit.spawn_notifier(config)?;
    let pipeline = kit.spawn(&Part::all());
    let id = kit.publish(&kit.request("eve", &fund_account, 1_000_00)).await?;
    kit.wait_terminal(&[id], SETTLE).await?;
    let deadline = Instant::now() + SETTLE;
    let reason = loop {
        let mut conn = kit.pool.acquire().await?;
        let subscription = notifications::subscriptions(&mut conn).await?.into_iter().find(|s| s.id == hook);
        if let Some(subscription) = subscription.filter(|s| !s.enabled) {
            break subscription.disabled_reason.unwrap_or_default();
        }
        ensure!(Instant::now() < deadline, "never disabled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(reason.starts_with("failing since"), "{reason}");
    let tried = receiver.received().len();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    ensure!(receiver.received().len() == tried, "a disabled target was called");
    ensure!(counts(&kit, hook).await? == (1, 0, 0));

    let mut conn = kit.pool.acquire().await?;
    ensure!(notifications::set_enabled(&mut conn, hook, true, None).await?);
    drop(conn);
    wait_deliveries(&kit, hook, 1, 0).await?;
    ensure!(receiver.accepted().len() == 1);
    pipeline.stop().await?;
    notifier.stop().await?;
    Ok(())
}

/// The event log is derived from the status topic: after losing part of it,
/// a rebuild finds exactly what is missing, feeds it back through the
/// notifier's intake (so the lost notifications go out, once), and then
/// finds nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_event_log_is_rebuilt_from_the_status_topic() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("rae", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let receiver = HttpReceiver::start(Behaviour::default()).await?;
    let hook = subscribe(&kit, "operator", None, "webhook", &format!("{}/h", receiver.url), &[]).await?;
    let mut config = NotifierConfig::default();
    quick(&mut config);
    let notifier = kit.spawn_notifier(config)?;
    let pipeline = kit.spawn(&Part::all());
    let mut ids = Vec::new();
    for amount in [1_000_00, 2_000_00] {
        ids.push(kit.publish(&kit.request("rae", &fund_account, amount)).await?);
    }
    kit.wait_terminal(&ids, SETTLE).await?;
    wait_deliveries(&kit, hook, 10, 0).await?;

    // Lose the completed events of both transfers from the log.
    sqlx::query(
        "DELETE FROM notification_deliveries WHERE event_id IN (SELECT event_id FROM notification_log WHERE state = 'completed')",
    )
    .execute(&kit.pool)
    .await?;
    sqlx::query("DELETE FROM notification_log WHERE state = 'completed'").execute(&kit.pool).await?;

    let context = bridge_pipeline::Pipeline::new(
        kit.pool.clone(),
        kit.config.clone(),
        bridge_pipeline::services::Services::none(),
    );
    let report = bridge_notify::rebuild::run(context.context(), false, 1_500).await?;
    ensure!(!report.consistent() && report.comparison.missing_from_log == 2, "{report:?}");
    ensure!(report.comparison.rebuilt == 10 && report.comparison.versions_never_published == 0, "{report:?}");
    let report = bridge_notify::rebuild::run(context.context(), true, 1_500).await?;
    ensure!(report.applied == 2 && report.consistent(), "{report:?}");
    wait_deliveries(&kit, hook, 10, 0).await?;
    let again = bridge_notify::rebuild::run(context.context(), true, 1_500).await?;
    ensure!(again.applied == 0 && again.consistent(), "{again:?}");
    pipeline.stop().await?;
    notifier.stop().await?;
    // The two lost notifications went out once more; nothing else did.
    ensure!(receiver.accepted().len() == 12, "{} deliveries", receiver.accepted().len());
    Ok(())
}

/// A target inside the deployment (a receiver on loopback, here in three
/// spellings, stored straight into the table as one written before the
/// rule would be) is refused when the notifier comes to send: each delivery
/// is dead at once with the reason, and nothing reaches the receiver. The
/// notifier runs without an allow-list, as a deployment's does by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn targets_inside_the_deployment_are_never_called() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("ivy", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let receiver = HttpReceiver::start(Behaviour::default()).await?;
    let port = receiver.url.rsplit(':').next().context("receiver port")?.to_owned();
    let mut subscriptions = Vec::new();
    for (channel, target) in [
        ("webhook", format!("{}/plain", receiver.url)),
        ("webhook", format!("http://2130706433:{port}/decimal")),
        ("slack", format!("http://[::ffff:127.0.0.1]:{port}/mapped")),
    ] {
        subscriptions.push(subscribe(&kit, "operator", None, channel, &target, &["completed"]).await?);
    }
    let mut config = NotifierConfig::default();
    quick(&mut config);
    config.channels.outbound = std::sync::Arc::default();
    let notifier = kit.spawn_notifier(config)?;
    let pipeline = kit.spawn(&Part::all());
    let id = kit.publish(&kit.request("ivy", &fund_account, 1_000_00)).await?;
    kit.wait_terminal(&[id], SETTLE).await?;
    for subscription in &subscriptions {
        wait_deliveries(&kit, *subscription, 0, 1).await?;
        let error: Option<String> =
            sqlx::query_scalar("SELECT last_error FROM notification_deliveries WHERE subscription_id = $1")
                .bind(subscription)
                .fetch_one(&kit.pool)
                .await?;
        let error = error.unwrap_or_default();
        ensure!(error.contains("loopback") && error.contains("public hosts only"), "{error}");
    }
    ensure!(receiver.received().is_empty(), "an internal target was called");
    pipeline.stop().await?;
    notifier.stop().await?;
    Ok(())
}

/// A Slack incoming webhook's URL is its credential: subscribed as the API
/// and the CLI do, it is sealed in the credentials store, the table and the
/// listing hold only its redacted form, and the notifier opens it to send,
/// to the full URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secret_target_urls_are_sealed_and_opened_only_to_send() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("una", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let receiver = HttpReceiver::start(Behaviour::default()).await?;
    let target = format!("{}/services/T0001/B0002/XXXXsecretXXXX", receiver.url);
    let mut conn = kit.pool.acquire().await?;
    let (reference, shown) = bridge_notify::outbound::seal(&mut conn, &keyring(), &target).await?;
    let id = notifications::subscribe(
        &mut conn,
        &NewSubscription {
            subscriber_kind: "operator".to_owned(),
            subscriber_id: None,
            states: vec!["completed".to_owned()],
            channel: "slack".to_owned(),
            target: shown.clone(),
            secret: None,
            sealed_target: Some(reference),
        },
    )
    .await?;
    let row: String = sqlx::query_scalar("SELECT row_to_json(s)::text FROM notification_subscriptions s WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    ensure!(!row.contains("XXXXsecretXXXX") && shown.ends_with("/services/…"), "{row}");
    let listed = notifications::subscriptions(&mut conn).await?;
    ensure!(listed.iter().all(|subscription| !subscription.target.contains("XXXXsecretXXXX")), "{listed:?}");
    drop(conn);

    let mut config = NotifierConfig::default();
    quick(&mut config);
    let notifier = kit.spawn_notifier(config)?;
    let pipeline = kit.spawn(&Part::all());
    let transfer = kit.publish(&kit.request("una", &fund_account, 1_000_00)).await?;
    kit.wait_terminal(&[transfer], SETTLE).await?;
    wait_deliveries(&kit, id, 1, 0).await?;
    let paths: Vec<String> = receiver.accepted().iter().map(|request| request.path.clone()).collect();
    ensure!(paths == ["/services/T0001/B0002/XXXXsecretXXXX"], "{paths:?}");
    pipeline.stop().await?;
    notifier.stop().await?;
    Ok(())
}
