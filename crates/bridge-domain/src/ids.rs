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
/// so a retried call can never move money twice.
pub fn idempotency_key(transfer_id: Uuid, step: Step) -> String {
    format!("bridge-{transfer_id}-{step}")
}

/// The transfer and step an idempotency key was made for; `None` for a key
/// Bridge did not make.
pub fn parse_idempotency_key(key: &str) -> Option<(Uuid, Step)> {
    let rest = key.strip_prefix("bridge-")?;
    // A hyphenated UUID is 36 characters, then '-' and the step.
    let (id, step) = (rest.get(..36)?, rest.get(36..)?.strip_prefix('-')?);
    let transfer_id = Uuid::try_parse(id).ok()?;
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
            assert_eq!(parse_idempotency_key(&idempotency_key(transfer, step)), Some((transfer, step)));
        }
        for foreign in ["", "bridge-", "bridge-not-a-uuid-withdrawal", "other-00000000-0000-0000-0000-00000000002a-x"] {
            assert_eq!(parse_idempotency_key(foreign), None, "{foreign}");
        }
        assert_eq!(parse_idempotency_key(&format!("bridge-{transfer}")), None);
        assert_eq!(parse_idempotency_key(&format!("bridge-{transfer}-")), None);
        assert_eq!(parse_idempotency_key(&format!("bridge-{transfer}-transfer")), None);
    }
}
