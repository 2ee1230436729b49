//! Compile-time shape errors, tested as data: each `tests/ui/*.rs` must fail to compile with
//! exactly the messages in its `.stderr` file (the spec of the messages; review changes to
//! them like code). The toolchain is pinned in `rust-toolchain.toml` so the text is stable.
//! Regenerate after an intended change with `TRYBUILD=overwrite cargo test --test compile_errors`.

#[test]
fn compile_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
