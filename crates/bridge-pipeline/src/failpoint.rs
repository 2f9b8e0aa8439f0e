//! Fault injection: named points where a process can be made to die at
//! once, as `kill -9` would (no unwinding, no cleanup, no offset commit, no
//! producer flush). Off unless `BRIDGE_FAILPOINTS` lists them
//! (comma-separated); the fault-injection tests use it to kill processes at
//! the exact moments that matter, which a signal sent from outside could
//! only hit by luck.
//!
//! | point | where |
//! | --- | --- |
//! | `<consumer>.after_poll` | a consumer (`validator`, `withdrawal`, `deposit`, `completion`, `notifier`) has received a message, before processing it |
//! | `stage.inside_tx` | a stage's transaction is written, before its commit |
//! | `<consumer>.after_commit` | the message (or a batch of them) is processed and committed, before its offset is stored |
//! | `relay.after_claim` | the relay has claimed outbox rows, before producing |
//! | `relay.after_produce` | the broker acknowledged, before the rows are marked published |
//! | `notifier.mid_delivery` | a notification was sent, before it is recorded as delivered |
//! | `review.after_reopen` | an operator's retry or fail reopened a transfer in manual review, before its step ran |
//!
//! A pause instead of a death: `<consumer>.pause_after_poll:<ms>` makes the
//! consumer hold its first message that long before processing it, as a
//! process stalled by a long GC pause or a frozen VM would (a zombie that
//! outlives its group membership and then carries on).

use std::sync::OnceLock;

/// The pause armed for `name` (`name:<ms>`), once per process.
pub async fn pause(name: &str) {
    static PAUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let prefix = format!("{name}:");
    let Some(ms) = armed().iter().find_map(|armed| armed.strip_prefix(&prefix)?.parse::<u64>().ok()) else {
        return;
    };
    if !PAUSED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        eprintln!("failpoint {name}: pausing {ms} ms");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        eprintln!("failpoint {name}: resuming");
    }
}

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("BRIDGE_FAILPOINTS")
            .map(|list| list.split(',').map(|name| name.trim().to_owned()).filter(|name| !name.is_empty()).collect())
            .unwrap_or_default()
    })
}

/// Whether any point is armed (lets hot paths skip naming theirs).
pub fn any() -> bool {
    !armed().is_empty()
}

/// Dies here if `name` is armed.
pub fn hit(name: &str) {
    if armed().iter().any(|armed| armed == name) {
        eprintln!("failpoint {name}: aborting the process");
        std::process::abort();
    }
}
