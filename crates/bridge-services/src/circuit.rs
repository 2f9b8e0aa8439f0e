//! A circuit per outside service for the replies that say the fault is
//! ours, not the transfer's: our credentials refused (401, 403) or an
//! endpoint that is not there (our configuration). Every money step would
//! get the same answer, so once one has, the service is not asked again
//! until a probe: calls fail at once, as an outage does (the stage retries
//! the step in place, its message stays in Kafka, nothing is
//! dead-lettered), and one call at a time goes through after a backoff
//! that doubles up to a ceiling. The first answer that is not our fault
//! closes the circuit, and the stages go on where they were.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// The first wait before probing an open circuit, and the longest.
const PROBE_AFTER_FIRST: Duration = Duration::from_secs(1);
const PROBE_AFTER_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct Circuit {
    open: Mutex<Option<Open>>,
}

#[derive(Clone, Debug)]
struct Open {
    since: DateTime<Utc>,
    reason: String,
    probe_at: Instant,
    wait: Duration,
    probing: bool,
}

/// Whether a call may go to the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    Go,
    /// The circuit is open and this call probes it.
    Probe,
    /// The circuit is open: fail at once, for this reason.
    Refuse(String),
}

/// What a call's answer did to the circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    None,
    Opened,
    StillOpen,
    Closed,
}

impl Circuit {
    pub fn admit(&self) -> Admission {
        let mut open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match open.as_mut() {
            None => Admission::Go,
            Some(state) if !state.probing && Instant::now() >= state.probe_at => {
                state.probing = true;
                Admission::Probe
            }
            Some(state) => Admission::Refuse(format!("{} (since {})", state.reason, state.since.to_rfc3339())),
        }
    }

    /// A call that got no answer that tells (the service unreachable or
    /// overloaded): an open circuit stays open, and a probe is due again
    /// after the same wait.
    pub fn record_silence(&self) {
        let mut open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(state) = open.as_mut().filter(|state| state.probing) {
            state.probe_at = Instant::now() + state.wait;
            state.probing = false;
        }
    }

    /// A call's answer: `fault` when it said the fault is ours.
    pub fn record(&self, fault: Option<&str>) -> Change {
        let mut open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match (open.as_mut(), fault) {
            (None, None) => Change::None,
            (Some(_), None) => {
                *open = None;
                Change::Closed
            }
            (None, Some(reason)) => {
                *open = Some(Open {
                    since: Utc::now(),
                    reason: reason.to_owned(),
                    probe_at: Instant::now() + PROBE_AFTER_FIRST,
                    wait: PROBE_AFTER_FIRST,
                    probing: false,
                });
                Change::Opened
            }
            (Some(state), Some(reason)) => {
                // A call admitted before the circuit opened, or a failed
                // probe: wait longer before the next.
                if state.probing {
                    state.wait = (state.wait * 2).min(PROBE_AFTER_MAX);
                    state.probe_at = Instant::now() + state.wait;
                    state.probing = false;
                }
                state.reason = reason.to_owned();
                Change::StillOpen
            }
        }
    }

    /// Why the circuit is open, if it is.
    pub fn open_because(&self) -> Option<String> {
        let open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        open.as_ref().map(|state| format!("{} (since {})", state.reason, state.since.to_rfc3339()))
    }

    /// How long until the next probe, for log lines.
    pub fn next_probe_in(&self) -> Option<Duration> {
        let open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        open.as_ref().map(|state| state.probe_at.saturating_duration_since(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_on_our_fault_probes_one_call_at_a_time_and_closes_on_any_other_answer() {
        let circuit = Circuit::default();
        assert_eq!(circuit.admit(), Admission::Go);
        assert_eq!(circuit.record(None), Change::None);
        assert_eq!(circuit.record(Some("401")), Change::Opened);
        assert!(matches!(circuit.admit(), Admission::Refuse(reason) if reason.starts_with("401")));
        assert!(circuit.open_because().is_some());
        // Probe time: one call goes, the others still wait.
        circuit.open.lock().unwrap().as_mut().unwrap().probe_at = Instant::now();
        assert_eq!(circuit.admit(), Admission::Probe);
        assert!(matches!(circuit.admit(), Admission::Refuse(_)));
        // The probe failed: a longer wait before the next.
        // No answer that tells: the probe is simply due again.
        circuit.record_silence();
        circuit.open.lock().unwrap().as_mut().unwrap().probe_at = Instant::now();
        assert_eq!(circuit.admit(), Admission::Probe);
        assert_eq!(circuit.record(Some("403")), Change::StillOpen);
        assert_eq!(circuit.open.lock().unwrap().as_ref().unwrap().wait, PROBE_AFTER_FIRST * 2);
        assert!(circuit.next_probe_in().is_some_and(|wait| wait > PROBE_AFTER_FIRST));
        circuit.open.lock().unwrap().as_mut().unwrap().probe_at = Instant::now();
        assert_eq!(circuit.admit(), Admission::Probe);
        assert_eq!(circuit.record(None), Change::Closed);
        assert_eq!(circuit.admit(), Admission::Go);
        assert!(circuit.open_because().is_none());
    }

    #[test]
    fn the_wait_between_probes_has_a_ceiling() {
        let circuit = Circuit::default();
        circuit.record(Some("401"));
        for _ in 0..20 {
            circuit.open.lock().unwrap().as_mut().unwrap().probe_at = Instant::now();
            assert_eq!(circuit.admit(), Admission::Probe);
            circuit.record(Some("401"));
        }
        assert_eq!(circuit.open.lock().unwrap().as_ref().unwrap().wait, PROBE_AFTER_MAX);
    }
}
