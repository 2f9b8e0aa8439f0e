//! How far each stage's consumer group is behind its input topic: the
//! broker's high watermark minus the group's committed offset, summed over
//! the topic's partitions. Read from outside the group (no member joins),
//! so any process may ask: the benchmark while it runs, the console.

use std::time::Duration;

use anyhow::Result;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;

use crate::config::{PipelineConfig, StageName};

/// One reader per stage group, kept open between readings.
pub struct LagReader {
    readers: Vec<(StageName, BaseConsumer, String, String)>,
    partitions: i32,
}

/// A stage's lag now.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StageLag {
    pub stage: &'static str,
    pub group: String,
    pub topic: String,
    /// Messages on the topic the group has not committed past.
    pub lag: i64,
}

impl LagReader {
    /// Clients for every stage group, with the pipeline's connection and
    /// security settings. Reading offsets never joins the group.
    pub fn new(config: &PipelineConfig) -> Result<Self> {
        let mut readers = Vec::new();
        for stage in StageName::ALL {
            let group = stage.group_id(config);
            let mut client = crate::kafka::base(config)?;
            crate::kafka::apply_overrides(&mut client, config);
            client.set("group.id", &group).set("enable.auto.commit", "false");
            readers.push((stage, client.create()?, stage.input_topic(&config.topics), group));
        }
        Ok(Self { readers, partitions: config.topic_partitions })
    }

    /// Every stage's lag. Blocking: call it off the async runtime's
    /// threads.
    pub fn read(&self, timeout: Duration) -> Result<Vec<StageLag>> {
        let mut lags = Vec::new();
        for (stage, consumer, topic, group) in &self.readers {
            let mut list = TopicPartitionList::new();
            for partition in 0..self.partitions {
                list.add_partition(topic, partition);
            }
            let committed = consumer.committed_offsets(list, timeout)?;
            let mut lag = 0;
            for element in committed.elements() {
                let (_, high) = consumer.fetch_watermarks(topic, element.partition(), timeout)?;
                let position = element.offset().to_raw().filter(|offset| *offset >= 0).unwrap_or(0);
                lag += (high - position).max(0);
            }
            lags.push(StageLag { stage: stage.as_str(), group: group.clone(), topic: topic.clone(), lag });
        }
        Ok(lags)
    }
}
