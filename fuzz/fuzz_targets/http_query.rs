//! libFuzzer entry for [`imgate_gateway::fuzz::http_query`]; the target itself lives in the
//! gateway crate, so the corpus replay test runs the same code.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imgate_gateway::fuzz::http_query(data));
