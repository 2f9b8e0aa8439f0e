//! The transfer state machine.
//!
//! ```text
//! requested ──► validated ──► withdrawn ──► deposited ──► completed
//!     │             │  │           │   │
//!     ▼             ▼  │           ▼   │
//!  rejected       failed│       reversed│
//!                       └──► manual_review ◄┘
//!                                  │
//!        an operator's resolution: ├──► validated or withdrawn (reopened: the
//!                                  │    step is asked again, or cancelled)
//!                                  ├──► deposited (deposit confirmed outside)
//!                                  └──► reversed (refunded outside)
//! ```
//!
//! `rejected` means validation said no (nothing was held); `failed` means the
//! withdrawal failed after funds were held (hold and reservation released);
//! `reversed` means the deposit failed after the investor was debited (the
//! investor is refunded and the reservation released). `manual_review` means
//! a person must resolve the transfer: the deposit failed and so did the
//! refund (the money sits in transit), or a step stayed pending at its service
//! past its deadline under the `manual_review` policy. It freezes the transfer
//! where it stood: from `validated` the funds stay held, from `withdrawn` the
//! money stays in transit, and the reservation is kept either way. It is not
//! terminal, but it is not in flight either: no stage will touch it until a
//! person resolves it. A resolution either reopens the transfer where it
//! froze, so the step code asks the service again (or cancels the step) under
//! its idempotency key, or records what happened outside Bridge: a refund to
//! the investor (money in transit back to the investor: `reversed`) or the
//! deposit confirmed by the fund administrator (`deposited`, and the
//! completion stage finishes it). Every transition is a new version of the
//! transfer; no version is ever overwritten.

use std::fmt;

use crate::{Error, Result, Step};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransferState {
    Requested,
    Validated,
    Withdrawn,
    Deposited,
    Completed,
    Rejected,
    Failed,
    Reversed,
    ManualReview,
}

impl TransferState {
    pub const ALL: [TransferState; 9] = [
        Self::Requested,
        Self::Validated,
        Self::Withdrawn,
        Self::Deposited,
        Self::Completed,
        Self::Rejected,
        Self::Failed,
        Self::Reversed,
        Self::ManualReview,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Validated => "validated",
            Self::Withdrawn => "withdrawn",
            Self::Deposited => "deposited",
            Self::Completed => "completed",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
            Self::Reversed => "reversed",
            Self::ManualReview => "manual_review",
        }
    }

    pub fn parse(value: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == value).ok_or_else(|| Error::UnknownState(value.to_owned()))
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Rejected | Self::Failed | Self::Reversed)
    }

    /// Waiting for a person: no stage will move it.
    pub fn needs_person(self) -> bool {
        self == Self::ManualReview
    }

    /// Applies `event` and returns the next state, or refuses an event that the
    /// state machine does not allow from this state.
    pub fn apply(self, event: &TransferEvent) -> Result<TransferState> {
        use TransferEvent as E;
        use TransferState as S;
        let next = match (self, event) {
            (S::Requested, E::Validated) => S::Validated,
            (S::Requested, E::Rejected(_)) => S::Rejected,
            (S::Validated, E::Withdrawn) => S::Withdrawn,
            (S::Validated, E::WithdrawalFailed(_)) => S::Failed,
            (S::Withdrawn, E::Deposited) => S::Deposited,
            (S::Withdrawn, E::DepositFailed(_)) => S::Reversed,
            (S::Withdrawn, E::CompensationFailed(_)) => S::ManualReview,
            (S::Validated | S::Withdrawn, E::StepOverdue(_) | E::StepRefused(_)) => S::ManualReview,
            (S::Deposited, E::Completed) => S::Completed,
            (S::ManualReview, E::Reopened(step)) => step.waits_in(),
            (S::ManualReview, E::RefundedOutside) => S::Reversed,
            (S::ManualReview, E::DepositConfirmed) => S::Deposited,
            _ => return Err(Error::IllegalTransition { from: self, event: event.name() }),
        };
        Ok(next)
    }

    /// True when some event leads from `self` to `next`. Used by the
    /// reconciler to audit stored version histories.
    pub fn can_become(self, next: TransferState) -> bool {
        TransferEvent::REPRESENTATIVES.iter().any(|event| self.apply(event) == Ok(next))
    }
}

impl fmt::Display for TransferState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why validation refused a request. The codes are part of the public status
/// event contract: add new ones freely, never rename or reuse one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    NonPositiveAmount,
    InvalidCurrency,
    UnknownInvestorAccount,
    UnknownFundAccount,
    CurrencyMismatch,
    BelowMinimumInvestment,
    FundFull,
    FundCapacityExceeded,
    InsufficientFunds,
    /// Signed requests are required and this one carries no signature.
    RequestUnsigned,
    /// The signature does not match the request (or is malformed).
    RequestSignatureInvalid,
    /// The signature's timestamp is too far from when the request arrived.
    RequestSignatureStale,
    /// The source is unknown or revoked, or may not move this investor's
    /// money into this fund, or the request names another source.
    SourceNotAllowed,
    /// The fund's rules: it takes no new money yet.
    FundNotOpen,
    /// The fund's rules: it takes no new money any more.
    FundClosed,
    /// The fund's rules: the investor's residence is not among its countries.
    ResidenceNotAllowed,
    /// The fund's rules: only accredited investors.
    AccreditationRequired,
    /// The fund's rules: above its maximum for one investment.
    AboveMaximumInvestment,
    /// The fund's rules: the investor's total in the fund would exceed its
    /// maximum per investor.
    InvestorLimitExceeded,
}

impl RejectReason {
    pub fn code(self) -> &'static str {
        match self {
            Self::NonPositiveAmount => "NON_POSITIVE_AMOUNT",
            Self::InvalidCurrency => "INVALID_CURRENCY",
            Self::UnknownInvestorAccount => "UNKNOWN_INVESTOR_ACCOUNT",
            Self::UnknownFundAccount => "UNKNOWN_FUND_ACCOUNT",
            Self::CurrencyMismatch => "CURRENCY_MISMATCH",
            Self::BelowMinimumInvestment => "BELOW_MINIMUM_INVESTMENT",
            Self::FundFull => "FUND_FULL",
            Self::FundCapacityExceeded => "FUND_CAPACITY_EXCEEDED",
            Self::InsufficientFunds => "INSUFFICIENT_FUNDS",
            Self::RequestUnsigned => "REQUEST_UNSIGNED",
            Self::RequestSignatureInvalid => "REQUEST_SIGNATURE_INVALID",
            Self::RequestSignatureStale => "REQUEST_SIGNATURE_STALE",
            Self::SourceNotAllowed => "SOURCE_NOT_ALLOWED",
            Self::FundNotOpen => "FUND_NOT_OPEN",
            Self::FundClosed => "FUND_CLOSED",
            Self::ResidenceNotAllowed => "RESIDENCE_NOT_ALLOWED",
            Self::AccreditationRequired => "ACCREDITATION_REQUIRED",
            Self::AboveMaximumInvestment => "ABOVE_MAXIMUM_INVESTMENT",
            Self::InvestorLimitExceeded => "INVESTOR_LIMIT_EXCEEDED",
        }
    }
}

/// Why an external step failed. These come from the account services.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FailureReason(pub String);

impl FailureReason {
    pub fn code(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferEvent {
    Validated,
    Rejected(RejectReason),
    Withdrawn,
    WithdrawalFailed(FailureReason),
    Deposited,
    DepositFailed(FailureReason),
    /// The deposit failed and the refund to the investor failed too.
    CompensationFailed(FailureReason),
    /// A step stayed pending at its service past its deadline, and the
    /// policy hands such steps to a person.
    StepOverdue(FailureReason),
    /// The service refused a step's request as wrong (an account it does
    /// not know, a malformed movement): a person must look.
    StepRefused(FailureReason),
    Completed,
    /// An operator reopened a transfer in manual review where it froze, so
    /// `step` is asked about again (retried or cancelled) by the step code.
    Reopened(Step),
    /// An operator recorded a refund to the investor made outside Bridge of
    /// money in transit.
    RefundedOutside,
    /// An operator recorded the deposit as confirmed outside Bridge by the
    /// fund administrator.
    DepositConfirmed,
}

impl TransferEvent {
    const REPRESENTATIVES: [TransferEvent; 14] = [
        TransferEvent::Validated,
        TransferEvent::Rejected(RejectReason::InsufficientFunds),
        TransferEvent::Withdrawn,
        TransferEvent::WithdrawalFailed(FailureReason(String::new())),
        TransferEvent::Deposited,
        TransferEvent::DepositFailed(FailureReason(String::new())),
        TransferEvent::CompensationFailed(FailureReason(String::new())),
        TransferEvent::StepOverdue(FailureReason(String::new())),
        TransferEvent::StepRefused(FailureReason(String::new())),
        TransferEvent::Completed,
        TransferEvent::Reopened(Step::Withdrawal),
        TransferEvent::Reopened(Step::Deposit),
        TransferEvent::RefundedOutside,
        TransferEvent::DepositConfirmed,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Self::Validated => "validated",
            Self::Rejected(_) => "rejected",
            Self::Withdrawn => "withdrawn",
            Self::WithdrawalFailed(_) => "withdrawal_failed",
            Self::Deposited => "deposited",
            Self::DepositFailed(_) => "deposit_failed",
            Self::CompensationFailed(_) => "compensation_failed",
            Self::StepOverdue(_) => "step_overdue",
            Self::StepRefused(_) => "step_refused",
            Self::Completed => "completed",
            Self::Reopened(_) => "reopened",
            Self::RefundedOutside => "refunded_outside",
            Self::DepositConfirmed => "deposit_confirmed",
        }
    }

    pub fn reason_code(&self) -> Option<&str> {
        match self {
            Self::Rejected(reason) => Some(reason.code()),
            Self::WithdrawalFailed(reason)
            | Self::DepositFailed(reason)
            | Self::CompensationFailed(reason)
            | Self::StepOverdue(reason)
            | Self::StepRefused(reason) => Some(reason.code()),
            Self::Reopened(_) => Some("REOPENED_BY_OPERATOR"),
            Self::RefundedOutside => Some("REFUNDED_OUTSIDE_BRIDGE"),
            Self::DepositConfirmed => Some("DEPOSIT_CONFIRMED_OUTSIDE_BRIDGE"),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn happy_path_walks_to_completed() {
        let mut state = TransferState::Requested;
        for event in
            [TransferEvent::Validated, TransferEvent::Withdrawn, TransferEvent::Deposited, TransferEvent::Completed]
        {
            state = state.apply(&event).unwrap();
        }
        assert_eq!(state, TransferState::Completed);
        assert!(state.is_terminal());
    }

    #[test]
    fn terminal_states_accept_nothing() {
        for state in TransferState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for event in TransferEvent::REPRESENTATIVES.iter() {
                assert!(state.apply(event).is_err(), "{state} must refuse {}", event.name());
            }
        }
    }

    #[test]
    fn only_an_operator_resolution_leads_out_of_manual_review() {
        let resolutions = ["reopened", "refunded_outside", "deposit_confirmed"];
        for event in TransferEvent::REPRESENTATIVES.iter() {
            let allowed = TransferState::ManualReview.apply(event).is_ok();
            assert_eq!(allowed, resolutions.contains(&event.name()), "{}", event.name());
            // And a resolution applies to nothing else.
            if resolutions.contains(&event.name()) {
                for state in TransferState::ALL.into_iter().filter(|s| !s.needs_person()) {
                    assert!(state.apply(event).is_err(), "{state} must refuse {}", event.name());
                }
            }
        }
        assert_eq!(
            TransferState::ManualReview.apply(&TransferEvent::Reopened(Step::Deposit)),
            Ok(TransferState::Withdrawn)
        );
        assert!(TransferState::ManualReview.can_become(TransferState::Validated));
        assert!(!TransferState::ManualReview.can_become(TransferState::Completed));
        assert!(!TransferState::ManualReview.can_become(TransferState::Failed));
    }

    #[test]
    fn steps_cannot_be_skipped_or_repeated() {
        assert!(TransferState::Requested.apply(&TransferEvent::Withdrawn).is_err());
        assert!(TransferState::Validated.apply(&TransferEvent::Validated).is_err());
        assert!(TransferState::Withdrawn.apply(&TransferEvent::Completed).is_err());
        assert!(!TransferState::Requested.can_become(TransferState::Completed));
        assert!(TransferState::Withdrawn.can_become(TransferState::Reversed));
        assert!(TransferState::Validated.can_become(TransferState::ManualReview));
        assert!(!TransferState::Requested.can_become(TransferState::ManualReview));
        assert!(!TransferState::Deposited.can_become(TransferState::ManualReview));
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for state in TransferState::ALL {
            assert_eq!(TransferState::parse(state.as_str()).unwrap(), state);
        }
        assert!(TransferState::parse("teleported").is_err());
    }
}
