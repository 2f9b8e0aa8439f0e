//! Avro encoding of every event Bridge reads or writes.
//!
//! This crate is the only one that knows Avro. It embeds the schemas from the
//! repository's `schemas/` folder at compile time, so the files there are, by
//! construction, exactly the schemas on the wire. Payloads use the Avro
//! specification's single-object encoding: `C3 01`, the 8-byte little-endian
//! CRC-64-AVRO (Rabin) fingerprint of the writer schema's canonical form, then
//! the Avro binary datum. Any Avro library can read our topics with the files
//! in `schemas/` alone.
//!
//! With a schema registry (Confluent's REST API), payloads are written in
//! Confluent's wire format instead: `00`, the 4-byte big-endian schema id the
//! registry gave, then the datum. The decoder reads both framings; a
//! registry id's schema must first be handed over with [`learn_schema`]
//! (this crate does no IO; `bridge-pipeline`'s registry client fetches it).
//!
//! Decoding never panics: every malformed input maps to a [`DecodeError`] with
//! a stable class, which the pipeline puts on the dead-letter record.

mod events;

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::{OnceLock, RwLock};

use apache_avro::rabin::Rabin;
use apache_avro::Schema;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use events::{FundsDeposited, FundsWithdrawn, TransferRequested, TransferStatusChanged, TransferValidated};

/// The content type of every payload, per the CloudEvents Kafka binding.
pub const CONTENT_TYPE: &str = "application/avro";

/// Single-object encoding marker from the Avro specification.
const MAGIC: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;
/// Confluent wire format: magic byte 0, then a 4-byte big-endian schema id.
const CONFLUENT_MAGIC: u8 = 0;
const CONFLUENT_HEADER_LEN: usize = 5;

/// The most a single decode may allocate. Our events are a few hundred bytes;
/// without this bound a forged length prefix in a malformed message could make
/// the decoder reserve hundreds of megabytes.
const MAX_DECODE_ALLOCATION_BYTES: usize = 1 << 20;

/// An event type with a schema in `schemas/`.
pub trait Event: Serialize + DeserializeOwned {
    /// The schema's full name, e.g. `io.bridge.transfers.v1.TransferRequested`.
    const NAME: &'static str;
    /// The CloudEvents `type` attribute for this event.
    const CE_TYPE: &'static str;
    /// Every schema version of this record we can read, newest first. The
    /// newest is the one we write and the reader schema for older versions.
    const SCHEMA_VERSIONS: &'static [&'static str];
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("failed to encode {name}: {message}")]
    Avro { name: &'static str, message: String },
}

/// Why a payload could not be decoded. `class()` names the kind of failure on
/// dead-letter records and in metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is {len} bytes, shorter than its framing header (10 bytes single-object, 5 Confluent)")]
    Truncated { len: usize },
    #[error("payload starts with neither the single-object marker C3 01 nor the Confluent magic byte 00 (found {found:02X?})")]
    BadMagic { found: [u8; 2] },
    #[error("schema id {id} is not a known version of {expected}")]
    UnknownSchemaId { id: u32, expected: &'static str },
    #[error("unknown schema fingerprint {fingerprint} for {expected}")]
    UnknownFingerprint { fingerprint: String, expected: &'static str },
    #[error("datum does not match schema {name}: {message}")]
    Datum { name: &'static str, message: String },
    #[error("{extra} trailing bytes after the {name} datum")]
    TrailingBytes { name: &'static str, extra: usize },
}

impl DecodeError {
    pub fn class(&self) -> &'static str {
        match self {
            Self::Truncated { .. } => "truncated",
            Self::BadMagic { .. } => "bad_magic",
            Self::UnknownFingerprint { .. } => "unknown_fingerprint",
            Self::UnknownSchemaId { .. } => "unknown_schema_id",
            Self::Datum { .. } => "schema_mismatch",
            Self::TrailingBytes { .. } => "trailing_bytes",
        }
    }
}

struct Registry {
    /// Fingerprint of every known schema version, to the parsed schema.
    by_fingerprint: HashMap<[u8; 8], (&'static str, Schema)>,
    /// Newest schema and its fingerprint per record name.
    newest: HashMap<&'static str, ([u8; 8], Schema)>,
}

/// The CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form as the
/// Avro specification defines it, which is what every other Avro library
/// (Java's SchemaNormalization, fastavro, ...) computes.
fn fingerprint(schema: &Schema) -> [u8; 8] {
    rabin(&canonical_form(schema))
}

/// The fingerprint apache-avro computes itself. Records written before the
/// codec followed the specification carry it, so it stays readable.
fn legacy_fingerprint(schema: &Schema) -> [u8; 8] {
    rabin(&schema.canonical_form())
}

fn rabin(text: &str) -> [u8; 8] {
    use digest::Digest;
    let mut digest = Rabin::new();
    digest.update(text.as_bytes());
    digest.finalize().as_slice().try_into().expect("Rabin fingerprints are 8 bytes")
}

/// The specification's Parsing Canonical Form. apache-avro 0.21 strips
/// `logicalType` but then leaves the primitive it annotated as an object:
/// `{"type":"long"}` where the specification's [PRIMITIVE] rule gives
/// `"long"`, so its fingerprint of any schema with a logical type differs
/// from everyone else's. In canonical form a one-member object naming a
/// type can only come from that, so it is reduced here.
pub fn canonical_form(schema: &Schema) -> String {
    let text = schema.canonical_form();
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    const OPEN: &str = "{\"type\":\"";
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        match after.find('"') {
            Some(end) if after[end..].starts_with("\"}") && !after[..end].contains(['{', ',', ':']) => {
                out.push_str(&rest[..start]);
                out.push('"');
                out.push_str(&after[..end]);
                out.push('"');
                rest = &after[end + 2..];
            }
            _ => {
                out.push_str(&rest[..start + OPEN.len()]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        apache_avro::util::max_allocation_bytes(MAX_DECODE_ALLOCATION_BYTES);
        let mut by_fingerprint = HashMap::new();
        let mut newest = HashMap::new();
        for (name, versions) in events::ALL {
            for (index, text) in versions.iter().enumerate() {
                // The schemas are compiled in and covered by tests; a parse
                // failure here is a build defect, not a runtime condition.
                let schema =
                    Schema::parse_str(text).unwrap_or_else(|error| panic!("schema {name} does not parse: {error}"));
                let print = fingerprint(&schema);
                if index == 0 {
                    newest.insert(*name, (print, schema.clone()));
                }
                by_fingerprint.insert(legacy_fingerprint(&schema), (*name, schema.clone()));
                by_fingerprint.insert(print, (*name, schema));
            }
        }
        Registry { by_fingerprint, newest }
    })
}

/// The newest schema of `T` (the one we write).
pub fn schema_of<T: Event>() -> &'static Schema {
    &registry().newest[T::NAME].1
}

/// The single-object fingerprint of `T`'s newest schema.
pub fn fingerprint_of<T: Event>() -> [u8; 8] {
    registry().newest[T::NAME].0
}

/// The schema text of `T`'s newest version, as registered with a registry.
pub fn schema_text_of<T: Event>() -> &'static str {
    T::SCHEMA_VERSIONS[0]
}

/// Schemas learned from a schema registry, by id, with their record's full
/// name.
fn registry_schemas() -> &'static RwLock<HashMap<u32, (String, Schema)>> {
    static SCHEMAS: OnceLock<RwLock<HashMap<u32, (String, Schema)>>> = OnceLock::new();
    SCHEMAS.get_or_init(Default::default)
}

/// Remembers the schema a registry holds under `id`, so payloads framed with
/// that id decode. Errors if the text is not an Avro schema.
pub fn learn_schema(id: u32, text: &str) -> Result<(), String> {
    let schema = Schema::parse_str(text).map_err(|error| format!("schema {id} from the registry: {error}"))?;
    let name = match &schema {
        Schema::Record(record) => record.name.fullname(None),
        other => return Err(format!("schema {id} from the registry is not a record: {other:?}")),
    };
    registry_schemas().write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(id, (name, schema));
    Ok(())
}

/// What keeps `ours` from replacing `registered` (a schema a registry
/// holds) on a topic with readers we do not control: readers of
/// `registered` must read data written with `ours` (forward), and `ours`
/// must read data already written with `registered` (backward).
pub fn compatibility_problems(registered: &str, ours: &str) -> Vec<String> {
    use apache_avro::schema_compatibility::SchemaCompatibility;
    let (registered, ours) = match (Schema::parse_str(registered), Schema::parse_str(ours)) {
        (Ok(registered), Ok(ours)) => (registered, ours),
        (Err(error), _) => return vec![format!("the registered schema is not Avro: {error}")],
        (_, Err(error)) => return vec![format!("our schema does not parse: {error}")],
    };
    let mut problems = Vec::new();
    if let Err(error) = SchemaCompatibility::can_read(&registered, &ours) {
        problems.push(format!("it cannot read data written with the registered schema (backward): {error}"));
    }
    if let Err(error) = SchemaCompatibility::can_read(&ours, &registered) {
        problems.push(format!("readers of the registered schema cannot read data it writes (forward): {error}"));
    }
    problems
}

/// The registry schema id of a payload in Confluent's wire format.
pub fn confluent_schema_id(payload: &[u8]) -> Option<u32> {
    match payload {
        [CONFLUENT_MAGIC, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// Whether the schema under `id` has been learned.
pub fn knows_schema_id(id: u32) -> bool {
    registry_schemas().read().unwrap_or_else(|poisoned| poisoned.into_inner()).contains_key(&id)
}

/// Encodes `event` in Confluent's wire format under the registry's `id` for
/// `T`'s newest schema.
pub fn encode_confluent<T: Event>(event: &T, id: u32) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(DATUM_CAPACITY);
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&id.to_be_bytes());
    write_datum(event, &mut out)?;
    Ok(out)
}

/// Room for a header and a typical event's datum, so encoding one seldom
/// grows its buffer.
const DATUM_CAPACITY: usize = 256;

/// Appends `event`'s Avro datum under `T`'s newest schema to `out`. The
/// schema-aware serializer writes the fields straight from the struct,
/// checked against the schema as it goes; going through a `Value` tree
/// (`to_value`, `resolve`, `to_avro_datum`) built and resolved the schema's
/// names twice and allocated every field name, per event.
fn write_datum<T: Event>(event: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let schema = &registry().newest[T::NAME].1;
    apache_avro::write_avro_datum_ref(schema, event, out)
        .map(drop)
        .map_err(|error| EncodeError::Avro { name: T::NAME, message: error.to_string() })
}

/// Encodes `event` in single-object encoding.
pub fn encode<T: Event>(event: &T) -> Result<Vec<u8>, EncodeError> {
    let print = &registry().newest[T::NAME].0;
    let mut out = Vec::with_capacity(DATUM_CAPACITY);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(print);
    write_datum(event, &mut out)?;
    Ok(out)
}

/// Decodes a `T` written with any known version of its schema, in
/// single-object encoding or Confluent's wire format, into the current shape.
pub fn decode<T: Event>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.first() == Some(&CONFLUENT_MAGIC) {
        return decode_confluent(bytes);
    }
    if bytes.len() < HEADER_LEN {
        if bytes.len() >= 2 && bytes[..2] != MAGIC {
            return Err(DecodeError::BadMagic { found: [bytes[0], bytes[1]] });
        }
        return Err(DecodeError::Truncated { len: bytes.len() });
    }
    if bytes[..2] != MAGIC {
        return Err(DecodeError::BadMagic { found: [bytes[0], bytes[1]] });
    }
    let print: [u8; 8] = bytes[2..HEADER_LEN].try_into().expect("slice of 8");
    let registry = registry();
    let (newest, reader) = &registry.newest[T::NAME];
    if print == *newest {
        // Written with the schema it is read with: nothing to resolve.
        return read_datum(reader, None, &bytes[HEADER_LEN..]);
    }
    let writer = match registry.by_fingerprint.get(&print) {
        Some((name, schema)) if *name == T::NAME => schema,
        _ => return Err(DecodeError::UnknownFingerprint { fingerprint: hex(&print), expected: T::NAME }),
    };
    decode_datum(writer, &bytes[HEADER_LEN..])
}

fn decode_confluent<T: Event>(bytes: &[u8]) -> Result<T, DecodeError> {
    let Some(id) = confluent_schema_id(bytes) else { return Err(DecodeError::Truncated { len: bytes.len() }) };
    let schemas = registry_schemas().read().unwrap_or_else(|poisoned| poisoned.into_inner());
    match schemas.get(&id) {
        Some((name, writer)) if name == T::NAME => decode_datum(writer, &bytes[CONFLUENT_HEADER_LEN..]),
        _ => Err(DecodeError::UnknownSchemaId { id, expected: T::NAME }),
    }
}

/// Reads `datum` written with `writer` into `T`'s newest schema.
fn decode_datum<T: Event>(writer: &Schema, datum: &[u8]) -> Result<T, DecodeError> {
    read_datum(writer, Some(&registry().newest[T::NAME].1), datum)
}

/// Reads `datum` written with `writer`, resolved into `reader` if given.
fn read_datum<T: Event>(writer: &Schema, reader: Option<&Schema>, datum: &[u8]) -> Result<T, DecodeError> {
    let mut cursor = Cursor::new(datum);
    let mismatch = |error: apache_avro::Error| DecodeError::Datum { name: T::NAME, message: error.to_string() };
    let value = apache_avro::from_avro_datum(writer, &mut cursor, reader).map_err(mismatch)?;
    let consumed = cursor.position() as usize;
    if consumed != datum.len() {
        return Err(DecodeError::TrailingBytes { name: T::NAME, extra: datum.len() - consumed });
    }
    apache_avro::from_value::<T>(&value).map_err(mismatch)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests;
