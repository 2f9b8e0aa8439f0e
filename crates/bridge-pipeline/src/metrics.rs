//! Process metrics in the Prometheus text format: what each consumer did
//! with its messages, how long that took and how far behind its partitions
//! are; what the relay published and in what batches; calls to the account
//! services by outcome and latency; notification deliveries by channel and
//! outcome.
//! Served on the health listener (`--health-listen`) at `/metrics`, next to
//! the probes, so every process can be scraped, not only the API.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    consumer: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Consumer {
    consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Partition {
    consumer: String,
    topic: String,
    partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Service {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExternalCall {
    service: String,
    operation: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallbackResult {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Delivery {
    channel: String,
    outcome: String,
}

struct Metrics {
    registry: Registry,
    messages: Family<Outcome, Counter>,
    retries: Family<Consumer, Counter>,
    duration: Family<Consumer, Histogram>,
    lag: Family<Partition, Gauge>,
    relay_published: Counter,
    relay_failed: Counter,
    relay_batch_size: Histogram,
    batch_size: Family<Consumer, Histogram>,
    external_calls: Family<ExternalCall, Histogram>,
    circuits: Family<Service, Gauge>,
    deliveries: Family<Delivery, Counter>,
    database: DatabaseGauges,
    callbacks: Family<CallbackResult, Counter>,
    api_connections: Gauge,
    api_connections_refused: Counter,
    api_auth_failures: Family<Reason, Counter>,
}

/// What the database says about the whole pipeline, read when the API is
/// scraped (so one process reports it, not every one).
struct DatabaseGauges {
    transfers_open: Family<State, Gauge>,
    manual_review: Gauge,
    pending_steps: Gauge,
    pending_steps_overdue: Gauge,
    outbox_unpublished: Gauge,
    outbox_oldest_age_seconds: Gauge,
}

fn duration_histogram() -> Histogram {
    // 1 ms to about 16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

fn batch_histogram() -> Histogram {
    // 1 to 1,024 messages.
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let mut registry = Registry::with_prefix("bridge");
        let messages = Family::<Outcome, Counter>::default();
        registry.register("messages", "Messages a consumer finished, by outcome", messages.clone());
        let retries = Family::<Consumer, Counter>::default();
        registry.register("message_retries", "Transient failures retried in place", retries.clone());
        let duration = Family::<Consumer, Histogram>::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register(
            "message_duration_seconds",
            "Time from taking a message to finishing it, retries included",
            duration.clone(),
        );
        let relay_published = Counter::default();
        registry.register("relay_published", "Outbox messages the broker acknowledged", relay_published.clone());
        let relay_failed = Counter::default();
        registry.register("relay_failed", "Outbox messages sent but not acknowledged (their rows are sent again)", relay_failed.clone());
        let lag = Family::<Partition, Gauge>::default();
        registry.register(
            "consumer_lag",
            "Messages in a partition behind the one this consumer last finished (from the last fetch's high watermark)",
            lag.clone(),
        );
        let relay_batch_size = batch_histogram();
        registry.register("relay_batch_size", "Outbox messages the relay sent per batch", relay_batch_size.clone());
        let batch_size = Family::<Consumer, Histogram>::new_with_constructor(batch_histogram as fn() -> Histogram);
        registry.register(
            "batch_size",
            "Messages a consumer applied together in one set-based transaction",
            batch_size.clone(),
        );
        let external_calls =
            Family::<ExternalCall, Histogram>::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register(
            "external_call_duration_seconds",
            "Calls to the account services by operation and outcome (settled, declined, pending, unavailable, refused), retries and lookups included",
            external_calls.clone(),
        );
        let circuits = Family::<Service, Gauge>::default();
        registry.register(
            "account_service_circuit_open",
            "1 while an account service refuses our credentials or configuration and its money steps wait",
            circuits.clone(),
        );
        let deliveries = Family::<Delivery, Counter>::default();
        registry.register(
            "notification_deliveries",
            "Notification attempts by channel and outcome (delivered, retry, dead)",
            deliveries.clone(),
        );
        let database = DatabaseGauges {
            transfers_open: Family::default(),
            manual_review: Gauge::default(),
            pending_steps: Gauge::default(),
            pending_steps_overdue: Gauge::default(),
            outbox_unpublished: Gauge::default(),
            outbox_oldest_age_seconds: Gauge::default(),
        };
        registry.register("transfers_open", "Transfers not in a terminal state, per state", database.transfers_open.clone());
        registry.register(
            "transfers_manual_review",
            "Transfers waiting for a person; alert when above zero",
            database.manual_review.clone(),
        );
        registry.register("pending_steps", "Steps pending at an account service", database.pending_steps.clone());
        registry.register("pending_steps_overdue", "Pending steps past their deadline", database.pending_steps_overdue.clone());
        registry.register("outbox_unpublished", "Outbox rows not yet published or awaiting their delete", database.outbox_unpublished.clone());
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest unpublished outbox row",
            database.outbox_oldest_age_seconds.clone(),
        );
        let callbacks = Family::<CallbackResult, Counter>::default();
        registry.register("callbacks", "Settlement callbacks received, by result", callbacks.clone());
        // Every result from the start, at 0, so a rate over them is defined
        // before the first callback of each kind.
        for result in ["applied", "already_applied", "still_pending", "replayed", "refused", "failed"] {
            let _ = callbacks.get_or_create(&CallbackResult { result: result.to_owned() });
        }
        let api_connections = Gauge::default();
        registry.register("api_connections", "HTTP connections the API holds open", api_connections.clone());
        let api_connections_refused = Counter::default();
        registry.register(
            "api_connections_refused",
            "HTTP connections answered 503 and closed because the API held its maximum",
            api_connections_refused.clone(),
        );
        let api_auth_failures = Family::<Reason, Counter>::default();
        registry.register(
            "api_auth_failures",
            "API requests refused for their credentials (missing, unknown_key, wrong_secret, revoked, invalid_token) or throttled after too many",
            api_auth_failures.clone(),
        );
        Metrics {
            registry,
            api_auth_failures,
            database,
            callbacks,
            api_connections,
            api_connections_refused,
            messages,
            retries,
            duration,
            lag,
            relay_published,
            relay_failed,
            relay_batch_size,
            batch_size,
            external_calls,
            circuits,
            deliveries,
        }
    })
}

/// A consumer finished a message (`outcome`: applied, duplicate,
/// dead_lettered, deferred) after `took`.
pub fn message_finished(consumer: &str, outcome: &str, took: Duration) {
    let metrics = metrics();
    let outcome = Outcome { consumer: consumer.to_owned(), outcome: outcome.to_owned() };
    metrics.messages.get_or_create(&outcome).inc();
    metrics.duration.get_or_create(&Consumer { consumer: consumer.to_owned() }).observe(took.as_secs_f64());
}

pub fn message_retried(consumer: &str) {
    metrics().retries.get_or_create(&Consumer { consumer: consumer.to_owned() }).inc();
}

pub fn relay_batch(published: usize, failed: usize) {
    let metrics = metrics();
    metrics.relay_published.inc_by(published as u64);
    metrics.relay_failed.inc_by(failed as u64);
    metrics.relay_batch_size.observe((published + failed) as f64);
}

/// A consumer applied `size` messages in one set-based transaction.
pub fn batch_applied(consumer: &str, size: usize) {
    metrics().batch_size.get_or_create(&Consumer { consumer: consumer.to_owned() }).observe(size as f64);
}

/// How many messages of `topic`/`partition` lie beyond the one `consumer`
/// just finished.
pub fn consumer_lag(consumer: &str, topic: &str, partition: i32, lag: i64) {
    let key = Partition { consumer: consumer.to_owned(), topic: topic.to_owned(), partition };
    metrics().lag.get_or_create(&key).set(lag.max(0));
}

/// `consumer` no longer holds `topic`/`partition`: its lag is no longer
/// this process's to report.
pub fn forget_partition(consumer: &str, topic: &str, partition: i32) {
    let key = Partition { consumer: consumer.to_owned(), topic: topic.to_owned(), partition };
    metrics().lag.remove(&key);
}

/// The content type `render` writes: the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A call to an account service finished with `outcome` after `took`.
pub fn external_call(service: &str, operation: &str, outcome: &str, took: Duration) {
    let key =
        ExternalCall { service: service.to_owned(), operation: operation.to_owned(), outcome: outcome.to_owned() };
    metrics().external_calls.get_or_create(&key).observe(took.as_secs_f64());
}

/// An account service's circuit opened or closed.
pub fn service_circuit(service: &str, open: bool) {
    metrics().circuits.get_or_create(&Service { service: service.to_owned() }).set(i64::from(open));
}

/// A notification attempt on `channel` ended with `outcome`.
pub fn notification_delivery(channel: &str, outcome: &str) {
    let key = Delivery { channel: channel.to_owned(), outcome: outcome.to_owned() };
    metrics().deliveries.get_or_create(&key).inc();
}

/// The database's figures as of now (see `bridge_store::gauges`); a state
/// with no open transfer left is no longer reported.
pub fn database_gauges(gauges: &bridge_store::gauges::Gauges) {
    let database = &metrics().database;
    database.transfers_open.clear();
    let mut manual_review = 0;
    for (state, count) in &gauges.open_transfers {
        if state == "manual_review" {
            manual_review = *count;
        }
        database.transfers_open.get_or_create(&State { state: state.clone() }).set(*count);
    }
    database.manual_review.set(manual_review);
    database.pending_steps.set(gauges.pending_steps);
    database.pending_steps_overdue.set(gauges.pending_steps_overdue);
    database.outbox_unpublished.set(gauges.outbox_unpublished);
    database.outbox_oldest_age_seconds.set(gauges.outbox_oldest_age_secs);
}

/// A settlement callback was handled with `result` (applied,
/// already_applied, still_pending, replayed, refused, failed).
pub fn callback(result: &str) {
    metrics().callbacks.get_or_create(&CallbackResult { result: result.to_owned() }).inc();
}

/// The API opened (`1`) or closed (`-1`) a connection.
pub fn api_connections(delta: i64) {
    metrics().api_connections.inc_by(delta);
}

/// An API request failed authentication (`reason`).
pub fn api_auth_failure(reason: &str) {
    metrics().api_auth_failures.get_or_create(&Reason { reason: reason.to_owned() }).inc();
}

/// The API refused a connection over its cap.
pub fn api_connection_refused() {
    metrics().api_connections_refused.inc();
}

/// Everything recorded so far, in the Prometheus text format.
pub fn render() -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &metrics().registry);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        message_finished("unit-test", "applied", Duration::from_millis(3));
        message_retried("unit-test");
        let text = render();
        assert!(text.contains(r#"bridge_messages_total{consumer="unit-test",outcome="applied"} 1"#), "{text}");
        assert!(text.contains(r#"bridge_message_retries_total{consumer="unit-test"} 1"#), "{text}");
        assert!(text.contains(r#"bridge_message_duration_seconds_count{consumer="unit-test"} 1"#), "{text}");
        consumer_lag("unit-test", "t", 3, 41);
        external_call("investor", "withdrawals", "settled", Duration::from_millis(2));
        notification_delivery("webhook", "delivered");
        relay_batch(7, 1);
        let text = render();
        assert!(text.contains(r#"bridge_consumer_lag{consumer="unit-test",topic="t",partition="3"} 41"#), "{text}");
        assert!(
            text.contains(r#"bridge_external_call_duration_seconds_count{service="investor",operation="withdrawals",outcome="settled"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"bridge_notification_deliveries_total{channel="webhook",outcome="delivered"} 1"#),
            "{text}"
        );
        assert!(text.contains("bridge_relay_batch_size_count 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "OpenMetrics, as CONTENT_TYPE says: {text}");
    }

    #[test]
    fn a_revoked_partition_no_longer_reports_its_lag() {
        consumer_lag("revoking", "t", 1, 5);
        consumer_lag("revoking", "t", 2, 7);
        forget_partition("revoking", "t", 1);
        let text = render();
        assert!(!text.contains(r#"bridge_consumer_lag{consumer="revoking",topic="t",partition="1"}"#), "{text}");
        assert!(text.contains(r#"bridge_consumer_lag{consumer="revoking",topic="t",partition="2"} 7"#), "{text}");
    }
}
