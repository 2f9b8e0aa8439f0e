//! `bridge rebuild`: the event log is derived from the status topic; this
//! reads the whole topic back into a fresh table, compares it with the live
//! log and with the transfers' own history, and, when asked, feeds the
//! events the live log lacks through the notifier's normal intake, so they
//! are logged and notified exactly once.

use anyhow::Result;
use chrono::Utc;
use serde::Serialize;
use uuid::Uuid;

use bridge_codec::TransferStatusChanged;
use bridge_pipeline::message::Inbound;
use bridge_pipeline::reader::{read_range, Range};
use bridge_pipeline::runner::Runtime;
use bridge_store::notifications::{self, LoggedEvent, RebuildComparison};

#[derive(Clone, Debug, Serialize)]
pub struct RebuildReport {
    pub read: u64,
    /// Messages on the topic that are not status events.
    pub undecodable: u64,
    pub comparison: RebuildComparison,
    /// Events fed to the live log (and its subscribers) with `apply`.
    pub applied: u64,
}

impl RebuildReport {
    /// Whether the live log and the topic agree and every transfer version
    /// was published.
    pub fn consistent(&self) -> bool {
        let c = &self.comparison;
        c.missing_from_log == 0 && c.differing == 0 && c.versions_never_published == 0
    }
}

fn logged(message: &Inbound) -> Option<LoggedEvent> {
    let event: TransferStatusChanged = bridge_codec::decode(message.payload.as_deref()?).ok()?;
    Some(LoggedEvent {
        event_id: Uuid::parse_str(&event.event_id).ok()?,
        transfer_id: Uuid::parse_str(&event.transfer_id).ok()?,
        version: event.version,
        state: event.state.clone(),
        investor_account_id: event.investor_account_id.clone(),
        fund_account_id: event.fund_account_id.clone(),
        event: serde_json::to_value(&event).ok()?,
        // The message's own: a rebuilt event's deliveries continue the
        // trace of the stage that wrote it.
        traceparent: message.header("traceparent").map(str::to_owned),
    })
}

pub async fn run(ctx: &Runtime, apply: bool, idle_ms: u64) -> Result<RebuildReport> {
    {
        let mut conn = ctx.pool.acquire().await?;
        notifications::clear_rebuild(&mut conn).await?;
    }
    let range = Range {
        topic: ctx.topics.status(),
        partitions: Vec::new(),
        from: None,
        to: None,
        idle_ms,
        appended_before: Some(Utc::now()),
    };
    let mut undecodable = 0;
    let pool = ctx.pool.clone();
    let read = read_range(&ctx.config, &range, |message: Inbound| {
        let event = logged(&message);
        if event.is_none() {
            undecodable += 1;
        }
        let pool = pool.clone();
        async move {
            if let Some(event) = event {
                let mut conn = pool.acquire().await?;
                notifications::rebuild_insert(&mut conn, &event).await?;
            }
            Ok(())
        }
    })
    .await?;
    let mut conn = ctx.pool.acquire().await?;
    let mut applied = 0;
    if apply {
        for event in notifications::missing_from_log(&mut conn).await? {
            let mut tx = ctx.pool.begin().await?;
            if notifications::accept(&mut tx, &event).await?.is_some() {
                applied += 1;
            }
            tx.commit().await?;
        }
    }
    let comparison = notifications::compare_rebuild(&mut conn).await?;
    Ok(RebuildReport { read, undecodable, comparison, applied })
}
