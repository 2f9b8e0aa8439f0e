//! The outside account services, behind traits.
//!
//! The Investor Account Service debits (and refunds) an investor's bank
//! account; the Fund Account Service remits money into a fund's account. Every
//! call carries an idempotency key derived from (transfer, step), so calling
//! again after a crash or a redelivery returns the first answer and never
//! moves money twice.
//!
//! Implementations: `http` (the real services over HTTP) and the simulator
//! in the `bridge-sim` crate. This crate knows nothing of Kafka or of the
//! pipeline, so the simulator and tools depend on it alone.

pub mod circuit;
pub mod http;

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

pub use bridge_domain::FundTerms;
use bridge_domain::Money;

/// An investor's own access to their bank account (an open-banking access
/// token), sent with a withdrawal from that account. Opened from the
/// credentials store only for the call; prints as `[REDACTED]`.
#[derive(Clone)]
pub struct BankAccess(secrecy::SecretString);

impl BankAccess {
    pub fn new(token: secrecy::SecretString) -> Self {
        Self(token)
    }

    pub fn expose(&self) -> &str {
        secrecy::ExposeSecret::expose_secret(&self.0)
    }
}

impl std::fmt::Debug for BankAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BankAccess([REDACTED])")
    }
}

impl PartialEq for BankAccess {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for BankAccess {}

/// One movement of money at an outside service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoneyMovement {
    pub idempotency_key: String,
    pub transfer_id: Uuid,
    pub account_id: String,
    pub amount: Money,
    /// The W3C trace context of the step, sent so the service's spans join
    /// the transfer's trace.
    pub traceparent: Option<String>,
    /// The investor's own bank access, on a withdrawal from an investor
    /// who gave Bridge one (None otherwise, and on every other step).
    pub bank_access: Option<BankAccess>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceOutcome {
    /// The money moved; `reference` is the service's id for the operation.
    Settled { reference: String },
    /// The service refused for a business reason (account frozen, closed...).
    /// Final: retrying the same call gives the same answer.
    Declined { code: String },
    /// Accepted but not settled yet (bank transfers can take days). Not a
    /// result: ask again later with the same idempotency key.
    Pending,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The service could not be reached or failed internally. Retry later
    /// with the same idempotency key.
    #[error("account service unavailable: {0}")]
    Unavailable(String),
    /// The idempotency key was used before with a different request, or the
    /// service refused the request as malformed or unauthorised. A defect or
    /// a configuration error: retrying cannot help.
    #[error("account service refused request {0} (key reused with a different request, or malformed)")]
    IdempotencyConflict(String),
    /// The service refused our credentials (401, 403) or has no such
    /// endpoint (our configuration): a fault of ours, not of the transfer.
    /// Retried later like an outage, so the step waits in Kafka until it is
    /// fixed; nothing is dead-lettered. The HTTP adapters hold such a
    /// service's circuit open meanwhile (`circuit.rs`).
    #[error("account service refused our credentials: {0}")]
    Unauthorized(String),
    /// The service refused this request as wrong (400, 404, 422: an account
    /// it does not know, a malformed movement). Asking again cannot help; a
    /// person must look at the transfer.
    #[error("account service refused the request: {0}")]
    Refused(String),
}

impl ServiceError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ServiceError::Unavailable(_) | ServiceError::Unauthorized(_))
    }
}

/// The decline code a service reports for an operation it cancelled at our
/// request (see the `cancel_*` calls).
pub const CANCELLED: &str = "CANCELLED";

#[async_trait]
pub trait InvestorAccountService: Send + Sync {
    async fn withdraw(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError>;
    async fn refund(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError>;
    /// Voids the withdrawal under the movement's idempotency key unless it
    /// has settled: a pending one, or one never received, becomes declined
    /// with code [`CANCELLED`], and a withdrawal that arrives later under the
    /// key finds the cancellation instead of moving money. Returns what the
    /// key holds afterwards (a settled withdrawal stays settled). This is
    /// how an expired reservation or an overdue step is failed without
    /// racing a withdrawal in flight.
    async fn cancel_withdrawal(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError>;
    /// Why no money step can go to the service now (its circuit is open),
    /// for readiness probes.
    fn unavailable_because(&self) -> Option<String> {
        None
    }
}

#[async_trait]
pub trait FundAccountService: Send + Sync {
    async fn remit(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError>;
    /// As [`InvestorAccountService::cancel_withdrawal`], for a remittance.
    async fn cancel_remittance(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError>;
    /// The fund's criteria, seats and capacity as the administrator
    /// publishes them; `None` for a fund it does not know.
    async fn fund_terms(&self, fund_id: &str) -> Result<Option<FundTerms>, ServiceError>;
    /// As [`InvestorAccountService::unavailable_because`].
    fn unavailable_because(&self) -> Option<String> {
        None
    }
}

#[derive(Clone)]
pub struct Services {
    pub investor: Arc<dyn InvestorAccountService>,
    pub fund: Arc<dyn FundAccountService>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Services")
    }
}

impl Services {
    /// For processes that run no stage calling an outside service (the
    /// validator, completion, the relay): any call is a wiring mistake.
    pub fn none() -> Self {
        let services = std::sync::Arc::new(NotConfigured);
        Self { investor: services.clone(), fund: services }
    }
}

struct NotConfigured;

fn not_configured() -> Result<ServiceOutcome, ServiceError> {
    Err(ServiceError::Unavailable("no account services configured in this process".to_owned()))
}

#[async_trait]
impl InvestorAccountService for NotConfigured {
    async fn withdraw(&self, _: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        not_configured()
    }

    async fn refund(&self, _: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        not_configured()
    }

    async fn cancel_withdrawal(&self, _: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        not_configured()
    }
}

#[async_trait]
impl FundAccountService for NotConfigured {
    async fn remit(&self, _: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        not_configured()
    }

    async fn cancel_remittance(&self, _: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        not_configured()
    }

    async fn fund_terms(&self, _: &str) -> Result<Option<FundTerms>, ServiceError> {
        Err(ServiceError::Unavailable("no account services configured in this process".to_owned()))
    }
}
