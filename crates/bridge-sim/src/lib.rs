//! The account-service simulator.
//!
//! It plays the two outside systems Bridge talks to, the investor's bank
//! (withdrawals and refunds) and the fund administrator (remittances), with
//! books of its own (`sim_*` tables) so tests can prove what really happened
//! on the other side. It honours idempotency keys like a real payment API:
//! the same key returns the first result and never moves money twice; the
//! same key with a different body is refused.
//!
//! [`Bank`] is the engine; its books are in a database or, for load runs,
//! in memory ([`Bank::in_memory`]). [`InProcessServices`] calls it directly (fast
//! tests); [`http::router`] serves it over HTTP (`bridge sim`, the demo), where
//! a [`FaultPlan`] injects the failures of the real world: declines, rate
//! limiting, server errors, timeouts and lost replies.
//!
//! This crate must not be used by the pipeline itself: the pipeline knows the
//! services only through the traits in `bridge_services`.

mod books;
pub mod http;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use books::Books;

use bridge_services::{
    FundAccountService, FundTerms, InvestorAccountService, MoneyMovement, ServiceError, ServiceOutcome, Services,
};
use bridge_store::simulator::{self, SimOperation};

pub use bridge_webhooks::Secret;

/// The three operations the simulated services offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Withdrawal,
    Refund,
    Deposit,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Withdrawal => "withdrawal",
            Self::Refund => "refund",
            Self::Deposit => "deposit",
        }
    }

    /// Money coming into the account (refunds, deposits) rather than out.
    fn is_credit(self) -> bool {
        self != Self::Withdrawal
    }
}

/// Failure rates for one operation, in basis points (1 = 0.01 %), so no float
/// ever decides anything here either.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OperationFaults {
    /// Added to every call.
    pub latency_ms: u64,
    /// Permanent declines, decided once per idempotency key.
    pub insufficient_funds_bp: u32,
    pub account_closed_bp: u32,
    pub account_frozen_bp: u32,
    pub limit_exceeded_bp: u32,
    /// Transient failures, decided per attempt.
    pub rate_limited_bp: u32,
    pub server_error_bp: u32,
    /// The call hangs past the client's timeout and is not acted on.
    pub timeout_bp: u32,
    /// The call is acted on but the reply is lost.
    pub unknown_outcome_bp: u32,
    /// Added after acting and before replying: the window in which a caller
    /// that dies has moved money without knowing it.
    pub reply_delay_ms: u64,
    /// When above zero, calls are accepted as `pending` and settle (or are
    /// declined) this long afterwards, as bank transfers do.
    pub settle_after_ms: u64,
    /// With `settle_after_ms`, the share of operations that go through
    /// pending (decided once per key); 0 means all of them.
    pub pending_bp: u32,
}

/// What to inject, per operation, with the seed that makes it reproducible.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultPlan {
    pub seed: u64,
    pub withdrawal: OperationFaults,
    pub refund: OperationFaults,
    pub deposit: OperationFaults,
    /// How long a "timeout" hangs; longer than the client's timeout.
    pub hang_ms: u64,
    /// Copies of each settlement callback, sent at once with distinct ids,
    /// as providers that deliver at least once sometimes do (0 means 1).
    pub callback_copies: u32,
}

impl FaultPlan {
    pub fn none() -> Self {
        Self::default()
    }

    /// A few percent of every kind of failure on every operation: what
    /// `bridge demo` runs against.
    pub fn demo(seed: u64) -> Self {
        let faults = OperationFaults {
            latency_ms: 0,
            reply_delay_ms: 0,
            settle_after_ms: 0,
            insufficient_funds_bp: 100,
            account_closed_bp: 50,
            account_frozen_bp: 50,
            limit_exceeded_bp: 50,
            rate_limited_bp: 200,
            server_error_bp: 200,
            timeout_bp: 100,
            unknown_outcome_bp: 200,
            pending_bp: 0,
        };
        // Refund declines are rarer than debit declines in practice, and
        // each one is a transfer that needs a person.
        let refund = OperationFaults { insufficient_funds_bp: 0, limit_exceeded_bp: 0, account_frozen_bp: 0, ..faults };
        // One withdrawal or deposit in ten is settled asynchronously, as bank
        // transfers are, and announced by callback (or found by polling).
        let asynchronous = OperationFaults { settle_after_ms: 400, pending_bp: 1_000, ..faults };
        Self {
            seed,
            withdrawal: asynchronous,
            refund,
            deposit: OperationFaults { insufficient_funds_bp: 0, ..asynchronous },
            hang_ms: 1_500,
            callback_copies: 0,
        }
    }

    fn for_operation(&self, operation: Operation) -> &OperationFaults {
        match operation {
            Operation::Withdrawal => &self.withdrawal,
            Operation::Refund => &self.refund,
            Operation::Deposit => &self.deposit,
        }
    }
}

/// The two services the simulator plays: the investor's bank (withdrawals
/// and refunds) and the fund administrator (deposits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Investor,
    Fund,
}

/// A money-moving request as the services receive it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationRequest {
    pub account_id: String,
    pub amount_minor: i64,
    pub currency: String,
    #[serde(default)]
    pub transfer_id: String,
    /// The investor's own access a withdrawal carried (the `Bank-Access`
    /// header over HTTP), never part of the body.
    #[serde(skip)]
    pub bank_access: Option<String>,
}

/// The stored result of an operation, as the services report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationRecord {
    pub idempotency_key: String,
    pub operation: String,
    pub status: String,
    /// The service's reference when settled, the decline code when declined.
    pub reference: String,
    pub account_id: String,
    pub amount_minor: i64,
    pub currency: String,
}

impl From<SimOperation> for OperationRecord {
    fn from(stored: SimOperation) -> Self {
        Self {
            idempotency_key: stored.idempotency_key,
            operation: stored.operation,
            status: stored.outcome,
            reference: stored.reference,
            account_id: stored.account_id,
            amount_minor: stored.amount_minor,
            currency: stored.currency,
        }
    }
}

/// What one call to the simulated service did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Acted on (now or on an earlier call with the same key).
    Done(OperationRecord),
    /// The key was used before with a different request.
    IdempotencyConflict,
    /// Refused before acting, retry later.
    RateLimited,
    ServerError,
    /// Hung and did not act.
    TimedOut,
    /// Acted, but the reply never reached the caller.
    ReplyLost(OperationRecord),
    /// The store was unavailable.
    Unavailable(String),
    /// The account is not one this service knows (its status is
    /// `unknown`): refused before acting, as a bank answers 404.
    UnknownAccount,
}

/// Where the services send settlement callbacks, and the secret they sign
/// them with (Standard Webhooks).
#[derive(Clone, Debug)]
pub struct CallbackTarget {
    /// Base URL of the receiving API; callbacks go to
    /// `{base_url}/v1/callbacks/{investor|fund}`.
    pub base_url: String,
    pub secret: bridge_webhooks::Secret,
    /// Bridge's API key for the `callbacks` scope, sent as a bearer token.
    pub api_key: Option<String>,
}

struct Callbacks {
    target: CallbackTarget,
    client: reqwest::Client,
    /// Keys whose callback is scheduled, so a repeated request does not
    /// schedule a second one.
    scheduled: Mutex<std::collections::HashSet<String>>,
}

/// The engine behind both services.
pub struct Bank {
    books: Books,
    plan: FaultPlan,
    /// Attempts seen per idempotency key, so transient faults are decided per
    /// attempt (a retry can succeed) yet reproducibly from the seed.
    attempts: Mutex<HashMap<String, u64>>,
    callbacks: Option<Arc<Callbacks>>,
    /// Calls being served now, and the most ever served at once, per
    /// operation: how tests see that a caller bounds its concurrency.
    in_flight: [std::sync::atomic::AtomicUsize; 3],
    max_in_flight: [std::sync::atomic::AtomicUsize; 3],
}

/// Counts a call in flight for as long as it lives.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn roll(seed: u64, key: &str, salt: u64) -> u32 {
    // A stable hash of the key (FNV-1a) seeds a generator; the same seed,
    // key and attempt always roll the same number.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash = (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
    }
    ChaCha8Rng::seed_from_u64(seed ^ hash ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15)).random_range(0..10_000)
}

/// Picks the fault whose band the roll falls into.
fn pick<'a>(roll: u32, bands: &[(u32, &'a str)]) -> Option<&'a str> {
    let mut ceiling = 0;
    for (basis_points, name) in bands {
        ceiling += basis_points;
        if roll < ceiling {
            return Some(name);
        }
    }
    None
}

impl Bank {
    /// A bank whose books are the `sim_*` tables of `pool`'s database.
    pub fn new(pool: PgPool, plan: FaultPlan) -> Self {
        Self::with_books(Books::Database(pool), plan)
    }

    /// A bank whose books live in this process's memory (see [`books`]):
    /// every account active, no consents, no funds' terms, and nothing kept
    /// after the process ends. For load runs, where the bank's own
    /// bookkeeping is not the system being measured.
    pub fn in_memory(plan: FaultPlan) -> Self {
        Self::with_books(Books::in_memory(), plan)
    }

    fn with_books(books: Books, plan: FaultPlan) -> Self {
        Self {
            books,
            plan,
            attempts: Mutex::new(HashMap::new()),
            callbacks: None,
            in_flight: Default::default(),
            max_in_flight: Default::default(),
        }
    }

    /// Also announces each pending operation's settlement by a signed
    /// callback to `target` when it settles.
    pub fn with_callbacks(mut self, target: CallbackTarget) -> Self {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .expect("a client with a timeout always builds");
        self.callbacks =
            Some(Arc::new(Callbacks { target, client, scheduled: Mutex::new(std::collections::HashSet::new()) }));
        self
    }

    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    fn next_attempt(&self, key: &str) -> u64 {
        // Bounded memory: past this many keys the counters start over, which
        // only changes which later attempts draw a transient fault.
        const KEYS_TRACKED_MAX: usize = 100_000;
        let mut attempts = self.attempts.lock().expect("attempt counter lock");
        if attempts.len() >= KEYS_TRACKED_MAX && !attempts.contains_key(key) {
            attempts.clear();
        }
        let counter = attempts.entry(key.to_owned()).or_insert(0);
        *counter += 1;
        *counter
    }

    fn enter(&self, operation: Operation) -> InFlight<'_> {
        let index = operation as usize;
        let now = self.in_flight[index].fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        self.max_in_flight[index].fetch_max(now, std::sync::atomic::Ordering::SeqCst);
        InFlight(&self.in_flight[index])
    }

    /// The most calls of `operation` ever served at once since the last
    /// reset.
    pub fn max_in_flight(&self, operation: Operation) -> usize {
        self.max_in_flight[operation as usize].load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many times an operation was requested under `key` (cancellations
    /// and lookups aside), as far as [`Bank::execute`] keeps count.
    pub fn requests(&self, key: &str) -> u64 {
        self.attempts.lock().expect("attempt counter lock").get(key).copied().unwrap_or(0)
    }

    pub fn reset_max_in_flight(&self) {
        for (max, now) in self.max_in_flight.iter().zip(&self.in_flight) {
            max.store(now.load(std::sync::atomic::Ordering::SeqCst), std::sync::atomic::Ordering::SeqCst);
        }
    }

    pub async fn execute(&self, operation: Operation, key: &str, request: &OperationRequest) -> Reply {
        let _in_flight = self.enter(operation);
        let faults = *self.plan.for_operation(operation);
        if faults.latency_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(faults.latency_ms)).await;
        }
        let attempt = self.next_attempt(key);
        let transient = pick(
            roll(self.plan.seed, key, attempt),
            &[
                (faults.rate_limited_bp, "rate_limited"),
                (faults.server_error_bp, "server_error"),
                (faults.timeout_bp, "timeout"),
                (faults.unknown_outcome_bp, "unknown_outcome"),
            ],
        );
        match transient {
            Some("rate_limited") => return Reply::RateLimited,
            Some("server_error") => return Reply::ServerError,
            Some("timeout") => {
                tokio::time::sleep(std::time::Duration::from_millis(self.plan.hang_ms)).await;
                return Reply::TimedOut;
            }
            _ => {}
        }
        let reply = match self.act(operation, key, request).await {
            Ok(Ok(record)) => record,
            Ok(Err(refused)) => return refused,
            Err(error) => return Reply::Unavailable(error.to_string()),
        };
        if faults.reply_delay_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(faults.reply_delay_ms)).await;
        }
        if transient == Some("unknown_outcome") {
            return Reply::ReplyLost(reply);
        }
        Reply::Done(reply)
    }

    /// Decides and stores the operation once per key. A refusal when the key
    /// was used for a different request or the account is unknown.
    async fn act(
        &self,
        operation: Operation,
        key: &str,
        request: &OperationRequest,
    ) -> bridge_store::Result<Result<OperationRecord, Reply>> {
        let status = self.books.account_status(&request.account_id).await?;
        if status == "unknown" {
            return Ok(Err(Reply::UnknownAccount));
        }
        // A bank checks the investor's consent before it looks at the
        // money; only a withdrawal needs one, and only from an account
        // linked with a consent.
        let access = match operation {
            Operation::Withdrawal => {
                self.books.check_bank_access(key, &request.account_id, request.bank_access.as_deref()).await?
            }
            _ => simulator::AccessVerdict::NotRequired,
        };
        let refused = match access {
            simulator::AccessVerdict::Refused { code, .. } => Some(code),
            _ => None,
        };
        let faults = self.plan.for_operation(operation);
        // Permanent outcomes depend on the key only, never on the attempt:
        // asking again gives the same answer.
        let injected = pick(
            roll(self.plan.seed, key, 0),
            &[
                (faults.insufficient_funds_bp, "INSUFFICIENT_FUNDS"),
                (faults.account_closed_bp, "ACCOUNT_CLOSED"),
                (faults.account_frozen_bp, "ACCOUNT_FROZEN"),
                (faults.limit_exceeded_bp, "LIMIT_EXCEEDED"),
            ],
        );
        // Refunds return money to an account; a real bank accepts them into
        // a frozen account, so only debits and deposits check for a freeze.
        // An account being closed ("no_credits") still honours debits but
        // refuses money coming in.
        let decline = refused.or(match status.as_str() {
            "frozen" if operation != Operation::Refund => Some("ACCOUNT_FROZEN"),
            "closed" => Some("ACCOUNT_CLOSED"),
            "no_credits" if operation.is_credit() => Some("ACCOUNT_NO_CREDITS"),
            _ => injected,
        });
        let requested = SimOperation {
            idempotency_key: key.to_owned(),
            operation: operation.as_str().to_owned(),
            account_id: request.account_id.clone(),
            amount_minor: request.amount_minor,
            currency: request.currency.clone(),
            outcome: if decline.is_some() { "declined" } else { "settled" }.to_owned(),
            reference: match decline {
                Some(code) => code.to_owned(),
                None => format!("sim-{}", Uuid::new_v4().simple()),
            },
        };
        // Reading the stored operation also settles a pending one whose time
        // has come, so a repeat may find it final.
        // Whether this operation settles later is decided once per key.
        const PENDING_SALT: u64 = u64::MAX;
        let asynchronous = faults.settle_after_ms > 0
            && (faults.pending_bp == 0 || roll(self.plan.seed, key, PENDING_SALT) < faults.pending_bp);
        let settle_after_ms = if asynchronous { faults.settle_after_ms } else { 0 };
        let stored = self.books.record_once(&requested, settle_after_ms).await?;
        if !stored.same_request(&requested) {
            return Ok(Err(Reply::IdempotencyConflict));
        }
        if stored.outcome == "pending" {
            self.schedule_callback(operation, key, settle_after_ms);
        }
        Ok(Ok(stored.into()))
    }

    /// Cancels the operation under `key` unless it has settled (see
    /// [`simulator::cancel`]).
    pub async fn cancel(&self, operation: Operation, key: &str, request: &OperationRequest) -> Reply {
        let faults = *self.plan.for_operation(operation);
        if faults.latency_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(faults.latency_ms)).await;
        }
        let cancelling = SimOperation {
            idempotency_key: key.to_owned(),
            operation: operation.as_str().to_owned(),
            account_id: request.account_id.clone(),
            amount_minor: request.amount_minor,
            currency: request.currency.clone(),
            outcome: "declined".to_owned(),
            reference: "CANCELLED".to_owned(),
        };
        match self.books.cancel(&cancelling).await {
            Ok(stored) if !stored.same_request(&cancelling) => Reply::IdempotencyConflict,
            Ok(stored) => Reply::Done(stored.into()),
            Err(error) => Reply::Unavailable(error.to_string()),
        }
    }

    /// After `settle_after_ms`, reads the operation (which settles it) and
    /// posts its outcome to the callback target, retrying with backoff until
    /// the receiver accepts it or refuses it for good.
    fn schedule_callback(&self, operation: Operation, key: &str, settle_after_ms: u64) {
        let Some(callbacks) = self.callbacks.clone() else { return };
        if !callbacks.scheduled.lock().expect("callback set lock").insert(key.to_owned()) {
            return;
        }
        let books = self.books.clone();
        let key = key.to_owned();
        let copies = self.plan.callback_copies.max(1);
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(settle_after_ms + 10)).await;
            let record = loop {
                match books.find(&key).await {
                    Ok(Some(found)) if found.outcome != "pending" => break OperationRecord::from(found),
                    Ok(_) | Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                }
            };
            let service = if operation == Operation::Deposit { "fund" } else { "investor" };
            let sends = (0..copies).map(|copy| {
                let id = if copy == 0 { format!("cb_{key}") } else { format!("cb_{key}_{copy}") };
                deliver(&callbacks, service, id, &record)
            });
            futures::future::join_all(sends).await;
            callbacks.scheduled.lock().expect("callback set lock").remove(&key);
        });
    }

    /// The fund administrator's terms for `fund_id`.
    pub async fn fund_terms(&self, fund_id: &str) -> bridge_store::Result<Option<simulator::SimFundTerms>> {
        self.books.fund_terms(fund_id).await
    }

    /// The stored result under `key`, if any: how a client resolves an
    /// unknown outcome.
    pub async fn lookup(&self, key: &str) -> bridge_store::Result<Option<OperationRecord>> {
        Ok(self.books.find(key).await?.map(Into::into))
    }

    /// Up to `limit` of the operations `service` holds, in idempotency-key
    /// order after `after`.
    pub async fn operations(
        &self,
        service: Service,
        after: &str,
        limit: usize,
    ) -> bridge_store::Result<Vec<OperationRecord>> {
        let kinds: &[&str] = match service {
            Service::Investor => &["withdrawal", "refund"],
            Service::Fund => &["deposit"],
        };
        Ok(self.books.list(kinds, after, limit).await?.into_iter().map(Into::into).collect())
    }
}

/// Posts one callback, signed, retrying transient failures.
async fn deliver(callbacks: &Callbacks, service: &str, id: String, record: &OperationRecord) {
    let url = format!("{}/v1/callbacks/{service}", callbacks.target.base_url.trim_end_matches('/'));
    let body = serde_json::to_vec(record).expect("records serialise");
    for attempt in 0..10u32 {
        let timestamp = chrono::Utc::now().timestamp();
        let signature = callbacks.target.secret.sign(&id, timestamp, &body);
        let mut request = callbacks.client.post(&url);
        if let Some(key) = &callbacks.target.api_key {
            request = request.bearer_auth(key);
        }
        let sent = request
            .header("content-type", "application/json")
            .header(bridge_webhooks::ID_HEADER, &id)
            .header(bridge_webhooks::TIMESTAMP_HEADER, timestamp.to_string())
            .header(bridge_webhooks::SIGNATURE_HEADER, signature)
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => return,
            // Refused for good (bad signature, unknown route): retrying the
            // same bytes cannot help.
            Ok(response)
                if response.status().is_client_error() && !matches!(response.status().as_u16(), 408 | 425 | 429) =>
            {
                tracing::warn!(url = %url, status = %response.status(), "Callback refused");
                return;
            }
            Ok(_) | Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis((100u64 << attempt.min(6)).min(5_000))).await
            }
        }
    }
    tracing::warn!(url = %url, id = %id, "Callback not delivered; the receiver must poll");
}

/// Both services backed by a [`Bank`] in this process, without HTTP. With
/// [`FaultPlan::none`] it is the quiet stand-in the fast tests use.
pub struct InProcessServices {
    bank: Arc<Bank>,
}

impl InProcessServices {
    pub fn new(pool: PgPool) -> Self {
        Self { bank: Arc::new(Bank::new(pool, FaultPlan::none())) }
    }

    pub fn services(pool: PgPool) -> Services {
        let services = Arc::new(Self::new(pool));
        Services { investor: services.clone(), fund: services }
    }

    async fn call(&self, operation: Operation, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        let reply = self.bank.execute(operation, &movement.idempotency_key, &request_of(movement)).await;
        Self::read(reply, movement)
    }

    async fn cancel(&self, operation: Operation, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        let reply = self.bank.cancel(operation, &movement.idempotency_key, &request_of(movement)).await;
        Self::read(reply, movement)
    }

    fn read(reply: Reply, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        match reply {
            Reply::Done(record) => outcome_of(&record),
            Reply::IdempotencyConflict => Err(ServiceError::IdempotencyConflict(movement.idempotency_key.clone())),
            Reply::UnknownAccount => Err(ServiceError::Refused(format!("unknown account {}", movement.account_id))),
            other => Err(ServiceError::Unavailable(format!("{other:?}"))),
        }
    }
}

fn request_of(movement: &MoneyMovement) -> OperationRequest {
    OperationRequest {
        account_id: movement.account_id.clone(),
        amount_minor: movement.amount.amount_minor,
        currency: movement.amount.currency.to_string(),
        transfer_id: movement.transfer_id.to_string(),
        bank_access: movement.bank_access.as_ref().map(|access| access.expose().to_owned()),
    }
}

/// How a stored record reads to the pipeline: only `settled` and `declined`
/// are final.
pub fn outcome_of(record: &OperationRecord) -> Result<ServiceOutcome, ServiceError> {
    match record.status.as_str() {
        "settled" => Ok(ServiceOutcome::Settled { reference: record.reference.clone() }),
        "declined" => Ok(ServiceOutcome::Declined { code: record.reference.clone() }),
        "pending" => Ok(ServiceOutcome::Pending),
        other => Err(ServiceError::Unavailable(format!("operation is {other}, not final yet"))),
    }
}

#[async_trait]
impl InvestorAccountService for InProcessServices {
    async fn withdraw(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.call(Operation::Withdrawal, movement).await
    }

    async fn refund(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.call(Operation::Refund, movement).await
    }

    async fn cancel_withdrawal(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.cancel(Operation::Withdrawal, movement).await
    }
}

#[async_trait]
impl FundAccountService for InProcessServices {
    async fn remit(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.call(Operation::Deposit, movement).await
    }

    async fn cancel_remittance(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.cancel(Operation::Deposit, movement).await
    }

    async fn fund_terms(&self, fund_id: &str) -> Result<Option<FundTerms>, ServiceError> {
        let terms =
            self.bank.fund_terms(fund_id).await.map_err(|error| ServiceError::Unavailable(error.to_string()))?;
        let Some(terms) = terms else { return Ok(None) };
        let rules = serde_json::from_value(terms.rules)
            .map_err(|error| ServiceError::Unavailable(format!("unreadable fund rules: {error}")))?;
        Ok(Some(FundTerms {
            currency: terms.currency,
            minimum_investment_minor: terms.minimum_investment_minor,
            seats_max: terms.seats_max,
            capacity_minor: terms.capacity_minor,
            rules,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolls_are_reproducible_and_bands_are_exclusive() {
        assert_eq!(roll(7, "key", 1), roll(7, "key", 1));
        assert!((0..100).any(|attempt| roll(7, "key", attempt) != roll(7, "key", 0)));
        let bands = [(100, "a"), (200, "b")];
        assert_eq!(pick(0, &bands), Some("a"));
        assert_eq!(pick(99, &bands), Some("a"));
        assert_eq!(pick(100, &bands), Some("b"));
        assert_eq!(pick(299, &bands), Some("b"));
        assert_eq!(pick(300, &bands), None);
    }

    #[test]
    fn demo_plan_rates_are_a_few_percent() {
        let plan = FaultPlan::demo(1);
        for faults in [plan.withdrawal, plan.refund, plan.deposit] {
            let total = faults.insufficient_funds_bp
                + faults.account_closed_bp
                + faults.account_frozen_bp
                + faults.limit_exceeded_bp
                + faults.rate_limited_bp
                + faults.server_error_bp
                + faults.timeout_bp
                + faults.unknown_outcome_bp;
            assert!(total <= 1_500, "{total} basis points");
        }
    }
}
