//! Test support: every integration test starts from [`TestKit::start`].
//!
//! A kit owns a fresh Postgres database (migrated), a broker (the in-process
//! `MockCluster` or the standalone broker named by
//! `BRIDGE_TEST_TANSU_BROKERS`), and random topic and group prefixes, so tests
//! run in parallel without seeing each other. It drives the pipeline only
//! through its public entry points and Kafka, as a deployment would.

mod cluster;
mod components;
mod credentials;
mod faults;
pub mod receivers;
pub mod schema_registry;
pub mod tansu;
pub mod tls;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::Utc;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use bridge_codec::TransferRequested;
use bridge_domain::{Currency, Money};
use bridge_pipeline::message::Inbound;
use bridge_pipeline::runner::Part;
use bridge_pipeline::services::{
    FundAccountService, InvestorAccountService, MoneyMovement, ServiceError, ServiceOutcome, Services,
};
use bridge_pipeline::{kafka, upstream, Pipeline, PipelineConfig, StageName, Topics};
use bridge_sim::InProcessServices;
use bridge_store::accounts::{self, FundAccountSeed, FundSeed, InvestorSeed};
use bridge_store::reconcile::{self, Report};
use bridge_store::transfers::{self, Transfer};
use bridge_store::PoolSettings;

pub use bridge_pipeline::runner::Part as PipelinePart;

use cluster::ClusterCommand;
pub use cluster::{BrokerKind, InProcessCluster};
pub use components::{RunningApi, RunningNotifier, RunningPipeline, RunningSimulator};
pub use credentials::{keyring, sealed_secret, unix_now};
pub use faults::{LosingFirstReplies, UnavailableForOneAccount};

/// What a consumer's fetch asks tansu for: more than a test's messages add
/// up to, so tansu reads its log again at the end of each wait.
pub const TANSU_FETCH_MIN_BYTES: u32 = 1 << 20;

pub struct TestKit {
    pub pool: PgPool,
    pub database_url: String,
    pub config: PipelineConfig,
    pub kind: BrokerKind,
    pub currency: Currency,
    producer: FutureProducer,
    _cluster: Option<InProcessCluster>,
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// The Postgres server the suite runs against: `BRIDGE_TEST_DATABASE_URL`,
/// a URL with any database name.
pub fn database_server() -> String {
    std::env::var("BRIDGE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Creates a database of its own on the Postgres server at `server`, not
/// yet migrated, and answers its URL and a pool. `scripts/test.sh` drops
/// the ones earlier runs left.
pub async fn scratch_database(server: &str) -> Result<(String, PgPool)> {
    let (base, _) = server.rsplit_once('/').context("the database URL has no database path")?;
    let run = Uuid::new_v4().simple().to_string();
    let database_url = format!("{base}/bridge_test_{}", &run[..16]);
    bridge_store::ensure_database(&database_url).await.context("Failed to create the test database")?;
    let pool = bridge_store::connect(&database_url, &PoolSettings { connections_max: 24, acquire_timeout_ms: 30_000 })
        .await
        .context("Failed to connect to the test database")?;
    Ok((database_url, pool))
}

/// Migrates `pool`'s database as a release before migration `first_left_out`
/// (its four-digit number, e.g. "0031") left it: every migration numbered
/// below it, so a test can write what that release wrote, then run
/// `bridge_store::migrate` and read it as this release does.
pub async fn migrate_before(pool: &PgPool, first_left_out: &str) -> Result<()> {
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bridge-store/migrations");
    let earlier = std::env::temp_dir().join(format!("bridge-migrations-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&earlier)?;
    for entry in std::fs::read_dir(&source)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default().to_owned();
        if name.as_str() < first_left_out {
            std::fs::copy(&path, earlier.join(&name))?;
        }
    }
    let migrated = async { sqlx::migrate::Migrator::new(earlier.as_path()).await?.run(pool).await }.await;
    std::fs::remove_dir_all(&earlier)?;
    migrated.context("Failed to migrate to the earlier release's schema")
}

impl TestKit {
    pub async fn start(kind: BrokerKind) -> Result<Self> {
        Self::start_with(kind, |_| {}).await
    }

    /// Starts a kit; `adjust` may change the pipeline settings first.
    pub async fn start_with(kind: BrokerKind, adjust: impl FnOnce(&mut PipelineConfig)) -> Result<Self> {
        Self::start_on(kind, &database_server(), adjust).await
    }

    /// Starts a kit on the Postgres server at `server` (a URL with any
    /// database name; the kit creates its own database there).
    pub async fn start_on(kind: BrokerKind, server: &str, adjust: impl FnOnce(&mut PipelineConfig)) -> Result<Self> {
        init_tracing();
        let (database_url, pool) = scratch_database(server).await?;
        bridge_store::migrate(&pool).await.context("Failed to migrate the test database")?;

        let run = Uuid::new_v4().simple().to_string();
        let prefix = format!("t{}.", &run[..12]);
        let mut config = PipelineConfig::new("");
        config.topics = Topics::new(&prefix);
        config.group_prefix = prefix.clone();
        config.topic_partitions = 3;
        config.relay_poll_interval_ms = 100;
        config.session_timeout_ms = 6_000;
        config.retry_backoff_max_ms = 1_000;
        if kind == BrokerKind::Standalone {
            // As a deployment on tansu is told to (see `fetch_min_bytes`),
            // so every test on it runs the way that deployment would.
            config.fetch_min_bytes = TANSU_FETCH_MIN_BYTES;
        }
        adjust(&mut config);

        let cluster = match kind {
            BrokerKind::InProcess => {
                let (cluster, servers) = InProcessCluster::start(config.topics.all(), config.topic_partitions)?;
                config.brokers = servers;
                Some(cluster)
            }
            BrokerKind::Standalone => {
                // `adjust` may point the kit at a broker of its own (one the
                // test stops and restarts); otherwise the suite's shared one.
                if config.brokers.is_empty() {
                    config.brokers = std::env::var("BRIDGE_TEST_TANSU_BROKERS").context(
                        "BRIDGE_TEST_TANSU_BROKERS is not set: run the suite with scripts/test.sh, which starts the standalone broker",
                    )?;
                }
                kafka::ensure_topics(&config).await?;
                None
            }
        };
        let producer = kafka::upstream_producer(&config)?;
        Ok(Self {
            pool,
            database_url,
            config,
            kind,
            currency: Currency::parse("EUR").expect("EUR"),
            producer,
            _cluster: cluster,
        })
    }

    /// Takes the in-process cluster's broker down or brings it back.
    pub fn set_broker_up(&self, up: bool) -> Result<()> {
        let cluster = self._cluster.as_ref().context("only the in-process cluster can be switched off from a test")?;
        cluster.send(if up { ClusterCommand::BrokerUp } else { ClusterCommand::BrokerDown })
    }

    /// The in-process broker answers the next requests of kind `api` with
    /// `errors`, one per request.
    pub fn inject_request_errors(
        &self,
        api: rdkafka::types::RDKafkaApiKey,
        errors: Vec<rdkafka::types::RDKafkaRespErr>,
    ) -> Result<()> {
        let cluster = self._cluster.as_ref().context("only the in-process cluster injects request errors")?;
        cluster.send(ClusterCommand::RequestErrors(api, errors))
    }

    pub fn topics(&self) -> &Topics {
        &self.config.topics
    }

    pub fn eur(&self, amount_minor: i64) -> Money {
        Money::new(amount_minor, self.currency)
    }

    pub fn pipeline(&self) -> Pipeline {
        Pipeline::new(self.pool.clone(), self.config.clone(), InProcessServices::services(self.pool.clone()))
    }

    /// Spawns the given parts of the pipeline on this runtime.
    pub fn spawn(&self, parts: &[Part]) -> RunningPipeline {
        self.spawn_with_services(parts, InProcessServices::services(self.pool.clone()))
    }

    /// Spawns parts of the pipeline talking to the given account services.
    pub fn spawn_with_services(&self, parts: &[Part], services: Services) -> RunningPipeline {
        let pipeline = Pipeline::new(self.pool.clone(), self.config.clone(), services);
        let token = CancellationToken::new();
        let parts = parts.to_vec();
        let run_token = token.clone();
        let handle = tokio::spawn(async move { pipeline.run(&parts, run_token).await });
        RunningPipeline { token, handle }
    }

    pub fn spawn_all(&self) -> RunningPipeline {
        self.spawn(&Part::all())
    }

    pub async fn seed_investor(&self, id: &str, balance_minor: i64) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        accounts::seed_investor(
            &mut conn,
            &InvestorSeed { id: id.to_owned(), opening_balance: self.eur(balance_minor) },
        )
        .await?;
        Ok(())
    }

    /// Seeds a fund and one account of it named `<fund_id>-account`.
    pub async fn seed_fund(
        &self,
        fund_id: &str,
        minimum_minor: i64,
        seats_max: i32,
        capacity_minor: i64,
    ) -> Result<String> {
        let mut conn = self.pool.acquire().await?;
        accounts::seed_fund(
            &mut conn,
            &FundSeed {
                id: fund_id.to_owned(),
                name: fund_id.to_owned(),
                currency: self.currency,
                minimum_investment_minor: minimum_minor,
                seats_max,
                capacity_minor,
            },
        )
        .await?;
        let account = format!("{fund_id}-account");
        accounts::seed_fund_account(
            &mut conn,
            &FundAccountSeed { id: account.clone(), fund_id: fund_id.to_owned(), currency: self.currency },
        )
        .await?;
        Ok(account)
    }

    pub async fn set_simulated_account_status(&self, account_id: &str, status: &str) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        bridge_store::simulator::set_account_status(&mut conn, account_id, status).await?;
        Ok(())
    }

    pub fn request(&self, investor: &str, fund_account: &str, amount_minor: i64) -> TransferRequested {
        TransferRequested {
            transfer_id: Uuid::new_v4().to_string(),
            investor_account_id: investor.to_owned(),
            fund_account_id: fund_account.to_owned(),
            amount_minor,
            currency: "EUR".to_owned(),
            requested_at: Utc::now().timestamp_millis(),
            reference: String::new(),
            source_system: "test".to_owned(),
        }
    }

    pub async fn publish(&self, request: &TransferRequested) -> Result<Uuid> {
        upstream::publish_request(&self.producer, self.topics(), request).await?;
        Ok(Uuid::parse_str(&request.transfer_id)?)
    }

    pub async fn publish_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
    ) -> Result<()> {
        upstream::publish_raw(&self.producer, topic, key, payload, headers).await
    }

    pub async fn transfer(&self, id: Uuid) -> Result<Transfer> {
        let mut conn = self.pool.acquire().await?;
        transfers::get(&mut conn, id).await?.with_context(|| format!("transfer {id} not found"))
    }

    /// How many of these transfers are in each state, keyed `state` or
    /// `state:REASON_CODE`.
    pub async fn state_counts(&self, ids: &[Uuid]) -> Result<BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state || coalesce(':' || reason_code, ''), count(*) FROM transfers WHERE id = ANY($1) GROUP BY 1",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// Waits until every transfer in `ids` exists and has stopped moving
    /// (terminal, or in manual review) and the outbox is drained.
    pub async fn wait_terminal(&self, ids: &[Uuid], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut conn = self.pool.acquire().await?;
            let states = bridge_store::transfers::count_by_state(&mut conn, Some(ids)).await?;
            let terminal: i64 = states
                .iter()
                .filter(|(state, _)| state.is_terminal() || state.needs_person())
                .map(|(_, count)| count)
                .sum();
            let unpublished = bridge_store::outbox::unpublished_count(&mut conn).await?;
            if terminal as usize == ids.len() && unpublished == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "Timed out: {terminal} of {} transfers terminal, {unpublished} outbox rows unpublished, states {states:?}",
                    ids.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every committed outbox row has been published.
    pub async fn wait_outbox_drained(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut conn = self.pool.acquire().await?;
            let unpublished = bridge_store::outbox::unpublished_count(&mut conn).await?;
            if unpublished == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{unpublished} outbox rows still unpublished");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn reconcile(&self) -> Result<Report> {
        let mut conn = self.pool.acquire().await?;
        Ok(reconcile::run(&mut conn).await?)
    }

    /// Fails with the violated checks unless the books balance.
    pub async fn assert_books_balance(&self) -> Result<()> {
        let report = self.reconcile().await?;
        if !report.ok() {
            bail!("Invariant violations: {:#?}", report.violations());
        }
        Ok(())
    }

    fn client(&self, group: &str) -> ClientConfig {
        let mut client = kafka::base(&self.config).expect("the kit's Kafka security settings are valid");
        client.set("group.id", group).set("enable.auto.commit", "false").set("session.timeout.ms", "6000");
        client
    }

    fn partitions(&self) -> Vec<i32> {
        (0..self.config.topic_partitions).collect()
    }

    /// Every message in `topic`, in partition order. The caller should
    /// first make sure what it wants to read was acknowledged by the broker
    /// (for example by waiting for the outbox to drain).
    ///
    /// Reading stops once every partition has been read past its high
    /// watermark and then the broker has had nothing more for a while. The
    /// watermark alone is not a reliable end: tansu 0.6 reports the base
    /// offset of the last record batch plus one, so a batch of five records
    /// at offsets 0..4 reads as a high watermark of 1.
    pub async fn read_topic(&self, topic: &str) -> Result<Vec<Inbound>> {
        const IDLE: Duration = Duration::from_millis(1_500);
        let consumer: StreamConsumer =
            self.client(&format!("{}reader-{}", self.config.group_prefix, Uuid::new_v4())).create()?;
        let mut watermarks = HashMap::new();
        let mut assignment = TopicPartitionList::new();
        for partition in self.partitions() {
            let (_, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
            watermarks.insert(partition, high);
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let mut positions: HashMap<i32, i64> = HashMap::new();
        let mut messages = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let below_watermark =
                watermarks.iter().any(|(partition, high)| positions.get(partition).copied().unwrap_or(0) < *high);
            let wait = if below_watermark { deadline.saturating_duration_since(Instant::now()) } else { IDLE };
            match tokio::time::timeout(wait, consumer.recv()).await {
                Ok(message) => {
                    let inbound = Inbound::from_kafka(&message?);
                    positions.insert(inbound.partition, inbound.offset + 1);
                    messages.push(inbound);
                }
                Err(_) if below_watermark => {
                    bail!("Timed out reading {topic}: positions {positions:?}, watermarks {watermarks:?}")
                }
                Err(_) => break,
            }
        }
        messages.sort_by_key(|message| (message.partition, message.offset));
        Ok(messages)
    }

    /// Waits until the stage's consumer group has committed offsets past the
    /// last message of every partition of its input topic.
    pub async fn wait_caught_up(&self, stage: StageName, timeout: Duration) -> Result<()> {
        self.wait_group_caught_up(&stage.group_id(&self.config), &stage.input_topic(self.topics()), timeout).await
    }

    /// Waits until consumer group `group` has committed past every message
    /// now in `topic`.
    pub async fn wait_group_caught_up(&self, group: &str, topic: &str, timeout: Duration) -> Result<()> {
        let (group, topic) = (group.to_owned(), topic.to_owned());
        let mut ends: HashMap<i32, i64> = HashMap::new();
        for message in self.read_topic(&topic).await? {
            ends.insert(message.partition, message.offset + 1);
        }
        let consumer: StreamConsumer = self.client(&group).create()?;
        let deadline = Instant::now() + timeout;
        loop {
            let mut list = TopicPartitionList::new();
            for partition in self.partitions() {
                list.add_partition(&topic, partition);
            }
            let committed = consumer.committed_offsets(list, Duration::from_secs(10))?;
            let mut behind = Vec::new();
            for element in committed.elements() {
                let end = ends.get(&element.partition()).copied().unwrap_or(0);
                let at = match element.offset() {
                    Offset::Offset(offset) => offset,
                    _ => 0,
                };
                if at < end {
                    behind.push((element.partition(), at, end));
                }
            }
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("Group {group} not caught up on {topic}: (partition, committed, end) {behind:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Makes every stage forget its committed offsets: later spawns use
    /// fresh consumer groups, which start from the beginning of each topic.
    /// To the stages this is exactly a crash after every database commit and
    /// before any offset commit: every message arrives again. (Moving the old
    /// groups' offsets back instead would race with the brokers' removal of
    /// the stopped members.)
    pub fn forget_committed_offsets(&mut self) {
        self.config.group_prefix =
            format!("{}again-{}.", self.config.group_prefix, &Uuid::new_v4().simple().to_string()[..8]);
    }

    /// Counts of rows that record effects, to compare before and after
    /// redelivery: (ledger entries, transfer versions, dead-letter records,
    /// outside-service operations). Every event a stage writes comes with a
    /// transfer version or a dead-letter record in the same transaction; the
    /// outbox itself keeps only what is still to publish.
    pub async fn effect_counts(&self) -> Result<(i64, i64, i64, i64)> {
        let mut conn = self.pool.acquire().await?;
        Ok(sqlx::query_as(
            "SELECT (SELECT count(*) FROM ledger_entries), (SELECT count(*) FROM transfer_versions),
                    (SELECT count(*) FROM inbox WHERE message_id LIKE 'dlq:%'), (SELECT count(*) FROM sim_operations)",
        )
        .fetch_one(&mut *conn)
        .await?)
    }
}
