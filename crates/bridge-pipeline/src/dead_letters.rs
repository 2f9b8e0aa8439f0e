//! Operating the dead-letter topics: what is in them, and sending records
//! back through the normal path. Used by `bridge dlq` and the API's operator
//! endpoints.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Result};
use chrono::Utc;
use serde::Serialize;

use crate::message::{dead_letter_headers as dlq, Inbound};
use crate::reader::{read_range, Range};
use crate::{kafka, upstream, PipelineConfig, StageName};

/// A dead-letter record as an operator sees it.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub original_topic: Option<String>,
    pub original_partition: Option<String>,
    pub original_offset: Option<String>,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    pub stage: Option<String>,
    pub failed_at: Option<String>,
    pub key: Option<String>,
    pub payload_bytes: usize,
    pub payload_hex_head: String,
    /// Every header, values read as UTF-8 where they are.
    #[serde(skip)]
    pub headers: Vec<(String, String)>,
    /// The payload decoded as the event its original topic carries, when
    /// it decodes.
    #[serde(skip)]
    pub payload_json: Option<serde_json::Value>,
    /// The payload in hex, up to `PAYLOAD_HEX_MAX` bytes of it.
    #[serde(skip)]
    pub payload_hex: String,
}

/// How much of a payload is shown in hex.
pub const PAYLOAD_HEX_MAX: usize = 4_096;

pub fn describe(record: &Inbound) -> DeadLetter {
    let payload = record.payload.as_deref().unwrap_or_default();
    let header = |name: &str| record.header(name).map(str::to_owned);
    DeadLetter {
        partition: record.partition,
        offset: record.offset,
        original_topic: header(dlq::ORIGINAL_TOPIC),
        original_partition: header(dlq::ORIGINAL_PARTITION),
        original_offset: header(dlq::ORIGINAL_OFFSET),
        error_class: header(dlq::ERROR_CLASS),
        error_message: header(dlq::ERROR_MESSAGE),
        stage: header(dlq::STAGE),
        failed_at: header(dlq::FAILED_AT),
        key: record.key.as_deref().map(|key| String::from_utf8_lossy(key).into_owned()),
        payload_bytes: payload.len(),
        payload_hex_head: payload.iter().take(32).map(|byte| format!("{byte:02x}")).collect(),
        headers: record
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), String::from_utf8_lossy(value).into_owned()))
            .collect(),
        payload_json: None,
        payload_hex: payload.iter().take(PAYLOAD_HEX_MAX).map(|byte| format!("{byte:02x}")).collect(),
    }
}

/// `payload` decoded as the event `original_topic` carries, as JSON; `None`
/// when it does not decode (which is often why it was dead-lettered).
pub fn payload_as_json(config: &PipelineConfig, original_topic: &str, payload: &[u8]) -> Option<serde_json::Value> {
    use bridge_codec::{
        decode, FundsDeposited, FundsWithdrawn, TransferRequested, TransferStatusChanged, TransferValidated,
    };
    fn json<T: serde::Serialize, E>(decoded: Result<T, E>) -> Option<serde_json::Value> {
        decoded.ok().and_then(|event| serde_json::to_value(event).ok())
    }
    let topics = &config.topics;
    if original_topic == topics.requested() {
        json(decode::<TransferRequested>(payload))
    } else if original_topic == topics.validated() {
        json(decode::<TransferValidated>(payload))
    } else if original_topic == topics.withdrawn() {
        json(decode::<FundsWithdrawn>(payload))
    } else if original_topic == topics.deposited() {
        json(decode::<FundsDeposited>(payload))
    } else if original_topic == topics.status() {
        json(decode::<TransferStatusChanged>(payload))
    } else {
        None
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TopicSummary {
    pub topic: String,
    pub records: u64,
    pub by_error_class: BTreeMap<String, u64>,
}

/// Every dead-letter topic of this pipeline with its records per error class.
/// The topics are read at the same time: each read ends only after its
/// partitions stay quiet for `idle_ms`, and one after another those waits
/// add up.
pub async fn summary(config: &PipelineConfig, idle_ms: u64) -> Result<Vec<TopicSummary>> {
    let appended_before = Utc::now();
    let topics: Vec<String> = config.topics.all().into_iter().filter(|topic| topic.ends_with(".dlq")).collect();
    let reads = topics.into_iter().map(|topic| async move {
        let mut classes: BTreeMap<String, u64> = BTreeMap::new();
        let range = Range {
            topic: topic.clone(),
            partitions: Vec::new(),
            from: None,
            to: None,
            idle_ms,
            appended_before: Some(appended_before),
        };
        let records = read_range(config, &range, |record: Inbound| {
            *classes.entry(record.header(dlq::ERROR_CLASS).unwrap_or("unknown").to_owned()).or_default() += 1;
            async { Ok(()) }
        })
        .await?;
        Ok(TopicSummary { topic, records, by_error_class: classes })
    });
    futures::future::try_join_all(reads).await
}

/// The topic a dead-letter topic belongs to, if it is one of this
/// pipeline's: a stage's input, or the status topic (the notifier's).
pub fn original_topic(config: &PipelineConfig, dead_letter_topic: &str) -> Result<String> {
    let Some(original) = dead_letter_topic.strip_suffix(".dlq") else {
        bail!("{dead_letter_topic} is not a dead-letter topic (they end in .dlq)");
    };
    let ours = StageName::ALL.into_iter().any(|stage| stage.input_topic(&config.topics) == original)
        || original == config.topics.status();
    if !ours {
        bail!(
            "{dead_letter_topic} is not a dead-letter topic of this pipeline (topic prefix {:?})",
            config.topics.prefix
        );
    }
    Ok(original.to_owned())
}

/// The records in `range` of a dead-letter topic, visited in order.
pub async fn show<F>(config: &PipelineConfig, range: &Range, mut visit: F) -> Result<u64>
where
    F: FnMut(DeadLetter) -> Result<()>,
{
    let original = original_topic(config, &range.topic)?;
    read_range(config, range, |record: Inbound| {
        let mut letter = describe(&record);
        letter.payload_json = payload_as_json(config, &original, record.payload.as_deref().unwrap_or_default());
        let visited = visit(letter);
        async move { visited }
    })
    .await
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Redriven {
    pub read: u64,
    pub redriven: u64,
    pub dry_run: bool,
}

/// Publishes the records in `range` of a dead-letter topic back to the
/// topic it belongs to (never to one a header names: headers came from
/// outside), with their original key, bytes and headers minus ours, so they
/// go through the normal path and, being idempotent there, apply once.
pub async fn redrive(config: &PipelineConfig, range: &Range, dry_run: bool) -> Result<Redriven> {
    let original = original_topic(config, &range.topic)?;
    let producer = kafka::upstream_producer(config)?;
    let redriven = AtomicU64::new(0);
    let read = read_range(config, range, |record: Inbound| {
        let (producer, redriven, original) = (&producer, &redriven, &original);
        async move {
            let headers: Vec<(String, Vec<u8>)> =
                record.headers.iter().filter(|(name, _)| !name.starts_with("bridge_dlq_")).cloned().collect();
            if !dry_run {
                let payload = record.payload.as_deref().unwrap_or_default();
                upstream::publish_raw(producer, original, record.key.as_deref(), payload, &headers).await?;
            }
            redriven.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    })
    .await?;
    Ok(Redriven { read, redriven: redriven.into_inner(), dry_run })
}
