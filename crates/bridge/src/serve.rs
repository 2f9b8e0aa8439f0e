//! The commands that run a long-lived process: the pipeline, the API,
//! the simulator.

use anyhow::{Context, Result};

use crate::*;

/// `bridge run`: the parts of the pipeline this process runs, with the
/// notifier, the API and the health listener as asked.
pub async fn run(args: RunArgs) -> Result<()> {
    let mut parts = Vec::new();
    for name in &args.stages {
        let stage = StageName::parse(name).with_context(|| {
            format!("Unknown stage {name:?}; expected validator, withdrawal, deposit or completion")
        })?;
        parts.push(Part::Stage(stage));
    }
    if args.relay {
        parts.push(Part::Relay);
    }
    if args.settlement {
        parts.push(Part::Settlement);
    }
    let notify = args.notify || parts.is_empty();
    if parts.is_empty() {
        parts = Part::all();
    }
    let mut config = args.common.pipeline_config(&args.common.brokers).await?;
    args.settlement_args.apply(&mut config);
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    let mut args = args;
    args.services.resolve_credentials(&pool).await?;
    args.api.resolve_credentials(&pool).await?;
    args.notifier.resolve_credentials(&pool).await?;
    kafka::ensure_topics(&config).await?;
    // Callbacks run the money-moving steps too.
    let calls_services = args.api.api_listen.is_some()
        || parts.iter().any(|part| {
            matches!(part, Part::Stage(StageName::Withdrawal) | Part::Stage(StageName::Deposit) | Part::Settlement)
        });
    let services = if calls_services { args.services.services(&pool)? } else { Services::none() };
    let mut pipeline = credentials::with_bank_access(Pipeline::new(pool, config, services))?;
    if args.require_signed_requests {
        pipeline = pipeline.require_signed_requests(std::sync::Arc::new(
            credentials::keyring().context("--require-signed-requests opens the sources' secrets")?,
        ));
    }
    // Before the API takes requests, whose events need the ids.
    pipeline.prepare().await?;
    let shutdown = shutdown_on_signal();
    let api = args.api.serve(&args.common, &pipeline, shutdown.clone()).await?;
    args.common.serve_health(&pipeline, shutdown.clone()).await?;
    let notifier = match notify {
        true => {
            let notifier = bridge_notify::Notifier::new(
                pipeline.runtime().clone(),
                args.notifier.config(args.common.notify_outbound()?)?,
            )?;
            let token = shutdown.clone();
            Some(tokio::spawn(async move { notifier.run(token).await }))
        }
        false => None,
    };
    let result = pipeline.run(&parts, shutdown.clone()).await;
    shutdown.cancel();
    if let Some(notifier) = notifier {
        notifier.await.context("Notifier task panicked")?.context("Notifier failed")?;
    }
    if let Some(api) = api {
        api.await.context("API task panicked")?.context("API failed")?;
    }
    result?;
    Ok(())
}

/// `bridge api`: the HTTP API alone.
pub async fn api(mut args: ApiCommandArgs) -> Result<()> {
    let mut config = args.common.pipeline_config(&args.common.brokers).await?;
    args.settlement.apply(&mut config);
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    args.services.resolve_credentials(&pool).await?;
    args.api.resolve_credentials(&pool).await?;
    let services = args.services.services(&pool)?;
    let pipeline = credentials::with_bank_access(Pipeline::new(pool, config, services))?;
    pipeline.prepare().await?;
    args.api.api_listen.get_or_insert_with(|| "127.0.0.1:8080".to_owned());
    let shutdown = shutdown_on_signal();
    // Probes on their own listener (--health-listen), apart from the
    // API's connections and their cap.
    args.common.serve_health(&pipeline, shutdown.clone()).await?;
    if let Some(api) = args.api.serve(&args.common, &pipeline, shutdown).await? {
        api.await.context("API task panicked")?.context("API failed")?;
    }
    Ok(())
}

/// `bridge sim`: the account-service simulator over HTTP.
pub async fn sim(args: SimArgs) -> Result<()> {
    let plan = fault_plan(&args.faults, args.seed)?;
    let mut bank = match args.books {
        SimBooks::Database => {
            let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
            bridge_store::migrate(&pool).await.context("Failed to migrate")?;
            bridge_sim::Bank::new(pool, plan)
        }
        SimBooks::Memory => bridge_sim::Bank::in_memory(plan),
    };
    if let Some(base_url) = args.callback_url {
        let secret = args.callback_secret.context("--callback-url needs --callback-secret")?;
        let secret = bridge_webhooks::Secret::parse(&secret).context("The callback secret is not valid")?;
        let api_key = args.callback_api_key.clone();
        bank = bank.with_callbacks(bridge_sim::CallbackTarget { base_url, secret, api_key });
    }
    let bank = std::sync::Arc::new(bank);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("Failed to listen on {}", args.listen))?;
    tracing::info!(
        address = %listener.local_addr()?,
        faults = %args.faults,
        books = ?args.books,
        "Account-service simulator listening"
    );
    bridge_sim::http::serve(listener, bridge_sim::http::router(bank, args.token), shutdown_on_signal()).await?;
    Ok(())
}
