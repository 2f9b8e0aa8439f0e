//! Signing and verifying HTTP callbacks per the Standard Webhooks
//! specification (<https://www.standardwebhooks.com>).
//!
//! A sender signs `"{webhook-id}.{webhook-timestamp}.{body}"` with
//! HMAC-SHA256 under a shared secret and sends three headers:
//! `webhook-id`, `webhook-timestamp` (Unix seconds) and
//! `webhook-signature: v1,<base64>` (several space-separated signatures while
//! a secret is being rotated). Secrets are written `whsec_<base64>`.
//!
//! The receiver checks the timestamp against its clock (a tolerance window
//! bounds how long a captured request can be replayed; remembering the
//! `webhook-id` within that window closes it) and compares signatures in
//! constant time.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";

/// How far a timestamp may be from the receiver's clock, either way: the
/// specification's recommended five minutes.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

const SECRET_PREFIX: &str = "whsec_";

/// A signing secret. Its bytes never appear in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("a webhook secret must be whsec_ followed by base64 of at least 24 bytes")]
    MalformedSecret,
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("webhook-timestamp is not a Unix time in seconds")]
    MalformedTimestamp,
    #[error("webhook-timestamp is outside the tolerance window")]
    TimestampOutOfTolerance,
    #[error("no signature matches")]
    BadSignature,
}

impl Secret {
    /// Parses `whsec_<base64>`; the prefix is optional, as in the reference
    /// libraries.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let encoded = text.trim().strip_prefix(SECRET_PREFIX).unwrap_or(text.trim());
        let bytes = STANDARD.decode(encoded).map_err(|_| Error::MalformedSecret)?;
        // Below 24 bytes (192 bits) a secret is too easy to guess; the
        // specification asks for 24 to 64.
        if bytes.len() < 24 {
            return Err(Error::MalformedSecret);
        }
        Ok(Self(bytes))
    }

    /// A new random secret from the caller's random bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes.to_vec())
    }

    /// The `whsec_...` form, to hand to the other side once.
    pub fn expose(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(&self.0))
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` header value for this message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        format!("v1,{}", STANDARD.encode(self.mac(id, timestamp, body).finalize().into_bytes()))
    }
}

/// The three signature headers as the receiver found them.
#[derive(Clone, Copy, Debug)]
pub struct SignedHeaders<'a> {
    pub id: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// Verifies a received message against any of `secrets` (several during a
/// rotation), at `now` (Unix seconds). Returns the webhook id, which the
/// caller remembers to refuse replays.
pub fn verify<'a>(
    secrets: &[Secret],
    headers: SignedHeaders<'a>,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<&'a str, Error> {
    let id = headers.id.filter(|id| !id.is_empty()).ok_or(Error::MissingHeader(ID_HEADER))?;
    let timestamp = headers.timestamp.ok_or(Error::MissingHeader(TIMESTAMP_HEADER))?;
    let signatures = headers.signature.ok_or(Error::MissingHeader(SIGNATURE_HEADER))?;
    let timestamp: i64 = timestamp.trim().parse().map_err(|_| Error::MalformedTimestamp)?;
    if (now - timestamp).abs() > tolerance_secs {
        return Err(Error::TimestampOutOfTolerance);
    }
    let candidates: Vec<Vec<u8>> = signatures
        .split_whitespace()
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|encoded| STANDARD.decode(encoded).ok())
        .collect();
    for secret in secrets {
        for candidate in &candidates {
            // verify_slice compares in constant time.
            if secret.mac(id, timestamp, body).verify_slice(candidate).is_ok() {
                return Ok(id);
            }
        }
    }
    Err(Error::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example from the specification's reference implementations.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn headers<'a>(id: &'a str, timestamp: &'a str, signature: &'a str) -> SignedHeaders<'a> {
        SignedHeaders { id: Some(id), timestamp: Some(timestamp), signature: Some(signature) }
    }

    #[test]
    fn signs_the_reference_example() {
        assert_eq!(Secret::parse(SECRET).unwrap().sign(ID, TIMESTAMP, BODY), SIGNATURE);
    }

    #[test]
    fn verifies_within_tolerance_and_with_a_rotated_secret() {
        let secret = Secret::parse(SECRET).unwrap();
        let old = Secret::from_bytes([7; 32]);
        let ts = TIMESTAMP.to_string();
        let both = format!("v1,bm90LWl0 {SIGNATURE}");
        assert_eq!(verify(&[old.clone(), secret.clone()], headers(ID, &ts, &both), BODY, TIMESTAMP + 299, 300), Ok(ID));
        assert_eq!(
            verify(std::slice::from_ref(&secret), headers(ID, &ts, SIGNATURE), BODY, TIMESTAMP + 301, 300),
            Err(Error::TimestampOutOfTolerance)
        );
        assert_eq!(verify(&[old], headers(ID, &ts, SIGNATURE), BODY, TIMESTAMP, 300), Err(Error::BadSignature));
    }

    #[test]
    fn any_change_breaks_the_signature() {
        let secret = Secret::parse(SECRET).unwrap();
        let ts = TIMESTAMP.to_string();
        let later = (TIMESTAMP + 1).to_string();
        for (id, timestamp, body) in [("msg_other", ts.as_str(), BODY), (ID, &later, BODY), (ID, &ts, b"{}".as_slice())]
        {
            assert_eq!(
                verify(std::slice::from_ref(&secret), headers(id, timestamp, SIGNATURE), body, TIMESTAMP, 300),
                Err(Error::BadSignature)
            );
        }
        let missing = SignedHeaders { id: Some(ID), timestamp: Some(&ts), signature: None };
        assert_eq!(verify(&[secret], missing, BODY, TIMESTAMP, 300), Err(Error::MissingHeader(SIGNATURE_HEADER)));
    }

    #[test]
    fn refuses_short_or_malformed_secrets() {
        assert_eq!(Secret::parse("whsec_c2hvcnQ="), Err(Error::MalformedSecret));
        assert_eq!(Secret::parse("whsec_!!!"), Err(Error::MalformedSecret));
        let secret = Secret::from_bytes([1; 32]);
        assert_eq!(Secret::parse(&secret.expose()), Ok(secret.clone()));
        assert_eq!(format!("{secret:?}"), "Secret(..)");
    }
}
