#![no_main]
//! `cnnc::fuzz::differential` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| cnnc::fuzz::differential(data));
