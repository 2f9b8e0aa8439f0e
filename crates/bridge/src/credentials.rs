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
    /// An investor's own bank access, which their withdrawals carry.
    Investor {
        #[command(subcommand)]
        action: InvestorAccess,
    },
}

#[derive(Subcommand)]
enum InvestorAccess {
    /// Store an investor's bank access token, read from standard input,
    /// replacing any earlier one.
    Set {
        investor: String,
        /// The bank's id of the consent.
        #[arg(long)]
        consent_id: String,
        /// When the bank said the access expires (RFC 3339).
        #[arg(long)]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
        /// The consent's scopes, comma separated.
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
    },
    /// What may be shown of it: consent, scopes, expiry, when set and last
    /// used, revoked or not. Never the token.
    ShowMetadata { investor: String },
    /// Delete the token; withdrawals carry none until a new one is set.
    Revoke { investor: String },
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

/// Every process that may move an investor's money (stages, the settlement
/// runner, the API's callbacks, an operator's review, a replay) opens
/// investors' bank access when master keys are configured, so a withdrawal
/// carries it whichever process makes it. Keys that are set but malformed
/// are an error, not a silent "no access".
pub fn with_bank_access(pipeline: bridge_pipeline::Pipeline) -> Result<bridge_pipeline::Pipeline> {
    if std::env::var_os("BRIDGE_MASTER_KEYS").is_none() && std::env::var_os("BRIDGE_MASTER_KEYS_FILE").is_none() {
        return Ok(pipeline);
    }
    let keyring = keyring().context("Investors' bank access is opened with BRIDGE_MASTER_KEYS")?;
    Ok(pipeline.with_keyring(std::sync::Arc::new(keyring)))
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
        CredentialsAction::Investor { action } => investor_access(&pool, action).await?,
    }
    Ok(())
}

async fn investor_access(pool: &sqlx::PgPool, action: InvestorAccess) -> Result<()> {
    use bridge_store::bank_access;
    let mut tx = pool.begin().await?;
    let investor = match action {
        InvestorAccess::Set { investor, consent_id, expires_at, scopes } => {
            let keyring = keyring()?;
            let mut value = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut value)?;
            let token = value.trim_end_matches(['\n', '\r']);
            anyhow::ensure!(!token.is_empty(), "No token on standard input");
            let operator = std::env::var("BRIDGE_OPERATOR").or_else(|_| std::env::var("USER")).unwrap_or_default();
            let access = bank_access::NewBankAccess {
                consent_id: &consent_id,
                scopes: &scopes,
                expires_at,
                set_by: &format!("cli:{}", operator.trim()),
            };
            anyhow::ensure!(bank_access::record(&mut tx, &investor, &access).await?, "No investor account {investor}");
            let token = SecretString::from(token.to_owned());
            bridge_secrets::put(&mut tx, &keyring, &bank_access::credential_name(&investor), &token).await?;
            investor
        }
        InvestorAccess::ShowMetadata { investor } => investor,
        InvestorAccess::Revoke { investor } => {
            anyhow::ensure!(bank_access::revoke(&mut tx, &investor).await?, "No bank access to revoke for {investor}");
            investor
        }
    };
    let metadata =
        bank_access::metadata(&mut tx, &investor).await?.with_context(|| format!("No bank access for {investor}"))?;
    tx.commit().await?;
    println!("{}", serde_json::to_string(&metadata)?);
    Ok(())
}
