//! Schema evolution rules, checked on every run of the suite, so a breaking
//! schema change fails CI instead of consumers in production.
//!
//! `schemas/<name>.avsc` is the schema we write; `schemas/history/<name>/`
//! keeps every version ever released (`v1.avsc`, `v2.avsc`, ...). The rules:
//! - the current schema is the newest version in its history (a changed
//!   schema is released by adding it there);
//! - it can read data written with every earlier version (backward
//!   compatibility, transitively: against all of them, not only the last);
//! - every earlier version can read data written with it (forward
//!   compatibility, transitively): consumers that are not ours upgrade when
//!   they choose, so a reader of v1 must still read what we write now;
//! - the decoder knows every released version, so records already on a
//!   topic still decode.

use std::path::{Path, PathBuf};

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;

use bridge_codec::{
    Event, FundsDeposited, FundsWithdrawn, TransferRequested, TransferStatusChanged, TransferValidated,
};

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

/// The released versions of `name`, oldest first.
fn history(name: &str) -> Vec<(u32, Schema)> {
    let dir = schemas_dir().join("history").join(name);
    let mut versions: Vec<(u32, Schema)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{} has no history folder {}: {error}", name, dir.display()))
        .map(|entry| entry.expect("readable entry").path())
        .map(|path| {
            let stem = path.file_stem().and_then(|stem| stem.to_str()).unwrap_or_default().to_owned();
            let version = stem
                .strip_prefix('v')
                .and_then(|number| number.parse().ok())
                .unwrap_or_else(|| panic!("{} is not named v<N>.avsc", path.display()));
            let text = std::fs::read_to_string(&path).expect("readable schema");
            (version, Schema::parse_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display())))
        })
        .collect();
    versions.sort_by_key(|(version, _)| *version);
    assert!(!versions.is_empty(), "{name} has no released version");
    for (index, (version, _)) in versions.iter().enumerate() {
        assert_eq!(*version as usize, index + 1, "{name}: versions must be v1, v2, ... without gaps");
    }
    versions
}

/// Every rule, for one event type. Returns what is wrong, so the negative
/// test below can show the check catches a breaking change.
fn violations(name: &str, current: &Schema, decodable: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    let versions = history(name);
    let (latest_version, latest) = versions.last().expect("not empty");
    if latest.canonical_form() != current.canonical_form() {
        problems.push(format!(
            "{name}.avsc differs from history/{name}/v{latest_version}.avsc: release it as v{}",
            latest_version + 1
        ));
    }
    for (version, old) in &versions {
        if let Err(error) = SchemaCompatibility::can_read(old, current) {
            problems.push(format!("{name}.avsc cannot read data written with v{version}: {error}"));
        }
    }
    for (version, old) in &versions {
        if let Err(error) = SchemaCompatibility::can_read(current, old) {
            problems.push(format!("readers of v{version} cannot read data written with {name}.avsc: {error}"));
        }
    }
    let known: Vec<String> = decodable
        .iter()
        .map(|text| Schema::parse_str(text).expect("embedded schema parses").canonical_form())
        .collect();
    for (version, old) in &versions {
        if !known.contains(&old.canonical_form()) {
            problems.push(format!("the decoder does not know {name} v{version} (add it to SCHEMA_VERSIONS)"));
        }
    }
    problems
}

fn check<T: Event>(name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(schemas_dir().join(format!("{name}.avsc"))).expect("current schema");
    let current = Schema::parse_str(&text).expect("current schema parses");
    violations(name, &current, T::SCHEMA_VERSIONS)
}

#[test]
fn every_schema_reads_all_its_released_versions() {
    let mut problems = Vec::new();
    problems.extend(check::<TransferRequested>("transfer_requested"));
    problems.extend(check::<TransferValidated>("transfer_validated"));
    problems.extend(check::<FundsWithdrawn>("funds_withdrawn"));
    problems.extend(check::<FundsDeposited>("funds_deposited"));
    problems.extend(check::<TransferStatusChanged>("transfer_status_changed"));
    assert!(problems.is_empty(), "schema evolution rules broken:\n{}", problems.join("\n"));
}

#[test]
fn every_schema_file_is_checked() {
    let mut names: Vec<String> = std::fs::read_dir(schemas_dir())
        .expect("schemas folder")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "avsc"))
        .filter_map(|path| path.file_stem().and_then(|stem| stem.to_str()).map(str::to_owned))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["funds_deposited", "funds_withdrawn", "transfer_requested", "transfer_status_changed", "transfer_validated"],
        "a schema was added or removed: check it in every_schema_reads_all_its_released_versions"
    );
}

/// The check is not vacuous: a field added without a default (old records
/// lack it) and a field whose type narrowed are both caught, and so is an
/// edited schema that was not released.
#[test]
fn breaking_changes_are_caught() {
    let text = std::fs::read_to_string(schemas_dir().join("transfer_requested.avsc")).expect("schema");
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
    let fields = json["fields"].as_array_mut().expect("fields");
    fields.push(serde_json::json!({"name": "channel", "type": "string"}));
    let added = Schema::parse_str(&json.to_string()).expect("parses");
    let problems = violations("transfer_requested", &added, TransferRequested::SCHEMA_VERSIONS);
    assert!(problems.iter().any(|p| p.contains("cannot read data written with v1")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("release it as v2")), "{problems:?}");

    let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
    for field in json["fields"].as_array_mut().expect("fields") {
        if field["name"] == "amount_minor" {
            field["type"] = serde_json::json!("int");
        }
    }
    let narrowed = Schema::parse_str(&json.to_string()).expect("parses");
    let problems = violations("transfer_requested", &narrowed, TransferRequested::SCHEMA_VERSIONS);
    assert!(problems.iter().any(|p| p.contains("cannot read data written with v1")), "{problems:?}");

    // A field removed that old readers need (it has no default there):
    // the new schema reads old data, but old readers cannot read new data.
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
    json["fields"].as_array_mut().expect("fields").retain(|field| field["name"] != "amount_minor");
    let removed = Schema::parse_str(&json.to_string()).expect("parses");
    let problems = violations("transfer_requested", &removed, TransferRequested::SCHEMA_VERSIONS);
    assert!(!problems.iter().any(|p| p.contains(".avsc cannot read data written with v1")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("readers of v1 cannot read data written with")), "{problems:?}");

    // A compatible change (a new optional field with a default) passes the
    // compatibility rule; only the release rule asks for v2.
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
    json["fields"]
        .as_array_mut()
        .expect("fields")
        .push(serde_json::json!({"name": "channel", "type": ["null", "string"], "default": null}));
    let compatible = Schema::parse_str(&json.to_string()).expect("parses");
    let problems = violations("transfer_requested", &compatible, TransferRequested::SCHEMA_VERSIONS);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("release it as v2"));
}
