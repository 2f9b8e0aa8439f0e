//! Operator commands: replay a range of a topic through its stage, and
//! inspect and redrive dead-letter topics.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use bridge_pipeline::dead_letters;
use bridge_pipeline::message::Inbound;
use bridge_pipeline::reader::{read_range, Bound, Range};
use bridge_pipeline::stages::{self, Outcome, StageError};
use bridge_pipeline::{Pipeline, StageName, Topics};

use crate::{Common, ServiceArgs};

#[derive(Args)]
pub struct RangeArgs {
    /// Full topic name.
    #[arg(long)]
    topic: Option<String>,
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
    fn topic(&self) -> Result<&str> {
        self.topic.as_deref().context("--topic is required")
    }

    fn range(&self) -> Result<Range> {
        Ok(self.range_of(self.topic()?))
    }

    fn range_of(&self, topic: &str) -> Range {
        Range {
            topic: topic.to_owned(),
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
    /// Every stage's input topic in the pipeline's order (requests, then
    /// validated, withdrawn and deposited events), each read to its end
    /// before the next, instead of one --topic: after restoring a database
    /// backup, with --from-time a little before the backup was taken.
    #[arg(long, conflicts_with = "topic")]
    all_stages: bool,
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
    let config = args.common.pipeline_config(&args.common.brokers).await?;
    let stages = match args.all_stages {
        // In the order a transfer goes through them, so each stage finds
        // the transfers the one before it recorded.
        true => StageName::ALL.to_vec(),
        false => vec![stage_for(&config.topics, args.range.topic()?)?],
    };
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    let services = args.services.services(&pool)?;
    let pipeline = crate::credentials::with_bank_access(Pipeline::new(pool, config.clone(), services))?;
    pipeline.prepare().await?;
    for stage in stages {
        replay_stage(&pipeline, &config, stage, &args).await?;
    }
    Ok(())
}

/// Replays the range of `stage`'s input topic through the stage; prints
/// what it found.
async fn replay_stage(
    pipeline: &Pipeline,
    config: &bridge_pipeline::PipelineConfig,
    stage: StageName,
    args: &ReplayArgs,
) -> Result<()> {
    let ctx = pipeline.context();
    let topic = stage.input_topic(&config.topics);
    let mut report =
        ReplayReport { topic: topic.clone(), stage: stage.as_str(), dry_run: args.dry_run, ..Default::default() };
    let bar = progress_bar();
    // Shared counters: the visitor's futures only borrow them.
    let counts = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
    let read = read_range(config, &args.range.range_of(&topic), |message: Inbound| {
        let bar = &bar;
        let counts = &counts;
        async move {
            bar.inc(1);
            if args.dry_run {
                return Ok(());
            }
            if let (Some(registry), Some(payload)) = (&ctx.registry, message.payload.as_deref()) {
                registry.learn_writer(payload).await?;
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

pub async fn dlq(args: DlqArgs) -> Result<()> {
    let config = args.common.pipeline_config(&args.common.brokers).await?;
    match args.command {
        DlqCommand::List { idle_ms } => {
            for topic in dead_letters::summary(&config, idle_ms).await? {
                println!("{}", serde_json::to_string(&topic)?);
            }
        }
        DlqCommand::Show { range } => {
            dead_letters::show(&config, &range.range()?, |record| {
                println!("{}", serde_json::to_string(&record)?);
                Ok(())
            })
            .await?;
        }
        DlqCommand::Redrive { range, dry_run } => {
            let report = dead_letters::redrive(&config, &range.range()?, dry_run).await?;
            println!(
                "{}",
                serde_json::json!({"topic": range.topic, "read": report.read, "redriven": report.redriven, "dry_run": dry_run})
            );
        }
    }
    Ok(())
}
