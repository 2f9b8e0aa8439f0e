//! The outside account services, behind traits.
//!
//! The Investor Account Service debits (and refunds) an investor's bank
//! account; the Fund Account Service remits money into a fund's account. Every
//! call carries an idempotency key derived from (transfer, step), so calling
//! again after a crash or a redelivery returns the first answer and never
//! moves money twice.
//!
//! [`SimulatedServices`] plays both services in-process with its own books in
//! Postgres (`sim_*` tables), so tests can prove what really happened on the
//! other side. Accounts can be frozen or closed there to make calls decline.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::PgPool;
use uuid::Uuid;

use bridge_domain::Money;
use bridge_store::simulator::{self, SimOperation};

/// One movement of money at an outside service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoneyMovement {
    pub idempotency_key: String,
    pub transfer_id: Uuid,
    pub account_id: String,
    pub amount: Money,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceOutcome {
    /// The money moved; `reference` is the service's id for the operation.
    Settled { reference: String },
    /// The service refused for a business reason (account frozen, closed...).
    /// Final: retrying the same call gives the same answer.
    Declined { code: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The service could not be reached or failed internally. Retry later
    /// with the same idempotency key.
    #[error("account service unavailable: {0}")]
    Unavailable(String),
    /// The idempotency key was used before with a different request. This is
    /// a defect on our side and must not be retried.
    #[error("idempotency key {0} reused with a different request")]
    IdempotencyConflict(String),
}

impl ServiceError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ServiceError::Unavailable(_))
    }
}

#[async_trait]
pub trait InvestorAccountService: Send + Sync {
    async fn withdraw(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError>;
    async fn refund(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError>;
}

#[async_trait]
pub trait FundAccountService: Send + Sync {
    async fn remit(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError>;
}

#[derive(Clone)]
pub struct Services {
    pub investor: Arc<dyn InvestorAccountService>,
    pub fund: Arc<dyn FundAccountService>,
}

impl Services {
    pub fn simulated(pool: PgPool) -> Self {
        let simulated = Arc::new(SimulatedServices { pool });
        Self { investor: simulated.clone(), fund: simulated }
    }
}

/// Both account services, simulated in-process over their own tables.
pub struct SimulatedServices {
    pool: PgPool,
}

impl SimulatedServices {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    async fn operate(&self, operation: &str, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        let unavailable = |error: bridge_store::Error| ServiceError::Unavailable(error.to_string());
        let mut conn = self.pool.acquire().await.map_err(|error| ServiceError::Unavailable(error.to_string()))?;
        let status = simulator::account_status(&mut conn, &movement.account_id).await.map_err(unavailable)?;
        // Refunds return money to an account; a real bank accepts them into a
        // frozen account, so only debits and deposits check for a freeze. An
        // account being closed ("no_credits") still honours debits but
        // refuses money coming in.
        let incoming = operation != "withdrawal";
        let outcome = match status.as_str() {
            "frozen" if operation != "refund" => "declined:ACCOUNT_FROZEN",
            "closed" => "declined:ACCOUNT_CLOSED",
            "no_credits" if incoming => "declined:ACCOUNT_NO_CREDITS",
            _ => "settled",
        };
        let requested = SimOperation {
            idempotency_key: movement.idempotency_key.clone(),
            operation: operation.to_owned(),
            account_id: movement.account_id.clone(),
            amount_minor: movement.amount.amount_minor,
            currency: movement.amount.currency.to_string(),
            outcome: outcome.split(':').next().unwrap_or(outcome).to_owned(),
            reference: match outcome.split_once(':') {
                Some((_, code)) => code.to_owned(),
                None => format!("sim-{}", Uuid::new_v4().simple()),
            },
        };
        let stored = simulator::record_once(&mut conn, &requested).await.map_err(unavailable)?;
        if !stored.same_request(&requested) {
            return Err(ServiceError::IdempotencyConflict(movement.idempotency_key.clone()));
        }
        Ok(match stored.outcome.as_str() {
            "settled" => ServiceOutcome::Settled { reference: stored.reference },
            _ => ServiceOutcome::Declined { code: stored.reference },
        })
    }
}

#[async_trait]
impl InvestorAccountService for SimulatedServices {
    async fn withdraw(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.operate("withdrawal", movement).await
    }

    async fn refund(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.operate("refund", movement).await
    }
}

#[async_trait]
impl FundAccountService for SimulatedServices {
    async fn remit(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.operate("deposit", movement).await
    }
}
