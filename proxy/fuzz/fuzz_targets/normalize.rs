//! Untrusted request targets through the one normalisation policy is judged on: no panic, and a
//! normalised path normalises to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::normalize::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else { return };
    if let Ok(t) = normalize(target) {
        if let Ok(again) = normalize(&t.path_and_query) {
            assert_eq!(again.path_and_query, t.path_and_query, "normalising is idempotent");
        }
    }
});
