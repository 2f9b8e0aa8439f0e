//! How a person resolves a transfer in manual review.
//!
//! A transfer freezes in `manual_review` where it stood: `validated` (the
//! investor's funds held, the withdrawal not made) or `withdrawn` (the money
//! in transit, the deposit not made). What a resolution may do depends on
//! that, and is decided here, without IO.

use std::fmt;
use std::str::FromStr;

use crate::{Step, TransferEvent, TransferState};

/// What an operator does with a transfer in manual review.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resolution {
    /// Ask the service for the step again (under the same idempotency key,
    /// or a new one once the first operation is void).
    Retry,
    /// Give up on the step: cancel it at its service and compensate as the
    /// pipeline does for a decline (release the held funds, or refund the
    /// investor).
    Fail,
    /// The investor was refunded outside Bridge.
    Refunded,
    /// The fund administrator confirmed the deposit outside Bridge.
    Complete,
}

impl Resolution {
    pub const ALL: [Resolution; 4] = [Self::Retry, Self::Fail, Self::Refunded, Self::Complete];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::Fail => "fail",
            Self::Refunded => "refunded",
            Self::Complete => "complete",
        }
    }

    /// Whether the resolution asks a service to act (and so goes through
    /// the step code), rather than recording what was done outside.
    pub fn asks_service(self) -> bool {
        matches!(self, Self::Retry | Self::Fail)
    }

    /// Whether the resolution must name the outside operation it records.
    pub fn needs_reference(self) -> bool {
        matches!(self, Self::Refunded | Self::Complete)
    }

    /// The event that starts this resolution of a transfer that froze in
    /// `frozen`, and the step it concerns; or why it cannot apply there.
    pub fn event(self, frozen: TransferState) -> Result<(TransferEvent, Step), &'static str> {
        let step = match frozen {
            TransferState::Validated => Step::Withdrawal,
            TransferState::Withdrawn => Step::Deposit,
            _ => return Err("the transfer did not freeze before a money step"),
        };
        match (self, step) {
            (Self::Retry | Self::Fail, step) => Ok((TransferEvent::Reopened(step), step)),
            (Self::Refunded, Step::Deposit) => Ok((TransferEvent::RefundedOutside, step)),
            (Self::Complete, Step::Deposit) => Ok((TransferEvent::DepositConfirmed, step)),
            (Self::Refunded, _) => {
                Err("no money left the investor's account (it is held): fail releases it, retry asks the bank again")
            }
            (Self::Complete, _) => {
                Err("the withdrawal was never made, so no deposit can be confirmed: retry asks the bank again")
            }
        }
    }
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Resolution {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|resolution| resolution.as_str() == name)
            .ok_or_else(|| format!("unknown resolution {name:?}: expected retry, fail, refunded or complete"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resolution_leads_from_where_the_transfer_froze_to_a_legal_state() {
        for frozen in [TransferState::Validated, TransferState::Withdrawn] {
            for resolution in Resolution::ALL {
                let Ok((event, step)) = resolution.event(frozen) else {
                    assert!(frozen == TransferState::Validated && resolution.needs_reference(), "{resolution}");
                    continue;
                };
                let next = TransferState::ManualReview.apply(&event).expect("legal");
                if resolution.asks_service() {
                    assert_eq!(next, frozen);
                    assert_eq!(step.waits_in(), frozen);
                } else {
                    assert!(matches!(next, TransferState::Reversed | TransferState::Deposited), "{next}");
                }
            }
        }
        assert!(Resolution::Retry.event(TransferState::Deposited).is_err());
    }

    #[test]
    fn resolutions_parse_back() {
        for resolution in Resolution::ALL {
            assert_eq!(resolution.as_str().parse::<Resolution>(), Ok(resolution));
        }
        assert!("approve".parse::<Resolution>().is_err());
    }
}
