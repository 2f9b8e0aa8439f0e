//! Kafka as production runs it: TLS with a private CA and client
//! certificates, SASL/SCRAM over TLS with the password in the credentials
//! store, and OAUTHBEARER tokens from an identity provider. The standalone
//! broker speaks plaintext, so TLS is a proxy in front of it (with a CA and
//! certificates made for this run) and the broker advertises the proxy's
//! address; SCRAM is the broker's own. A broker Bridge cannot verify, or
//! that refuses its password, stops `bridge run` at start-up with the
//! reason, before it has read a single request.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use bridge_pipeline::security::KafkaSecurity;
use bridge_testkit::tansu::{PrivateTansu, TansuOptions};
use bridge_testkit::tls::{TestPki, TlsProxy};
use bridge_testkit::{BrokerKind, TestKit};

const BRIDGE: &str = env!("CARGO_BIN_EXE_bridge");

fn kit_env(kit: &TestKit) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", kit.database_url.clone()),
        ("KAFKA_BROKERS", kit.config.brokers.clone()),
        ("BRIDGE_TOPIC_PREFIX", kit.config.topics.prefix.clone()),
        ("BRIDGE_GROUP_PREFIX", kit.config.group_prefix.clone()),
        ("BRIDGE_SIMULATED_SERVICES", "true".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ]
}

/// `bridge run` that must fail at start-up: its exit and what it said.
fn run_must_fail(env: &[(&'static str, String)]) -> Result<String> {
    let started = Instant::now();
    let output = Command::new(BRIDGE)
        .arg("run")
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .output()
        .context("Failed to run bridge")?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    // Shown with --no-capture: what an operator would read.
    println!("bridge run refused the cluster after {:?}:\n{stderr}", started.elapsed());
    ensure!(!output.status.success(), "bridge run started against a broker it should refuse:\n{stderr}");
    // Fails fast: within the start-up connection timeout, not never.
    ensure!(started.elapsed() < Duration::from_secs(60), "bridge run took {:?} to give up", started.elapsed());
    Ok(stderr)
}

/// Runs `bridge run` until the transfers are terminal, then stops it.
async fn run_until_terminal(kit: &TestKit, env: &[(&'static str, String)], ids: &[uuid::Uuid]) -> Result<()> {
    let log = std::env::temp_dir().join(format!("bridge-security-{}.log", uuid::Uuid::new_v4().simple()));
    let process = Command::new(BRIDGE)
        .arg("run")
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let waited = kit.wait_terminal(ids, Duration::from_secs(120)).await;
    Command::new("kill").args(["-TERM", &process.id().to_string()]).status()?;
    let status = tokio::task::spawn_blocking(move || process.wait_with_output()).await??.status;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    waited.with_context(|| format!("bridge run:\n{text}"))?;
    ensure!(status.success(), "bridge run did not stop cleanly:\n{text}");
    Ok(())
}

async fn transfer_count(kit: &TestKit) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM transfers").fetch_one(&kit.pool).await?)
}

/// A private broker behind a TLS proxy on a port of its own.
async fn broker_behind_tls(
    pki: &TestPki,
    options: TansuOptions,
    client_ca: Option<&str>,
) -> Result<(PrivateTansu, TlsProxy)> {
    let proxy_port = bridge_store::local_cluster::unused_port()?;
    let broker = PrivateTansu::start_with(TansuOptions { advertised_port: Some(proxy_port), ..options })?;
    let upstream: SocketAddr = format!("127.0.0.1:{}", broker.port()).parse()?;
    let server = pki.server("broker", &["localhost", "127.0.0.1"])?;
    let proxy = TlsProxy::start(proxy_port, upstream, &server, client_ca).await?;
    Ok((broker, proxy))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_over_mutual_tls_and_refuses_brokers_it_cannot_verify() -> Result<()> {
    let pki = TestPki::new("Bridge test CA")?;
    let (_broker, proxy) = broker_behind_tls(&pki, TansuOptions::default(), Some(pki.ca_pem())).await?;
    let client = pki.client("bridge", "bridge-pipeline")?;
    let security = KafkaSecurity {
        ca_file: Some(pki.ca_file().display().to_string()),
        cert_file: Some(client.cert_file.display().to_string()),
        key_file: Some(client.key_file.display().to_string()),
        ..KafkaSecurity::new()
    };
    let brokers = proxy.address.to_string();
    let kit = TestKit::start_with(BrokerKind::Standalone, |config| {
        config.brokers = brokers.clone();
        config.kafka_security = security;
    })
    .await?;
    kit.seed_investor("tls-investor", 10_000_00).await?;
    let fund_account = kit.seed_fund("tls-fund", 100_00, 100, 1_000_000_00).await?;
    let mut ids = Vec::new();
    for amount in [100_00, 200_00, 300_00] {
        ids.push(kit.publish(&kit.request("tls-investor", &fund_account, amount)).await?);
    }
    let mut env = kit_env(&kit);
    env.push(("KAFKA_SSL_CERT_FILE", client.cert_file.display().to_string()));
    env.push(("KAFKA_SSL_KEY_FILE", client.key_file.display().to_string()));

    // A CA that did not sign the broker's certificate.
    let stranger = TestPki::new("Another CA")?;
    let mut wrong_ca = env.clone();
    wrong_ca.push(("KAFKA_SSL_CA_FILE", stranger.ca_file().display().to_string()));
    let said = run_must_fail(&wrong_ca)?;
    ensure!(said.contains("certificate verify failed"), "no clear reason for an untrusted broker:\n{said}");
    ensure!(said.contains(&brokers), "the error does not name the brokers:\n{said}");

    // The right CA, but a broker whose certificate names another host.
    let impostor = pki.server("impostor", &["broker.invalid"])?;
    let impostor_port = bridge_store::local_cluster::unused_port()?;
    let upstream: SocketAddr = format!("127.0.0.1:{}", _broker.port()).parse()?;
    let impostor_proxy = TlsProxy::start(impostor_port, upstream, &impostor, None).await?;
    let mut wrong_host = env.clone();
    wrong_host.push(("KAFKA_SSL_CA_FILE", pki.ca_file().display().to_string()));
    for (name, value) in wrong_host.iter_mut() {
        if *name == "KAFKA_BROKERS" {
            *value = impostor_proxy.address.to_string();
        }
    }
    let said = run_must_fail(&wrong_host)?;
    ensure!(
        said.contains("certificate verify failed") && said.contains("name the host"),
        "no clear reason for a broker of another name:\n{said}"
    );

    // Trusting the broker but without a client certificate: it refuses us.
    let anonymous: Vec<_> = env
        .iter()
        .filter(|(name, _)| !name.starts_with("KAFKA_SSL_"))
        .cloned()
        .chain([("KAFKA_SSL_CA_FILE", pki.ca_file().display().to_string())])
        .collect();
    let said = run_must_fail(&anonymous)?;
    ensure!(said.contains("certificate required"), "no clear reason without a client certificate:\n{said}");

    ensure!(transfer_count(&kit).await? == 0, "a process that could not verify its broker moved money");

    env.push(("KAFKA_SSL_CA_FILE", pki.ca_file().display().to_string()));
    run_until_terminal(&kit, &env, &ids).await?;
    let states = kit.state_counts(&ids).await?;
    ensure!(states.get("completed") == Some(&3), "over TLS: {states:?}");
    kit.assert_books_balance().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_over_tls_with_the_password_in_the_credentials_store() -> Result<()> {
    let pki = TestPki::new("Bridge test CA")?;
    let user = ("bridge".to_owned(), "correct horse".to_owned(), "scram512".to_owned());
    let options = TansuOptions { scram_user: Some(user), ..TansuOptions::default() };
    let (_broker, proxy) = broker_behind_tls(&pki, options, None).await?;
    let brokers = proxy.address.to_string();
    let ca_file = pki.ca_file().display().to_string();
    let security = KafkaSecurity {
        sasl_mechanism: Some("SCRAM-SHA-512".into()),
        sasl_username: Some("bridge".into()),
        sasl_password: Some("correct horse".into()),
        ca_file: Some(ca_file.clone()),
        ..KafkaSecurity::new()
    };
    let kit = TestKit::start_with(BrokerKind::Standalone, |config| {
        config.brokers = brokers.clone();
        config.kafka_security = security;
    })
    .await?;
    kit.seed_investor("sasl-investor", 10_000_00).await?;
    let fund_account = kit.seed_fund("sasl-fund", 100_00, 100, 1_000_000_00).await?;
    let mut ids = Vec::new();
    for amount in [150_00, 250_00] {
        ids.push(kit.publish(&kit.request("sasl-investor", &fund_account, amount)).await?);
    }

    let master_key = Command::new(BRIDGE).args(["credentials", "generate-key", "k1"]).output()?;
    let master_key = String::from_utf8(master_key.stdout)?.trim().to_owned();
    let mut env = kit_env(&kit);
    env.extend([
        ("BRIDGE_MASTER_KEYS", master_key),
        ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl".to_owned()),
        ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512".to_owned()),
        ("KAFKA_SASL_USERNAME", "bridge".to_owned()),
        ("KAFKA_SSL_CA_FILE", ca_file),
    ]);
    let mut store = Command::new(BRIDGE)
        .args(["credentials", "set", "kafka_password"])
        .envs(env.iter().cloned())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    std::io::Write::write_all(store.stdin.as_mut().context("stdin")?, b"correct horse\n")?;
    ensure!(store.wait()?.success(), "bridge credentials set failed");

    let mut wrong = env.clone();
    wrong.push(("KAFKA_SASL_PASSWORD", "incorrect horse".to_owned()));
    let said = run_must_fail(&wrong)?;
    ensure!(said.contains("SASL authentication error"), "no clear reason for a refused password:\n{said}");
    ensure!(!said.contains("incorrect horse"), "the password was printed:\n{said}");
    ensure!(transfer_count(&kit).await? == 0, "a process the broker refused moved money");

    env.push(("KAFKA_SASL_PASSWORD", "credential:kafka_password".to_owned()));
    let config = Command::new(BRIDGE).arg("config").envs(env.iter().cloned()).output()?;
    let shown = String::from_utf8_lossy(&config.stdout);
    let line = shown.lines().find(|line| line.contains("kafka-sasl-password =")).context("no password line")?;
    ensure!(line.contains("<redacted>") && !shown.contains("kafka_password"), "{shown}");
    run_until_terminal(&kit, &env, &ids).await?;
    let states = kit.state_counts(&ids).await?;
    ensure!(states.get("completed") == Some(&2), "over SASL_SSL: {states:?}");
    kit.assert_books_balance().await
}

/// OAUTHBEARER with OIDC: librdkafka fetches a token from the identity
/// provider's token endpoint with the client credentials grant. Neither
/// broker here accepts OAUTHBEARER, so what is proven is the client side:
/// the request the identity provider sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauthbearer_fetches_its_token_with_the_client_credentials_grant() -> Result<()> {
    use axum::routing::post;
    type Seen = Arc<Mutex<Vec<(Option<String>, String)>>>;
    let seen: Seen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let token_url = format!("http://{}/oauth2/token", listener.local_addr()?);
    let app = axum::Router::new()
        .route(
            "/oauth2/token",
            post(
                |axum::extract::State(seen): axum::extract::State<Seen>,
                 headers: axum::http::HeaderMap,
                 body: String| async move {
                    let authorization =
                        headers.get("authorization").and_then(|value| value.to_str().ok()).map(str::to_owned);
                    seen.lock().expect("lock").push((authorization, body));
                    // A JWT (unsigned; librdkafka reads its expiry and subject).
                    use base64::Engine as _;
                    let encode = |value: serde_json::Value| {
                        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
                    };
                    let exp = chrono::Utc::now().timestamp() + 3_600;
                    let jwt = format!(
                        "{}.{}.c2lnbmF0dXJl",
                        encode(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
                        encode(serde_json::json!({"sub": "bridge-pipeline", "exp": exp, "iat": exp - 3_600}))
                    );
                    axum::Json(serde_json::json!({"access_token": jwt, "token_type": "bearer", "expires_in": 3600}))
                },
            ),
        )
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut config = bridge_pipeline::PipelineConfig::new("127.0.0.1:9");
    config.kafka_security = KafkaSecurity {
        protocol: Some("sasl_plaintext".into()),
        sasl_mechanism: Some("OAUTHBEARER".into()),
        oauth_token_url: Some(token_url),
        oauth_client_id: Some("bridge-pipeline".into()),
        oauth_client_secret: Some("client-secret".into()),
        oauth_scope: Some("kafka".into()),
        ..KafkaSecurity::new()
    };
    // The producer's own thread serves librdkafka's token refresh.
    let _producer = bridge_pipeline::kafka::upstream_producer(&config)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().expect("lock").is_empty() {
        ensure!(Instant::now() < deadline, "librdkafka never asked the identity provider for a token");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (authorization, body) = seen.lock().expect("lock")[0].clone();
    use base64::Engine as _;
    let expected =
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("bridge-pipeline:client-secret"));
    ensure!(authorization.as_deref() == Some(expected.as_str()), "client credentials not sent: {authorization:?}");
    ensure!(body.contains("grant_type=client_credentials") && body.contains("scope=kafka"), "token request: {body}");
    Ok(())
}
