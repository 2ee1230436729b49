//! `cnnc-onnx-codegen PROTO OUT_DIR`: compiles the `.proto` with protox (pure Rust) and writes
//! prost's Rust types to `OUT_DIR/onnx.rs`.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, proto, out] = &args[..] else {
        eprintln!("usage: cnnc-onnx-codegen PROTO OUT_DIR");
        std::process::exit(2);
    };
    let dir = std::path::Path::new(proto).parent().expect("the .proto's folder");
    let fds = protox::compile([proto], [dir]).expect("onnx.proto compiles");
    std::fs::create_dir_all(out).expect("OUT_DIR");
    // `bytes` fields as `bytes::Bytes`: decoded from a `Bytes` buffer, tensor data is a view
    // of the file's bytes rather than a copy.
    prost_build::Config::new().out_dir(out).bytes(["."]).compile_fds(fds).expect("prost-build");
}
