//! Test support: every integration test starts from [`TestKit::start`].
//!
//! A kit owns a fresh Postgres database (migrated), a broker (the in-process
//! `MockCluster` or the standalone broker named by
//! `BRIDGE_TEST_TANSU_BROKERS`), and random topic and group prefixes, so tests
//! run in parallel without seeing each other. It drives the pipeline only
//! through its public entry points and Kafka, as a deployment would.

pub mod receivers;
pub mod schema_registry;
pub mod tansu;

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

/// Which Kafka-protocol broker a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    /// librdkafka's in-process mock cluster.
    InProcess,
    /// The standalone broker process started by `scripts/test.sh`.
    Standalone,
}

/// Runs a scenario once per broker: `both_brokers!(happy_path);` expects an
/// `async fn happy_path(kind: BrokerKind) -> anyhow::Result<()>` and makes the
/// tests `happy_path::in_process` and `happy_path::standalone`.
#[macro_export]
macro_rules! both_brokers {
    ($($scenario:ident),+ $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn in_process() -> anyhow::Result<()> {
                super::$scenario($crate::BrokerKind::InProcess).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn standalone() -> anyhow::Result<()> {
                super::$scenario($crate::BrokerKind::Standalone).await
            }
        }
    )+};
}

/// What a test can do to the in-process cluster.
enum ClusterCommand {
    BrokerDown,
    BrokerUp,
    /// The next requests of this kind fail with these errors, in order.
    RequestErrors(rdkafka::types::RDKafkaApiKey, Vec<rdkafka::types::RDKafkaRespErr>),
}

/// The in-process cluster lives on a thread of its own because it is not
/// `Send`; dropping the handle stops it.
struct InProcessCluster {
    commands: Option<mpsc::Sender<(ClusterCommand, mpsc::Sender<Result<(), String>>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcessCluster {
    fn start(topics: Vec<String>, partitions: i32) -> Result<(Self, String)> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
        let (command_tx, command_rx) = mpsc::channel::<(ClusterCommand, mpsc::Sender<Result<(), String>>)>();
        let thread = std::thread::spawn(move || {
            let cluster = match MockCluster::new(1) {
                Ok(cluster) => cluster,
                Err(error) => {
                    let _ = ready_tx.send(Err(error.to_string()));
                    return;
                }
            };
            for topic in &topics {
                if let Err(error) = cluster.create_topic(topic, partitions, 1) {
                    let _ = ready_tx.send(Err(format!("create {topic}: {error}")));
                    return;
                }
            }
            let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
            // Serve commands until the kit is dropped. The cluster's only
            // broker has id 1.
            while let Ok((command, reply)) = command_rx.recv() {
                let result = match command {
                    ClusterCommand::BrokerDown => cluster.broker_down(1),
                    ClusterCommand::BrokerUp => cluster.broker_up(1),
                    ClusterCommand::RequestErrors(api, errors) => {
                        cluster.request_errors(api, &errors);
                        Ok(())
                    }
                };
                let _ = reply.send(result.map_err(|error| error.to_string()));
            }
        });
        let servers = ready_rx
            .recv()
            .context("In-process cluster thread died")?
            .map_err(|error| anyhow::anyhow!("Failed to start the in-process cluster: {error}"))?;
        Ok((Self { commands: Some(command_tx), thread: Some(thread) }, servers))
    }

    fn send(&self, command: ClusterCommand) -> Result<()> {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.commands
            .as_ref()
            .context("cluster stopped")?
            .send((command, reply_tx))
            .ok()
            .context("cluster thread gone")?;
        reply_rx.recv().context("cluster thread gone")?.map_err(|error| anyhow::anyhow!(error))
    }
}

impl Drop for InProcessCluster {
    fn drop(&mut self) {
        drop(self.commands.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

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

impl TestKit {
    pub async fn start(kind: BrokerKind) -> Result<Self> {
        Self::start_with(kind, |_| {}).await
    }

    /// Starts a kit; `adjust` may change the pipeline settings first.
    pub async fn start_with(kind: BrokerKind, adjust: impl FnOnce(&mut PipelineConfig)) -> Result<Self> {
        let server = std::env::var("BRIDGE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        Self::start_on(kind, &server, adjust).await
    }

    /// Starts a kit on the Postgres server at `server` (a URL with any
    /// database name; the kit creates its own database there).
    pub async fn start_on(kind: BrokerKind, server: &str, adjust: impl FnOnce(&mut PipelineConfig)) -> Result<Self> {
        init_tracing();
        let (base, _) = server.rsplit_once('/').context("the database URL has no database path")?;
        let run = Uuid::new_v4().simple().to_string();
        let database_url = format!("{base}/bridge_test_{}", &run[..16]);
        bridge_store::ensure_database(&database_url).await.context("Failed to create the test database")?;
        let pool =
            bridge_store::connect(&database_url, &PoolSettings { connections_max: 24, acquire_timeout_ms: 30_000 })
                .await
                .context("Failed to connect to the test database")?;
        bridge_store::migrate(&pool).await.context("Failed to migrate the test database")?;

        let prefix = format!("t{}.", &run[16..28]);
        let mut config = PipelineConfig::new("");
        config.topics = Topics::new(&prefix);
        config.group_prefix = prefix.clone();
        config.topic_partitions = 3;
        config.relay_poll_interval_ms = 100;
        config.session_timeout_ms = 6_000;
        config.retry_backoff_max_ms = 1_000;
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
            let terminal: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM transfers WHERE id = ANY($1)
                 AND state IN ('completed', 'rejected', 'failed', 'reversed', 'manual_review')",
            )
            .bind(ids)
            .fetch_one(&mut *conn)
            .await?;
            let unpublished = bridge_store::outbox::unpublished_count(&mut conn).await?;
            if terminal as usize == ids.len() && unpublished == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                let states: Vec<(String, i64)> =
                    sqlx::query_as("SELECT state, count(*) FROM transfers WHERE id = ANY($1) GROUP BY state")
                        .bind(ids)
                        .fetch_all(&mut *conn)
                        .await?;
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
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &self.config.brokers)
            .set("broker.address.family", "v4")
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000");
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

/// The account-service simulator with one real-world failure added: the
/// first reply to every request is lost after the service has acted on it
/// (an "unknown outcome": a timeout after the bank debited). The caller must
/// retry with the same idempotency key and must not move money twice.
pub struct LosingFirstReplies {
    inner: Arc<InProcessServices>,
    seen: Mutex<HashSet<String>>,
}

impl LosingFirstReplies {
    pub fn services(pool: PgPool) -> Services {
        let services =
            Arc::new(Self { inner: Arc::new(InProcessServices::new(pool)), seen: Mutex::new(HashSet::new()) });
        Services { investor: services.clone(), fund: services }
    }

    fn lose_first(
        &self,
        key: &str,
        outcome: Result<ServiceOutcome, ServiceError>,
    ) -> Result<ServiceOutcome, ServiceError> {
        let first = self.seen.lock().expect("not poisoned").insert(key.to_owned());
        if first && outcome.is_ok() {
            return Err(ServiceError::Unavailable(format!("reply to {key} lost after the service acted")));
        }
        outcome
    }
}

#[async_trait::async_trait]
impl InvestorAccountService for LosingFirstReplies {
    async fn withdraw(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        let outcome = self.inner.withdraw(movement).await;
        self.lose_first(&movement.idempotency_key, outcome)
    }

    async fn refund(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        let outcome = self.inner.refund(movement).await;
        self.lose_first(&movement.idempotency_key, outcome)
    }

    async fn cancel_withdrawal(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.inner.cancel_withdrawal(movement).await
    }
}

#[async_trait::async_trait]
impl FundAccountService for LosingFirstReplies {
    async fn remit(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        let outcome = self.inner.remit(movement).await;
        self.lose_first(&movement.idempotency_key, outcome)
    }

    async fn cancel_remittance(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.inner.cancel_remittance(movement).await
    }

    async fn fund_terms(&self, fund_id: &str) -> Result<Option<bridge_pipeline::services::FundTerms>, ServiceError> {
        self.inner.fund_terms(fund_id).await
    }
}

/// The simulator, except that the investor's bank is unavailable for one
/// account while `down` is set: every withdrawal from it fails as a
/// transient error (the stage retries it in place), everyone else's goes
/// through.
pub struct UnavailableForOneAccount {
    inner: Arc<InProcessServices>,
    account: String,
    down: std::sync::atomic::AtomicBool,
}

impl UnavailableForOneAccount {
    pub fn services(pool: PgPool, account: &str) -> (Services, Arc<Self>) {
        let services = Arc::new(Self {
            inner: Arc::new(InProcessServices::new(pool)),
            account: account.to_owned(),
            down: std::sync::atomic::AtomicBool::new(true),
        });
        (Services { investor: services.clone(), fund: services.inner.clone() }, services)
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl InvestorAccountService for UnavailableForOneAccount {
    async fn withdraw(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        if movement.account_id == self.account && self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ServiceError::Unavailable(format!("bank of {} is down", self.account)));
        }
        self.inner.withdraw(movement).await
    }

    async fn refund(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.inner.refund(movement).await
    }

    async fn cancel_withdrawal(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.inner.cancel_withdrawal(movement).await
    }
}

/// The account-service simulator served over HTTP from the test process.
pub struct RunningSimulator {
    pub url: String,
    /// The engine, for what only the simulator can see (calls in flight).
    pub bank: Arc<bridge_sim::Bank>,
    token: CancellationToken,
    handle: JoinHandle<std::io::Result<()>>,
}

impl RunningSimulator {
    pub async fn stop(self) -> Result<()> {
        self.token.cancel();
        Ok(self.handle.await??)
    }
}

impl TestKit {
    /// Serves the simulator with `plan` on `address` ("127.0.0.1:0" for any
    /// free port), keeping its books in this kit's database.
    pub async fn start_simulator_on(&self, address: &str, plan: bridge_sim::FaultPlan) -> Result<RunningSimulator> {
        let listener = tokio::net::TcpListener::bind(address).await?;
        self.serve_simulator(listener, plan)
    }

    /// Serves the simulator on a socket the test bound earlier. Until then
    /// the kernel queues connections and nobody answers: a service that is
    /// up on the network but not responding.
    pub fn start_simulator_with(
        &self,
        listener: std::net::TcpListener,
        plan: bridge_sim::FaultPlan,
    ) -> Result<RunningSimulator> {
        listener.set_nonblocking(true)?;
        self.serve_simulator(tokio::net::TcpListener::from_std(listener)?, plan)
    }

    fn serve_simulator(
        &self,
        listener: tokio::net::TcpListener,
        plan: bridge_sim::FaultPlan,
    ) -> Result<RunningSimulator> {
        self.serve_bank(listener, bridge_sim::Bank::new(self.pool.clone(), plan))
    }

    /// Serves the simulator with `plan` on a socket bound earlier (so the
    /// API that it calls back can be told its address first), announcing
    /// settlements by signed callbacks to `target`.
    pub fn start_simulator_calling_back(
        &self,
        listener: std::net::TcpListener,
        plan: bridge_sim::FaultPlan,
        target: bridge_sim::CallbackTarget,
    ) -> Result<RunningSimulator> {
        listener.set_nonblocking(true)?;
        let bank = bridge_sim::Bank::new(self.pool.clone(), plan).with_callbacks(target);
        self.serve_bank(tokio::net::TcpListener::from_std(listener)?, bank)
    }

    fn serve_bank(&self, listener: tokio::net::TcpListener, bank: bridge_sim::Bank) -> Result<RunningSimulator> {
        let bank = Arc::new(bank);
        let url = format!("http://{}", listener.local_addr()?);
        let token = CancellationToken::new();
        let handle = tokio::spawn(bridge_sim::http::serve(
            listener,
            bridge_sim::http::router(bank.clone(), None),
            token.clone(),
        ));
        Ok(RunningSimulator { url, token, handle, bank })
    }

    pub async fn start_simulator(&self, plan: bridge_sim::FaultPlan) -> Result<RunningSimulator> {
        self.start_simulator_on("127.0.0.1:0", plan).await
    }

    /// The HTTP adapters pointed at `url` for both services.
    pub fn http_services(&self, url: &str, timeout_ms: u64) -> Result<Services> {
        bridge_pipeline::http_services::HttpAccountServices::services(
            bridge_pipeline::http_services::HttpServicesConfig {
                investor_base_url: url.to_owned(),
                fund_base_url: url.to_owned(),
                token: None,
                timeout_ms,
            },
        )
    }
}

/// Seconds since the Unix epoch, as signed timestamps carry them.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs() as i64
}

/// A keyring with one fresh master key, for the credentials store.
pub fn keyring() -> Arc<bridge_secrets::Keyring> {
    let entry = bridge_secrets::Keyring::generate_entry("test");
    Arc::new(bridge_secrets::Keyring::parse(&entry).expect("a generated key parses"))
}

/// Stores `secret` in the credentials store and returns the reference a
/// webhook subscription keeps.
pub async fn sealed_secret(pool: &PgPool, keyring: &bridge_secrets::Keyring, secret: &str) -> Result<String> {
    let mut conn = pool.acquire().await?;
    let value = bridge_secrets::SecretString::from(secret.to_owned());
    Ok(bridge_secrets::store_new(&mut conn, keyring, "webhook-secret", &value).await?)
}

/// The notifier running in the test process.
pub struct RunningNotifier {
    token: CancellationToken,
    handle: JoinHandle<Result<()>>,
}

impl RunningNotifier {
    pub async fn stop(self) -> Result<()> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .context("Notifier did not stop within 60 s")??
    }
}

impl TestKit {
    /// Runs the notifier (its consumer and its sender) on this runtime.
    pub fn spawn_notifier(&self, config: bridge_notify::NotifierConfig) -> Result<RunningNotifier> {
        let pipeline = Pipeline::new(self.pool.clone(), self.config.clone(), Services::none());
        let notifier = bridge_notify::Notifier::new(pipeline.context().clone(), config)?;
        let token = CancellationToken::new();
        let run_token = token.clone();
        let handle = tokio::spawn(async move { notifier.run(run_token).await });
        Ok(RunningNotifier { token, handle })
    }
}

/// Bridge's HTTP API served from the test process.
pub struct RunningApi {
    pub url: String,
    token: CancellationToken,
    handle: JoinHandle<std::io::Result<()>>,
}

impl RunningApi {
    pub async fn stop(self) -> Result<()> {
        self.token.cancel();
        Ok(self.handle.await??)
    }
}

impl TestKit {
    /// Serves the API (callbacks, health, metrics) on a free port, running
    /// steps against `services`.
    pub async fn start_api(&self, services: Services, config: bridge_api::ApiConfig) -> Result<RunningApi> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let pipeline = Pipeline::new(self.pool.clone(), self.config.clone(), services);
        let router = bridge_api::router(pipeline.context().clone(), config);
        let token = CancellationToken::new();
        let handle = tokio::spawn(bridge_api::serve(listener, router, token.clone()));
        Ok(RunningApi { url, token, handle })
    }
}

pub struct RunningPipeline {
    token: CancellationToken,
    handle: JoinHandle<Result<()>>,
}

impl RunningPipeline {
    /// Stops gracefully and returns the pipeline's own result.
    pub async fn stop(self) -> Result<()> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .context("Pipeline did not stop within 60 s")??
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Stops at once, as a crash would: every task is dropped wherever it
    /// is (a transaction in progress rolls back with its connection), no
    /// offset is committed, no producer is flushed.
    pub async fn crash(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}
