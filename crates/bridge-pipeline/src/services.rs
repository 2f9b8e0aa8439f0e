//! The account-service traits, outcomes and errors the stages call, from
//! `bridge-services`.

pub use bridge_services::*;
