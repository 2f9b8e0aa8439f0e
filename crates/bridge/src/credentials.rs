//! `bridge credentials`: the encrypted credentials store, and the
//! `credential:<name>` form every secret-valued setting accepts.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use bridge_secrets::{ExposeSecret, Keyring, SecretString};

use crate::Common;

#[derive(Args)]
pub struct CredentialsArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    action: CredentialsAction,
}

#[derive(Subcommand)]
enum CredentialsAction {
    /// Store a credential, read from standard input (never from the command
    /// line, where it would reach the shell history and the process list).
    Set { name: String },
    /// Names and the master key each is sealed under; never values.
    List,
    /// Seal every credential's data key under the current (first) master
    /// key. Run with both old and new keys configured; then retire the old.
    Rotate,
    /// Print a new master key entry (`id:base64`) to add to
    /// BRIDGE_MASTER_KEYS.
    GenerateKey { id: String },
}

/// Master keys from BRIDGE_MASTER_KEYS, or the file BRIDGE_MASTER_KEYS_FILE.
pub fn keyring() -> Result<Keyring> {
    let text = match (std::env::var("BRIDGE_MASTER_KEYS"), std::env::var("BRIDGE_MASTER_KEYS_FILE")) {
        (Ok(keys), _) => keys,
        (Err(_), Ok(path)) => std::fs::read_to_string(&path).with_context(|| format!("Failed to read {path}"))?,
        _ => bail!("Set BRIDGE_MASTER_KEYS or BRIDGE_MASTER_KEYS_FILE (entries `id:base64`, current first)"),
    };
    Ok(Keyring::parse(&text)?)
}

/// A setting's secret: itself, or, written `credential:<name>`, the value
/// stored encrypted under that name.
pub async fn resolve(pool: &sqlx::PgPool, value: &str) -> Result<String> {
    let Some(name) = value.strip_prefix("credential:") else { return Ok(value.to_owned()) };
    let mut conn = pool.acquire().await?;
    let secret = bridge_secrets::get(&mut conn, &keyring()?, name)
        .await
        .with_context(|| format!("Failed to read credential {name}"))?;
    Ok(secret.expose_secret().to_owned())
}

/// As [`resolve`], for an optional setting.
pub async fn resolve_option(pool: &sqlx::PgPool, value: &mut Option<String>) -> Result<()> {
    if let Some(text) = value.as_ref() {
        *value = Some(resolve(pool, text).await?);
    }
    Ok(())
}

pub async fn run(args: CredentialsArgs) -> Result<()> {
    if let CredentialsAction::GenerateKey { id } = &args.action {
        println!("{}", Keyring::generate_entry(id));
        return Ok(());
    }
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    match args.action {
        CredentialsAction::Set { name } => {
            let mut value = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut value)?;
            let value = SecretString::from(value.trim_end_matches(['\n', '\r']).to_owned());
            let mut conn = pool.acquire().await?;
            let keyring = keyring()?;
            bridge_secrets::put(&mut conn, &keyring, &name, &value).await?;
            println!("credential {name} stored under master key {}", keyring.current_id());
        }
        CredentialsAction::List => {
            let mut conn = pool.acquire().await?;
            for (name, key_id) in bridge_store::credentials::list(&mut conn).await? {
                println!("{name} (master key {key_id})");
            }
        }
        CredentialsAction::Rotate => {
            let keyring = keyring()?;
            let count = bridge_secrets::rotate(&pool, &keyring).await?;
            println!("{count} credentials now sealed under master key {}", keyring.current_id());
        }
        CredentialsAction::GenerateKey { .. } => unreachable!("handled above"),
    }
    Ok(())
}
