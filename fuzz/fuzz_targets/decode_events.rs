//! Any bytes, decoded as every event type: an error, never a panic; and
//! whatever decodes re-encodes to bytes that decode to the same event.
#![no_main]

use bridge_codec::{
    decode, encode, Event, FundsDeposited, FundsWithdrawn, TransferRequested, TransferStatusChanged, TransferValidated,
};
use libfuzzer_sys::fuzz_target;

fn round_trip<T: Event + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(event) = decode::<T>(data) {
        let bytes = encode(&event).expect("a decoded event encodes");
        assert_eq!(decode::<T>(&bytes).expect("its encoding decodes"), event);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<TransferRequested>(data);
    round_trip::<TransferValidated>(data);
    round_trip::<FundsWithdrawn>(data);
    round_trip::<FundsDeposited>(data);
    round_trip::<TransferStatusChanged>(data);
});
