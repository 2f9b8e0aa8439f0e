//! Operator commands: replay a range of a topic through its stage, and
//! inspect and redrive dead-letter topics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use bridge_pipeline::message::{dead_letter_headers as dlq, Inbound};
use bridge_pipeline::reader::{read_range, Bound, Range};
use bridge_pipeline::stages::{self, Outcome, StageError};
use bridge_pipeline::{kafka, upstream, Pipeline, StageName, Topics};

use crate::{Common, ServiceArgs};

#[derive(Args)]
pub struct RangeArgs {
    /// Full topic name.
    #[arg(long)]
    topic: String,
    /// Only these partitions (repeatable); all by default.
    #[arg(long = "partition")]
    partitions: Vec<i32>,
    #[arg(long, conflicts_with = "from_time")]
    from_offset: Option<i64>,
    /// RFC 3339 time, e.g. 2026-11-25T10:00:00Z.
    #[arg(long)]
    from_time: Option<DateTime<Utc>>,
    /// Inclusive.
    #[arg(long, conflicts_with = "to_time")]
    to_offset: Option<i64>,
    #[arg(long)]
    to_time: Option<DateTime<Utc>>,
    /// A partition with nothing new for this long is at its end.
    #[arg(long, default_value_t = 2_000)]
    idle_ms: u64,
}

impl RangeArgs {
    fn range(&self) -> Range {
        Range {
            topic: self.topic.clone(),
            partitions: self.partitions.clone(),
            from: self.from_offset.map(Bound::Offset).or(self.from_time.map(Bound::Time)),
            to: self.to_offset.map(Bound::Offset).or(self.to_time.map(Bound::Time)),
            idle_ms: self.idle_ms,
            appended_before: Some(Utc::now()),
        }
    }
}

#[derive(Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    services: ServiceArgs,
    #[command(flatten)]
    range: RangeArgs,
    /// Count the messages in the range without processing them.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Default, Serialize)]
struct ReplayReport {
    topic: String,
    stage: &'static str,
    read: u64,
    new: u64,
    duplicates: u64,
    dead_lettered: u64,
    /// Steps an outside service holds as pending; the settlement runner
    /// finishes them.
    deferred: u64,
    dry_run: bool,
}

fn stage_for(topics: &Topics, topic: &str) -> Result<StageName> {
    StageName::ALL.into_iter().find(|stage| stage.input_topic(topics) == topic).with_context(|| {
        if topic == topics.status() {
            format!("No stage consumes {topic}; it is the pipeline's output")
        } else if topic.ends_with(".dlq") {
            format!("{topic} is a dead-letter topic; use `bridge dlq redrive`")
        } else {
            format!("{topic} is not an input topic of this pipeline (topic prefix {:?})", topics.prefix)
        }
    })
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {pos} messages  {msg}").expect("static template"));
    bar
}

/// Re-drives a range of a stage's input topic through that stage. Safe for
/// any range: the stage's inbox and state checks turn repeats into no-ops.
/// Reads by assignment and never moves the live consumer groups' offsets.
pub async fn replay(args: ReplayArgs) -> Result<()> {
    let config = args.common.pipeline_config(&args.common.brokers);
    let stage = stage_for(&config.topics, &args.range.topic)?;
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    let services = args.services.services(&pool)?;
    let pipeline = Pipeline::new(pool, config.clone(), services);
    let ctx = pipeline.context();
    let mut report = ReplayReport {
        topic: args.range.topic.clone(),
        stage: stage.as_str(),
        dry_run: args.dry_run,
        ..Default::default()
    };
    let bar = progress_bar();
    // Shared counters: the visitor's futures only borrow them.
    let counts = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
    let read = read_range(&config, &args.range.range(), |message: Inbound| {
        let bar = &bar;
        let counts = &counts;
        async move {
            bar.inc(1);
            if args.dry_run {
                return Ok(());
            }
            let mut attempts = 0;
            loop {
                match stages::handle(ctx, stage, &message).await {
                    Ok(outcome) => {
                        let slot = match outcome {
                            Outcome::Applied => 0,
                            Outcome::Duplicate => 1,
                            Outcome::DeadLettered => 2,
                            Outcome::Deferred => 3,
                        };
                        counts[slot].fetch_add(1, Ordering::Relaxed);
                    }
                    Err(StageError::Transient(reason)) if attempts < 20 => {
                        attempts += 1;
                        bar.set_message(format!("retrying: {reason}"));
                        tokio::time::sleep(std::time::Duration::from_millis(250 * attempts)).await;
                        continue;
                    }
                    Err(error) => bail!("Replay stopped at {}: {error}", message.position_id()),
                }
                return Ok(());
            }
        }
    })
    .await?;
    bar.finish_and_clear();
    let [new, duplicates, dead_lettered, deferred] = counts.map(AtomicU64::into_inner);
    (report.read, report.new, report.duplicates, report.dead_lettered, report.deferred) =
        (read, new, duplicates, dead_lettered, deferred);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[derive(Args)]
pub struct DlqArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Every dead-letter topic with its record count per error class.
    List {
        #[arg(long, default_value_t = 2_000)]
        idle_ms: u64,
    },
    /// Print dead-letter records, one JSON object per line.
    Show {
        #[command(flatten)]
        range: RangeArgs,
    },
    /// Publish dead-letter records back to their original topic, with their
    /// original key, bytes and headers, to go through the normal path again.
    Redrive {
        #[command(flatten)]
        range: RangeArgs,
        /// Print what would be redriven without publishing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Serialize)]
struct DeadLetter {
    partition: i32,
    offset: i64,
    original_topic: Option<String>,
    original_partition: Option<String>,
    original_offset: Option<String>,
    error_class: Option<String>,
    error_message: Option<String>,
    stage: Option<String>,
    failed_at: Option<String>,
    key: Option<String>,
    payload_bytes: usize,
    payload_hex_head: String,
}

fn describe(record: &Inbound) -> DeadLetter {
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
    }
}

fn require_dead_letter_topic(topic: &str) -> Result<()> {
    if !topic.ends_with(".dlq") {
        bail!("{topic} is not a dead-letter topic (they end in .dlq)");
    }
    Ok(())
}

pub async fn dlq(args: DlqArgs) -> Result<()> {
    let config = args.common.pipeline_config(&args.common.brokers);
    match args.command {
        DlqCommand::List { idle_ms } => {
            for topic in config.topics.all().into_iter().filter(|topic| topic.ends_with(".dlq")) {
                let mut classes: BTreeMap<String, u64> = BTreeMap::new();
                let range = Range {
                    topic: topic.clone(),
                    partitions: Vec::new(),
                    from: None,
                    to: None,
                    idle_ms,
                    appended_before: Some(Utc::now()),
                };
                let total = read_range(&config, &range, |record: Inbound| {
                    *classes.entry(record.header(dlq::ERROR_CLASS).unwrap_or("unknown").to_owned()).or_default() += 1;
                    async { Ok(()) }
                })
                .await?;
                println!("{}", serde_json::json!({"topic": topic, "records": total, "by_error_class": classes}));
            }
        }
        DlqCommand::Show { range } => {
            require_dead_letter_topic(&range.topic)?;
            read_range(&config, &range.range(), |record: Inbound| {
                let line = serde_json::to_string(&describe(&record));
                async move {
                    println!("{}", line?);
                    Ok(())
                }
            })
            .await?;
        }
        DlqCommand::Redrive { range, dry_run } => {
            require_dead_letter_topic(&range.topic)?;
            let original_topic = range.topic.strip_suffix(".dlq").unwrap_or(&range.topic).to_owned();
            stage_for(&config.topics, &original_topic)?;
            let producer = kafka::upstream_producer(&config)?;
            let redriven = AtomicU64::new(0);
            let read = read_range(&config, &range.range(), |record: Inbound| {
                let producer = &producer;
                let redriven = &redriven;
                let original_topic = &original_topic;
                async move {
                    // Back to the topic this dead-letter topic belongs to, never
                    // to one a header names: headers came from outside.
                    let original = original_topic.clone();
                    // The original headers, without the dead-letter ones.
                    let headers: Vec<(String, Vec<u8>)> =
                        record.headers.iter().filter(|(name, _)| !name.starts_with("bridge_dlq_")).cloned().collect();
                    if !dry_run {
                        let payload = record.payload.as_deref().unwrap_or_default();
                        upstream::publish_raw(producer, &original, record.key.as_deref(), payload, &headers).await?;
                    }
                    redriven.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            })
            .await?;
            let redriven = redriven.into_inner();
            println!(
                "{}",
                serde_json::json!({"topic": range.topic, "read": read, "redriven": redriven, "dry_run": dry_run})
            );
        }
    }
    Ok(())
}
