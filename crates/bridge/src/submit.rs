//! `bridge submit`: publish transfer requests as an upstream system would.

use anyhow::{Context, Result};
use chrono::Utc;
use clap::Args;
use uuid::Uuid;

use bridge_codec::TransferRequested;
use bridge_pipeline::demo::DemoData;
use bridge_pipeline::{kafka, upstream};

use crate::Common;

#[derive(Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    common: Common,
    /// Publish N generated demo requests instead of one from flags.
    #[arg(long)]
    generate: Option<usize>,
    /// Demo namespace for generated requests (see `bridge seed`).
    #[arg(long, default_value = "demo")]
    namespace: String,
    /// Seed of the deterministic generator.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[arg(long, required_unless_present = "generate")]
    investor: Option<String>,
    #[arg(long, required_unless_present = "generate")]
    fund_account: Option<String>,
    /// Amount in minor units (cents).
    #[arg(long, required_unless_present = "generate")]
    amount_minor: Option<i64>,
    #[arg(long, default_value = "EUR")]
    currency: String,
    /// Transfer id (a UUID); a fresh one if omitted. Reusing one is how a
    /// client retries safely.
    #[arg(long)]
    transfer_id: Option<Uuid>,
    #[arg(long, default_value = "")]
    reference: String,
    /// Sign the requests as this registered source (`bridge sources add`);
    /// its name is also the requests' `source_system`.
    #[arg(long, env = "BRIDGE_SOURCE", requires = "source_secret")]
    source: Option<String>,
    /// The source's signing secret (`whsec_...`, or `credential:<name>`).
    #[arg(long, env = "BRIDGE_SOURCE_SECRET", hide_env_values = true)]
    source_secret: Option<String>,
}

pub async fn run(args: SubmitArgs) -> Result<()> {
    let config = args.common.pipeline_config(&args.common.brokers).await?;
    kafka::ensure_topics(&config).await?;
    let producer = kafka::upstream_producer(&config)?;
    let signer = match (&args.source, &args.source_secret) {
        (Some(source), Some(secret)) => {
            let mut secret = Some(secret.clone());
            if secret.as_deref().is_some_and(|text| text.starts_with(bridge_secrets::REFERENCE_PREFIX)) {
                let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
                crate::credentials::resolve_option(&pool, &mut secret).await?;
            }
            let secret = bridge_webhooks::Secret::parse(secret.as_deref().unwrap_or_default())
                .context("The source secret is not a whsec_ secret")?;
            Some((source.clone(), secret))
        }
        _ => None,
    };
    let source_system = args.source.clone().unwrap_or_else(|| "bridge-submit".to_owned());
    let mut requests = match args.generate {
        Some(count) => DemoData::new(&args.namespace, 200, args.seed).requests(count, args.seed),
        None => vec![TransferRequested {
            transfer_id: args.transfer_id.unwrap_or_else(Uuid::new_v4).to_string(),
            investor_account_id: args.investor.context("--investor is required")?,
            fund_account_id: args.fund_account.context("--fund-account is required")?,
            amount_minor: args.amount_minor.context("--amount-minor is required")?,
            currency: args.currency,
            requested_at: Utc::now().timestamp_millis(),
            reference: args.reference,
            source_system: source_system.clone(),
        }],
    };
    // A signed request names the source that signed it.
    if args.source.is_some() {
        for request in &mut requests {
            request.source_system = source_system.clone();
        }
    }
    for request in &requests {
        let signer = signer.as_ref().map(|(source, secret)| (source.as_str(), secret));
        upstream::publish_signed_request(&producer, &config.topics, request, signer).await?;
        println!("{}", request.transfer_id);
    }
    Ok(())
}
