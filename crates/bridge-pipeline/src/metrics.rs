//! Process metrics in the Prometheus text format: what each consumer did
//! with its messages and how long that took, and what the relay published.
//! Served on the health listener (`--health-listen`) at `/metrics`, next to
//! the probes, so every process can be scraped, not only the API.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

struct Metrics {
    registry: Registry,
    messages: Family<Outcome, Counter>,
    retries: Family<Consumer, Counter>,
    duration: Family<Consumer, Histogram>,
    relay_published: Counter,
    relay_failed: Counter,
}

fn duration_histogram() -> Histogram {
    // 1 ms to about 16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
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
        registry.register("relay_published", "Outbox rows the broker acknowledged", relay_published.clone());
        let relay_failed = Counter::default();
        registry.register("relay_failed", "Outbox rows sent but not acknowledged (sent again)", relay_failed.clone());
        Metrics { registry, messages, retries, duration, relay_published, relay_failed }
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
    }
}
