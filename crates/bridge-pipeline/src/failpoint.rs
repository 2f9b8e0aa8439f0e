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
//! | `<consumer>.after_commit` | the message is processed and committed, before its offset is stored |
//! | `relay.after_claim` | the relay has claimed outbox rows, before producing |
//! | `relay.after_produce` | the broker acknowledged, before the rows are marked published |
//! | `notifier.mid_delivery` | a notification was sent, before it is recorded as delivered |

use std::sync::OnceLock;

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
