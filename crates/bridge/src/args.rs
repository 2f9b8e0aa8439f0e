//! The argument groups that several commands share: the database and
//! Kafka settings every process needs (`Common`), the account services,
//! the settlement runner and the HTTP API, each with what it builds from
//! them.

use anyhow::{Context, Result};
use clap::Args;
use tokio_util::sync::CancellationToken;

use bridge_pipeline::config::defaults;
use bridge_pipeline::http_services::{HttpAccountServices, HttpServicesConfig};
use bridge_pipeline::services::Services;
use bridge_pipeline::{DeadlinePolicy, Pipeline, PipelineConfig, Topics};
use bridge_store::PoolSettings;

use crate::{credentials, security, DEFAULT_DATABASE_URL};

#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, global = true)]
    pub database_url: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092", global = true)]
    pub brokers: String,
    /// Prefix of every topic name (lets several pipelines share a cluster).
    #[arg(long, env = "BRIDGE_TOPIC_PREFIX", default_value = "", global = true)]
    pub topic_prefix: String,
    /// Prefix of every consumer group id.
    #[arg(long, env = "BRIDGE_GROUP_PREFIX", default_value = "", global = true)]
    pub group_prefix: String,
    /// Partitions of the topics Bridge creates.
    #[arg(long, env = "BRIDGE_TOPIC_PARTITIONS", default_value_t = defaults::TOPIC_PARTITIONS, global = true)]
    pub topic_partitions: i32,
    /// Replication factor of the topics Bridge creates.
    #[arg(long, env = "BRIDGE_TOPIC_REPLICATION", default_value_t = defaults::TOPIC_REPLICATION, global = true)]
    pub topic_replication: i32,
    /// Extra librdkafka settings, `key=value`, applied to every client.
    #[arg(long = "kafka-option", value_parser = parse_key_value, global = true)]
    pub kafka_options: Vec<(String, String)>,
    /// Consumer session timeout: how long a silent consumer keeps its
    /// partitions before the group hands them to others.
    #[arg(long, env = "BRIDGE_SESSION_TIMEOUT_MS", default_value_t = defaults::SESSION_TIMEOUT_MS, global = true)]
    pub session_timeout_ms: u32,
    /// Postgres connections per process.
    #[arg(long, env = "BRIDGE_DB_CONNECTIONS_MAX", default_value_t = 16, global = true)]
    pub db_connections_max: u32,
    /// Longest a consumer's fetch waits at the broker for new data (bounds
    /// each hop's latency on brokers that do not answer a waiting fetch
    /// early).
    #[arg(long, env = "BRIDGE_FETCH_WAIT_MAX_MS", default_value_t = defaults::FETCH_WAIT_MAX_MS, global = true)]
    pub fetch_wait_max_ms: u32,
    /// Bytes a consumer's fetch asks the broker to gather before answering
    /// within its wait. Leave it at 1 on Kafka. On a broker that reads its
    /// log once per fetch and holds the answer for the whole wait (tansu
    /// 0.6), a value larger than a paced load's answers (1048576) makes it
    /// read again at the end of the wait, which cuts what a message waits
    /// there at a steady load from about one and a half waits to a half.
    #[arg(long, env = "BRIDGE_FETCH_MIN_BYTES", default_value_t = defaults::FETCH_MIN_BYTES, global = true)]
    pub fetch_min_bytes: u32,
    /// Address for `/healthz` and `/readyz` alone (for orchestrator probes of
    /// processes that do not serve the API).
    #[arg(long, env = "BRIDGE_HEALTH_LISTEN", global = true)]
    pub health_listen: Option<String>,
    /// How long applied message ids are kept in the inbox.
    #[arg(long, env = "BRIDGE_INBOX_RETENTION_MS", default_value_t = defaults::INBOX_RETENTION_MS, global = true)]
    pub inbox_retention_ms: u64,
    /// Most queued messages of one partition a stage applies in one
    /// set-based transaction (1: one message per transaction).
    #[arg(long, env = "BRIDGE_BATCH_SIZE_MAX", default_value_t = defaults::BATCH_SIZE_MAX, global = true)]
    pub batch_size_max: usize,
    /// Most set-based transactions a stage has in flight at once; batches of
    /// several partitions that find them busy share the next one.
    #[arg(long, env = "BRIDGE_BATCHES_IN_FLIGHT", default_value_t = defaults::BATCHES_IN_FLIGHT, global = true)]
    pub batches_in_flight: usize,
    /// A schema registry (Confluent's REST API): events are then written in
    /// Confluent's wire format under ids registered for `<topic>-value`.
    /// Both that and Avro single-object encoding are read either way.
    #[arg(long, env = "SCHEMA_REGISTRY_URL", global = true)]
    pub schema_registry_url: Option<String>,
    #[command(flatten)]
    pub security: security::SecurityArgs,
    /// Internal hosts notification targets may point to on purpose
    /// (comma-separated names, addresses or CIDR ranges); any other target
    /// must be a public host.
    #[arg(long, env = "BRIDGE_NOTIFY_ALLOWED_HOSTS", default_value = "", global = true)]
    pub notify_allowed_hosts: String,
}

impl Common {
    /// The pipeline's settings, with `credential:<name>` secrets read from
    /// the store.
    pub async fn pipeline_config(&self, brokers: &str) -> Result<PipelineConfig> {
        let mut security = self.security.clone();
        security.resolve_credentials(&self.database_url, &self.pool_settings()).await?;
        let mut config = PipelineConfig::new(brokers);
        config.kafka_security = security.kafka();
        // Checked here, so a contradiction is reported before anything runs.
        config.kafka_security.protocol()?;
        config.schema_registry_auth = security.registry();
        config.schema_registry_auto_register = security.schema_registry_auto_register;
        config.topics = Topics::new(&self.topic_prefix);
        config.group_prefix = self.group_prefix.clone();
        config.topic_partitions = self.topic_partitions;
        config.topic_replication = self.topic_replication;
        config.kafka_overrides = self.kafka_options.clone();
        config.session_timeout_ms = self.session_timeout_ms;
        config.fetch_wait_max_ms = self.fetch_wait_max_ms;
        config.fetch_min_bytes = self.fetch_min_bytes;
        config.inbox_retention_ms = self.inbox_retention_ms;
        config.schema_registry_url = self.schema_registry_url.clone();
        config.batch_size_max = self.batch_size_max.max(1);
        config.batches_in_flight = self.batches_in_flight.max(1);
        Ok(config)
    }

    /// Serves the health endpoints when `--health-listen` is given.
    pub async fn serve_health(&self, pipeline: &Pipeline, shutdown: CancellationToken) -> Result<()> {
        let Some(address) = &self.health_listen else { return Ok(()) };
        let listener =
            tokio::net::TcpListener::bind(address).await.with_context(|| format!("Failed to listen on {address}"))?;
        tracing::info!(address = %listener.local_addr()?, "Health endpoints listening");
        let router = bridge_api::health_router(pipeline.context().clone());
        tokio::spawn(bridge_api::serve(listener, router, shutdown));
        Ok(())
    }

    /// Where notification targets may point.
    pub fn notify_outbound(&self) -> Result<std::sync::Arc<bridge_notify::outbound::OutboundPolicy>> {
        let policy = bridge_notify::outbound::OutboundPolicy::parse(&self.notify_allowed_hosts)
            .map_err(|reason| anyhow::anyhow!("--notify-allowed-hosts: {reason}"))?;
        Ok(std::sync::Arc::new(policy))
    }

    pub fn pool_settings(&self) -> PoolSettings {
        PoolSettings { connections_max: self.db_connections_max, ..PoolSettings::default() }
    }
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .ok_or_else(|| format!("expected key=value, got {text:?}"))
}

/// Where the Investor and Fund Account Services are.
#[derive(Args, Clone, Debug)]
pub struct ServiceArgs {
    /// Base URL serving both account services (e.g. a `bridge sim`).
    #[arg(long, env = "BRIDGE_ACCOUNT_SERVICES_URL")]
    pub account_services_url: Option<String>,
    /// Base URL of the Investor Account Service (overrides the shared URL).
    #[arg(long, env = "BRIDGE_INVESTOR_SERVICE_URL")]
    pub investor_service_url: Option<String>,
    /// Base URL of the Fund Account Service (overrides the shared URL).
    #[arg(long, env = "BRIDGE_FUND_SERVICE_URL")]
    pub fund_service_url: Option<String>,
    /// Bearer token for the account services.
    #[arg(long, env = "BRIDGE_ACCOUNT_SERVICES_TOKEN", hide_env_values = true)]
    pub account_services_token: Option<String>,
    /// Upper bound of one call to an account service.
    #[arg(long, env = "BRIDGE_ACCOUNT_SERVICE_TIMEOUT_MS", default_value_t = 5_000)]
    pub account_service_timeout_ms: u64,
    /// Use the in-process simulator instead of real account services. Must
    /// be asked for: a pipeline that silently simulated the bank would record
    /// money movements that never happened.
    #[arg(long, env = "BRIDGE_SIMULATED_SERVICES")]
    pub simulated_services: bool,
    /// With `--simulated-services`, where the simulator keeps its books
    /// (the `sim_*` tables): by default Bridge's own database. A real bank's
    /// books are not in Bridge's database, so a benchmark that wants to
    /// count only Bridge's cost points this at a database of its own.
    #[arg(long, env = "BRIDGE_SIMULATOR_DATABASE_URL", hide_env_values = true)]
    pub simulator_database_url: Option<String>,
}

impl ServiceArgs {
    /// Reads `credential:<name>` settings from the encrypted store.
    pub async fn resolve_credentials(&mut self, pool: &sqlx::PgPool) -> Result<()> {
        credentials::resolve_option(pool, &mut self.account_services_token).await
    }

    pub fn services(&self, pool: &sqlx::PgPool) -> Result<Services> {
        let investor = self.investor_service_url.clone().or_else(|| self.account_services_url.clone());
        let fund = self.fund_service_url.clone().or_else(|| self.account_services_url.clone());
        match (investor, fund) {
            (None, None) if self.simulated_services => {
                let books = match &self.simulator_database_url {
                    // Connected on first use (this is not async).
                    Some(url) => bridge_store::connect_lazy(url, &bridge_store::PoolSettings::default())?,
                    None => pool.clone(),
                };
                Ok(bridge_sim::InProcessServices::services(books))
            }
            (None, None) => anyhow::bail!(
                "No account services configured: set BRIDGE_ACCOUNT_SERVICES_URL (or the investor and fund service URLs), \
                 or pass --simulated-services to use the in-process simulator"
            ),
            (Some(investor_base_url), Some(fund_base_url)) => HttpAccountServices::services(HttpServicesConfig {
                investor_base_url,
                fund_base_url,
                token: self.account_services_token.clone(),
                timeout_ms: self.account_service_timeout_ms,
            }),
            _ => anyhow::bail!("Configure both account services"),
        }
    }
}

/// How steps pending at the account services are followed up.
#[derive(Args, Clone, Debug)]
pub struct SettlementArgs {
    /// How long a step may stay pending at its service before the deadline
    /// policy applies.
    #[arg(long, env = "BRIDGE_PENDING_DEADLINE_MS", default_value_t = defaults::PENDING_DEADLINE_MS)]
    pub pending_deadline_ms: u64,
    /// What happens to a step pending past its deadline: `manual_review`,
    /// `fail` (cancel it at the service and compensate) or `keep_polling`.
    #[arg(long, env = "BRIDGE_PENDING_DEADLINE_POLICY", default_value_t = defaults::PENDING_DEADLINE_POLICY, value_parser = parse_policy)]
    pub pending_deadline_policy: DeadlinePolicy,
    /// Withdrawal declines to ask again later under a new idempotency key
    /// before the transfer fails: `CODE:ATTEMPTS:DELAY_MS`, comma-separated
    /// (e.g. `INSUFFICIENT_FUNDS:3:86400000`). A decline not listed fails the
    /// transfer at once.
    #[arg(long, env = "BRIDGE_DECLINE_RETRIES", default_value = "")]
    pub decline_retries: bridge_pipeline::DeclineRetries,
    /// Times the settlement runner asks about one pending step before the
    /// deadline policy applies anyway.
    #[arg(long, env = "BRIDGE_PENDING_ATTEMPTS_MAX", default_value_t = defaults::PENDING_ATTEMPTS_MAX)]
    pub pending_attempts_max: i32,
    /// How long a fund reservation waits for its withdrawal before it expires.
    #[arg(long, env = "BRIDGE_RESERVATION_TTL_MS", default_value_t = defaults::RESERVATION_TTL_MS)]
    pub reservation_ttl_ms: u64,
    /// Calls the settlement runner makes at once to each account service.
    #[arg(long, env = "BRIDGE_SETTLEMENT_CONCURRENCY", default_value_t = defaults::SETTLEMENT_CONCURRENCY_PER_SERVICE)]
    pub settlement_concurrency: usize,
    /// How often the settlement runner reads fund terms from the Fund
    /// Account Service (0: never).
    #[arg(long, env = "BRIDGE_FUND_TERMS_REFRESH_MS", default_value_t = defaults::FUND_TERMS_REFRESH_MS)]
    pub fund_terms_refresh_ms: u64,
}

impl SettlementArgs {
    pub fn apply(&self, config: &mut PipelineConfig) {
        config.pending_deadline_ms = self.pending_deadline_ms;
        config.pending_deadline_policy = self.pending_deadline_policy;
        config.decline_retries = self.decline_retries.clone();
        config.pending_attempts_max = self.pending_attempts_max;
        config.reservation_ttl_ms = self.reservation_ttl_ms;
        config.settlement_concurrency_per_service = self.settlement_concurrency;
        config.fund_terms_refresh_ms = self.fund_terms_refresh_ms;
    }
}

fn parse_policy(text: &str) -> Result<DeadlinePolicy, String> {
    DeadlinePolicy::parse(text).ok_or_else(|| format!("expected manual_review, fail or keep_polling, got {text:?}"))
}

/// The HTTP API's settings.
#[derive(Args, Clone, Debug)]
pub struct ApiArgs {
    /// Serve the HTTP API (settlement callbacks, health, metrics) here.
    #[arg(long, env = "BRIDGE_API_LISTEN")]
    pub api_listen: Option<String>,
    /// Secrets (`whsec_...`, comma-separated during a rotation) that sign the
    /// Investor Account Service's settlement callbacks.
    #[arg(long, env = "BRIDGE_INVESTOR_CALLBACK_SECRETS", hide_env_values = true)]
    pub investor_callback_secrets: Option<String>,
    /// As above, for the Fund Account Service.
    #[arg(long, env = "BRIDGE_FUND_CALLBACK_SECRETS", hide_env_values = true)]
    pub fund_callback_secrets: Option<String>,
    /// Requests per second each API key may make.
    #[arg(long, env = "BRIDGE_API_RATE_PER_SECOND", default_value_t = 100)]
    pub api_rate_per_second: u32,
    /// Requests an API key may make at once above that rate.
    #[arg(long, env = "BRIDGE_API_RATE_BURST", default_value_t = 200)]
    pub api_rate_burst: u32,
    /// Also accept JWT bearer tokens signed with this algorithm only (e.g.
    /// RS256, ES256); needs the key file, issuer and audience.
    #[arg(long, env = "BRIDGE_JWT_ALGORITHM", requires_all = ["jwt_key_file", "jwt_issuer", "jwt_audience"])]
    pub jwt_algorithm: Option<String>,
    /// PEM public key of the identity provider (for HS algorithms: the secret).
    #[arg(long, env = "BRIDGE_JWT_KEY_FILE")]
    pub jwt_key_file: Option<String>,
    #[arg(long, env = "BRIDGE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    #[arg(long, env = "BRIDGE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Operators a manual-review resolution needs: 2 makes a second,
    /// different operator approve each before it runs (four-eyes).
    #[arg(long, env = "BRIDGE_REVIEW_APPROVALS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub review_approvals: u8,
    /// How long a client has to send a request's headers (and how long a
    /// kept-alive connection may sit idle) before it is closed.
    #[arg(long, env = "BRIDGE_API_HEADER_READ_TIMEOUT_MS", default_value_t = bridge_api::server::defaults::HEADER_READ_TIMEOUT_MS)]
    pub api_header_read_timeout_ms: u64,
    /// Longest a request may take, its body included (503 past it).
    #[arg(long, env = "BRIDGE_API_REQUEST_TIMEOUT_MS", default_value_t = bridge_api::server::defaults::REQUEST_TIMEOUT_MS)]
    pub api_request_timeout_ms: u64,
    /// Most connections the API holds at once; past it a new one is
    /// answered 503 and closed.
    #[arg(long, env = "BRIDGE_API_CONNECTIONS_MAX", default_value_t = bridge_api::server::defaults::CONNECTIONS_MAX)]
    pub api_connections_max: usize,
    /// Failed authentications one client address (or one key prefix) may
    /// make per minute; past it, 429 until the minute is over.
    #[arg(long, env = "BRIDGE_API_AUTH_FAILURES_PER_MINUTE", default_value_t = 30)]
    pub api_auth_failures_per_minute: u32,
}

impl ApiArgs {
    /// Reads `credential:<name>` settings from the encrypted store.
    pub async fn resolve_credentials(&mut self, pool: &sqlx::PgPool) -> Result<()> {
        credentials::resolve_option(pool, &mut self.investor_callback_secrets).await?;
        credentials::resolve_option(pool, &mut self.fund_callback_secrets).await
    }

    pub fn config(&self, common: &Common) -> Result<bridge_api::ApiConfig> {
        let mut config = bridge_api::ApiConfig::new();
        config.notify_outbound = common.notify_outbound()?;
        config.rate_per_second = self.api_rate_per_second;
        config.rate_burst = self.api_rate_burst;
        config.review_approvals = self.review_approvals;
        config.auth_failures_per_minute = self.api_auth_failures_per_minute;
        config.keyring = credentials::keyring().ok().map(std::sync::Arc::new);
        if let (Some(algorithm), Some(path), Some(issuer), Some(audience)) =
            (&self.jwt_algorithm, &self.jwt_key_file, &self.jwt_issuer, &self.jwt_audience)
        {
            let key = std::fs::read(path).with_context(|| format!("Failed to read the JWT key {path}"))?;
            config.jwt = Some(bridge_api::auth::JwtConfig::new(algorithm, &key, issuer, audience)?);
        }
        for (service, secrets) in [("investor", &self.investor_callback_secrets), ("fund", &self.fund_callback_secrets)]
        {
            let Some(secrets) = secrets else { continue };
            let parsed = secrets
                .split(',')
                .filter(|secret| !secret.trim().is_empty())
                .map(bridge_webhooks::Secret::parse)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("The {service} callback secrets are not valid"))?;
            config.callback_secrets.insert(service.to_owned(), parsed);
        }
        Ok(config)
    }

    /// Serves the API for `pipeline` until `shutdown`, if an address is set.
    pub async fn serve(
        &self,
        common: &Common,
        pipeline: &Pipeline,
        shutdown: CancellationToken,
    ) -> Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>> {
        let Some(address) = &self.api_listen else { return Ok(None) };
        let listener =
            tokio::net::TcpListener::bind(address).await.with_context(|| format!("Failed to listen on {address}"))?;
        tracing::info!(address = %listener.local_addr()?, "API listening");
        let router = bridge_api::router(pipeline.context().clone(), self.config(common)?);
        let limits = bridge_api::server::ServerLimits {
            header_read_timeout: std::time::Duration::from_millis(self.api_header_read_timeout_ms),
            request_timeout: std::time::Duration::from_millis(self.api_request_timeout_ms),
            connections_max: self.api_connections_max.max(1),
        };
        Ok(Some(tokio::spawn(bridge_api::server::serve(listener, router, shutdown, limits))))
    }
}
