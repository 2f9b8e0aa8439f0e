use proptest::prelude::*;

use super::*;

fn request() -> TransferRequested {
    TransferRequested {
        transfer_id: "0b7e7a4e-8f6c-4a8e-9a51-000000000001".into(),
        investor_account_id: "inv-001".into(),
        fund_account_id: "fund-acc-001".into(),
        amount_minor: 125_000,
        currency: "EUR".into(),
        requested_at: 1_764_000_000_000,
        reference: "order 17".into(),
        source_system: "crm".into(),
    }
}

fn status() -> TransferStatusChanged {
    TransferStatusChanged {
        event_id: "e".into(),
        transfer_id: "t".into(),
        version: 2,
        state: "rejected".into(),
        previous_state: Some("requested".into()),
        terminal: true,
        reason_code: Some("FUND_FULL".into()),
        investor_account_id: "inv".into(),
        fund_account_id: "fa".into(),
        amount_minor: 1,
        currency: "EUR".into(),
        reference: String::new(),
        occurred_at: 5,
    }
}

/// CRC-64-AVRO exactly as the Avro specification prints it, independent of
/// the library, so a change in the library's byte order would be caught.
fn reference_fingerprint(canonical: &str) -> [u8; 8] {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    let mut table = [0u64; 256];
    for (i, slot) in table.iter_mut().enumerate() {
        let mut fp = i as u64;
        for _ in 0..8 {
            fp = (fp >> 1) ^ (EMPTY & (0u64.wrapping_sub(fp & 1)));
        }
        *slot = fp;
    }
    let mut fp = EMPTY;
    for byte in canonical.bytes() {
        fp = (fp >> 8) ^ table[((fp ^ byte as u64) & 0xff) as usize];
    }
    fp.to_le_bytes()
}

#[test]
fn payload_starts_with_marker_and_specification_fingerprint() {
    let bytes = encode(&request()).unwrap();
    assert_eq!(&bytes[..2], &[0xC3, 0x01]);
    let canonical = canonical_form(schema_of::<TransferRequested>());
    // The specification's [PRIMITIVE] rule: a logical type's annotation is
    // stripped and what remains is the bare primitive name.
    assert!(canonical.contains(r#"{"name":"requested_at","type":"long"}"#), "{canonical}");
    assert_eq!(bytes[2..10], reference_fingerprint(&canonical));
    // What another implementation computes from the same file: fastavro's
    // CRC-64-AVRO fingerprint of schemas/transfer_requested.avsc.
    assert_eq!(hex(&bytes[2..10]), "5690d5477086cb6a");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Records written before the fingerprint followed the specification carry
/// apache-avro's own; they still decode.
#[test]
fn records_with_the_earlier_fingerprint_still_decode() {
    let mut bytes = encode(&request()).unwrap();
    let legacy = legacy_fingerprint(schema_of::<TransferRequested>());
    assert_ne!(bytes[2..10], legacy, "the two fingerprints differ for a schema with a logical type");
    bytes[2..10].copy_from_slice(&legacy);
    assert_eq!(decode::<TransferRequested>(&bytes).unwrap(), request());
}

#[test]
fn every_event_round_trips() {
    assert_eq!(decode::<TransferRequested>(&encode(&request()).unwrap()).unwrap(), request());
    assert_eq!(decode::<TransferStatusChanged>(&encode(&status()).unwrap()).unwrap(), status());
    let withdrawn = FundsWithdrawn {
        event_id: "e".into(),
        transfer_id: "t".into(),
        version: 3,
        investor_account_id: "i".into(),
        fund_account_id: "f".into(),
        fund_id: "fund".into(),
        amount_minor: 9,
        currency: "EUR".into(),
        occurred_at: 1,
        external_reference: "bank-42".into(),
    };
    assert_eq!(decode::<FundsWithdrawn>(&encode(&withdrawn).unwrap()).unwrap(), withdrawn);
}

/// The datum as the general path writes it: the event as an Avro value,
/// resolved against the schema, then encoded.
fn datum_through_a_value<T: Event>(event: &T) -> Vec<u8> {
    let schema = schema_of::<T>();
    let value = apache_avro::to_value(event).unwrap().resolve(schema).unwrap();
    apache_avro::to_avro_datum(schema, value).unwrap()
}

/// Events are written straight from their structs; the bytes are those of
/// the general path through an Avro value, absent options and empty
/// strings included, so readers elsewhere see no change.
#[test]
fn the_direct_encoding_writes_what_the_value_path_writes() {
    fn check<T: Event + std::fmt::Debug + PartialEq>(event: T) {
        let bytes = encode(&event).unwrap();
        assert_eq!(bytes[HEADER_LEN..], datum_through_a_value(&event)[..], "{event:?}");
        assert_eq!(decode::<T>(&bytes).unwrap(), event);
        let confluent = encode_confluent(&event, 7).unwrap();
        assert_eq!(confluent[CONFLUENT_HEADER_LEN..], bytes[HEADER_LEN..]);
    }
    check(request());
    check(status());
    check(TransferStatusChanged { previous_state: None, reason_code: None, terminal: false, ..status() });
    let stage = |external_reference: &str| FundsDeposited {
        event_id: "e".into(),
        transfer_id: "t".into(),
        version: i64::MAX,
        investor_account_id: "inv".into(),
        fund_account_id: "fa".into(),
        fund_id: "fund".into(),
        amount_minor: -1,
        currency: "EUR".into(),
        occurred_at: 0,
        external_reference: external_reference.into(),
    };
    check(stage("ref-ü"));
    check(stage(""));
    check(TransferValidated {
        event_id: "e".into(),
        transfer_id: "t".into(),
        version: 1,
        investor_account_id: "i".into(),
        fund_account_id: "f".into(),
        fund_id: "fund".into(),
        amount_minor: 1,
        currency: "GBP".into(),
        occurred_at: 1_764_000_000_000,
    });
}

#[test]
fn malformed_payloads_have_distinct_classes() {
    let good = encode(&request()).unwrap();
    let classes = |bytes: &[u8]| decode::<TransferRequested>(bytes).unwrap_err().class();

    assert_eq!(classes(&[]), "truncated");
    assert_eq!(classes(&good[..6]), "truncated");
    assert_eq!(classes(b"{\"json\": true}"), "bad_magic");

    let mut unknown = good.clone();
    unknown[2] ^= 0xff;
    assert_eq!(classes(&unknown), "unknown_fingerprint");

    // A valid payload of another event type is not a TransferRequested.
    assert_eq!(classes(&encode(&status()).unwrap()), "unknown_fingerprint");

    assert_eq!(classes(&good[..good.len() - 3]), "schema_mismatch");

    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0, 0]);
    assert_eq!(classes(&trailing), "trailing_bytes");
}

#[test]
fn a_forged_length_prefix_is_refused_without_allocating_it() {
    // Header, then a string length of ~2^62 encoded as a zig-zag varint.
    let mut forged = encode(&request()).unwrap()[..10].to_vec();
    forged.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    assert_eq!(decode::<TransferRequested>(&forged).unwrap_err().class(), "schema_mismatch");
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode::<TransferRequested>(&bytes);
        let _ = decode::<TransferStatusChanged>(&bytes);
    }

    #[test]
    fn arbitrary_datum_after_a_valid_header_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut bytes = encode(&request()).unwrap()[..10].to_vec();
        bytes.extend_from_slice(&tail);
        let _ = decode::<TransferRequested>(&bytes);
    }
}

/// The fuzz target for the decoders starts from a valid encoding of each
/// event; this keeps those seeds equal to what the schemas produce today.
/// `BRIDGE_UPDATE_FUZZ_SEEDS=1` rewrites them after a schema change.
#[test]
fn fuzz_seed_corpus_matches_the_schemas() {
    let directory = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/decode_events");
    let seeds =
        [("seed-transfer-requested", encode(&request()).unwrap()), ("seed-status-changed", encode(&status()).unwrap())];
    for (name, bytes) in seeds {
        let path = directory.join(name);
        if std::env::var_os("BRIDGE_UPDATE_FUZZ_SEEDS").is_some() {
            std::fs::create_dir_all(&directory).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let stored = std::fs::read(&path).unwrap_or_default();
        assert_eq!(stored, bytes, "{} is stale: run with BRIDGE_UPDATE_FUZZ_SEEDS=1", path.display());
    }
}

#[test]
fn confluent_framing_round_trips_once_the_id_is_learned() {
    // Ids are process-wide; these are far from any other test's.
    let id = 70_001;
    let bytes = encode_confluent(&request(), id).unwrap();
    assert_eq!(bytes[0], 0);
    assert_eq!(&bytes[1..5], &id.to_be_bytes());
    assert_eq!(confluent_schema_id(&bytes), Some(id));
    // Unknown until the registry's schema is handed over.
    let error = decode::<TransferRequested>(&bytes).unwrap_err();
    assert_eq!(error.class(), "unknown_schema_id");
    learn_schema(id, schema_text_of::<TransferRequested>()).unwrap();
    assert!(knows_schema_id(id));
    assert_eq!(decode::<TransferRequested>(&bytes).unwrap(), request());
    // The same datum after a single-object header decodes the same: the
    // framings differ only in their headers.
    let single = encode(&request()).unwrap();
    assert_eq!(&single[10..], &bytes[5..]);
}

#[test]
fn a_confluent_id_of_another_record_or_a_short_header_is_refused() {
    let id = 70_002;
    learn_schema(id, schema_text_of::<TransferStatusChanged>()).unwrap();
    let status_bytes = encode_confluent(&status(), id).unwrap();
    assert_eq!(decode::<TransferStatusChanged>(&status_bytes).unwrap(), status());
    let error = decode::<TransferRequested>(&status_bytes).unwrap_err();
    assert_eq!(error, DecodeError::UnknownSchemaId { id, expected: TransferRequested::NAME });
    assert_eq!(decode::<TransferRequested>(&[0, 0, 1]).unwrap_err().class(), "truncated");
    assert!(learn_schema(70_003, "\"string\"").is_err(), "a registry schema that is not a record is refused");
    assert!(learn_schema(70_004, "not json").is_err());
}
