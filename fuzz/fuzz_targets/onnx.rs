#![no_main]
//! `cnnc::fuzz::onnx` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| cnnc::fuzz::onnx(data));
