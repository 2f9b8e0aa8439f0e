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

impl std::fmt::Display for DeadlinePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::KeepPolling => "keep_polling",
            Self::Fail => "fail",
            Self::ManualReview => "manual_review",
        })
    }
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
    /// Bytes a consumer's fetch asks the broker to gather before it answers
    /// (within the wait). 1, the default, asks for an answer as soon as
    /// anything is there, which is right for Kafka. Some Kafka-protocol
    /// brokers (tansu 0.6) read the log once when a fetch arrives and then
    /// hold the answer for the whole wait; they read again at the end only
    /// when the first read found fewer bytes than asked for. At a load
    /// where most fetches find something, a message that lands just after
    /// a read then waits out this fetch and the whole next one: about one
    /// and a half waits on average. Asking for more than a fetch finds
    /// makes such a broker read again at the end of every wait, which
    /// brings that down to half a wait, for one more read per fetch.
    pub fetch_min_bytes: u32,
    /// Most messages of one partition a stage applies in one
    /// set-based transaction, when that many are queued; 1 turns it off.
    pub batch_size_max: usize,
    /// Most set-based transactions a stage has in flight at once in one
    /// process. Partitions' batches that find them all busy wait and go
    /// together into the next one (up to `batch_size_max` messages, whole
    /// batches only), so a busier stage makes larger transactions.
    pub batches_in_flight: usize,
    /// Outbox messages the relay claims and publishes per database
    /// transaction (whole rows: the row that reaches the limit is taken
    /// whole).
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
    /// Withdrawal declines asked again later under a new idempotency key
    /// (`INSUFFICIENT_FUNDS` may pass after payday) rather than failing the
    /// transfer at once.
    pub decline_retries: DeclineRetries,
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
    /// Credentials and TLS for the schema registry.
    pub schema_registry_auth: crate::security::RegistryAuth,
    /// Register Bridge's schemas on start-up (a registry open to
    /// applications); off, Bridge only looks its subjects up and refuses to
    /// start while one is missing (`bridge schemas register` is then run by
    /// the deployment, with credentials that may write).
    pub schema_registry_auto_register: bool,
    /// TLS and SASL of every Kafka client.
    pub kafka_security: crate::security::KafkaSecurity,
    /// Extra librdkafka settings applied last (escape hatch).
    pub kafka_overrides: Vec<(String, String)>,
}

/// Every setting's default, in one place: `PipelineConfig::new` and the
/// command line's flags both take them from here.
pub mod defaults {
    use super::DeadlinePolicy;

    pub const TOPIC_PARTITIONS: i32 = 6;
    pub const TOPIC_REPLICATION: i32 = 1;
    pub const SESSION_TIMEOUT_MS: u32 = 10_000;
    pub const FETCH_WAIT_MAX_MS: u32 = 20;
    pub const FETCH_MIN_BYTES: u32 = 1;
    pub const BATCH_SIZE_MAX: usize = 64;
    pub const BATCHES_IN_FLIGHT: usize = 1;
    pub const RELAY_BATCH_SIZE_MAX: i64 = 500;
    pub const RELAY_POLL_INTERVAL_MS: u64 = 500;
    pub const PRODUCER_MESSAGE_TIMEOUT_MS: u32 = 30_000;
    pub const RETRY_BACKOFF_MAX_MS: u64 = 5_000;
    pub const TRANSACTION_ATTEMPTS_MAX: u32 = 32;
    /// Bank transfers settle in up to three business days; past five days
    /// something is wrong and a person should look.
    pub const PENDING_DEADLINE_MS: u64 = 5 * 24 * 3_600_000;
    pub const PENDING_DEADLINE_POLICY: DeadlinePolicy = DeadlinePolicy::ManualReview;
    /// With the backoff capped at 30 s, about four days of asking.
    pub const PENDING_ATTEMPTS_MAX: i32 = 12_000;
    pub const RESERVATION_TTL_MS: u64 = 7 * 24 * 3_600_000;
    pub const SETTLEMENT_CONCURRENCY_PER_SERVICE: usize = 8;
    pub const FUND_TERMS_REFRESH_MS: u64 = 300_000;
    pub const INBOX_RETENTION_MS: u64 = 7 * 24 * 3_600_000;
    pub const SCHEMA_REGISTRY_TIMEOUT_MS: u64 = 5_000;
}

impl PipelineConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topics: Topics::default(),
            group_prefix: String::new(),
            topic_partitions: defaults::TOPIC_PARTITIONS,
            topic_replication: defaults::TOPIC_REPLICATION,
            session_timeout_ms: defaults::SESSION_TIMEOUT_MS,
            fetch_wait_max_ms: defaults::FETCH_WAIT_MAX_MS,
            fetch_min_bytes: defaults::FETCH_MIN_BYTES,
            batch_size_max: defaults::BATCH_SIZE_MAX,
            batches_in_flight: defaults::BATCHES_IN_FLIGHT,
            relay_batch_size_max: defaults::RELAY_BATCH_SIZE_MAX,
            relay_poll_interval_ms: defaults::RELAY_POLL_INTERVAL_MS,
            producer_message_timeout_ms: defaults::PRODUCER_MESSAGE_TIMEOUT_MS,
            retry_backoff_max_ms: defaults::RETRY_BACKOFF_MAX_MS,
            transaction_attempts_max: defaults::TRANSACTION_ATTEMPTS_MAX,
            pending_deadline_ms: defaults::PENDING_DEADLINE_MS,
            pending_deadline_policy: defaults::PENDING_DEADLINE_POLICY,
            decline_retries: DeclineRetries::default(),
            pending_attempts_max: defaults::PENDING_ATTEMPTS_MAX,
            reservation_ttl_ms: defaults::RESERVATION_TTL_MS,
            settlement_concurrency_per_service: defaults::SETTLEMENT_CONCURRENCY_PER_SERVICE,
            fund_terms_refresh_ms: defaults::FUND_TERMS_REFRESH_MS,
            inbox_retention_ms: defaults::INBOX_RETENTION_MS,
            schema_registry_url: None,
            schema_registry_timeout_ms: defaults::SCHEMA_REGISTRY_TIMEOUT_MS,
            schema_registry_auth: crate::security::RegistryAuth::default(),
            schema_registry_auto_register: true,
            kafka_security: crate::security::KafkaSecurity::new(),
            kafka_overrides: Vec::new(),
        }
    }
}

/// A withdrawal decline worth asking again: the bank's code, how many more
/// attempts (each under a new idempotency key, so the bank decides anew),
/// and the wait before each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclineRetry {
    pub code: String,
    pub attempts: u32,
    pub delay_ms: u64,
}

/// The decline retries in force, written `CODE:ATTEMPTS:DELAY_MS`,
/// comma-separated (`INSUFFICIENT_FUNDS:3:86400000`); empty for none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeclineRetries(pub Vec<DeclineRetry>);

impl DeclineRetries {
    /// The retry for a decline with `code`, if one is configured.
    pub fn of(&self, code: &str) -> Option<&DeclineRetry> {
        self.0.iter().find(|retry| retry.code == code)
    }
}

impl std::str::FromStr for DeclineRetries {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut retries = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
            let parts: Vec<&str> = entry.split(':').collect();
            let [code, attempts, delay_ms] = parts.as_slice() else {
                return Err(format!("expected CODE:ATTEMPTS:DELAY_MS, got {entry:?}"));
            };
            if code.is_empty() {
                return Err(format!("no decline code in {entry:?}"));
            }
            let attempts = attempts.parse().map_err(|_| format!("attempts in {entry:?} is not a number"))?;
            let delay_ms =
                delay_ms.parse().map_err(|_| format!("delay in {entry:?} is not a number of milliseconds"))?;
            retries.push(DeclineRetry { code: (*code).to_owned(), attempts, delay_ms });
        }
        Ok(Self(retries))
    }
}

impl std::fmt::Display for DeclineRetries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries: Vec<String> =
            self.0.iter().map(|retry| format!("{}:{}:{}", retry.code, retry.attempts, retry.delay_ms)).collect();
        f.write_str(&entries.join(","))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decline_retries_parse_and_print_back() {
        let retries: DeclineRetries = "INSUFFICIENT_FUNDS:3:86400000, LIMIT_EXCEEDED:1:5000".parse().unwrap();
        let limit = DeclineRetry { code: "LIMIT_EXCEEDED".into(), attempts: 1, delay_ms: 5_000 };
        assert_eq!(retries.of("LIMIT_EXCEEDED"), Some(&limit));
        assert_eq!(retries.of("ACCOUNT_CLOSED"), None);
        assert_eq!(retries.to_string(), "INSUFFICIENT_FUNDS:3:86400000,LIMIT_EXCEEDED:1:5000");
        assert_eq!("".parse::<DeclineRetries>(), Ok(DeclineRetries::default()));
        for bad in ["INSUFFICIENT_FUNDS", "X:three:1", "X:1:soon", ":1:1"] {
            assert!(bad.parse::<DeclineRetries>().is_err(), "{bad}");
        }
    }
}
