#![no_main]
//! `cnnc::fuzz::npy` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| cnnc::fuzz::npy(data));
