//! The operator's one-shot commands: schema, seed data, keys, fund terms,
//! the event log's rebuild and the invariant checks.

use anyhow::{Context, Result};

use crate::*;

/// `bridge migrate`: the database (created if missing), its schema, and
/// with `--topics` the topics.
pub async fn migrate(args: MigrateArgs) -> Result<()> {
    bridge_store::ensure_database(&args.common.database_url).await.context("Failed to create the database")?;
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    bridge_store::migrate(&pool).await.context("Failed to migrate")?;
    if args.topics {
        kafka::ensure_topics(&args.common.pipeline_config(&args.common.brokers).await?).await?;
    }
    println!("migrated");
    Ok(())
}

/// `bridge seed`: the demo's investors, funds and accounts.
pub async fn seed(args: SeedArgs) -> Result<()> {
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    let data = bridge_pipeline::demo::DemoData::new(&args.namespace, args.investors, args.seed);
    data.seed(&pool).await.context("Failed to seed")?;
    println!("seeded namespace {} with {} investors and 4 funds", args.namespace, data.investors.len());
    Ok(())
}

/// `bridge rebuild`: the event log read back from the status topic and
/// compared; exits 1 unless consistent (or made so with `--apply`).
pub async fn rebuild(args: RebuildArgs) -> Result<()> {
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    let pipeline = Pipeline::new(pool, args.common.pipeline_config(&args.common.brokers).await?, Services::none());
    pipeline.prepare().await?;
    let report = bridge_notify::rebuild::run(pipeline.runtime(), args.apply, args.idle_ms).await?;
    println!("{}", serde_json::to_string(&report)?);
    let lossless = report.comparison.versions_never_published == 0 && report.comparison.differing == 0;
    if !(report.consistent() || (args.apply && lossless)) {
        std::process::exit(1);
    }
    Ok(())
}

/// `bridge keys`: API keys created, listed and revoked.
pub async fn keys(args: KeysArgs) -> Result<()> {
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    let mut conn = pool.acquire().await?;
    match args.action {
        KeysAction::Create { name, scopes, investor } => {
            let created = bridge_api::auth::create_key(&mut conn, &name, &scopes, investor.as_deref()).await?;
            println!("{}", created.full_key);
            eprintln!("Key {} created; it is shown only now.", created.key.prefix);
        }
        KeysAction::List => {
            for key in bridge_store::api::keys(&mut conn).await? {
                println!(
                    "brk_{} {:?} scopes={} investor={} created={} {}",
                    key.prefix,
                    key.name,
                    key.scopes.join(","),
                    key.investor_account_id.as_deref().unwrap_or("*"),
                    key.created_at.to_rfc3339(),
                    key.revoked_at.map_or("active".to_owned(), |at| format!("revoked {}", at.to_rfc3339()))
                );
            }
        }
        KeysAction::Revoke { prefix } => {
            let prefix = prefix.trim_start_matches("brk_").split('_').next().unwrap_or_default().to_owned();
            if !bridge_store::api::revoke_key(&mut conn, &prefix).await? {
                anyhow::bail!("No active key with prefix {prefix}");
            }
            println!("revoked brk_{prefix}");
        }
    }
    Ok(())
}

/// `bridge funds-sync`: every fund's terms read from the fund
/// administrator now; exits 1 if any were refused.
pub async fn funds_sync(mut args: FundsSyncArgs) -> Result<()> {
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    args.services.resolve_credentials(&pool).await?;
    let services = args.services.services(&pool)?;
    let pipeline = Pipeline::new(pool, args.common.pipeline_config(&args.common.brokers).await?, services);
    let report = bridge_pipeline::fund_terms::sync(pipeline.context()).await?;
    println!(
        "{} funds checked, {} updated {:?}, {} unknown to the administrator {:?}",
        report.checked,
        report.updated.len(),
        report.updated,
        report.unknown.len(),
        report.unknown
    );
    for (fund, reason) in &report.refused {
        println!("refused {fund}: {reason}");
    }
    for (fund, error) in &report.failed {
        println!("could not read {fund}: {error}");
    }
    if !report.refused.is_empty() || !report.failed.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

/// `bridge reconcile`: the invariant checks; exits 1 on any violation.
pub async fn reconcile(args: ReconcileArgs) -> Result<()> {
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    let mut conn = pool.acquire().await?;
    let report = bridge_store::reconcile::run_with(&mut conn, args.idle_after_secs).await?;
    if args.json {
        // For monitoring and scripts: the whole report, with the verdict.
        let mut value = serde_json::to_value(&report)?;
        value["ok"] = serde_json::Value::Bool(report.ok());
        println!("{value}");
        if !report.ok() {
            std::process::exit(1);
        }
        return Ok(());
    }
    for check in &report.checks {
        let mark = if check.violations == 0 { "ok  " } else { "FAIL" };
        let named = match check.examples.as_slice() {
            [] => String::new(),
            examples => format!(": {}", examples.join(", ")),
        };
        println!("{mark} {} {} ({} violations{named})", check.invariant, check.name, check.violations);
    }
    println!(
        "in flight: {}, manual review: {}, pending at services: {}, outbox unpublished: {}",
        report.in_flight, report.manual_review, report.pending_steps, report.outbox_unpublished
    );
    if !report.ok() {
        std::process::exit(1);
    }
    Ok(())
}

#[derive(Args)]
pub struct InvestorsArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    action: InvestorsAction,
}

#[derive(clap::Subcommand)]
enum InvestorsAction {
    /// An investor's attributes (residence, accreditation) and version.
    Show {
        /// The investor account.
        id: String,
    },
    /// Set what funds' rules read about an investor; what is not given
    /// stays as it is. Recorded in the account's history under
    /// BRIDGE_OPERATOR (or USER).
    Attributes {
        /// The investor account.
        id: String,
        /// Residence as an ISO 3166-1 alpha-2 code (`DE`), or `none`.
        #[arg(long)]
        residence: Option<String>,
        /// Whether the investor is accredited.
        #[arg(long)]
        accredited: Option<bool>,
    },
}

/// `bridge investors`: read and set the attributes funds' rules read.
pub async fn investors(args: InvestorsArgs) -> Result<()> {
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    let mut tx = pool.begin().await?;
    let (id, residence, accredited) = match &args.action {
        InvestorsAction::Show { id } => (id, None, None),
        InvestorsAction::Attributes { id, residence, accredited } => (id, residence.as_deref(), *accredited),
    };
    let account =
        bridge_store::accounts::investor(&mut tx, id).await?.with_context(|| format!("No investor account {id}"))?;
    let mut attributes = account.value.attributes;
    let mut version = account.version;
    let before = attributes;
    attributes.residence = match residence {
        None => attributes.residence,
        Some("none") => None,
        Some(code) => Some(bridge_domain::CountryCode::parse(code)?),
    };
    attributes.accredited = accredited.unwrap_or(attributes.accredited);
    // Nothing to change writes nothing: no version, no history entry.
    if attributes != before {
        let operator = std::env::var("BRIDGE_OPERATOR").or_else(|_| std::env::var("USER")).unwrap_or_default();
        bridge_store::set_actor(&mut tx, &format!("cli:{}", operator.trim())).await?;
        // Against the version just read: a change made meanwhile by someone
        // else is a conflict, not overwritten.
        version = bridge_store::accounts::set_investor_attributes(&mut tx, id, attributes, Some(version))
            .await?
            .with_context(|| format!("No investor account {id}"))?;
    }
    tx.commit().await?;
    let residence = attributes.residence.map_or_else(|| "none".to_owned(), |code| code.to_string());
    println!("{id}: residence {residence}, accredited {}, version {version}", attributes.accredited);
    Ok(())
}
