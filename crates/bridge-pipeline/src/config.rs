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
        // The status topic has consumers of ours too (the notifier).
        let dead_letters: Vec<String> = main.iter().map(|topic| Self::dead_letter(topic)).collect();
        main.into_iter().chain(dead_letters).collect()
    }
}

impl Default for Topics {
    fn default() -> Self {
        Self::new("")
    }
}

/// What happens to a step still pending at its service after its deadline
/// (or after the settlement runner has asked about it too many times).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeadlinePolicy {
    /// Keep asking; the reconciler reports the transfer as stuck.
    KeepPolling,
    /// Cancel the operation at the service; if the cancellation wins, the
    /// step fails and is compensated like a decline (a withdrawal fails, a
    /// deposit is refunded). If the service settled first, the step applies.
    Fail,
    /// Stop and hand the transfer to a person (`manual_review`).
    #[default]
    ManualReview,
}

impl DeadlinePolicy {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "keep_polling" => Some(Self::KeepPolling),
            "fail" => Some(Self::Fail),
            "manual_review" => Some(Self::ManualReview),
            _ => None,
        }
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
    /// Longest a consumer's fetch waits at the broker for new data.
    pub fetch_wait_max_ms: u32,
    /// Most messages of one partition a stage applies in one
    /// set-based transaction, when that many are queued; 1 turns it off.
    pub batch_size_max: usize,
    /// Most set-based transactions a stage has in flight at once in one
    /// process. Partitions' batches that find them all busy wait and go
    /// together into the next one (up to `batch_size_max` messages, whole
    /// batches only), so a busier stage makes larger transactions.
    pub batches_in_flight: usize,
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
    /// How long a step may stay pending at its service before
    /// `pending_deadline_policy` applies.
    pub pending_deadline_ms: u64,
    pub pending_deadline_policy: DeadlinePolicy,
    /// Times the settlement runner asks about one pending step before the
    /// deadline policy applies even though the deadline has not passed.
    pub pending_attempts_max: i32,
    /// How long a transfer's fund reservation (and the investor's hold) waits
    /// for its withdrawal to settle before it expires: the withdrawal is
    /// cancelled at the bank and, if the cancellation wins, the transfer
    /// fails with `RESERVATION_EXPIRED`, freeing the seat and the funds.
    pub reservation_ttl_ms: u64,
    /// Calls the settlement runner has in flight at once per step kind
    /// (withdrawals at the investor's bank, deposits at the fund
    /// administrator), so a backlog of pending steps cannot flood a service.
    pub settlement_concurrency_per_service: usize,
    /// How often the settlement runner reads fund terms from the fund
    /// administrator; 0 turns it off.
    pub fund_terms_refresh_ms: u64,
    /// How long inbox rows (applied message ids) are kept. Past it, a
    /// redelivered message is still recognised by its transfer's state.
    pub inbox_retention_ms: u64,
    /// A schema registry (Confluent's REST API). When set, events are
    /// written in Confluent's wire format under ids registered for
    /// `<topic>-value`; without it, in Avro single-object encoding. Both are
    /// read either way.
    pub schema_registry_url: Option<String>,
    /// Upper bound of one call to the schema registry.
    pub schema_registry_timeout_ms: u64,
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
            fetch_wait_max_ms: 20,
            batch_size_max: 64,
            batches_in_flight: 1,
            relay_batch_size_max: 500,
            relay_poll_interval_ms: 500,
            producer_message_timeout_ms: 30_000,
            retry_backoff_max_ms: 5_000,
            transaction_attempts_max: 32,
            // Bank transfers settle in up to three business days; past five
            // days something is wrong and a person should look.
            pending_deadline_ms: 5 * 24 * 3_600_000,
            pending_deadline_policy: DeadlinePolicy::ManualReview,
            // With the backoff capped at 30 s, about four days of asking.
            pending_attempts_max: 12_000,
            reservation_ttl_ms: 7 * 24 * 3_600_000,
            settlement_concurrency_per_service: 8,
            fund_terms_refresh_ms: 300_000,
            inbox_retention_ms: 7 * 24 * 3_600_000,
            schema_registry_url: None,
            schema_registry_timeout_ms: 5_000,
            kafka_overrides: Vec::new(),
        }
    }
}

/// A stage of the transfer workflow: its input topic and consumer group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StageName {
    Validator,
    Withdrawal,
    Deposit,
    Completion,
}

impl StageName {
    pub const ALL: [StageName; 4] = [Self::Validator, Self::Withdrawal, Self::Deposit, Self::Completion];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validator => "validator",
            Self::Withdrawal => "withdrawal",
            Self::Deposit => "deposit",
            Self::Completion => "completion",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|stage| stage.as_str() == name)
    }

    pub fn input_topic(self, topics: &Topics) -> String {
        match self {
            Self::Validator => topics.requested(),
            Self::Withdrawal => topics.validated(),
            Self::Deposit => topics.withdrawn(),
            Self::Completion => topics.deposited(),
        }
    }

    pub fn group_id(self, config: &PipelineConfig) -> String {
        format!("{}bridge-{}", config.group_prefix, self.as_str())
    }
}
