//! `bridge review`: the transfers waiting for a person, and their
//! resolutions (see `bridge_pipeline::stages::resolve`).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use uuid::Uuid;

use bridge_domain::Resolution;
use bridge_pipeline::stages::resolve::{self, ResolutionRequest, Resolved};
use bridge_store::reviews::{self, Operator};

use crate::*;

#[derive(Args)]
pub struct ReviewArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    settlement: SettlementArgs,
    #[command(flatten)]
    services: ServiceArgs,
    /// Who is acting, as the transfer's history will name them.
    #[arg(long, env = "BRIDGE_OPERATOR", global = true)]
    operator: Option<String>,
    /// Operators a resolution needs: 2 makes a second, different operator
    /// approve each before it runs (four-eyes).
    #[arg(long, env = "BRIDGE_REVIEW_APPROVALS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2), global = true)]
    review_approvals: u8,
    #[command(subcommand)]
    action: ReviewAction,
}

#[derive(Args)]
struct Resolve {
    /// The transfer in manual review.
    transfer_id: Uuid,
    /// Why, in your words: kept in the transfer's history.
    #[arg(long)]
    reason: String,
    /// The outside operation (a bank's refund reference, the fund
    /// administrator's confirmation): required by `refunded` and `complete`.
    #[arg(long)]
    reference: Option<String>,
}

#[derive(Subcommand)]
enum ReviewAction {
    /// The transfers in manual review, oldest first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// A transfer's story: state, where it froze and why, its history with
    /// who acted, its ledger lines and its resolutions.
    Show { transfer_id: Uuid },
    /// Ask the service for the step again, under the same idempotency key;
    /// with --new-attempt the old operation is cancelled at the service
    /// first and, unless it had settled, a new one is made under a new key.
    Retry {
        #[command(flatten)]
        resolve: Resolve,
        #[arg(long)]
        new_attempt: bool,
    },
    /// Cancel the step at its service and compensate: held funds released,
    /// or money in transit refunded to the investor through the bank.
    Fail {
        #[command(flatten)]
        resolve: Resolve,
    },
    /// Record a refund to the investor made outside Bridge (money in
    /// transit only).
    Refunded {
        #[command(flatten)]
        resolve: Resolve,
    },
    /// Record the deposit as confirmed by the fund administrator outside
    /// Bridge (money in transit only); the completion stage completes it.
    Complete {
        #[command(flatten)]
        resolve: Resolve,
    },
    /// Approve a resolution another operator asked for; it runs now.
    Approve { action_id: Uuid },
    /// Turn down (or withdraw your own) resolution waiting for approval.
    Reject {
        action_id: Uuid,
        #[arg(long)]
        reason: String,
    },
}

pub async fn run(args: ReviewArgs) -> Result<()> {
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    // Reading needs only the database.
    match &args.action {
        ReviewAction::List { json } => return list(&mut *pool.acquire().await?, *json).await,
        ReviewAction::Show { transfer_id } => return show(&mut *pool.acquire().await?, *transfer_id).await,
        _ => {}
    }
    let name = args.operator.clone().context("Name yourself with --operator (or BRIDGE_OPERATOR)")?;
    anyhow::ensure!(!name.trim().is_empty(), "--operator must not be empty");
    // From the command line an operator is their name; through the API, the
    // key they hold.
    let operator = Operator { id: format!("cli:{}", name.trim()), name: name.trim().to_owned() };
    let mut config = args.common.pipeline_config(&args.common.brokers).await?;
    args.settlement.apply(&mut config);
    let mut services_args = args.services;
    services_args.resolve_credentials(&pool).await?;
    let services = services_args.services(&pool)?;
    let pipeline = crate::credentials::with_bank_access(Pipeline::new(pool, config, services))?;
    pipeline.prepare().await?;
    let ctx = pipeline.context();
    let asked = |resolution, resolve: &Resolve, new_attempt| {
        let asked = ResolutionRequest {
            resolution,
            reason: resolve.reason.clone(),
            reference: resolve.reference.clone(),
            new_attempt,
            idempotency_key: None,
        };
        (resolve.transfer_id, asked)
    };
    let (transfer_id, asked) = match &args.action {
        ReviewAction::List { .. } | ReviewAction::Show { .. } => return Ok(()),
        ReviewAction::Retry { resolve, new_attempt } => asked(Resolution::Retry, resolve, *new_attempt),
        ReviewAction::Fail { resolve } => asked(Resolution::Fail, resolve, false),
        ReviewAction::Refunded { resolve } => asked(Resolution::Refunded, resolve, false),
        ReviewAction::Complete { resolve } => asked(Resolution::Complete, resolve, false),
        ReviewAction::Approve { action_id } => {
            return print_resolved(resolve::approve(ctx, *action_id, &operator).await?);
        }
        ReviewAction::Reject { action_id, reason } => {
            let action = resolve::reject(ctx, *action_id, &operator, reason).await?;
            println!("{}", serde_json::to_string_pretty(&action)?);
            return Ok(());
        }
    };
    print_resolved(resolve::request(ctx, transfer_id, &asked, &operator, args.review_approvals).await?)
}

/// Prints what a resolution came to; exits 1 if it changed nothing.
fn print_resolved(Resolved { action, transfer }: Resolved) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "action": action,
            "transfer": reviews::transfer_json(&transfer),
        }))?
    );
    if action.status == reviews::ActionStatus::NotApplied {
        std::process::exit(1);
    }
    Ok(())
}

async fn list(conn: &mut sqlx::PgConnection, as_json: bool) -> Result<()> {
    let waiting = reviews::waiting(conn, 10_000).await?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&waiting)?);
        return Ok(());
    }
    if waiting.is_empty() {
        println!("No transfer is waiting for a person.");
    }
    for review in waiting {
        println!(
            "{}  since {}  {} {} {}  froze in {}  {}{}",
            review.transfer_id,
            review.since.format("%Y-%m-%d %H:%M:%S"),
            review.amount_minor,
            review.currency,
            review.investor_account_id,
            review.frozen_in.as_deref().unwrap_or("?"),
            review.reason_code.as_deref().unwrap_or("-"),
            review.open_action.map_or(String::new(), |id| format!("  (resolution {id} open)")),
        );
    }
    Ok(())
}

async fn show(conn: &mut sqlx::PgConnection, transfer_id: Uuid) -> Result<()> {
    let story = reviews::story(conn, transfer_id).await?.with_context(|| format!("No transfer {transfer_id}"))?;
    println!("{}", serde_json::to_string_pretty(&story)?);
    Ok(())
}
