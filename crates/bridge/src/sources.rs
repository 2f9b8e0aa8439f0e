//! `bridge sources`: the upstream systems allowed to publish transfer
//! requests, each with a signing secret sealed in the credentials store
//! (see `bridge_pipeline::sources`).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use bridge_store::sources::{self, Source};

use crate::Common;

#[derive(Args)]
pub struct SourcesArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    action: SourcesAction,
}

#[derive(Subcommand)]
enum SourcesAction {
    /// Register a source (or replace one's scope and secret) and print its
    /// new signing secret, once.
    Add {
        /// Lower-case letters, digits, `.`, `_` and `-`; also the
        /// `source_system` its requests carry.
        name: String,
        /// Investor accounts whose money it may move: ids, or prefixes
        /// ending in `*` (`*` for all); comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        investors: Vec<String>,
        /// Funds it may move money into: ids or prefixes ending in `*`.
        #[arg(long, value_delimiter = ',', required = true)]
        funds: Vec<String>,
    },
    /// Every source, with its scope; revoked ones say so.
    List,
    /// Revoke a source: its requests are rejected within seconds.
    Revoke { name: String },
}

pub async fn run(args: SourcesArgs) -> Result<()> {
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    let mut conn = pool.acquire().await?;
    match args.action {
        SourcesAction::Add { name, investors, funds } => {
            let keyring = crate::credentials::keyring()?;
            let secret = crate::notify::new_secret().expose();
            let reference = bridge_secrets::store_new(
                &mut conn,
                &keyring,
                "request-source",
                &bridge_secrets::SecretString::from(secret.clone()),
            )
            .await?;
            let source = Source {
                name: name.clone(),
                investors,
                funds,
                secret_credential: reference,
                created_at: chrono::Utc::now(),
                revoked_at: None,
            };
            sources::put(&mut conn, &source).await.context("Failed to register the source")?;
            println!("{secret}");
            eprintln!("Source {name} registered; its signing secret is shown only now.");
        }
        SourcesAction::List => {
            for source in sources::list(&mut conn).await? {
                println!("{}", serde_json::to_string(&source)?);
            }
        }
        SourcesAction::Revoke { name } => {
            anyhow::ensure!(sources::revoke(&mut conn, &name).await?, "No active source {name}");
            println!("revoked {name}");
        }
    }
    Ok(())
}
