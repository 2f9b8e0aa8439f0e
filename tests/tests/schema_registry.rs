//! Confluent Schema Registry: with `SCHEMA_REGISTRY_URL` set the pipeline
//! registers its schemas under `<topic>-value` and writes Confluent's wire
//! format; it reads requests in either framing, fetches a foreign writer
//! schema once by id, waits out a registry outage, dead-letters an id the
//! registry does not know, and refuses to start against a registry that
//! rejects its schemas.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bridge_codec::{decode, encode_confluent, schema_text_of, TransferRequested, TransferStatusChanged};
use bridge_pipeline::message::dead_letter_headers as dlq;
use bridge_pipeline::Topics;
use bridge_testkit::schema_registry::SchemaRegistryServer;
use bridge_testkit::{BrokerKind, TestKit};

const SETTLE: Duration = Duration::from_secs(120);

/// The request schema as another producer registered it: the same record
/// with a doc string added, which makes it a different schema (a new id)
/// with the same binary layout.
fn foreign_request_schema() -> Result<String> {
    let mut schema: serde_json::Value = serde_json::from_str(schema_text_of::<TransferRequested>())?;
    schema["doc"] = serde_json::Value::String("Registered by an upstream system".to_owned());
    Ok(schema.to_string())
}

async fn wait_for(kit: &TestKit, topic: &str, count: usize) -> Result<Vec<bridge_pipeline::message::Inbound>> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let messages = kit.read_topic(topic).await?;
        if messages.len() >= count {
            return Ok(messages);
        }
        ensure!(Instant::now() < deadline, "{topic}: {} of {count} messages", messages.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_registry_events_are_confluent_framed_and_both_framings_are_read() -> Result<()> {
    let registry = SchemaRegistryServer::start().await?;
    let url = registry.url.clone();
    let kit = TestKit::start_with(BrokerKind::InProcess, |config| config.schema_registry_url = Some(url)).await?;
    kit.seed_investor("ann", 100_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 10_000_000_00).await?;
    let topics = kit.topics().clone();
    let foreign_id = registry.register_directly(&format!("{}-value", topics.requested()), &foreign_request_schema()?);
    let pipeline = kit.spawn_all();

    // One request in single-object encoding, as before any registry.
    let plain = kit.publish(&kit.request("ann", &fund_account, 1_000_00)).await?;
    kit.wait_terminal(&[plain], SETTLE).await?;

    // The registry is down when two requests framed with an id the pipeline
    // has not seen arrive: their partitions wait instead of dead-lettering.
    registry.set_unavailable(true);
    let mut framed = Vec::new();
    for _ in 0..2 {
        let request = kit.request("ann", &fund_account, 2_000_00);
        let bytes = encode_confluent(&request, foreign_id)?;
        let key = request.transfer_id.clone();
        kit.publish_raw(&topics.requested(), Some(key.as_bytes()), &bytes, &[]).await?;
        framed.push(uuid::Uuid::parse_str(&request.transfer_id)?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in &framed {
        let transfer = kit.transfer(*id).await;
        ensure!(transfer.is_err(), "a request was processed while its schema could not be fetched: {transfer:?}");
    }
    ensure!(registry.requests().iter().any(|request| request == &format!("GET /schemas/ids/{foreign_id}")));
    registry.set_unavailable(false);
    kit.wait_terminal(&framed, SETTLE).await?;
    for id in framed.iter().chain([&plain]) {
        let transfer = kit.transfer(*id).await?;
        ensure!(transfer.state.as_str() == "completed", "{id}: {}", transfer.state.as_str());
    }

    // An id the registry never gave is dead-lettered with the original bytes.
    let unknown = encode_confluent(&kit.request("ann", &fund_account, 1_00), 9_999)?;
    kit.publish_raw(&topics.requested(), Some(b"unknown-id"), &unknown, &[]).await?;
    let dead = wait_for(&kit, &Topics::dead_letter(&topics.requested()), 1).await?;
    ensure!(dead[0].header(dlq::ERROR_CLASS) == Some("unknown_schema_id"), "{:?}", dead[0].header(dlq::ERROR_CLASS));
    ensure!(dead[0].payload.as_deref() == Some(unknown.as_slice()), "the dead letter lost the original bytes");

    // Every subject is registered, and every status event is framed with its
    // subject's id and decodes.
    let subjects = registry.subjects();
    for topic in [topics.requested(), topics.validated(), topics.withdrawn(), topics.deposited(), topics.status()] {
        ensure!(subjects.contains_key(&format!("{topic}-value")), "{topic}-value not registered: {subjects:?}");
    }
    let status_id = *subjects[&format!("{}-value", topics.status())].last().context("status subject")?;
    let events = wait_for(&kit, &topics.status(), 15).await?;
    for event in &events {
        let payload = event.payload.as_deref().context("status event without payload")?;
        ensure!(
            bridge_codec::confluent_schema_id(payload) == Some(status_id),
            "status event not framed with {status_id}"
        );
        decode::<TransferStatusChanged>(payload)?;
    }
    for topic in [topics.validated(), topics.withdrawn(), topics.deposited()] {
        for event in kit.read_topic(&topic).await? {
            ensure!(bridge_codec::confluent_schema_id(event.payload.as_deref().unwrap_or_default()).is_some());
        }
    }
    // Once fetched, the foreign schema is kept: another request framed with
    // it does not ask the registry again.
    let fetches = |registry: &SchemaRegistryServer| {
        let wanted = format!("GET /schemas/ids/{foreign_id}");
        registry.requests().iter().filter(|request| **request == wanted).count()
    };
    let before = fetches(&registry);
    let request = kit.request("ann", &fund_account, 3_000_00);
    let bytes = encode_confluent(&request, foreign_id)?;
    kit.publish_raw(&topics.requested(), Some(request.transfer_id.as_bytes()), &bytes, &[]).await?;
    kit.wait_terminal(&[uuid::Uuid::parse_str(&request.transfer_id)?], SETTLE).await?;
    ensure!(fetches(&registry) == before, "the registry was asked again for a schema already fetched");
    pipeline.stop().await?;
    kit.assert_books_balance().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_that_refuses_our_schema_stops_the_pipeline_from_starting() -> Result<()> {
    let registry = SchemaRegistryServer::start().await?;
    let url = registry.url.clone();
    let kit = TestKit::start_with(BrokerKind::InProcess, |config| config.schema_registry_url = Some(url)).await?;
    // Someone registered a different status schema, and the registry holds
    // the subject to it.
    let mut other: serde_json::Value = serde_json::from_str(schema_text_of::<TransferStatusChanged>())?;
    other["doc"] = serde_json::Value::String("another writer".to_owned());
    registry.register_directly(&format!("{}-value", kit.topics().status()), &other.to_string());
    registry.refuse_new_versions(true);
    let error = kit.pipeline().prepare().await.err().context("the pipeline prepared against a refusing registry")?;
    let text = format!("{error:#}");
    ensure!(text.contains("refused the schema") && text.contains("409"), "{text}");
    Ok(())
}

/// A registry run as production ones are: every request authenticated, the
/// pipeline's user read-only. The pipeline only looks its schemas up, and
/// refuses to start until the deployment's user has checked and registered
/// them (`bridge schemas check` / `register`); then it writes with those ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_only_registry_is_looked_up_after_the_deployment_registers() -> Result<()> {
    use bridge_pipeline::schema_registry::SchemaRegistry;
    use bridge_pipeline::security::RegistryAuth;
    let registry = SchemaRegistryServer::start().await?;
    registry.add_user("bridge-app", "app-secret", false);
    registry.add_user("deployer", "deployer-secret", true);
    let url = registry.url.clone();
    let app = RegistryAuth {
        username: Some("bridge-app".into()),
        password: Some("app-secret".into()),
        ..RegistryAuth::default()
    };
    let app_settings = app.clone();
    let kit = TestKit::start_with(BrokerKind::InProcess, |config| {
        config.schema_registry_url = Some(url.clone());
        config.schema_registry_auth = app_settings;
        config.schema_registry_auto_register = false;
    })
    .await?;

    // Nothing registered yet: the pipeline will not start.
    let error = kit.pipeline().prepare().await.err().context("started without its schemas registered")?;
    let text = format!("{error:#}");
    ensure!(text.contains("bridge schemas register"), "{text}");
    // Without credentials the registry answers 401, and that is what is said.
    let anonymous = SchemaRegistry::new(&url, 5_000, RegistryAuth::default(), false);
    let text = format!("{:#}", anonymous.register(kit.topics()).await.err().context("anonymous lookup worked")?);
    ensure!(text.contains("401"), "{text}");
    // The pipeline's own user may not register.
    let as_app = SchemaRegistry::new(&url, 5_000, app, true);
    let text = format!("{:#}", as_app.register_all(kit.topics()).await.err().context("a read-only user registered")?);
    ensure!(text.contains("403"), "{text}");

    let deployer = SchemaRegistry::new(
        &url,
        5_000,
        RegistryAuth {
            username: Some("deployer".into()),
            password: Some("deployer-secret".into()),
            ..RegistryAuth::default()
        },
        false,
    );
    let checks = deployer.check(kit.topics()).await?;
    ensure!(checks.iter().all(|check| check.new_subject && check.problems.is_empty()), "{checks:?}");
    let registered = deployer.register_all(kit.topics()).await?;
    ensure!(registered.len() == 5, "{registered:?}");
    let checks = deployer.check(kit.topics()).await?;
    ensure!(checks.iter().all(|check| !check.new_subject && check.problems.is_empty()), "{checks:?}");
    let writes_before = registry.requests().iter().filter(|request| request.ends_with("/versions")).count();

    kit.seed_investor("ro", 100_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 10_000_000_00).await?;
    let pipeline = kit.spawn_all();
    let id = kit.publish(&kit.request("ro", &fund_account, 1_000_00)).await?;
    kit.wait_terminal(&[id], SETTLE).await?;
    pipeline.stop().await?;
    let status_id = registered
        .iter()
        .find(|(subject, _)| *subject == format!("{}-value", kit.topics().status()))
        .map(|(_, id)| *id)
        .context("status subject")?;
    let events = wait_for(&kit, &kit.topics().status(), 1).await?;
    ensure!(
        events
            .iter()
            .all(|event| bridge_codec::confluent_schema_id(event.payload.as_deref().unwrap_or_default())
                == Some(status_id)),
        "status events not framed with the registered id"
    );
    let writes_after = registry.requests().iter().filter(|request| request.ends_with("/versions")).count();
    ensure!(writes_after == writes_before, "the pipeline wrote to a registry it may only read");
    kit.assert_books_balance().await
}

/// `check` looks both ways. A registered status schema with a field that
/// has no default and that ours lacks: ours reads old data (the registry's
/// BACKWARD verdict is yes), but a consumer still on the registered schema
/// cannot read what we would write, and `check` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_check_finds_what_would_break_readers_that_have_not_upgraded() -> Result<()> {
    use bridge_pipeline::schema_registry::SchemaRegistry;
    use bridge_pipeline::security::RegistryAuth;
    let registry = SchemaRegistryServer::start().await?;
    let topics = Topics::new("check.");
    let mut older: serde_json::Value = serde_json::from_str(schema_text_of::<TransferStatusChanged>())?;
    older["fields"].as_array_mut().context("fields")?.push(serde_json::json!({"name": "channel", "type": "string"}));
    let subject = format!("{}-value", topics.status());
    registry.register_directly(&subject, &older.to_string());
    let checks = SchemaRegistry::new(&registry.url, 5_000, RegistryAuth::default(), false).check(&topics).await?;
    let status = checks.iter().find(|check| check.subject == subject).context("status checked")?;
    ensure!(status.problems.len() == 1 && status.problems[0].contains("forward"), "{status:?}");
    ensure!(checks.iter().filter(|check| check.subject != subject).all(|check| check.new_subject), "{checks:?}");
    Ok(())
}
