//! Rust shapes of the schemas in `schemas/`. Field names and types mirror the
//! `.avsc` files one to one; the round-trip tests fail if they drift apart.

use serde::{Deserialize, Serialize};

use crate::Event;

macro_rules! schema_file {
    ($file:literal) => {
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas/", $file))
    };
}

pub(crate) const ALL: &[(&str, &[&str])] = &[
    (TransferRequested::NAME, TransferRequested::SCHEMA_VERSIONS),
    (TransferValidated::NAME, TransferValidated::SCHEMA_VERSIONS),
    (FundsWithdrawn::NAME, FundsWithdrawn::SCHEMA_VERSIONS),
    (FundsDeposited::NAME, FundsDeposited::SCHEMA_VERSIONS),
    (TransferStatusChanged::NAME, TransferStatusChanged::SCHEMA_VERSIONS),
];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRequested {
    pub transfer_id: String,
    pub investor_account_id: String,
    pub fund_account_id: String,
    pub amount_minor: i64,
    pub currency: String,
    /// Milliseconds since the Unix epoch.
    pub requested_at: i64,
    #[serde(default)]
    pub reference: String,
    #[serde(default)]
    pub source_system: String,
}

impl Event for TransferRequested {
    const NAME: &'static str = "io.bridge.transfers.v1.TransferRequested";
    const CE_TYPE: &'static str = "io.bridge.transfer.requested.v1";
    const SCHEMA_VERSIONS: &'static [&'static str] = &[schema_file!("transfer_requested.avsc")];
}

/// Fields shared by the three stage outcome events.
macro_rules! stage_event {
    ($name:ident, $full:literal, $ce:literal, $file:literal $(, $extra:ident)?) => {
        #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $name {
            pub event_id: String,
            pub transfer_id: String,
            pub version: i64,
            pub investor_account_id: String,
            pub fund_account_id: String,
            pub fund_id: String,
            pub amount_minor: i64,
            pub currency: String,
            /// Milliseconds since the Unix epoch.
            pub occurred_at: i64,
            $(#[serde(default)] pub $extra: String,)?
        }

        impl Event for $name {
            const NAME: &'static str = $full;
            const CE_TYPE: &'static str = $ce;
            const SCHEMA_VERSIONS: &'static [&'static str] = &[schema_file!($file)];
        }
    };
}

stage_event!(
    TransferValidated,
    "io.bridge.transfers.v1.TransferValidated",
    "io.bridge.transfer.validated.v1",
    "transfer_validated.avsc"
);
stage_event!(
    FundsWithdrawn,
    "io.bridge.transfers.v1.FundsWithdrawn",
    "io.bridge.transfer.withdrawn.v1",
    "funds_withdrawn.avsc",
    external_reference
);
stage_event!(
    FundsDeposited,
    "io.bridge.transfers.v1.FundsDeposited",
    "io.bridge.transfer.deposited.v1",
    "funds_deposited.avsc",
    external_reference
);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStatusChanged {
    pub event_id: String,
    pub transfer_id: String,
    pub version: i64,
    pub state: String,
    pub previous_state: Option<String>,
    pub terminal: bool,
    pub reason_code: Option<String>,
    pub investor_account_id: String,
    pub fund_account_id: String,
    pub amount_minor: i64,
    pub currency: String,
    #[serde(default)]
    pub reference: String,
    /// Milliseconds since the Unix epoch.
    pub occurred_at: i64,
}

impl Event for TransferStatusChanged {
    const NAME: &'static str = "io.bridge.transfers.v1.TransferStatusChanged";
    const CE_TYPE: &'static str = "io.bridge.transfer.status_changed.v1";
    const SCHEMA_VERSIONS: &'static [&'static str] = &[schema_file!("transfer_status_changed.avsc")];
}
