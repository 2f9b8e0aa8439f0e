//! API keys: `brk_<prefix>_<secret>`. The prefix (public, 8 hex digits)
//! finds the stored row; the secret (32 random bytes, base64url) is compared
//! by its SHA-256 in constant time. Keys carry scopes and may be bound to one
//! investor. Each key has its own rate limit.
//!
//! Deployments behind an identity provider may also accept JWT bearer
//! tokens: one pinned algorithm, issuer and audience checked, `exp`
//! required; scopes from the `scope` claim (space-separated), an investor
//! binding from `bridge_investor`. A token is rate limited by its subject.

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::Response;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use governor::{DefaultKeyedRateLimiter, Quota};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use bridge_store::api::{self, ApiKey};

use crate::{problem, AppState};

/// `operator`: resolves transfers in manual review (`/v1/reviews`) and acts
/// in the console; `viewer`: reads everything in the console and acts on
/// nothing.
pub const SCOPES: [&str; 6] = ["transfers:write", "transfers:read", "callbacks", "admin", "operator", "viewer"];

/// A newly created key: the full key is shown once, then only its hash is
/// kept.
pub struct CreatedKey {
    pub key: ApiKey,
    pub full_key: String,
}

fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Creates and stores a key.
pub async fn create_key(
    conn: &mut sqlx::PgConnection,
    name: &str,
    scopes: &[String],
    investor_account_id: Option<&str>,
) -> anyhow::Result<CreatedKey> {
    for scope in scopes {
        anyhow::ensure!(SCOPES.contains(&scope.as_str()), "unknown scope {scope:?}; expected one of {SCOPES:?}");
    }
    anyhow::ensure!(!scopes.is_empty(), "a key needs at least one scope");
    let mut bytes = [0u8; 36];
    rand::rng().fill_bytes(&mut bytes);
    let prefix = hex(&bytes[..4]);
    let secret = URL_SAFE_NO_PAD.encode(&bytes[4..]);
    let key = ApiKey {
        id: Uuid::new_v4(),
        prefix: prefix.clone(),
        name: name.to_owned(),
        scopes: scopes.to_vec(),
        investor_account_id: investor_account_id.map(str::to_owned),
        created_at: chrono::Utc::now(),
        revoked_at: None,
    };
    api::insert_key(conn, &key, &hash(&secret)).await?;
    Ok(CreatedKey { key, full_key: format!("brk_{prefix}_{secret}") })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Who is calling, once their key checked out.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key_id: Uuid,
    /// How the caller is named in histories: the key's name and prefix, or
    /// the token's subject.
    pub name: String,
    pub scopes: Vec<String>,
    pub investor_account_id: Option<String>,
}

impl Caller {
    pub fn require(&self, scope: &str) -> Result<(), Response> {
        if self.scopes.iter().any(|held| held == scope) {
            Ok(())
        } else {
            Err(problem(StatusCode::FORBIDDEN, "Forbidden", &format!("this key lacks the {scope} scope")))
        }
    }

    /// Whether this caller may see or act for `investor_account_id`.
    pub fn may_act_for(&self, investor_account_id: &str) -> bool {
        self.investor_account_id.as_deref().is_none_or(|bound| bound == investor_account_id)
    }
}

/// How JWT bearer tokens are checked, when they are accepted at all.
#[derive(Clone)]
pub struct JwtConfig {
    pub algorithm: jsonwebtoken::Algorithm,
    pub key: jsonwebtoken::DecodingKey,
    pub issuer: String,
    pub audience: String,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("algorithm", &self.algorithm)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl JwtConfig {
    /// `algorithm` as JWT names it (RS256, ES256, HS256, ...); `key` is a
    /// PEM public key, or for the HS algorithms the shared secret.
    pub fn new(algorithm: &str, key: &[u8], issuer: &str, audience: &str) -> anyhow::Result<Self> {
        use jsonwebtoken::{Algorithm, DecodingKey};
        let algorithm: Algorithm =
            algorithm.parse().map_err(|_| anyhow::anyhow!("unknown JWT algorithm {algorithm}"))?;
        let key = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => DecodingKey::from_secret(key),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => DecodingKey::from_rsa_pem(key)?,
            Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(key)?,
            Algorithm::EdDSA => DecodingKey::from_ed_pem(key)?,
        };
        Ok(Self { algorithm, key, issuer: issuer.to_owned(), audience: audience.to_owned() })
    }

    fn verify(&self, token: &str) -> Option<Caller> {
        #[derive(serde::Deserialize)]
        struct Claims {
            sub: String,
            #[serde(default)]
            scope: String,
            #[serde(default)]
            bridge_investor: Option<String>,
        }
        let mut validation = jsonwebtoken::Validation::new(self.algorithm);
        validation.algorithms = vec![self.algorithm];
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // A token not valid yet is refused, with the same leeway as expiry.
        validation.validate_nbf = true;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &validation).ok()?.claims;
        if claims.sub.trim().is_empty() {
            return None;
        }
        Some(Caller {
            key_id: Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("jwt:{}:{}", self.issuer, claims.sub).as_bytes()),
            name: claims.sub,
            scopes: claims.scope.split_whitespace().map(str::to_owned).collect(),
            investor_account_id: claims.bridge_investor,
        })
    }
}

pub type RateLimiter = Arc<DefaultKeyedRateLimiter<Uuid>>;

pub fn rate_limiter(per_second: u32, burst: u32) -> RateLimiter {
    let quota = Quota::per_second(NonZeroU32::new(per_second.max(1)).expect("at least 1"))
        .allow_burst(NonZeroU32::new(burst.max(1)).expect("at least 1"));
    Arc::new(DefaultKeyedRateLimiter::keyed(quota))
}

fn unauthorized() -> Response {
    let mut response = problem(StatusCode::UNAUTHORIZED, "Unauthorized", "a valid API key is required");
    response.headers_mut().insert("www-authenticate", "Bearer".parse().expect("static header"));
    response
}

/// Compared against on a lookup that finds no key, so a prefix that does
/// not exist costs what one that does costs.
const DUMMY_HASH: [u8; 32] = [0x5a; 32];

/// The credentials of `Authorization: Bearer <credentials>`; the scheme
/// is case-insensitive (RFC 9110).
fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get("authorization")?.to_str().ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| credentials.trim()).filter(|credentials| !credentials.is_empty())
}

/// Failed authentications per client address and per key prefix, in
/// fixed one-minute windows: past the limit, further attempts are refused
/// (429) before any key is looked up, so guessing costs the guesser, not
/// the database and the clients with real keys.
pub struct FailureLimiter {
    per_minute: u32,
    windows: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u32)>>,
}

const FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl FailureLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute: per_minute.max(1), windows: Default::default() }
    }

    /// How long until `key` may try again, if it is over the limit.
    fn blocked(&self, key: &str) -> Option<std::time::Duration> {
        let windows = self.windows.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (started, failures) = windows.get(key)?;
        let left = FAILURE_WINDOW.checked_sub(started.elapsed())?;
        (*failures >= self.per_minute).then_some(left)
    }

    fn record(&self, key: &str) {
        let mut windows = self.windows.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Forget finished windows now and then, so addresses that come and
        // go do not accumulate.
        if windows.len() > 10_000 {
            windows.retain(|_, (started, _)| started.elapsed() < FAILURE_WINDOW);
        }
        let entry = windows.entry(key.to_owned()).or_insert((std::time::Instant::now(), 0));
        if entry.0.elapsed() >= FAILURE_WINDOW {
            *entry = (std::time::Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

fn too_many(wait: std::time::Duration, detail: &str) -> Response {
    let mut response = problem(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests", detail);
    response.headers_mut().insert("retry-after", wait.as_secs().max(1).to_string().parse().expect("digits"));
    response
}

/// Counts and logs a failed authentication.
fn failed(state: &AppState, peer: &str, prefix: Option<&str>, reason: &'static str) {
    bridge_pipeline::metrics::api_auth_failure(reason);
    state.failures.record(&format!("address:{peer}"));
    if let Some(prefix) = prefix {
        state.failures.record(&format!("prefix:{prefix}"));
    }
    // The prefix is public; the secret is never logged.
    tracing::warn!(peer, prefix = prefix.unwrap_or(""), reason, "API authentication failed");
}

/// Why a presented credential was not accepted.
pub(crate) enum Refused {
    /// Too many failures from this address or for this key prefix.
    Throttled(std::time::Duration),
    /// Missing, malformed, unknown, wrong or revoked (the caller is not
    /// told which).
    Invalid,
    /// The keys could not be read.
    Unavailable,
}

impl Refused {
    fn response(self) -> Response {
        match self {
            Self::Throttled(wait) => too_many(wait, "too many failed authentications"),
            Self::Invalid => unauthorized(),
            Self::Unavailable => problem(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", "try again later"),
        }
    }
}

/// Checks an API key (`brk_...`) presented from `peer`: throttled per
/// address and per key prefix, compared in constant time, failures counted
/// and logged. The console's sign-in checks keys through here too.
pub(crate) async fn check_api_key(state: &AppState, peer: &str, presented: &str) -> Result<ApiKey, Refused> {
    if let Some(wait) = state.failures.blocked(&format!("address:{peer}")) {
        bridge_pipeline::metrics::api_auth_failure("throttled");
        return Err(Refused::Throttled(wait));
    }
    let Some((prefix, secret)) = presented.strip_prefix("brk_").and_then(|rest| rest.split_once('_')) else {
        failed(state, peer, None, "invalid_token");
        return Err(Refused::Invalid);
    };
    if let Some(wait) = state.failures.blocked(&format!("prefix:{prefix}")) {
        bridge_pipeline::metrics::api_auth_failure("throttled");
        return Err(Refused::Throttled(wait));
    }
    let found = match state.ctx.pool.acquire().await {
        Ok(mut conn) => api::key_by_prefix(&mut conn, prefix).await,
        Err(error) => Err(error.into()),
    };
    let (key, stored) = match found {
        Ok(Some(found)) => found,
        Ok(None) => {
            std::hint::black_box(bool::from(hash(secret).ct_eq(&DUMMY_HASH)));
            failed(state, peer, Some(prefix), "unknown_key");
            return Err(Refused::Invalid);
        }
        Err(error) => {
            tracing::warn!(error = %error, "API key lookup failed");
            return Err(Refused::Unavailable);
        }
    };
    let matches: bool = hash(secret).ct_eq(&stored).into();
    if !matches {
        failed(state, peer, Some(prefix), "wrong_secret");
        return Err(Refused::Invalid);
    }
    if key.revoked_at.is_some() {
        failed(state, peer, Some(prefix), "revoked");
        return Err(Refused::Invalid);
    }
    Ok(key)
}

impl Caller {
    /// The caller an API key stands for.
    pub(crate) fn of_key(key: ApiKey) -> Self {
        Caller {
            key_id: key.id,
            name: format!("{} (brk_{})", key.name, key.prefix),
            scopes: key.scopes,
            investor_account_id: key.investor_account_id,
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let peer = crate::peer_address(&parts.extensions);
        let Some(presented) = bearer(parts) else {
            if let Some(wait) = state.failures.blocked(&format!("address:{peer}")) {
                bridge_pipeline::metrics::api_auth_failure("throttled");
                return Err(too_many(wait, "too many failed authentications"));
            }
            bridge_pipeline::metrics::api_auth_failure("missing");
            return Err(unauthorized());
        };
        if !presented.starts_with("brk_") {
            if let Some(wait) = state.failures.blocked(&format!("address:{peer}")) {
                bridge_pipeline::metrics::api_auth_failure("throttled");
                return Err(too_many(wait, "too many failed authentications"));
            }
            let Some(caller) = state.config.jwt.as_ref().and_then(|jwt| jwt.verify(presented)) else {
                failed(state, &peer, None, "invalid_token");
                return Err(unauthorized());
            };
            limit(state, &caller.key_id)?;
            note_for_audit(parts, &caller);
            return Ok(caller);
        }
        let key = check_api_key(state, &peer, presented).await.map_err(Refused::response)?;
        limit(state, &key.id)?;
        let caller = Caller::of_key(key);
        note_for_audit(parts, &caller);
        Ok(caller)
    }
}

/// Tells the audit middleware who this request is.
fn note_for_audit(parts: &Parts, caller: &Caller) {
    if let Some(slot) = parts.extensions.get::<crate::AuditSlot>() {
        if let Ok(mut actor) = slot.0.lock() {
            *actor = Some(caller.name.clone());
        }
    }
}

pub(crate) fn limit(state: &AppState, caller: &Uuid) -> Result<(), Response> {
    if let Err(not_until) = state.limiter.check_key(caller) {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
        return Err(too_many(wait, "slow down"));
    }
    Ok(())
}
