//! The command line as the audit log and Postgres see it: which subcommand
//! ran (the process's `application_name`, the actor of changes no
//! transaction attributes otherwise), the audit record of an operator's
//! change, and `bridge audit`, which reads the log.

use anyhow::Result;
use clap::{ArgMatches, Args};

use bridge_store::PoolSettings;

use crate::Common;

/// What an operator changes at the command line, written to the audit log
/// (the API records its own): the subcommand path, as `keys revoke`.
const AUDITED: [&str; 21] = [
    "keys create",
    "keys revoke",
    "sources add",
    "sources revoke",
    "credentials set",
    "credentials rotate",
    "credentials investor set",
    "credentials investor revoke",
    "notify subscribe",
    "notify enable",
    "notify disable",
    "notify redrive",
    "dlq redrive",
    "review retry",
    "review fail",
    "review refunded",
    "review complete",
    "review approve",
    "review reject",
    "schemas register",
    "investors attributes",
];

/// One run of `bridge`, from its parsed command line only: subcommands,
/// stages, positional arguments (names, ids, prefixes; never a secret,
/// which commands read from standard input or the environment) and the
/// database. No flag's value, so a URL with a password reaches neither
/// Postgres's `application_name` nor the audit log.
pub struct Invocation {
    path: Vec<String>,
    stages: Vec<String>,
    target: Vec<String>,
    database_url: Option<String>,
}

impl Invocation {
    pub fn of(command: &clap::Command, matches: &ArgMatches) -> Self {
        let (mut command, mut leaf) = (command, matches);
        let mut path = Vec::new();
        while let Some((name, sub)) = leaf.subcommand() {
            path.push(name.to_owned());
            leaf = sub;
            match command.find_subcommand(name) {
                Some(sub_command) => command = sub_command,
                None => break,
            }
        }
        let stages = leaf.try_get_many::<String>("stages").ok().flatten().into_iter().flatten().cloned().collect();
        let target = command
            .get_positionals()
            .filter_map(|arg| leaf.try_get_raw(arg.get_id().as_str()).ok().flatten())
            .flatten()
            .map(|value| value.to_string_lossy().into_owned())
            .collect();
        let database_url = leaf.try_get_one::<String>("database_url").ok().flatten().cloned();
        Self { path, stages, target, database_url }
    }

    /// `bridge run --stage validator`, `bridge review retry`.
    pub fn process_name(&self) -> String {
        let mut words = vec!["bridge".to_owned()];
        words.extend(self.path.iter().cloned());
        words.extend(self.stages.iter().map(|stage| format!("--stage {stage}")));
        // Postgres keeps 63 bytes of it.
        words.join(" ").chars().take(60).collect()
    }

    /// Writes the audit record of an operator's change and how it ended;
    /// nothing for other commands.
    pub async fn record(&self, result: &Result<()>) {
        let action = self.path.join(" ");
        let Some(database_url) = self.database_url.as_deref().filter(|_| AUDITED.contains(&action.as_str())) else {
            return;
        };
        let actor = std::env::var("BRIDGE_OPERATOR")
            .or_else(|_| std::env::var("USER"))
            .map(|name| format!("{name} (cli)"))
            .unwrap_or_else(|_| "unknown (cli)".to_owned());
        let outcome = match result {
            Ok(()) => "ok".to_owned(),
            Err(error) => format!("error: {error:#}").chars().take(500).collect(),
        };
        let settings = PoolSettings { connections_max: 1, ..PoolSettings::default() };
        let target = self.target.join(" ");
        let recorded = async {
            let pool = bridge_store::connect(database_url, &settings).await?;
            let mut conn = pool.acquire().await?;
            bridge_store::audit::record(&mut conn, &actor, &action, &target, "cli", &outcome).await?;
            anyhow::Ok(())
        };
        if let Err(error) = recorded.await {
            eprintln!("warning: could not write the audit record of `{action}`: {error:#}");
        }
    }
}

#[derive(Args)]
pub struct AuditArgs {
    #[command(flatten)]
    common: Common,
    /// At most this many records.
    #[arg(long, default_value_t = 50)]
    limit: i64,
    /// Only records older than this id (the next page).
    #[arg(long)]
    before: Option<i64>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

/// `bridge audit`: the log, newest first.
pub async fn list(args: AuditArgs) -> Result<()> {
    let pool = bridge_store::connect(&args.common.database_url, &args.common.pool_settings()).await?;
    let mut conn = pool.acquire().await?;
    for record in bridge_store::audit::list(&mut conn, args.limit, args.before).await? {
        if args.json {
            println!("{}", serde_json::to_string(&record)?);
        } else {
            let target = if record.target.is_empty() { String::new() } else { format!(" {}", record.target) };
            println!(
                "{:>6} {} {} {}{target} from {}: {}",
                record.id,
                record.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                record.actor,
                record.action,
                record.source,
                record.outcome
            );
        }
    }
    Ok(())
}
