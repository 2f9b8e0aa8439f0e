//! Pipeline settings: one typed struct, passed explicitly. Every bound has its
//! unit in its name.

/// Topic names. A prefix lets several pipelines (tests, tenants) share one
/// cluster without seeing each other's messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    pub prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    fn name(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    /// Upstream systems publish transfer requests here.
    pub fn requested(&self) -> String {
        self.name("bridge.transfers.requested.v1")
    }
    /// Validation passed; consumed by the withdrawal stage.
    pub fn validated(&self) -> String {
        self.name("bridge.transfers.validated.v1")
    }
    /// Investor debited; consumed by the deposit stage.
    pub fn withdrawn(&self) -> String {
        self.name("bridge.transfers.withdrawn.v1")
    }
    /// Fund credited; consumed by the completion stage.
    pub fn deposited(&self) -> String {
        self.name("bridge.transfers.deposited.v1")
    }
    /// Every state change of every transfer, for downstream subscribers.
    pub fn status(&self) -> String {
        self.name("bridge.transfers.status.v1")
    }

    pub fn dead_letter(topic: &str) -> String {
        format!("{topic}.dlq")
    }

    /// Every topic the pipeline reads or writes, dead-letter topics included.
    pub fn all(&self) -> Vec<String> {
        let main = [self.requested(), self.validated(), self.withdrawn(), self.deposited(), self.status()];
        let dead_letters: Vec<String> = main[..4].iter().map(|topic| Self::dead_letter(topic)).collect();
        main.into_iter().chain(dead_letters).collect()
    }
}

impl Default for Topics {
    fn default() -> Self {
        Self::new("")
    }
}

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Kafka bootstrap servers, comma separated.
    pub brokers: String,
    pub topics: Topics,
    /// Prefix of every consumer group id (`<prefix>bridge-<stage>`).
    pub group_prefix: String,
    /// Partitions of topics the pipeline creates. Transfers are keyed by id,
    /// so this bounds how many consumers of one stage can work in parallel.
    pub topic_partitions: i32,
    pub topic_replication: i32,
    /// Consumer session timeout. Low values detect dead consumers sooner.
    pub session_timeout_ms: u32,
    /// Outbox rows the relay claims and publishes per database transaction.
    pub relay_batch_size_max: i64,
    /// How long the relay sleeps without a notification before polling.
    pub relay_poll_interval_ms: u64,
    /// How long the producer keeps trying one message before giving up (the
    /// row then stays unpublished and is retried).
    pub producer_message_timeout_ms: u32,
    /// Upper bound of the backoff between retries of a transient failure.
    pub retry_backoff_max_ms: u64,
    /// Times one database transaction is retried after a lost race before the
    /// message is handed back to the transient-failure loop.
    pub transaction_attempts_max: u32,
    /// Extra librdkafka settings applied last (escape hatch).
    pub kafka_overrides: Vec<(String, String)>,
}

impl PipelineConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topics: Topics::default(),
            group_prefix: String::new(),
            topic_partitions: 6,
            topic_replication: 1,
            session_timeout_ms: 10_000,
            relay_batch_size_max: 500,
            relay_poll_interval_ms: 500,
            producer_message_timeout_ms: 30_000,
            retry_backoff_max_ms: 5_000,
            transaction_attempts_max: 32,
            kafka_overrides: Vec::new(),
        }
    }
}
