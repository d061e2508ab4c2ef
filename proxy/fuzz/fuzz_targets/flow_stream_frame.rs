//! Bytes off a proxy's record stream (`porin_flow::stream`: length-prefixed protobuf batches, as a
//! follower reads them) through framing, decoding and the conversion into flows: no panic, and
//! every record is either a flow or an error naming it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use porin_flow::stream::{FrameError, read_frame};

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let mut buf = Vec::new();
    loop {
        match read_frame(&mut input, &mut buf) {
            Ok(batch) => {
                let n = batch.records.len();
                let (flows, errors) = batch.into_flows();
                assert_eq!(flows.len() + errors.len(), n);
            }
            Err(FrameError::Io(_)) => break,
            Err(FrameError::Stream(_)) => {}
        }
    }
});
