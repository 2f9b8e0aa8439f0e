//! `bridge schemas check|register`: the deployment step for registries that
//! applications may only read. `check` runs before a rollout and fails it
//! if a schema Bridge would write is incompatible with what the registry
//! holds (under the subject's own compatibility level, and both ways
//! against its latest version); `register` then registers them, with
//! credentials that may write.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use bridge_pipeline::schema_registry::SchemaRegistry;

use crate::Common;

#[derive(Args)]
pub struct SchemasArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    action: SchemasAction,
}

#[derive(Subcommand)]
enum SchemasAction {
    /// Check every schema Bridge writes against the registry; exit non-zero
    /// if one is incompatible.
    Check,
    /// Register every schema Bridge writes (after `check`).
    Register,
}

pub async fn run(args: SchemasArgs) -> Result<()> {
    let config = args.common.pipeline_config(&args.common.brokers).await?;
    let url = config.schema_registry_url.as_deref().context("Set the schema registry (--schema-registry-url)")?;
    let registry =
        SchemaRegistry::new(url, config.schema_registry_timeout_ms, config.schema_registry_auth.clone(), false);
    match args.action {
        SchemasAction::Check => {
            let checks = registry.check(&config.topics).await?;
            let mut incompatible = 0;
            for check in &checks {
                if check.problems.is_empty() {
                    let verdict = if check.new_subject { "new subject" } else { "compatible" };
                    println!("{}: {verdict}", check.subject);
                } else {
                    incompatible += 1;
                    println!("{}: INCOMPATIBLE", check.subject);
                    for problem in &check.problems {
                        println!("  - {problem}");
                    }
                }
            }
            if incompatible > 0 {
                bail!("{incompatible} schema(s) incompatible with the registry's");
            }
        }
        SchemasAction::Register => {
            for (subject, id) in registry.register_all(&config.topics).await? {
                println!("{subject}: id {id}");
            }
        }
    }
    Ok(())
}
