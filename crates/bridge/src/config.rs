//! One configuration for every subcommand: command-line flags, environment
//! variables and a TOML file, in that order of precedence, over the
//! documented defaults (`bridge <command> --help` lists every setting with
//! its variable and default).
//!
//! The file (`--config <path>` or `BRIDGE_CONFIG`) uses the flags' long
//! names as keys, e.g. `database-url = "postgres://…"`,
//! `topic-partitions = 12`, `stage = ["validator"]`. A key no subcommand
//! knows is an error (a typo must not silently fall back to a default); a
//! key another subcommand knows is ignored, so one file serves them all.
//! clap stays the one typed definition of every setting: the file's values
//! are handed to it as flags, only for settings that neither a flag nor a
//! variable set, and so pass through the same parsers and checks.
//!
//! `bridge config` prints the settings `bridge run` would use, where each
//! came from, and secrets redacted.

use std::collections::BTreeSet;
use std::ffi::OsString;

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory};

/// The flag and variable that name the configuration file.
const FLAG: &str = "config";
const VARIABLE: &str = "BRIDGE_CONFIG";

/// What a redacted value is shown as.
pub const REDACTED: &str = "<redacted>";

/// The command line with the configuration file's settings added as flags,
/// and the names of the settings the file supplied.
pub fn resolve_args<C: CommandFactory>(args: Vec<OsString>) -> Result<Resolved> {
    let Some(path) = file_path(&args) else { return Ok(Resolved { args, from_file: BTreeSet::new() }) };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("Failed to read the configuration file {path}"))?;
    let table: toml::Table =
        text.parse().with_context(|| format!("The configuration file {path} is not valid TOML"))?;
    // Parse once without the file to learn which settings a flag or a
    // variable already set. Missing required settings are not an error
    // here (the file may supply them); any other error is reported by the
    // real parse.
    let command = C::command();
    let Ok(matches) = command.clone().ignore_errors(true).try_get_matches_from(&args) else {
        return Ok(Resolved { args, from_file: BTreeSet::new() });
    };
    // A setting goes right after the (sub)command that defines it: the
    // database flag of `keys` is not a flag of `keys create`, so appended
    // after `create` it would not be read.
    let levels = levels(&command, &matches, &args);
    let mut insertions: Vec<Vec<OsString>> = vec![Vec::new(); levels.len()];
    let known = all_long_names(&command);
    let mut from_file = BTreeSet::new();
    for (key, value) in &table {
        let name = key.replace('_', "-");
        if name == FLAG {
            bail!("{path}: a configuration file cannot name another one");
        }
        if !known.contains(&name) {
            bail!("{path}: unknown setting {key:?} (settings are the long flag names of `bridge <command> --help`)");
        }
        // The innermost (sub)command on the command line that has the
        // setting; a setting of another command is ignored.
        let Some((level, arg)) = levels.iter().enumerate().rev().find_map(|(level, (command, _, _))| {
            command.get_arguments().find(|arg| arg.get_long() == Some(name.as_str())).map(|arg| (level, arg))
        }) else {
            continue;
        };
        let id = arg.get_id().as_str();
        if !matches!(levels[level].1.value_source(id), None | Some(ValueSource::DefaultValue)) {
            continue;
        }
        from_file.insert(name.clone());
        // The action, not the number of values: that is known only once
        // the command is built, and a boolean set to a value (`--x=true`)
        // must not be taken for a flag.
        let takes_value = arg.get_action().takes_values();
        let flags = &mut insertions[level];
        match value {
            toml::Value::Boolean(set) if !takes_value => {
                if *set {
                    flags.push(format!("--{name}").into());
                }
            }
            toml::Value::Array(items) => {
                for item in items {
                    flags.push(format!("--{name}={}", scalar(&path, key, item)?).into());
                }
            }
            other => flags.push(format!("--{name}={}", scalar(&path, key, other)?).into()),
        }
    }
    let mut extended = args;
    // From the last position back, so each insertion leaves the earlier
    // positions where they were.
    for ((_, _, at), flags) in levels.iter().zip(insertions).rev() {
        extended.splice(*at..*at, flags);
    }
    Ok(Resolved { args: extended, from_file })
}

/// The command and each subcommand named on the command line, with its
/// matches and the position in `args` just after its name (for the
/// command itself, after the program's name).
fn levels<'a>(
    command: &'a clap::Command,
    matches: &'a ArgMatches,
    args: &[OsString],
) -> Vec<(&'a clap::Command, &'a ArgMatches, usize)> {
    let mut levels = vec![(command, matches, args.len().min(1))];
    let (mut command, mut matches, mut after) = (command, matches, args.len().min(1));
    while let Some((name, sub_matches)) = matches.subcommand() {
        let Some(sub) = command.find_subcommand(name) else { break };
        // The subcommand's name is the first argument after its parent's
        // that spells it.
        let Some(offset) = args[after..].iter().position(|arg| arg.to_str() == Some(name)) else { break };
        after += offset + 1;
        levels.push((sub, sub_matches, after));
        (command, matches) = (sub, sub_matches);
    }
    levels
}

/// A command line with the configuration file applied.
pub struct Resolved {
    pub args: Vec<OsString>,
    pub from_file: BTreeSet<String>,
}

fn scalar(path: &str, key: &str, value: &toml::Value) -> Result<String> {
    Ok(match value {
        toml::Value::String(text) => text.clone(),
        toml::Value::Integer(number) => number.to_string(),
        toml::Value::Boolean(flag) => flag.to_string(),
        toml::Value::Float(_) => bail!("{path}: {key} must not be a float (money and durations are integers)"),
        other => bail!("{path}: {key} has a value of type {} that no setting takes", other.type_str()),
    })
}

/// `--config <path>`, `--config=<path>`, or the variable.
fn file_path(args: &[OsString]) -> Option<String> {
    let mut args = args.iter().map(|arg| arg.to_string_lossy().into_owned());
    while let Some(arg) = args.next() {
        if arg == "--" {
            break;
        }
        if arg == format!("--{FLAG}") {
            return args.next();
        }
        if let Some(path) = arg.strip_prefix(&format!("--{FLAG}=")) {
            return Some(path.to_owned());
        }
    }
    std::env::var(VARIABLE).ok().filter(|path| !path.is_empty())
}

/// The innermost subcommand named on the command line, and its matches.
fn leaf<'a>(command: &'a clap::Command, matches: &'a ArgMatches) -> (&'a clap::Command, &'a ArgMatches) {
    match matches.subcommand() {
        Some((name, sub_matches)) => match command.find_subcommand(name) {
            Some(sub) => leaf(sub, sub_matches),
            None => (command, matches),
        },
        None => (command, matches),
    }
}

fn all_long_names(command: &clap::Command) -> BTreeSet<String> {
    let mut names: BTreeSet<String> =
        command.get_arguments().filter_map(|arg| arg.get_long()).map(str::to_owned).collect();
    for sub in command.get_subcommands() {
        names.extend(all_long_names(sub));
    }
    names
}

/// One setting as `bridge config` shows it.
#[derive(Debug, PartialEq, Eq)]
pub struct Setting {
    pub name: String,
    /// The values as given (several for a repeatable flag), redacted.
    pub values: Vec<String>,
    pub source: &'static str,
    pub variable: Option<String>,
    /// A repeatable setting, shown as a list whatever its count.
    pub repeatable: bool,
}

/// The settings of subcommand `name` as parsed from `args` (already
/// resolved), with secrets redacted: settings whose variable hides its value
/// in `--help` are secrets, and so is the password of any URL.
pub fn effective<C: CommandFactory>(resolved: &Resolved, name: &str) -> Result<Vec<Setting>> {
    let command = C::command();
    let matches = command.clone().try_get_matches_from(&resolved.args)?;
    let (leaf_command, leaf_matches) = leaf(&command, &matches);
    if leaf_command.get_name() != name {
        bail!("expected the {name} subcommand");
    }
    let mut settings = Vec::new();
    for arg in leaf_command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let id = arg.get_id().as_str();
        if long == FLAG || matches!(id, "help" | "version") {
            continue;
        }
        let source = match leaf_matches.value_source(id) {
            Some(ValueSource::CommandLine) if resolved.from_file.contains(long) => "file",
            Some(ValueSource::CommandLine) => "command line",
            Some(ValueSource::EnvVariable) => "environment",
            Some(ValueSource::DefaultValue) => "default",
            Some(_) => "other",
            None => "unset",
        };
        let secret = arg.is_hide_env_values_set();
        let values = leaf_matches
            .get_raw(id)
            .map(|raw| {
                raw.map(|value| {
                    let text = value.to_string_lossy();
                    if secret && !text.is_empty() {
                        REDACTED.to_owned()
                    } else if long == "kafka-option" {
                        redact_secret_option(&text)
                    } else {
                        redact_url_password(&text)
                    }
                })
                .collect()
            })
            .unwrap_or_default();
        let variable = arg.get_env().map(|variable| variable.to_string_lossy().into_owned());
        let repeatable = matches!(arg.get_action(), clap::ArgAction::Append);
        settings.push(Setting { name: long.to_owned(), values, source, variable, repeatable });
    }
    Ok(settings)
}

/// A librdkafka `key=value` whose key names a secret (`sasl.password`,
/// `ssl.key.password`, `sasl.oauthbearer.client.secret`, ...) with the
/// value replaced.
pub fn redact_secret_option(text: &str) -> String {
    match text.split_once('=') {
        Some((key, _)) if ["password", "secret", "token", "pem"].iter().any(|word| key.contains(word)) => {
            format!("{key}={REDACTED}")
        }
        _ => text.to_owned(),
    }
}

/// `scheme://user:password@host/…` with the password replaced.
pub fn redact_url_password(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else { return text.to_owned() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((credentials, host)) = authority.rsplit_once('@') else { return text.to_owned() };
    let Some((user, _password)) = credentials.split_once(':') else { return text.to_owned() };
    format!("{scheme}://{user}:{REDACTED}@{host}{tail}")
}

/// The settings as a TOML document that can be used as a configuration file
/// (secrets left out, each line saying where the value came from).
pub fn render(settings: &[Setting]) -> String {
    let mut out = String::new();
    for setting in settings {
        let origin = match &setting.variable {
            Some(variable) => format!("{}; variable {variable}", setting.source),
            None => setting.source.to_owned(),
        };
        let quoted: Vec<String> = setting.values.iter().map(|value| toml_value(value)).collect();
        let redacted = setting.values.iter().any(|value| value.contains(REDACTED));
        let line = match quoted.as_slice() {
            [] => format!("# {} is not set", setting.name),
            [one] if !setting.repeatable => format!("{} = {one}", setting.name),
            many => format!("{} = [{}]", setting.name, many.join(", ")),
        };
        // A redacted value would be wrong if fed back; leave it commented.
        let line = if redacted && !line.starts_with('#') { format!("# {line}") } else { line };
        out.push_str(&format!("{line:<60} # {origin}\n"));
    }
    out
}

fn toml_value(text: &str) -> String {
    if text.parse::<i64>().is_ok() || text == "true" || text == "false" {
        text.to_owned()
    } else {
        toml::Value::String(text.to_owned()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_redacted_and_other_urls_kept() {
        assert_eq!(
            redact_url_password("postgres://bridge:s3cret@db:5432/bridge"),
            format!("postgres://bridge:{REDACTED}@db:5432/bridge")
        );
        assert_eq!(redact_url_password("postgres://postgres@127.0.0.1/x"), "postgres://postgres@127.0.0.1/x");
        assert_eq!(redact_url_password("127.0.0.1:9092"), "127.0.0.1:9092");
    }

    #[test]
    fn secret_librdkafka_options_are_redacted() {
        assert_eq!(redact_secret_option("sasl.password=hunter2"), format!("sasl.password={REDACTED}"));
        assert_eq!(redact_secret_option("ssl.key.pem=-----BEGIN"), format!("ssl.key.pem={REDACTED}"));
        assert_eq!(redact_secret_option("linger.ms=5"), "linger.ms=5");
    }
}
