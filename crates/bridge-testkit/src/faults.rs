//! Account services with one real-world failure added to the simulator.

use super::*;

/// The account-service simulator with one real-world failure added: the
/// first reply to every request is lost after the service has acted on it
/// (an "unknown outcome": a timeout after the bank debited). The caller must
/// retry with the same idempotency key and must not move money twice.
pub struct LosingFirstReplies {
    inner: Arc<InProcessServices>,
    seen: Mutex<HashSet<String>>,
}

impl LosingFirstReplies {
    pub fn services(pool: PgPool) -> Services {
        let services =
            Arc::new(Self { inner: Arc::new(InProcessServices::new(pool)), seen: Mutex::new(HashSet::new()) });
        Services { investor: services.clone(), fund: services }
    }

    fn lose_first(
        &self,
        key: &str,
        outcome: Result<ServiceOutcome, ServiceError>,
    ) -> Result<ServiceOutcome, ServiceError> {
        let first = self.seen.lock().expect("not poisoned").insert(key.to_owned());
        if first && outcome.is_ok() {
            return Err(ServiceError::Unavailable(format!("reply to {key} lost after the service acted")));
        }
        outcome
    }
}

#[async_trait::async_trait]
impl InvestorAccountService for LosingFirstReplies {
    async fn withdraw(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        let outcome = self.inner.withdraw(movement).await;
        self.lose_first(&movement.idempotency_key, outcome)
    }

    async fn refund(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        let outcome = self.inner.refund(movement).await;
        self.lose_first(&movement.idempotency_key, outcome)
    }

    async fn cancel_withdrawal(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.inner.cancel_withdrawal(movement).await
    }
}

#[async_trait::async_trait]
impl FundAccountService for LosingFirstReplies {
    async fn remit(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        let outcome = self.inner.remit(movement).await;
        self.lose_first(&movement.idempotency_key, outcome)
    }

    async fn cancel_remittance(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.inner.cancel_remittance(movement).await
    }

    async fn fund_terms(&self, fund_id: &str) -> Result<Option<bridge_pipeline::services::FundTerms>, ServiceError> {
        self.inner.fund_terms(fund_id).await
    }
}

/// The simulator, except that the investor's bank is unavailable for one
/// account while `down` is set: every withdrawal from it fails as a
/// transient error (the stage retries it in place), everyone else's goes
/// through.
pub struct UnavailableForOneAccount {
    inner: Arc<InProcessServices>,
    account: String,
    down: std::sync::atomic::AtomicBool,
}

impl UnavailableForOneAccount {
    pub fn services(pool: PgPool, account: &str) -> (Services, Arc<Self>) {
        let services = Arc::new(Self {
            inner: Arc::new(InProcessServices::new(pool)),
            account: account.to_owned(),
            down: std::sync::atomic::AtomicBool::new(true),
        });
        (Services { investor: services.clone(), fund: services.inner.clone() }, services)
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl InvestorAccountService for UnavailableForOneAccount {
    async fn withdraw(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        if movement.account_id == self.account && self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ServiceError::Unavailable(format!("bank of {} is down", self.account)));
        }
        self.inner.withdraw(movement).await
    }

    async fn refund(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.inner.refund(movement).await
    }

    async fn cancel_withdrawal(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.inner.cancel_withdrawal(movement).await
    }
}
