//! Signed transfer requests. Each upstream system is a registered source
//! (`bridge sources add`) with a Standard Webhooks secret in the encrypted
//! credentials store. It signs each request it publishes over the message
//! key (the transfer id), a timestamp and the payload, and names itself in
//! headers:
//!
//! | header | value |
//! | --- | --- |
//! | `bridge-source` | the source's name |
//! | `bridge-signature-timestamp` | Unix seconds when it signed |
//! | `bridge-signature` | `v1,<base64 HMAC-SHA256 of "<key>.<timestamp>.<payload>">` (several, space-separated, during a rotation) |
//!
//! With `--require-signed-requests` the validator rejects a request
//! whose signature is missing, wrong, or older than the tolerance when the
//! broker appended it (so a replay of the topic long after still
//! verifies), or whose source is unknown, revoked or not allowed to move
//! that investor's money into that fund: with its own reason code on the
//! status topic, before any money is held or any service asked. Requests
//! recorded by the API are authenticated by the API key that made them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bridge_domain::RejectReason;
use bridge_secrets::ExposeSecret;
use bridge_secrets::Keyring;
use bridge_store::sources::{self, Source};
use bridge_store::transfers::Transfer;
use bridge_webhooks::{Secret, SignedHeaders};

use crate::message::Inbound;
use crate::outcome::StageError;

pub const SOURCE_HEADER: &str = "bridge-source";
pub const TIMESTAMP_HEADER: &str = "bridge-signature-timestamp";
pub const SIGNATURE_HEADER: &str = "bridge-signature";

/// How far a signature's time may be from the time the broker appended the
/// request, as for settlement callbacks.
pub const TOLERANCE_SECS: i64 = bridge_webhooks::DEFAULT_TOLERANCE_SECS;

/// How long the registered sources are used before they are read again;
/// a revocation takes effect within it.
const REFRESH_AFTER: Duration = Duration::from_secs(10);

/// The headers that sign a request published under `key` with `payload`.
pub fn signature_headers(source: &str, secret: &Secret, key: &str, payload: &[u8], now: i64) -> Vec<(String, Vec<u8>)> {
    vec![
        (SOURCE_HEADER.to_owned(), source.as_bytes().to_vec()),
        (TIMESTAMP_HEADER.to_owned(), now.to_string().into_bytes()),
        (SIGNATURE_HEADER.to_owned(), secret.sign(key, now, payload).into_bytes()),
    ]
}

/// Checks requests against the registered sources.
pub struct RequestVerifier {
    pool: sqlx::PgPool,
    keyring: Arc<Keyring>,
    known: tokio::sync::Mutex<Option<(Instant, Arc<HashMap<String, (Source, Secret)>>)>>,
}

impl std::fmt::Debug for RequestVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestVerifier").finish_non_exhaustive()
    }
}

impl RequestVerifier {
    pub fn new(pool: sqlx::PgPool, keyring: Arc<Keyring>) -> Self {
        Self { pool, keyring, known: tokio::sync::Mutex::new(None) }
    }

    /// The active sources with their secrets, read again when stale.
    async fn sources(&self) -> Result<Arc<HashMap<String, (Source, Secret)>>, StageError> {
        let mut known = self.known.lock().await;
        if let Some((read_at, sources)) = known.as_ref() {
            if read_at.elapsed() < REFRESH_AFTER {
                return Ok(sources.clone());
            }
        }
        let mut conn = self.pool.acquire().await?;
        let mut read = HashMap::new();
        for source in sources::list(&mut conn).await?.into_iter().filter(|source| source.revoked_at.is_none()) {
            let secret = bridge_secrets::open_reference(&mut conn, &self.keyring, &source.secret_credential)
                .await
                .map_err(|error| StageError::Transient(format!("the secret of source {}: {error}", source.name)))?;
            let secret = Secret::parse(secret.expose_secret())
                .map_err(|error| StageError::Transient(format!("the secret of source {}: {error}", source.name)))?;
            read.insert(source.name.clone(), (source, secret));
        }
        let read = Arc::new(read);
        *known = Some((Instant::now(), read.clone()));
        Ok(read)
    }

    /// Whether `message` is a request its source signed and may make for
    /// `transfer` (whose fund is known): `Ok(Err(reason))` rejects it.
    pub async fn check(&self, message: &Inbound, transfer: &Transfer) -> Result<Result<(), RejectReason>, StageError> {
        let (Some(source), Some(timestamp), Some(signature)) =
            (message.header(SOURCE_HEADER), message.header(TIMESTAMP_HEADER), message.header(SIGNATURE_HEADER))
        else {
            return Ok(Err(RejectReason::RequestUnsigned));
        };
        let sources = self.sources().await?;
        let Some((registered, secret)) = sources.get(source) else {
            return Ok(Err(RejectReason::SourceNotAllowed));
        };
        let key = message.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
        let appended = message.timestamp_ms.map_or_else(|| chrono::Utc::now().timestamp(), |ms| ms / 1_000);
        let headers = SignedHeaders { id: Some(&key), timestamp: Some(timestamp), signature: Some(signature) };
        let payload = message.payload.as_deref().unwrap_or_default();
        match bridge_webhooks::verify(std::slice::from_ref(secret), headers, payload, appended, TOLERANCE_SECS) {
            Ok(_) => {}
            Err(bridge_webhooks::Error::TimestampOutOfTolerance) => {
                return Ok(Err(RejectReason::RequestSignatureStale))
            }
            Err(_) => return Ok(Err(RejectReason::RequestSignatureInvalid)),
        }
        // The signed key must be the transfer the payload names, and the
        // payload must name the source that signed it.
        if key != transfer.id.to_string()
            || transfer.source_system != registered.name
            || !registered.may_move(&transfer.investor_account_id, transfer.fund_id.as_deref())
        {
            return Ok(Err(RejectReason::SourceNotAllowed));
        }
        Ok(Ok(()))
    }
}
