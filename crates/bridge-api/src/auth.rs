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

/// `operator`: resolves transfers in manual review (`/v1/reviews`).
pub const SCOPES: [&str; 5] = ["transfers:write", "transfers:read", "callbacks", "admin", "operator"];

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
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &validation).ok()?.claims;
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

impl FromRequestParts<AppState> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let presented = parts
            .headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(unauthorized)?;
        let Some((prefix, secret)) = presented.strip_prefix("brk_").and_then(|rest| rest.split_once('_')) else {
            let caller = state.config.jwt.as_ref().and_then(|jwt| jwt.verify(presented)).ok_or_else(unauthorized)?;
            limit(state, &caller.key_id)?;
            return Ok(caller);
        };
        let found = match state.ctx.pool.acquire().await {
            Ok(mut conn) => api::key_by_prefix(&mut conn, prefix).await,
            Err(error) => Err(error.into()),
        };
        let (key, stored) = match found {
            Ok(Some(found)) => found,
            Ok(None) => return Err(unauthorized()),
            Err(error) => {
                tracing::warn!(error = %error, "API key lookup failed");
                return Err(problem(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", "try again later"));
            }
        };
        let matches: bool = hash(secret).ct_eq(&stored).into();
        if !matches || key.revoked_at.is_some() {
            return Err(unauthorized());
        }
        limit(state, &key.id)?;
        Ok(Caller {
            key_id: key.id,
            name: format!("{} (brk_{})", key.name, key.prefix),
            scopes: key.scopes,
            investor_account_id: key.investor_account_id,
        })
    }
}

fn limit(state: &AppState, caller: &Uuid) -> Result<(), Response> {
    if let Err(not_until) = state.limiter.check_key(caller) {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
        let mut response = problem(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests", "slow down");
        let seconds = wait.as_secs().max(1).to_string();
        response.headers_mut().insert("retry-after", seconds.parse().expect("digits"));
        return Err(response);
    }
    Ok(())
}
