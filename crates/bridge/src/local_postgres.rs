//! Finding a Postgres for `bridge demo`: the configured URL, else the usual
//! local server, else a private throw-away cluster started from the locally
//! installed server binaries.

use std::time::Duration;

use anyhow::{Context, Result};

pub use bridge_store::local_cluster::TemporaryCluster;

/// Returns a usable database URL and, when one had to be started, the
/// temporary cluster serving it (keep it alive while the URL is in use).
pub async fn resolve(explicit: Option<String>, default_url: &str) -> Result<(String, Option<TemporaryCluster>)> {
    if let Some(url) = explicit {
        bridge_store::ensure_database(&url).await.with_context(|| format!("Failed to reach Postgres at {url}"))?;
        return Ok((url, None));
    }
    let reachable = tokio::time::timeout(Duration::from_secs(5), bridge_store::ensure_database(default_url)).await;
    match reachable {
        Ok(Ok(())) => return Ok((default_url.to_owned(), None)),
        Ok(Err(error)) => eprintln!("Postgres at {default_url} is not usable ({error}); starting a temporary cluster"),
        Err(_) => eprintln!("Postgres at {default_url} did not answer; starting a temporary cluster"),
    }
    let cluster = tokio::task::spawn_blocking(TemporaryCluster::start).await?.context(
        "No Postgres available: set DATABASE_URL, run one on 127.0.0.1:5432, or install the PostgreSQL server binaries",
    )?;
    bridge_store::ensure_database(&cluster.url).await?;
    let url = cluster.url.clone();
    Ok((url, Some(cluster)))
}
