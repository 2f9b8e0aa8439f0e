//! The domain of Bridge: money, the transfer state machine, and the rules that
//! decide whether a transfer may go ahead.
//!
//! This crate owns every business decision that does not need IO: what a legal
//! state change is, which rejection reason applies to a request, and how stable
//! event ids are derived. It must not depend on tokio, sqlx, rdkafka or Avro;
//! the edge crates (`bridge-store`, `bridge-pipeline`) call into it, never the
//! other way round. Keeping it pure is what lets the reconciler and the stages
//! share one definition of "correct".

pub mod criteria;
pub mod ids;
pub mod money;
pub mod resolution;
pub mod rules;
pub mod step;
pub mod text;
pub mod transfer;

pub use criteria::{CountryCode, InvestorAttributes, Rule, RuleError, RuleSet};
pub use money::{format_major, Currency, Money};
pub use resolution::Resolution;
pub use rules::{check_request, AccountSnapshot, FundSnapshot, FundTerms, RequestFacts, RunningBooks};
pub use step::{Book, Effect, Posting, Step};
pub use transfer::{FailureReason, RejectReason, TransferEvent, TransferState};

/// Errors raised by domain rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid currency code {0:?}: expected three upper-case ASCII letters (ISO 4217)")]
    InvalidCurrency(String),
    #[error("currency mismatch: {left} vs {right}")]
    CurrencyMismatch { left: Currency, right: Currency },
    #[error("amount overflow while adding {left} and {right} minor units")]
    Overflow { left: i64, right: i64 },
    #[error("illegal transition from {from} on {event}")]
    IllegalTransition { from: TransferState, event: &'static str },
    #[error("unknown transfer state {0:?}")]
    UnknownState(String),
    #[error("unknown step {0:?}: expected withdrawal, deposit or refund")]
    UnknownStep(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
