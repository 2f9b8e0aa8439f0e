//! The account services over HTTP.
//!
//! Every call has a timeout and, when it moves money, an `Idempotency-Key`
//! derived from (transfer, step). Each reply is classified here, once:
//!
//! - settled (2xx) or declined (402): final, returned to the stage;
//! - refused before acting (429, 503, connection refused): transient, the
//!   stage retries later with the same key;
//! - unknown outcome (timeout, 502, 504, 500, a connection that broke after
//!   the request was sent): the service may have acted, so we ask it what it
//!   holds under the key before deciding. Found: that is the answer. Not
//!   found: it never acted, and retrying is safe.
//! - the key in use (409): either still in progress or taken by a different
//!   request; the lookup tells which (in progress: retry later; different:
//!   a defect, never retried);
//! - 401, 403 (our credentials), and a 404 or 405 without a problem body
//!   (no such endpoint: our configuration): retried later like an outage,
//!   since the fix is ours and nothing happened; the service's circuit
//!   opens (`circuit.rs`), so until a probe succeeds no step asks it;
//! - other 4xx (400, 422, a 404 whose problem body names what the service
//!   does not know, such as the account): this request is wrong; refused,
//!   never retried; the stage hands the transfer to a person.
//!
//! Cancelling (`POST {service}/v1/operations/{key}/cancel` with the
//! operation's body) is classified the same way: its reply is what the key
//! holds afterwards.
//!
//! Only the statuses `settled` and `declined` are final. `pending` (or
//! `processing`, or a 202) means accepted but not settled: the stage records
//! the step for the settlement runner. Any other status is retried later.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use crate::circuit::{Admission, Change, Circuit};
use crate::{
    FundAccountService, FundTerms, InvestorAccountService, MoneyMovement, ServiceError, ServiceOutcome, Services,
};

/// Told about every call: service, operation, outcome (`settled`,
/// `declined`, `pending`, `unavailable` or `refused`) and how long it took.
/// The pipeline counts them on its metrics.
pub type CallObserver = fn(service: &str, operation: &str, outcome: &str, took: Duration);

/// Told when a service's circuit opens (`true`) or closes.
pub type CircuitObserver = fn(service: &str, open: bool);

/// Who is told about calls and circuits.
#[derive(Clone, Copy, Default)]
pub struct Observers {
    pub call: Option<CallObserver>,
    pub circuit: Option<CircuitObserver>,
}

#[derive(Clone)]
pub struct HttpServicesConfig {
    /// Base URL of the Investor Account Service, e.g. `https://bank.example/`.
    pub investor_base_url: String,
    /// Base URL of the Fund Account Service.
    pub fund_base_url: String,
    /// Bearer token for both services, if they require one.
    pub token: Option<String>,
    /// Upper bound of one call, connection included.
    pub timeout_ms: u64,
}

impl std::fmt::Debug for HttpServicesConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServicesConfig")
            .field("investor_base_url", &self.investor_base_url)
            .field("fund_base_url", &self.fund_base_url)
            .field("token", &self.token.as_ref().map(|_| "[REDACTED]"))
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

pub struct HttpAccountServices {
    client: reqwest::Client,
    config: HttpServicesConfig,
    observers: Observers,
    investor_circuit: Circuit,
    fund_circuit: Circuit,
}

#[derive(Serialize)]
struct OperationBody<'a> {
    account_id: &'a str,
    amount_minor: i64,
    currency: &'a str,
    transfer_id: String,
}

#[derive(Debug, Deserialize)]
struct OperationRecord {
    status: String,
    reference: String,
    #[serde(default)]
    account_id: Option<String>,
    #[serde(default)]
    amount_minor: Option<i64>,
}

impl OperationRecord {
    /// Only the two final statuses are final. Anything else ("pending",
    /// "processing", a status added later) means the money may still move,
    /// so it is neither a success nor a reason to compensate: ask again later
    /// with the same key.
    fn attempt(self) -> Attempt {
        match self.status.as_str() {
            "settled" => Attempt::Final(ServiceOutcome::Settled { reference: self.reference }),
            "declined" => Attempt::Final(ServiceOutcome::Declined { code: self.reference }),
            "pending" | "processing" => Attempt::Final(ServiceOutcome::Pending),
            other => Attempt::Transient(format!("operation is {other}, not a status we know")),
        }
    }

    /// Whether the stored operation is the one we asked for.
    fn matches(&self, movement: &MoneyMovement) -> bool {
        self.account_id.as_deref().is_none_or(|account| account == movement.account_id)
            && self.amount_minor.is_none_or(|amount| amount == movement.amount.amount_minor)
    }
}

/// What one HTTP attempt told us.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Attempt {
    Final(ServiceOutcome),
    Transient(String),
    Unknown(String),
    /// 409: the key is in use, either by a request still in progress or by a
    /// different request. The lookup tells which.
    KeyInUse,
    /// 401 or 403: our credentials are wrong; retried later, as nothing
    /// happened and the fix is ours.
    Unauthorized(String),
    /// Refused as wrong (400, 404, 422): retrying cannot help.
    Refused(String),
    /// The key holds a different operation: a defect, never retried.
    KeyHoldsAnother(String),
}

impl HttpAccountServices {
    /// Both services over HTTP, each call and circuit reported to
    /// `observers`.
    pub fn services(config: HttpServicesConfig, observers: Observers) -> Result<Services, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.timeout_ms.min(5_000)))
            .build()?;
        let services = std::sync::Arc::new(Self {
            client,
            config,
            observers,
            investor_circuit: Circuit::default(),
            fund_circuit: Circuit::default(),
        });
        Ok(Services { investor: services.clone(), fund: services })
    }

    fn url(base: &str, path: &str) -> String {
        format!("{}/{}", base.trim_end_matches('/'), path)
    }

    fn authorise(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.config.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn post(&self, base: &str, path: &str, movement: &MoneyMovement) -> Attempt {
        let body = OperationBody {
            account_id: &movement.account_id,
            amount_minor: movement.amount.amount_minor,
            currency: movement.amount.currency.as_str(),
            transfer_id: movement.transfer_id.to_string(),
        };
        let mut request = self
            .authorise(self.client.post(Self::url(base, path)))
            .header("Idempotency-Key", &movement.idempotency_key)
            .json(&body);
        if let Some(traceparent) = &movement.traceparent {
            request = request.header("traceparent", traceparent);
        }
        if let Some(access) = &movement.bank_access {
            // Marked sensitive so no HTTP-level logging prints it.
            match reqwest::header::HeaderValue::from_str(access.expose()) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    request = request.header("Bank-Access", value);
                }
                Err(_) => {
                    tracing::warn!(idempotency_key = %movement.idempotency_key, "An investor's bank access is not a valid header value; sent without it")
                }
            }
        }
        match request.send().await {
            Ok(response) => classify(response).await,
            // Nothing reached the service.
            Err(error) if error.is_connect() => Attempt::Transient(format!("cannot connect: {error}")),
            // The request may have arrived and been acted on.
            Err(error) => Attempt::Unknown(format!("no reply: {error}")),
        }
    }

    /// Resolves an unknown outcome by asking for the operation under the key.
    async fn lookup(&self, base: &str, service: &str, movement: &MoneyMovement) -> Attempt {
        let key = &movement.idempotency_key;
        let url = Self::url(base, &format!("{service}/v1/operations/{key}"));
        match self.authorise(self.client.get(url)).send().await {
            Ok(response) => {
                let status = response.status();
                let record = match status {
                    StatusCode::OK => Some(response.json::<OperationRecord>().await.map_err(|error| error.to_string())),
                    _ => None,
                };
                lookup_reply(status, record, movement)
            }
            Err(error) => Attempt::Transient(format!("lookup failed: {error}")),
        }
    }

    async fn call(
        &self,
        base: &str,
        service: &str,
        path: &str,
        movement: &MoneyMovement,
    ) -> Result<ServiceOutcome, ServiceError> {
        let circuit = match service {
            "investor" => &self.investor_circuit,
            _ => &self.fund_circuit,
        };
        if let Admission::Refuse(reason) = circuit.admit() {
            return Err(ServiceError::Unauthorized(format!("the {service} service's circuit is open: {reason}")));
        }
        let started = std::time::Instant::now();
        let result = self.call_once(base, service, path, movement).await;
        let fault = match &result {
            Err(ServiceError::Unauthorized(reason)) => Some(reason.as_str()),
            _ => None,
        };
        let change = match &result {
            Err(ServiceError::Unavailable(_)) => {
                circuit.record_silence();
                Change::None
            }
            _ => circuit.record(fault),
        };
        match change {
            Change::Opened => {
                tracing::error!(service, reason = fault.unwrap_or_default(), "Circuit open: the account service refuses our credentials or configuration; its money steps wait in Kafka (nothing is dead-lettered) and it is probed again with backoff");
                if let Some(observe) = self.observers.circuit {
                    observe(service, true);
                }
            }
            Change::StillOpen => {
                let next = circuit.next_probe_in().unwrap_or_default();
                tracing::warn!(
                    service,
                    reason = fault.unwrap_or_default(),
                    next_probe_ms = next.as_millis() as u64,
                    "Circuit still open"
                );
            }
            Change::Closed => {
                tracing::info!(
                    service,
                    "Circuit closed: the account service accepts our calls again; its money steps go on"
                );
                if let Some(observe) = self.observers.circuit {
                    observe(service, false);
                }
            }
            Change::None => {}
        }
        let outcome = match &result {
            Ok(ServiceOutcome::Settled { .. }) => "settled",
            Ok(ServiceOutcome::Declined { .. }) => "declined",
            Ok(ServiceOutcome::Pending) => "pending",
            Err(ServiceError::Unauthorized(_)) => "unauthorized",
            Err(error) if error.is_retryable() => "unavailable",
            Err(_) => "refused",
        };
        if let Some(observe) = self.observers.call {
            let operation = path.rsplit('/').next().unwrap_or(path);
            observe(service, operation, outcome, started.elapsed());
        }
        result
    }

    async fn call_once(
        &self,
        base: &str,
        service: &str,
        path: &str,
        movement: &MoneyMovement,
    ) -> Result<ServiceOutcome, ServiceError> {
        let attempt = match self.post(base, path, movement).await {
            Attempt::Unknown(reason) => {
                tracing::info!(idempotency_key = %movement.idempotency_key, reason = %reason, "Outcome unknown; asking the service");
                self.lookup(base, service, movement).await
            }
            Attempt::KeyInUse => self.lookup(base, service, movement).await,
            other => other,
        };
        match attempt {
            Attempt::Final(outcome) => Ok(outcome),
            Attempt::Transient(reason) | Attempt::Unknown(reason) => Err(ServiceError::Unavailable(reason)),
            Attempt::KeyInUse => Err(ServiceError::Unavailable("idempotency key in use".to_owned())),
            Attempt::Unauthorized(reason) => Err(ServiceError::Unauthorized(reason)),
            Attempt::Refused(reason) => {
                tracing::error!(idempotency_key = %movement.idempotency_key, reason = %reason, "Account service refused the request");
                Err(ServiceError::Refused(reason))
            }
            Attempt::KeyHoldsAnother(reason) => {
                tracing::error!(idempotency_key = %movement.idempotency_key, reason = %reason, "Idempotency key holds a different operation");
                Err(ServiceError::IdempotencyConflict(movement.idempotency_key.clone()))
            }
        }
    }
}

async fn classify(response: reqwest::Response) -> Attempt {
    let status = response.status();
    let problem = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|kind| kind.contains("json"));
    let record = if status.is_success() || status == StatusCode::PAYMENT_REQUIRED {
        Some(response.json::<OperationRecord>().await.map_err(|error| error.to_string()))
    } else {
        None
    };
    match status {
        // A service that does not know what we named says so in a problem
        // body; a bare 404 or 405 is a route that is not there.
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED if !problem => Attempt::Unauthorized(format!(
            "service answered {status} without a problem body: no such endpoint, check its URL"
        )),
        _ => classify_reply(status, record),
    }
}

/// The classification of a money-moving call's reply (design note 002):
/// `record` is the decoded body of a 2xx or 402 reply.
fn classify_reply(status: StatusCode, record: Option<Result<OperationRecord, String>>) -> Attempt {
    match status {
        _ if status.is_success() || status == StatusCode::PAYMENT_REQUIRED => match record {
            Some(Ok(record)) => record.attempt(),
            // The body was cut off: the service acted, the reply broke.
            Some(Err(error)) => Attempt::Unknown(format!("unreadable {status} reply: {error}")),
            None => Attempt::Unknown(format!("{status} reply without a body")),
        },
        StatusCode::CONFLICT => Attempt::KeyInUse,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            Attempt::Transient(format!("service answered {status}"))
        }
        // Our credentials: nothing happened, and nothing will until they are
        // fixed.
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Attempt::Unauthorized(format!("service answered {status}")),
        // This request is wrong (malformed, an account the service does not
        // know): nothing happened, and asking again will not change that.
        _ if status.is_client_error() => Attempt::Refused(format!("service answered {status}")),
        // 500, 502, 504 and anything unexpected: the service may have acted.
        _ => Attempt::Unknown(format!("service answered {status}")),
    }
}

/// The classification of a lookup by idempotency key: `record` is the
/// decoded body of a 200.
fn lookup_reply(
    status: StatusCode,
    record: Option<Result<OperationRecord, String>>,
    movement: &MoneyMovement,
) -> Attempt {
    let key = &movement.idempotency_key;
    match (status, record) {
        (StatusCode::OK, Some(Ok(record))) if !record.matches(movement) => {
            Attempt::KeyHoldsAnother(format!("idempotency key {key} holds a different operation"))
        }
        (StatusCode::OK, Some(Ok(record))) => record.attempt(),
        (StatusCode::OK, _) => Attempt::Transient("unreadable lookup reply".to_owned()),
        // Never acted on: the original call may be repeated safely.
        (StatusCode::NOT_FOUND, _) => Attempt::Transient(format!("operation {key} was not carried out")),
        (status, _) => Attempt::Transient(format!("lookup answered {status}")),
    }
}

#[async_trait]
impl InvestorAccountService for HttpAccountServices {
    fn unavailable_because(&self) -> Option<String> {
        self.investor_circuit.open_because()
    }

    async fn withdraw(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.call(&self.config.investor_base_url, "investor", "investor/v1/withdrawals", movement).await
    }

    async fn refund(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.call(&self.config.investor_base_url, "investor", "investor/v1/refunds", movement).await
    }

    async fn cancel_withdrawal(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        let path = format!("investor/v1/operations/{}/cancel", movement.idempotency_key);
        self.call(&self.config.investor_base_url, "investor", &path, movement).await
    }
}

#[async_trait]
impl FundAccountService for HttpAccountServices {
    fn unavailable_because(&self) -> Option<String> {
        self.fund_circuit.open_because()
    }

    async fn remit(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        self.call(&self.config.fund_base_url, "fund", "fund/v1/remittances", movement).await
    }

    async fn cancel_remittance(&self, movement: &MoneyMovement) -> Result<ServiceOutcome, ServiceError> {
        let path = format!("fund/v1/operations/{}/cancel", movement.idempotency_key);
        self.call(&self.config.fund_base_url, "fund", &path, movement).await
    }

    async fn fund_terms(&self, fund_id: &str) -> Result<Option<FundTerms>, ServiceError> {
        #[derive(Deserialize)]
        struct Terms {
            currency: String,
            minimum_investment_minor: i64,
            seats_max: i32,
            capacity_minor: i64,
            // An administrator that publishes no rules has none; rules that
            // do not parse make the whole answer unreadable, so the fund
            // keeps the terms it had rather than half of the new ones.
            #[serde(default)]
            rules: bridge_domain::RuleSet,
        }
        let url = Self::url(&self.config.fund_base_url, &format!("fund/v1/funds/{fund_id}"));
        let response = self
            .authorise(self.client.get(url))
            .send()
            .await
            .map_err(|error| ServiceError::Unavailable(format!("fund terms: {error}")))?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            status if status.is_success() => {
                // Read, then parsed here: the parser's own message (which
                // rule, which field) reaches the operator, not only
                // "error decoding response body".
                let body = response
                    .bytes()
                    .await
                    .map_err(|error| ServiceError::Unavailable(format!("fund terms: {error}")))?;
                let terms: Terms = serde_json::from_slice(&body)
                    .map_err(|error| ServiceError::Unavailable(format!("unreadable fund terms: {error}")))?;
                Ok(Some(FundTerms {
                    currency: terms.currency,
                    minimum_investment_minor: terms.minimum_investment_minor,
                    seats_max: terms.seats_max,
                    capacity_minor: terms.capacity_minor,
                    rules: terms.rules,
                }))
            }
            status => Err(ServiceError::Unavailable(format!("fund terms: service answered {status}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Design note 002's table, reply by reply, without a network.

    use super::*;

    fn record(status: &str, reference: &str) -> Option<Result<OperationRecord, String>> {
        Some(Ok(OperationRecord {
            status: status.to_owned(),
            reference: reference.to_owned(),
            account_id: Some("inv-1".to_owned()),
            amount_minor: Some(100),
        }))
    }

    fn movement() -> MoneyMovement {
        MoneyMovement {
            idempotency_key: "bridge-k".to_owned(),
            transfer_id: uuid::Uuid::nil(),
            account_id: "inv-1".to_owned(),
            amount: bridge_domain::Money::new(100, bridge_domain::Currency::parse("EUR").expect("EUR")),
            traceparent: None,
            bank_access: None,
        }
    }

    #[test]
    fn every_reply_has_one_class() {
        let settled = Attempt::Final(ServiceOutcome::Settled { reference: "r1".to_owned() });
        let cases: Vec<(u16, Option<Result<OperationRecord, String>>, Attempt)> = vec![
            (201, record("settled", "r1"), settled.clone()),
            (200, record("settled", "r1"), settled.clone()),
            (202, record("pending", ""), Attempt::Final(ServiceOutcome::Pending)),
            (200, record("processing", ""), Attempt::Final(ServiceOutcome::Pending)),
            (
                402,
                record("declined", "INSUFFICIENT_FUNDS"),
                Attempt::Final(ServiceOutcome::Declined { code: "INSUFFICIENT_FUNDS".to_owned() }),
            ),
            (200, record("reversed", ""), Attempt::Transient("operation is reversed, not a status we know".to_owned())),
            (201, Some(Err("EOF".to_owned())), Attempt::Unknown("unreadable 201 Created reply: EOF".to_owned())),
            (409, None, Attempt::KeyInUse),
            (429, None, Attempt::Transient("service answered 429 Too Many Requests".to_owned())),
            (503, None, Attempt::Transient("service answered 503 Service Unavailable".to_owned())),
            (500, None, Attempt::Unknown("service answered 500 Internal Server Error".to_owned())),
            (502, None, Attempt::Unknown("service answered 502 Bad Gateway".to_owned())),
            (504, None, Attempt::Unknown("service answered 504 Gateway Timeout".to_owned())),
            (400, None, Attempt::Refused("service answered 400 Bad Request".to_owned())),
            (401, None, Attempt::Unauthorized("service answered 401 Unauthorized".to_owned())),
            (403, None, Attempt::Unauthorized("service answered 403 Forbidden".to_owned())),
            (422, None, Attempt::Refused("service answered 422 Unprocessable Entity".to_owned())),
            (404, None, Attempt::Refused("service answered 404 Not Found".to_owned())),
        ];
        for (status, body, expected) in cases {
            let status = StatusCode::from_u16(status).expect("valid status");
            assert_eq!(classify_reply(status, body), expected, "{status}");
        }
    }

    #[tokio::test]
    async fn a_bare_404_is_a_missing_endpoint_and_a_problem_404_a_missing_account() {
        let reply = |status: u16, content_type: Option<&str>| {
            let mut response = http::Response::builder().status(status);
            if let Some(kind) = content_type {
                response = response.header("content-type", kind);
            }
            reqwest::Response::from(response.body(if content_type.is_some() { "{}" } else { "" }).expect("response"))
        };
        assert!(matches!(classify(reply(404, None)).await, Attempt::Unauthorized(_)));
        assert!(matches!(classify(reply(405, Some("text/html"))).await, Attempt::Unauthorized(_)));
        assert!(matches!(classify(reply(404, Some("application/problem+json"))).await, Attempt::Refused(_)));
        assert!(matches!(classify(reply(400, None)).await, Attempt::Refused(_)));
    }

    #[test]
    fn a_lookup_answers_the_unknown_outcome() {
        let movement = movement();
        assert_eq!(
            lookup_reply(StatusCode::OK, record("settled", "r1"), &movement),
            Attempt::Final(ServiceOutcome::Settled { reference: "r1".to_owned() })
        );
        assert!(matches!(lookup_reply(StatusCode::NOT_FOUND, None, &movement), Attempt::Transient(_)));
        assert!(matches!(lookup_reply(StatusCode::SERVICE_UNAVAILABLE, None, &movement), Attempt::Transient(_)));
        assert!(matches!(lookup_reply(StatusCode::OK, Some(Err("EOF".to_owned())), &movement), Attempt::Transient(_)));
        // The key holds another operation (another account or amount): a
        // defect, never retried.
        let mut other = record("settled", "r1");
        if let Some(Ok(record)) = other.as_mut() {
            record.amount_minor = Some(999);
        }
        assert!(matches!(lookup_reply(StatusCode::OK, other, &movement), Attempt::KeyHoldsAnother(_)));
    }
}
