//! Where a consumer resumes: from the group's committed offset, which may
//! lie inside a batch the producer wrote in one request. Every message from
//! there on must reach the handler; a broker that answers a fetch begun
//! inside a batch with the next batch (tansu 0.6) must not make the consumer
//! pass over the rest of it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use bridge_pipeline::runner::{consume, Handler};
use bridge_pipeline::services::Services;
use bridge_pipeline::stages::Outcome;
use bridge_pipeline::Pipeline;
use bridge_testkit::{both_brokers, BrokerKind, TestKit};

async fn resuming_inside_a_batch_misses_nothing(kind: BrokerKind) -> Result<()> {
    let kit = TestKit::start(kind).await?;
    let topic = kit.topics().validated();
    // Fifty messages under one key in one produce request: one batch.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kit.config.brokers)
        .set("broker.address.family", "v4")
        .set("linger.ms", "50")
        .create()?;
    let payloads: Vec<String> = (0..50).map(|index| format!("message {index}")).collect();
    let mut sent = Vec::with_capacity(payloads.len());
    for payload in &payloads {
        let record = FutureRecord::to(&topic).key("one-transfer").payload(payload);
        sent.push(producer.send_result(record).map_err(|(error, _)| error)?);
    }
    let mut delivered = Vec::new();
    for delivery in sent {
        delivered.push(delivery.await?.map_err(|(error, _)| error)?);
    }
    let partition = delivered[0].partition;
    let last = delivered.iter().map(|delivery| delivery.offset).max().context("nothing delivered")?;
    let resume_at = delivered[25].offset;

    // The group committed up to the middle of that batch.
    let group = format!("{}resumer", kit.config.group_prefix);
    let committer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kit.config.brokers)
        .set("broker.address.family", "v4")
        .set("group.id", &group)
        .create()?;
    let mut offsets = TopicPartitionList::new();
    offsets.add_partition_offset(&topic, partition, Offset::Offset(resume_at))?;
    committer.commit(&offsets, CommitMode::Sync)?;
    drop(committer);

    let seen: Arc<Mutex<BTreeSet<i64>>> = Arc::default();
    let handler: Handler = {
        let seen = seen.clone();
        Arc::new(move |message| {
            let seen = seen.clone();
            Box::pin(async move {
                seen.lock().expect("seen").insert(message.offset);
                Ok(Outcome::Applied)
            })
        })
    };
    let pipeline = Pipeline::new(kit.pool.clone(), kit.config.clone(), Services::none());
    let shutdown = CancellationToken::new();
    let running = {
        let (ctx, shutdown, topic, group) =
            (pipeline.context().clone(), shutdown.clone(), topic.clone(), group.clone());
        tokio::spawn(async move { consume(&ctx, "resumer", &group, &topic, handler, shutdown).await })
    };
    let expected: BTreeSet<i64> = (resume_at..=last).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = seen.lock().expect("seen").clone();
        if expected.is_subset(&got) {
            break;
        }
        if Instant::now() > deadline {
            shutdown.cancel();
            let missing: Vec<i64> = expected.difference(&got).copied().collect();
            anyhow::bail!("resumed at {resume_at}: offsets never handled {missing:?}; handled {got:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    running.await??;
    let got = seen.lock().expect("seen").clone();
    ensure!(got.iter().all(|offset| *offset >= resume_at), "handled what the group had finished: {got:?}");
    Ok(())
}

both_brokers!(resuming_inside_a_batch_misses_nothing);
