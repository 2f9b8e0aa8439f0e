//! Rows of encrypted credentials. This module stores and reads sealed bytes
//! only; sealing and opening are in the bridge-secrets crate.

use sqlx::PgConnection;

use crate::Result;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCredential {
    pub name: String,
    pub key_id: String,
    pub wrapped_key: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

pub async fn put(conn: &mut PgConnection, credential: &StoredCredential) -> Result<()> {
    sqlx::query(
        "INSERT INTO credentials (name, key_id, wrapped_key, ciphertext) VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE SET key_id = EXCLUDED.key_id, wrapped_key = EXCLUDED.wrapped_key,
             ciphertext = EXCLUDED.ciphertext, updated_at = now()",
    )
    .bind(&credential.name)
    .bind(&credential.key_id)
    .bind(&credential.wrapped_key)
    .bind(&credential.ciphertext)
    .execute(conn)
    .await?;
    Ok(())
}

async fn fetch(conn: &mut PgConnection, name: &str, lock: bool) -> Result<Option<StoredCredential>> {
    let sql = format!(
        "SELECT name, key_id, wrapped_key, ciphertext FROM credentials WHERE name = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let row: Option<(String, String, Vec<u8>, Vec<u8>)> = sqlx::query_as(&sql).bind(name).fetch_optional(conn).await?;
    Ok(row.map(|(name, key_id, wrapped_key, ciphertext)| StoredCredential { name, key_id, wrapped_key, ciphertext }))
}

pub async fn get(conn: &mut PgConnection, name: &str) -> Result<Option<StoredCredential>> {
    fetch(conn, name, false).await
}

pub async fn get_for_update(conn: &mut PgConnection, name: &str) -> Result<Option<StoredCredential>> {
    fetch(conn, name, true).await
}

/// Deletes credential `name`; nothing if there is none.
pub async fn delete(conn: &mut PgConnection, name: &str) -> Result<()> {
    sqlx::query("DELETE FROM credentials WHERE name = $1").bind(name).execute(conn).await?;
    Ok(())
}

/// Names and master key ids, for listing.
pub async fn list(conn: &mut PgConnection) -> Result<Vec<(String, String)>> {
    Ok(sqlx::query_as("SELECT name, key_id FROM credentials ORDER BY name").fetch_all(conn).await?)
}

pub async fn names_not_under(conn: &mut PgConnection, key_id: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar("SELECT name FROM credentials WHERE key_id <> $1 ORDER BY name")
        .bind(key_id)
        .fetch_all(conn)
        .await?)
}
