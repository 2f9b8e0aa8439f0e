//! Stable identifiers. Event ids are derived, not random, so that re-running a
//! step (after a crash, a redelivery or a replay) produces the very same event
//! id and downstream consumers can deduplicate on it.

use uuid::Uuid;

use crate::Step;

/// Namespace for every name-based (v5) id Bridge derives.
const BRIDGE_NAMESPACE: Uuid = Uuid::from_u128(0x5b1d_6e0a_3c4f_4f7e_9a51_2c0d_8e77_b310);

/// The id of the status event that records `version` of `transfer_id`.
pub fn status_event_id(transfer_id: Uuid, version: i64) -> Uuid {
    Uuid::new_v5(&BRIDGE_NAMESPACE, format!("status/{transfer_id}/{version}").as_bytes())
}

/// The id of the outcome event a stage emits for `transfer_id`.
pub fn stage_event_id(transfer_id: Uuid, stage: &str) -> Uuid {
    Uuid::new_v5(&BRIDGE_NAMESPACE, format!("stage/{stage}/{transfer_id}").as_bytes())
}

/// The idempotency key sent to an outside service for one step of one
/// transfer: the same step of the same transfer always carries the same key,
/// so a retried call can never move money twice. `attempt` is 0 unless an
/// operator retried the step after its service voided the first operation;
/// a new attempt is a new key (`…-withdrawal-1`).
pub fn idempotency_key(transfer_id: Uuid, step: Step, attempt: i32) -> String {
    match attempt {
        0 => format!("bridge-{transfer_id}-{step}"),
        attempt => format!("bridge-{transfer_id}-{step}-{attempt}"),
    }
}

/// The transfer and step an idempotency key was made for; `None` for a key
/// Bridge did not make.
pub fn parse_idempotency_key(key: &str) -> Option<(Uuid, Step)> {
    let rest = key.strip_prefix("bridge-")?;
    // A hyphenated UUID is 36 characters, then '-' and the step, then the
    // attempt if not the first.
    let (id, step) = (rest.get(..36)?, rest.get(36..)?.strip_prefix('-')?);
    let transfer_id = Uuid::try_parse(id).ok()?;
    let step = match step.split_once('-') {
        Some((step, attempt)) if attempt.parse::<u32>().is_ok_and(|attempt| attempt > 0) => step,
        Some(_) => return None,
        None => step,
    };
    Some((transfer_id, step.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let transfer = Uuid::from_u128(42);
        assert_eq!(status_event_id(transfer, 1), status_event_id(transfer, 1));
        assert_ne!(status_event_id(transfer, 1), status_event_id(transfer, 2));
        assert_ne!(stage_event_id(transfer, "validated"), stage_event_id(transfer, "withdrawn"));
    }

    #[test]
    fn idempotency_keys_parse_back() {
        let transfer = Uuid::from_u128(42);
        for step in Step::ALL {
            for attempt in [0, 1, 12] {
                assert_eq!(parse_idempotency_key(&idempotency_key(transfer, step, attempt)), Some((transfer, step)));
            }
        }
        assert_ne!(idempotency_key(transfer, Step::Withdrawal, 0), idempotency_key(transfer, Step::Withdrawal, 1));
        assert_eq!(parse_idempotency_key(&format!("bridge-{transfer}-refund-0")), None);
        assert_eq!(parse_idempotency_key(&format!("bridge-{transfer}-refund-x")), None);
        for foreign in ["", "bridge-", "bridge-not-a-uuid-withdrawal", "other-00000000-0000-0000-0000-00000000002a-x"] {
            assert_eq!(parse_idempotency_key(foreign), None, "{foreign}");
        }
        assert_eq!(parse_idempotency_key(&format!("bridge-{transfer}")), None);
        assert_eq!(parse_idempotency_key(&format!("bridge-{transfer}-")), None);
        assert_eq!(parse_idempotency_key(&format!("bridge-{transfer}-transfer")), None);
    }
}
