//! The test kit's schema registry as a process of its own, for clients that
//! are not ours (the Python examples):
//!
//!     schema-registry-sim [--user NAME:PASSWORD:read|write]...
//!
//! prints its URL on the first line and serves until killed.

use anyhow::{bail, Context, Result};
use bridge_testkit::schema_registry::SchemaRegistryServer;

#[tokio::main]
async fn main() -> Result<()> {
    let registry = SchemaRegistryServer::start().await?;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--user" => {
                let spec = args.next().context("--user needs NAME:PASSWORD:read|write")?;
                let mut parts = spec.splitn(3, ':');
                let (Some(name), Some(password), Some(mode)) = (parts.next(), parts.next(), parts.next()) else {
                    bail!("--user needs NAME:PASSWORD:read|write, got {spec:?}");
                };
                registry.add_user(name, password, mode == "write");
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    println!("{}", registry.url);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
