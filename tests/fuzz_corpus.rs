//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz harnesses
//! (`cnnc::fuzz`), so every input the fuzzers kept — and every crash they found, once fixed —
//! is checked by `cargo test` with no fuzz engine.

use std::path::Path;

fn replay(target: &str, harness: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{target}: only {} corpus files", files.len());
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let r = std::panic::catch_unwind(|| harness(&data));
        assert!(r.is_ok(), "{target}: {} fails", f.display());
    }
    println!("{target}: {} inputs", files.len());
}

#[test]
fn cnn_source_corpus() {
    replay("cnn_source", cnnc::fuzz::cnn_source);
}

#[test]
fn safetensors_corpus() {
    replay("safetensors", cnnc::fuzz::safetensors);
}

#[test]
fn npy_corpus() {
    replay("npy", cnnc::fuzz::npy);
}

#[test]
fn onnx_corpus() {
    replay("onnx", cnnc::fuzz::onnx);
}

#[test]
fn differential_corpus() {
    replay("differential", cnnc::fuzz::differential);
}
