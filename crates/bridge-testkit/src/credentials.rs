//! Signed timestamps and sealed secrets for tests of the API and the
//! credentials store.

use super::*;

/// Seconds since the Unix epoch, as signed timestamps carry them.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs() as i64
}

/// A keyring with one fresh master key, for the credentials store.
pub fn keyring() -> Arc<bridge_secrets::Keyring> {
    let entry = bridge_secrets::Keyring::generate_entry("test");
    Arc::new(bridge_secrets::Keyring::parse(&entry).expect("a generated key parses"))
}

/// Stores `secret` in the credentials store and returns the reference a
/// webhook subscription keeps.
pub async fn sealed_secret(pool: &PgPool, keyring: &bridge_secrets::Keyring, secret: &str) -> Result<String> {
    let mut conn = pool.acquire().await?;
    let value = bridge_secrets::SecretString::from(secret.to_owned());
    Ok(bridge_secrets::store_new(&mut conn, keyring, "webhook-secret", &value).await?)
}
