//! Kafka client construction. Every option that matters for correctness is
//! set explicitly here, with the reason next to it.

use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;

use crate::PipelineConfig;

/// The settings every client shares: where the brokers are and how to
/// authenticate to them.
pub fn base(config: &PipelineConfig) -> Result<ClientConfig> {
    let mut client = ClientConfig::new();
    // Any address family: a broker name may resolve to IPv6, IPv4 or both
    // (librdkafka tries each address in turn). A broker reachable over one
    // family only is pinned with `--kafka-option broker.address.family=v4`.
    client.set("bootstrap.servers", &config.brokers);
    config.kafka_security.apply(&mut client)?;
    Ok(client)
}

pub(crate) fn apply_overrides(client: &mut ClientConfig, config: &PipelineConfig) {
    for (key, value) in &config.kafka_overrides {
        client.set(key, value);
    }
}

/// How long start-up waits for the cluster to answer before it gives up
/// with the reason librdkafka gave.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Keeps the first error librdkafka reports about the connection (the
/// informative one: later ones say only that every broker is down).
#[derive(Default)]
pub struct FirstError(std::sync::Mutex<Option<String>>);

impl FirstError {
    pub fn first(&self) -> Option<String> {
        self.0.lock().ok().and_then(|first| first.clone())
    }
}

impl rdkafka::ClientContext for FirstError {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if let Ok(mut first) = self.0.lock() {
            if first.is_none() && error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown) {
                tracing::warn!(error = %error, reason, "Kafka connection error");
                *first = Some(reason.to_owned());
                return;
            }
        }
        tracing::debug!(error = %error, reason, "Kafka connection error");
    }
}

impl rdkafka::consumer::ConsumerContext for FirstError {}

/// A consumer for one stage. Offsets are stored by the stage only after the
/// database transaction that consumed the message committed, and librdkafka
/// commits stored offsets in the background; so a crash can re-deliver a
/// message (which the inbox absorbs) but never skip one.
pub fn consumer(config: &PipelineConfig, name: &str, group_id: &str) -> Result<StreamConsumer<ConsumerState>> {
    let mut client = base(config)?;
    client
        .set("group.id", group_id)
        // librdkafka's statistics carry each partition's lag; `ConsumerState`
        // publishes it as a metric.
        .set("statistics.interval.ms", "5000")
        // Commit only what we stored after our own commit.
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        // A new group reads the topic from the start: a request published
        // before the pipeline first started is still a request.
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (config.session_timeout_ms / 4).max(100).to_string())
        // Outbox messages are only visible once their transaction committed,
        // but in-flight transactional messages of other writers must not be
        // read.
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        // How long a fetch may wait at the broker for data. Kafka answers a
        // waiting fetch as soon as data arrives, so this only bounds idle
        // polling; some Kafka-protocol brokers (tansu 0.6) hold every fetch
        // for the full time instead, which at librdkafka's default of 500 ms
        // added half a second to each hop of a transfer.
        .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string())
        // 1 unless the broker needs otherwise (see `fetch_min_bytes`).
        .set("fetch.min.bytes", config.fetch_min_bytes.to_string());
    apply_overrides(&mut client, config);
    let state = ConsumerState { name: name.to_owned(), assignments: Default::default() };
    client.create_with_context(state).context("Failed to create Kafka consumer")
}

/// What a stage's consumer keeps beside librdkafka: the windows of the
/// partitions it holds (`offsets`), which its rebalance callback keeps in
/// step with the group's assignments; and, from librdkafka's periodic
/// statistics, the lag of each partition it reads: the partition's high
/// watermark minus the offset the consumer stored (which it does only once
/// a message and all before it are finished), so it counts what is not yet
/// done.
pub struct ConsumerState {
    name: String,
    pub assignments: crate::offsets::Assignments,
}

impl rdkafka::ClientContext for ConsumerState {
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, stats) in &stats.partitions {
                // -1 is librdkafka's internal "unassigned" partition; a lag
                // of -1 means not known yet.
                if *partition >= 0 && stats.desired && stats.consumer_lag_stored >= 0 {
                    crate::metrics::consumer_lag(&self.name, topic, *partition, stats.consumer_lag_stored);
                }
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ConsumerState {
    /// librdkafka's own rebalance, with the partitions' windows kept in step
    /// (`offsets`): an assignment starts explicitly at the group's committed
    /// offset, which its window is told first, and a revocation closes the
    /// window before librdkafka commits what was stored and lets the
    /// partition go.
    fn rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        error: rdkafka::types::RDKafkaRespErr,
        partitions: &mut rdkafka::TopicPartitionList,
    ) {
        use rdkafka::consumer::RebalanceProtocol;
        use rdkafka::types::RDKafkaRespErr;
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let result = match error {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.start_at_committed(consumer, partitions);
                if cooperative {
                    consumer.incremental_assign(partitions)
                } else {
                    consumer.assign(partitions)
                }
            }
            other => {
                if other != RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                    let code: RDKafkaErrorCode = other.into();
                    tracing::error!(consumer = %self.name, error = %code, "Rebalance failed; giving up the partitions");
                }
                for element in partitions.elements() {
                    self.assignments.revoke(element.topic(), element.partition());
                    // Another member reports this partition's lag from now
                    // on; a stale figure here would add to its sum.
                    crate::metrics::forget_partition(&self.name, element.topic(), element.partition());
                }
                if cooperative {
                    consumer.incremental_unassign(partitions)
                } else {
                    consumer.unassign()
                }
            }
        };
        if let Err(error) = result {
            tracing::error!(consumer = %self.name, error = %error, "librdkafka refused the rebalance");
        }
    }
}

/// How long an assignment waits for the group's committed offsets.
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);

impl ConsumerState {
    /// Sets each newly assigned partition to start at the group's committed
    /// offset and tells its window so. Without an answer from the group
    /// (or with no committed offset yet) librdkafka decides the start
    /// itself, and the window keeps what it knows.
    fn start_at_committed(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        partitions: &mut rdkafka::TopicPartitionList,
    ) {
        let committed = match consumer.committed_offsets(partitions.clone(), COMMITTED_TIMEOUT) {
            Ok(committed) => committed,
            Err(error) => {
                tracing::warn!(consumer = %self.name, error = %error, "Could not read the committed offsets; librdkafka chooses where to start");
                for element in partitions.elements() {
                    self.assignments.assign(element.topic(), element.partition(), None);
                }
                return;
            }
        };
        for element in committed.elements() {
            let start = match element.offset() {
                rdkafka::Offset::Offset(offset) => {
                    let set = partitions.set_partition_offset(
                        element.topic(),
                        element.partition(),
                        rdkafka::Offset::Offset(offset),
                    );
                    set.ok().map(|()| offset)
                }
                _ => None,
            };
            self.assignments.assign(element.topic(), element.partition(), start);
        }
    }
}

/// The relay's producer.
pub fn producer(config: &PipelineConfig) -> Result<FutureProducer> {
    let mut client = base(config)?;
    client
        // Every in-sync replica must have the message before we mark the
        // outbox row published.
        .set("acks", "all")
        // Broker-side deduplication of producer retries, and per-partition
        // ordering even with several requests in flight.
        .set("enable.idempotence", "true")
        .set("max.in.flight.requests.per.connection", "5")
        // The relay hands over a whole claimed batch at once and then waits
        // for its acknowledgements, so a long linger would only delay every
        // batch; one millisecond lets librdkafka put the batch's messages
        // for a partition into one request instead of sending the first
        // alone.
        .set("linger.ms", "1")
        .set("message.timeout.ms", config.producer_message_timeout_ms.to_string())
        // Bounded in-memory queue.
        .set("queue.buffering.max.messages", "100000")
        .set("compression.type", "none");
    apply_overrides(&mut client, config);
    client.create().context("Failed to create Kafka producer")
}

/// A plain producer for tests and `bridge submit`, acting as an upstream
/// system would. A transfer request is sent after at most a millisecond
/// (librdkafka's default linger of 5 ms would be paid by every transfer at
/// a paced load); under a burst, requests still share a produce request
/// while earlier ones are in flight.
pub fn upstream_producer(config: &PipelineConfig) -> Result<FutureProducer> {
    let mut client = base(config)?;
    client.set("acks", "all").set("enable.idempotence", "true").set("linger.ms", "1");
    apply_overrides(&mut client, config);
    client.create().context("Failed to create Kafka producer")
}

/// Creates every pipeline topic that does not exist yet. Standalone brokers
/// and production clusters usually do not auto-create topics, and relying on
/// auto-creation would give the wrong partition count anyway. Topics that
/// exist are left alone and nothing is asked of the admin API for them, so a
/// process whose credentials may read and write its topics but not create
/// them starts against topics an operator created (and so does one against
/// a broker without the CreateTopics request, such as librdkafka's
/// in-process cluster).
pub async fn ensure_topics(config: &PipelineConfig) -> Result<()> {
    let mut client = base(config)?;
    // Asking a broker that auto-creates topics about one by name must not
    // create it (with the broker's partition count).
    client.set("allow.auto.create.topics", "false");
    apply_overrides(&mut client, config);
    // Topics are looked up with a consumer, which (unlike the admin client)
    // can be polled for the errors librdkafka queued while connecting.
    let mut probe = client.clone();
    // It never joins the group, but librdkafka checks a consumer's
    // timeouts against each other (and --kafka-option may have lowered
    // max.poll.interval.ms to go with a short session timeout).
    probe
        .set("group.id", format!("{}bridge-topics", config.group_prefix))
        .set("session.timeout.ms", config.session_timeout_ms.to_string());
    let lookup: rdkafka::consumer::BaseConsumer<FirstError> =
        probe.create_with_context(FirstError::default()).context("Failed to create Kafka client")?;
    let names = config.topics.all();
    // Each of ours by name, not the whole cluster's list, which can be long.
    let mut existing = std::collections::HashSet::new();
    for name in &names {
        let metadata = lookup.fetch_metadata(Some(name), CONNECT_TIMEOUT).map_err(|error| {
            // librdkafka retries a failed connection for ever and answers
            // the request only with a timeout; what went wrong (a
            // certificate the CA did not sign, a name it does not carry, a
            // password the broker refused) is in the errors it queued.
            let _ = lookup.poll(Duration::from_millis(100));
            let cause = lookup.context().first().unwrap_or_else(|| error.to_string());
            // OpenSSL's verdict does not say which check failed.
            let hint = if cause.contains("certificate verify failed") {
                " (the brokers' certificates must be signed by the CA in KAFKA_SSL_CA_FILE, or the system's, \
                 and name the host in KAFKA_BROKERS)"
            } else {
                ""
            };
            anyhow::anyhow!("Cannot use the Kafka cluster at {}: {cause}{hint}", config.brokers)
        })?;
        if metadata.topics().iter().any(|topic| topic.error().is_none() && !topic.partitions().is_empty()) {
            existing.insert(name.as_str());
        }
    }
    drop(lookup);
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .filter(|name| !existing.contains(name.as_str()))
        .map(|name| NewTopic::new(name, config.topic_partitions, TopicReplication::Fixed(config.topic_replication)))
        .collect();
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        client.create().context("Failed to create Kafka admin client")?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(topics.iter(), &options).await.context("Failed to create topics")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("Failed to create topic {topic}: {code}"),
        }
    }
    Ok(())
}
