#![no_main]
//! `cnnc::fuzz::safetensors` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| cnnc::fuzz::safetensors(data));
