//! Reading a range of a topic by assignment, for operator tools (replay,
//! dead-letter inspection and redrive). Never joins or moves a consumer
//! group: it assigns partitions directly and commits nothing.

use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::message::Inbound;
use crate::PipelineConfig;

/// Where a range starts or ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    Offset(i64),
    Time(DateTime<Utc>),
}

#[derive(Clone, Debug)]
pub struct Range {
    pub topic: String,
    /// All partitions when empty.
    pub partitions: Vec<i32>,
    /// From the beginning when `None`.
    pub from: Option<Bound>,
    /// Inclusive end; to the end of the log when `None`.
    pub to: Option<Bound>,
    /// A partition with nothing new for this long is taken to be at its end.
    /// The brokers' high watermark is not used for that: tansu 0.6
    /// under-reports it for multi-record batches.
    pub idle_ms: u64,
    /// Messages appended after this time end their partition's range. Tools
    /// set it to their own start, so what they cause themselves (a redriven
    /// message dead-lettered again, say) is never part of what they read.
    pub appended_before: Option<DateTime<Utc>>,
}

fn client(config: &PipelineConfig) -> Result<StreamConsumer> {
    let mut client = crate::kafka::base(config)?;
    client
        // A group id is required by librdkafka, but with manual assignment
        // and no commits the group is never joined.
        .set("group.id", format!("{}bridge-tools", config.group_prefix))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A start offset older than the log (retention) reads from the
        // oldest message still there.
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false");
    for (key, value) in &config.kafka_overrides {
        client.set(key, value);
    }
    client.create().context("Failed to create Kafka reader")
}

fn partition_count(consumer: &StreamConsumer, topic: &str) -> Result<Vec<i32>> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).context("Failed to read metadata")?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|found| found.name() == topic)
        .flat_map(|found| found.partitions().iter().map(|partition| partition.id()))
        .collect();
    anyhow::ensure!(!partitions.is_empty(), "Topic {topic} does not exist or has no partitions");
    Ok(partitions)
}

/// Resolves a time bound to the first offset at or after it, per partition.
fn offsets_for_time(
    consumer: &StreamConsumer,
    topic: &str,
    partitions: &[i32],
    time: DateTime<Utc>,
) -> Result<Vec<(i32, Offset)>> {
    let mut list = TopicPartitionList::new();
    for partition in partitions {
        list.add_partition_offset(topic, *partition, Offset::Offset(time.timestamp_millis()))?;
    }
    let found =
        consumer.offsets_for_times(list, Duration::from_secs(10)).context("Failed to look offsets up by time")?;
    Ok(found.elements().iter().map(|element| (element.partition(), element.offset())).collect())
}

/// Calls `visit` for every message in `range`, partition by partition in
/// offset order within each, and returns how many were visited.
pub async fn read_range<F, Fut>(config: &PipelineConfig, range: &Range, mut visit: F) -> Result<u64>
where
    F: FnMut(Inbound) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let consumer = client(config)?;
    let partitions =
        if range.partitions.is_empty() { partition_count(&consumer, &range.topic)? } else { range.partitions.clone() };
    let starts: Vec<(i32, Offset)> = match range.from {
        None => partitions.iter().map(|partition| (*partition, Offset::Beginning)).collect(),
        Some(Bound::Offset(offset)) => {
            partitions.iter().map(|partition| (*partition, Offset::Offset(offset))).collect()
        }
        Some(Bound::Time(time)) => offsets_for_time(&consumer, &range.topic, &partitions, time)?,
    };
    let ends: Vec<(i32, Option<i64>)> = match range.to {
        None => partitions.iter().map(|partition| (*partition, None)).collect(),
        Some(Bound::Offset(offset)) => partitions.iter().map(|partition| (*partition, Some(offset))).collect(),
        Some(Bound::Time(time)) => offsets_for_time(&consumer, &range.topic, &partitions, time)?
            .into_iter()
            .map(|(partition, offset)| match offset {
                // The first offset after the end time, so the range ends
                // just before it.
                Offset::Offset(first_after) => (partition, Some(first_after - 1)),
                _ => (partition, None),
            })
            .collect(),
    };
    let mut list = TopicPartitionList::new();
    let mut open: std::collections::HashMap<i32, Option<i64>> = std::collections::HashMap::new();
    for (partition, start) in &starts {
        // A time bound past the log's end resolves to "end": nothing to read.
        if matches!(start, Offset::End) {
            continue;
        }
        let end = ends.iter().find(|(p, _)| p == partition).and_then(|(_, end)| *end);
        list.add_partition_offset(&range.topic, *partition, *start)?;
        open.insert(*partition, end);
    }
    if open.is_empty() {
        return Ok(0);
    }
    consumer.assign(&list)?;
    let idle = Duration::from_millis(range.idle_ms);
    let mut visited = 0;
    while !open.is_empty() {
        let message = match tokio::time::timeout(idle, consumer.recv()).await {
            Ok(message) => message.context("Kafka read failed")?,
            Err(_) => break,
        };
        let inbound = Inbound::from_kafka(&message);
        let Some(end) = open.get(&inbound.partition).copied() else { continue };
        let appended_later = match (range.appended_before, inbound.timestamp_ms) {
            (Some(cutoff), Some(timestamp_ms)) => timestamp_ms > cutoff.timestamp_millis(),
            _ => false,
        };
        if appended_later || end.is_some_and(|end| inbound.offset > end) {
            // Past the end: stop fetching this partition, so its traffic
            // neither reaches us nor keeps the idle timer from running out.
            open.remove(&inbound.partition);
            let mut done = TopicPartitionList::new();
            done.add_partition(&range.topic, inbound.partition);
            let _ = consumer.pause(&done);
            continue;
        }
        let last = end == Some(inbound.offset);
        let partition = inbound.partition;
        visit(inbound).await?;
        visited += 1;
        if last {
            open.remove(&partition);
            let mut done = TopicPartitionList::new();
            done.add_partition(&range.topic, partition);
            let _ = consumer.pause(&done);
        }
    }
    Ok(visited)
}
