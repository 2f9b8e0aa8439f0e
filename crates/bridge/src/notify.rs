//! `bridge notify`: the notifier, and the operator's commands for its
//! subscriptions and dead-lettered deliveries.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use bridge_notify::{NotifierConfig, SmsProvider, SmtpServer};
use bridge_pipeline::services::Services;
use bridge_pipeline::Pipeline;
use bridge_store::notifications::{self, NewSubscription};

use crate::Common;

/// How the notifier delivers.
#[derive(Args, Clone, Debug)]
pub struct NotifierArgs {
    /// Attempts per delivery before it is dead-lettered.
    #[arg(long, env = "BRIDGE_NOTIFY_ATTEMPTS_MAX", default_value_t = 10)]
    pub notify_attempts_max: i32,
    /// First retry delay (doubling, with jitter, up to an hour).
    #[arg(long, env = "BRIDGE_NOTIFY_RETRY_BASE_MS", default_value_t = 1_000)]
    pub notify_retry_base_ms: u64,
    /// A target failing without a success for this long is disabled.
    #[arg(long, env = "BRIDGE_NOTIFY_DISABLE_AFTER_MS", default_value_t = 24 * 3_600_000)]
    pub notify_disable_after_ms: u64,
    /// Targets served at once.
    #[arg(long, env = "BRIDGE_NOTIFY_TARGETS_IN_FLIGHT", default_value_t = 64)]
    pub notify_targets_in_flight: usize,
    /// How long a claimed delivery is one notifier's before another may
    /// take it over (after a crash); longer than any send.
    #[arg(long, env = "BRIDGE_NOTIFY_LEASE_MS", default_value_t = 60_000)]
    pub notify_lease_ms: u64,
    /// How long a delivered notification's row is kept before it is pruned
    /// (the event stays in the event log; pending and dead ones are kept).
    #[arg(long, env = "BRIDGE_NOTIFY_DELIVERED_RETENTION_MS", default_value_t = 7 * 24 * 3_600_000)]
    pub notify_delivered_retention_ms: u64,
    /// Upper bound of one webhook, Slack, SMS or SMTP exchange.
    #[arg(long, env = "BRIDGE_NOTIFY_TIMEOUT_MS", default_value_t = 5_000)]
    pub notify_timeout_ms: u64,
    /// Base URL of a Twilio-style SMS API.
    #[arg(long, env = "BRIDGE_SMS_URL")]
    pub sms_url: Option<String>,
    #[arg(long, env = "BRIDGE_SMS_ACCOUNT", default_value = "")]
    pub sms_account: String,
    #[arg(long, env = "BRIDGE_SMS_TOKEN", hide_env_values = true, default_value = "")]
    pub sms_token: String,
    /// The number SMS are sent from.
    #[arg(long, env = "BRIDGE_SMS_FROM", default_value = "")]
    pub sms_from: String,
    /// SMTP relay, `host:port`.
    #[arg(long, env = "BRIDGE_SMTP_RELAY")]
    pub smtp_relay: Option<String>,
    /// The address emails are sent from.
    #[arg(long, env = "BRIDGE_SMTP_FROM", default_value = "Bridge <notifications@bridge.invalid>")]
    pub smtp_from: String,
}

impl NotifierArgs {
    /// Reads a `credential:<name>` SMS token from the encrypted store.
    pub async fn resolve_credentials(&mut self, pool: &sqlx::PgPool) -> Result<()> {
        self.sms_token = crate::credentials::resolve(pool, &self.sms_token).await?;
        Ok(())
    }

    pub fn config(&self, outbound: std::sync::Arc<bridge_notify::outbound::OutboundPolicy>) -> Result<NotifierConfig> {
        let mut config = NotifierConfig {
            attempts_max: self.notify_attempts_max,
            retry_base_ms: self.notify_retry_base_ms,
            disable_after_ms: self.notify_disable_after_ms,
            targets_in_flight_max: self.notify_targets_in_flight,
            lease_ms: self.notify_lease_ms,
            delivered_retention_ms: self.notify_delivered_retention_ms,
            ..NotifierConfig::default()
        };
        config.channels.request_timeout_ms = self.notify_timeout_ms;
        config.channels.outbound = outbound;
        config.channels.sms = self.sms_url.as_ref().map(|base_url| SmsProvider {
            base_url: base_url.clone(),
            account_sid: self.sms_account.clone(),
            auth_token: self.sms_token.clone(),
            from: self.sms_from.clone(),
        });
        config.channels.smtp = match &self.smtp_relay {
            Some(relay) => {
                let (host, port) = relay.rsplit_once(':').context("--smtp-relay is host:port")?;
                Some(SmtpServer {
                    host: host.to_owned(),
                    port: port.parse().context("--smtp-relay port")?,
                    from: self.smtp_from.clone(),
                })
            }
            None => None,
        };
        // Webhook signing secrets are in the encrypted store; without master
        // keys the notifier can deliver every other channel.
        config.keyring = crate::credentials::keyring().ok().map(std::sync::Arc::new);
        Ok(config)
    }
}

#[derive(Args)]
pub struct NotifyArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    action: Option<NotifyAction>,
    #[command(flatten)]
    notifier: NotifierArgs,
}

#[derive(Subcommand)]
enum NotifyAction {
    /// Deliver notifications until SIGTERM (the default).
    Run,
    /// Subscribe a target; prints its id (and, for a webhook, its signing
    /// secret, shown only this once).
    Subscribe {
        /// `investor`, `fund` or `operator` (every transfer).
        #[arg(long)]
        kind: String,
        /// Investor account id or fund account id (not for operators).
        #[arg(long)]
        id: Option<String>,
        /// `webhook`, `slack`, `sms` or `email`.
        #[arg(long)]
        channel: String,
        /// URL, phone number (E.164) or email address.
        #[arg(long)]
        target: String,
        /// Transfer states to hear about, comma-separated; all by default.
        #[arg(long, value_delimiter = ',')]
        states: Vec<String>,
    },
    /// List subscriptions with their delivery counts.
    List,
    /// Enable a target again (after it was disabled for failing).
    Enable { id: i64 },
    /// Stop delivering to a target; its deliveries wait.
    Disable { id: i64 },
    /// Put dead-lettered deliveries back at the end of their queues.
    Redrive {
        /// Only this subscription's.
        #[arg(long)]
        subscription: Option<i64>,
    },
}

pub(crate) fn new_secret() -> bridge_webhooks::Secret {
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    bridge_webhooks::Secret::from_bytes(bytes)
}

pub async fn run(mut args: NotifyArgs) -> Result<()> {
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    args.notifier.resolve_credentials(&pool).await?;
    match args.action.unwrap_or(NotifyAction::Run) {
        NotifyAction::Run => {
            let config = args.common.pipeline_config(&args.common.brokers).await?;
            bridge_pipeline::kafka::ensure_topics(&config).await?;
            let pipeline = Pipeline::new(pool, config, Services::none());
            let notifier = bridge_notify::Notifier::new(
                pipeline.runtime().clone(),
                args.notifier.config(args.common.notify_outbound()?)?,
            )?;
            let shutdown = crate::shutdown_on_signal();
            args.common.serve_health(&pipeline, shutdown.clone()).await?;
            notifier.run(shutdown).await?;
        }
        NotifyAction::Subscribe { kind, id, channel, target, states } => {
            if !["investor", "fund", "operator"].contains(&kind.as_str()) {
                bail!("--kind must be investor, fund or operator");
            }
            if (kind == "operator") != id.is_none() {
                bail!("--id names the investor or fund account; operators hear about every transfer and take none");
            }
            for state in &states {
                bridge_domain::TransferState::parse(state).with_context(|| format!("unknown state {state:?}"))?;
            }
            bridge_notify::channels::validate_target(&channel, &target, &*args.common.notify_outbound()?)
                .map_err(anyhow::Error::msg)?;
            let secret = (channel == "webhook").then(new_secret);
            let mut conn = pool.acquire().await?;
            // The secret is kept encrypted; the subscription holds a reference.
            let reference = match &secret {
                Some(secret) => {
                    let keyring = crate::credentials::keyring().context("Webhook secrets are stored encrypted")?;
                    let value = bridge_secrets::SecretString::from(secret.expose());
                    Some(bridge_secrets::store_new(&mut conn, &keyring, "webhook-secret", &value).await?)
                }
                None => None,
            };
            // A webhook or Slack URL can itself be a secret: sealed too.
            let (target, sealed_target) = if matches!(channel.as_str(), "webhook" | "slack") {
                let keyring =
                    crate::credentials::keyring().context("Webhook and Slack targets are stored encrypted")?;
                let (reference, shown) = bridge_notify::outbound::seal(&mut conn, &keyring, &target).await?;
                (shown, Some(reference))
            } else {
                (target, None)
            };
            let subscription = NewSubscription {
                subscriber_kind: kind,
                subscriber_id: id,
                states,
                channel,
                target,
                secret: reference,
                sealed_target,
            };
            let id = notifications::subscribe(&mut conn, &subscription).await?;
            println!("subscription {id}");
            if let Some(secret) = secret {
                println!("signing secret {} (shown once)", secret.expose());
            }
        }
        NotifyAction::List => {
            let mut conn = pool.acquire().await?;
            for subscription in notifications::subscriptions(&mut conn).await? {
                let counts = notifications::delivery_counts(&mut conn, Some(subscription.id)).await?;
                println!(
                    "{} {} {} {} -> {} states={:?} {} deliveries={:?}",
                    subscription.id,
                    subscription.subscriber_kind,
                    subscription.subscriber_id.as_deref().unwrap_or("*"),
                    subscription.channel,
                    subscription.target,
                    subscription.states,
                    match (&subscription.enabled, &subscription.disabled_reason) {
                        (true, _) => "enabled".to_owned(),
                        (false, reason) => format!("disabled ({})", reason.as_deref().unwrap_or("by an operator")),
                    },
                    counts
                );
            }
        }
        NotifyAction::Enable { id } => {
            let mut conn = pool.acquire().await?;
            if !notifications::set_enabled(&mut conn, id, true, None).await? {
                bail!("no subscription {id}");
            }
            println!("subscription {id} enabled");
        }
        NotifyAction::Disable { id } => {
            let mut conn = pool.acquire().await?;
            if !notifications::set_enabled(&mut conn, id, false, Some("disabled by an operator")).await? {
                bail!("no subscription {id}");
            }
            println!("subscription {id} disabled");
        }
        NotifyAction::Redrive { subscription } => {
            let mut conn = pool.acquire().await?;
            let count = notifications::redrive(&mut conn, subscription).await?;
            println!("{count} deliveries back in their queues");
        }
    }
    Ok(())
}
