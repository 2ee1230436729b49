#![no_main]
//! `cnnc::fuzz::cnn_source` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| cnnc::fuzz::cnn_source(data));
