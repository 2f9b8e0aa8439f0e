//! The credentials Bridge holds for outside services, encrypted at rest.
//!
//! Envelope encryption: each credential has its own random data key; the
//! value is sealed with AES-256-GCM under the data key, with the credential's
//! name as associated data (a ciphertext moved to another row does not
//! open), and the data key is sealed under a master key, recorded by id.
//! Master keys never touch the database: they come from the environment or
//! a file (`id:base64` each, the first one current). Rotating seals every
//! data key again under the current master key; values are not touched and
//! readers keep working throughout, since they hold every listed key.
//!
//! Decrypted values are `SecretString`s: they print as `[REDACTED]` in any
//! debug output or log line.

use std::collections::HashMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::RngCore;
pub use secrecy::{ExposeSecret, SecretString};
use sqlx::PgConnection;

use bridge_store::credentials::{self, StoredCredential};

const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("master keys must be `id:base64` of 32 bytes, comma or newline separated; the first is current")]
    MalformedKeys,
    #[error("no master keys configured")]
    NoKeys,
    #[error("credential {0} is sealed under master key {1}, which is not configured")]
    UnknownKey(String, String),
    #[error("credential {0} does not open: tampered with, moved, or the wrong key")]
    Undecryptable(String),
    #[error("no credential named {0}")]
    Missing(String),
    #[error(transparent)]
    Store(#[from] bridge_store::Error),
}

/// Master keys by id; the first is the one new seals use.
pub struct Keyring {
    current: String,
    keys: HashMap<String, Aes256Gcm>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring {{ current: {:?}, keys: {} }}", self.current, self.keys.len())
    }
}

impl Keyring {
    /// Parses `id:base64,id:base64` (or one per line).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut current = None;
        let mut keys = HashMap::new();
        for entry in text.split([',', '\n']).map(str::trim).filter(|entry| !entry.is_empty()) {
            let (id, encoded) = entry.split_once(':').ok_or(Error::MalformedKeys)?;
            let bytes = STANDARD.decode(encoded.trim()).map_err(|_| Error::MalformedKeys)?;
            if id.is_empty() || bytes.len() != 32 {
                return Err(Error::MalformedKeys);
            }
            let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| Error::MalformedKeys)?;
            current.get_or_insert_with(|| id.to_owned());
            keys.insert(id.to_owned(), cipher);
        }
        Ok(Self { current: current.ok_or(Error::NoKeys)?, keys })
    }

    /// A fresh master key in the `id:base64` form, for an operator to keep.
    pub fn generate_entry(id: &str) -> String {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        format!("{id}:{}", STANDARD.encode(key))
    }

    pub fn current_id(&self) -> &str {
        &self.current
    }

    fn cipher(&self, name: &str, key_id: &str) -> Result<&Aes256Gcm, Error> {
        self.keys.get(key_id).ok_or_else(|| Error::UnknownKey(name.to_owned(), key_id.to_owned()))
    }

    /// Seals `value` as credential `name` under a new data key.
    pub fn seal(&self, name: &str, value: &SecretString) -> Result<StoredCredential, Error> {
        let mut data_key = [0u8; 32];
        rand::rng().fill_bytes(&mut data_key);
        let data_cipher = Aes256Gcm::new_from_slice(&data_key).expect("32-byte key");
        let ciphertext = seal_with(&data_cipher, value.expose_secret().as_bytes(), &value_aad(name));
        let wrapped_key = seal_with(self.cipher(name, &self.current)?, &data_key, &key_aad(name, &self.current));
        data_key.fill(0);
        Ok(StoredCredential { name: name.to_owned(), key_id: self.current.clone(), wrapped_key, ciphertext })
    }

    pub fn open(&self, stored: &StoredCredential) -> Result<SecretString, Error> {
        let name = &stored.name;
        let undecryptable = || Error::Undecryptable(name.clone());
        let master = self.cipher(name, &stored.key_id)?;
        let mut data_key =
            open_with(master, &stored.wrapped_key, &key_aad(name, &stored.key_id)).ok_or_else(undecryptable)?;
        let data_cipher = Aes256Gcm::new_from_slice(&data_key).map_err(|_| undecryptable())?;
        data_key.fill(0);
        let plain = open_with(&data_cipher, &stored.ciphertext, &value_aad(name)).ok_or_else(undecryptable)?;
        let text = String::from_utf8(plain).map_err(|_| undecryptable())?;
        Ok(SecretString::from(text))
    }

    /// The same credential with its data key sealed under the current
    /// master key; the value's ciphertext is unchanged.
    pub fn rewrap(&self, stored: &StoredCredential) -> Result<StoredCredential, Error> {
        let name = &stored.name;
        let master = self.cipher(name, &stored.key_id)?;
        let mut data_key = open_with(master, &stored.wrapped_key, &key_aad(name, &stored.key_id))
            .ok_or_else(|| Error::Undecryptable(name.clone()))?;
        let wrapped_key = seal_with(self.cipher(name, &self.current)?, &data_key, &key_aad(name, &self.current));
        data_key.fill(0);
        Ok(StoredCredential { key_id: self.current.clone(), wrapped_key, ..stored.clone() })
    }
}

fn value_aad(name: &str) -> Vec<u8> {
    format!("bridge-credential:{name}").into_bytes()
}

fn key_aad(name: &str, key_id: &str) -> Vec<u8> {
    format!("bridge-data-key:{name}:{key_id}").into_bytes()
}

fn seal_with(cipher: &Aes256Gcm, plain: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    let sealed = cipher
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
        .expect("AES-GCM encrypts any message below 64 GiB");
    [nonce.as_slice(), &sealed].concat()
}

fn open_with(cipher: &Aes256Gcm, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN {
        return None;
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    cipher.decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad }).ok()
}

/// Stores `value` as credential `name`, replacing any earlier value.
pub async fn put(conn: &mut PgConnection, keyring: &Keyring, name: &str, value: &SecretString) -> Result<(), Error> {
    credentials::put(conn, &keyring.seal(name, value)?).await?;
    Ok(())
}

pub async fn get(conn: &mut PgConnection, keyring: &Keyring, name: &str) -> Result<SecretString, Error> {
    let stored = credentials::get(conn, name).await?.ok_or_else(|| Error::Missing(name.to_owned()))?;
    keyring.open(&stored)
}

/// Seals every data key not yet under the current master key again, one
/// row per transaction. Returns how many were rewrapped.
pub async fn rotate(pool: &sqlx::PgPool, keyring: &Keyring) -> Result<usize, Error> {
    let mut rewrapped = 0;
    let names = {
        let mut conn = pool.acquire().await.map_err(bridge_store::Error::from)?;
        credentials::names_not_under(&mut conn, keyring.current_id()).await?
    };
    for name in names {
        let mut tx = pool.begin().await.map_err(bridge_store::Error::from)?;
        if let Some(stored) = credentials::get_for_update(&mut tx, &name).await? {
            if stored.key_id != keyring.current_id() {
                credentials::put(&mut tx, &keyring.rewrap(&stored)?).await?;
                rewrapped += 1;
            }
        }
        tx.commit().await.map_err(bridge_store::Error::from)?;
    }
    Ok(rewrapped)
}

/// The prefix of a setting or column that names a stored credential.
pub const REFERENCE_PREFIX: &str = "credential:";

/// Stores `value` under a new unique name starting with `prefix` and
/// returns the reference (`credential:<name>`) to keep in its place.
pub async fn store_new(
    conn: &mut PgConnection,
    keyring: &Keyring,
    prefix: &str,
    value: &SecretString,
) -> Result<String, Error> {
    let mut id = [0u8; 16];
    rand::rng().fill_bytes(&mut id);
    let name = format!("{prefix}-{}", id.iter().map(|byte| format!("{byte:02x}")).collect::<String>());
    put(conn, keyring, &name, value).await?;
    Ok(format!("{REFERENCE_PREFIX}{name}"))
}

/// Opens a `credential:<name>` reference.
pub async fn open_reference(
    conn: &mut PgConnection,
    keyring: &Keyring,
    reference: &str,
) -> Result<SecretString, Error> {
    let name = reference.strip_prefix(REFERENCE_PREFIX).ok_or_else(|| Error::Missing(reference.to_owned()))?;
    get(conn, keyring, name).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(entries: &[&str]) -> Keyring {
        Keyring::parse(&entries.join(",")).unwrap()
    }

    #[test]
    fn seals_open_only_under_their_name_and_key() {
        let old = Keyring::generate_entry("k1");
        let keyring = ring(&[&old]);
        let value = SecretString::from("sk_live_very_secret");
        let sealed = keyring.seal("bank_token", &value).unwrap();
        assert_eq!(keyring.open(&sealed).unwrap().expose_secret(), "sk_live_very_secret");
        assert!(!sealed.ciphertext.windows(7).any(|window| window == b"sk_live"));

        // Moved to another name: refused.
        let moved = StoredCredential { name: "other".into(), ..sealed.clone() };
        assert!(matches!(keyring.open(&moved), Err(Error::Undecryptable(_))));
        // One bit flipped: refused.
        let mut tampered = sealed.clone();
        let last = tampered.ciphertext.len() - 1;
        tampered.ciphertext[last] ^= 1;
        assert!(matches!(keyring.open(&tampered), Err(Error::Undecryptable(_))));
        // Another keyring under the same id: refused.
        let impostor = ring(&[&Keyring::generate_entry("k1")]);
        assert!(matches!(impostor.open(&sealed), Err(Error::Undecryptable(_))));
    }

    #[test]
    fn rotation_rewraps_the_data_key_only() {
        let (old, new) = (Keyring::generate_entry("k1"), Keyring::generate_entry("k2"));
        let sealed = ring(&[&old]).seal("bank_token", &SecretString::from("value")).unwrap();
        let both = ring(&[&new, &old]);
        assert_eq!(both.open(&sealed).unwrap().expose_secret(), "value");
        let rotated = both.rewrap(&sealed).unwrap();
        assert_eq!((rotated.key_id.as_str(), &rotated.ciphertext), ("k2", &sealed.ciphertext));
        let only_new = ring(&[&new]);
        assert_eq!(only_new.open(&rotated).unwrap().expose_secret(), "value");
        assert!(matches!(only_new.open(&sealed), Err(Error::UnknownKey(_, _))));
    }

    #[test]
    fn keys_are_checked_and_never_printed() {
        assert!(matches!(Keyring::parse(""), Err(Error::NoKeys)));
        assert!(matches!(Keyring::parse("k1:c2hvcnQ="), Err(Error::MalformedKeys)));
        assert!(matches!(Keyring::parse("nocolon"), Err(Error::MalformedKeys)));
        let entry = Keyring::generate_entry("k1");
        let keyring = ring(&[&entry]);
        let printed = format!("{keyring:?} {:?}", SecretString::from("hunter2"));
        assert!(!printed.contains(entry.split(':').nth(1).unwrap()) && !printed.contains("hunter2"), "{printed}");
    }
}
