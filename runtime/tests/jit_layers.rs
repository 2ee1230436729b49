//! The JIT's modules form layers, and imports only go downward: a module may name only the
//! modules listed after it in [`LAYERS`] (a folder's `mod.rs` declares its files, which sit
//! below it). Every module under `runtime/src/jit/` must be listed, so a new file has to
//! take a place in the order; an upward import — a kernel calling the dispatcher, a
//! micro-kernel calling generated-code helpers, a tier calling a sibling tier — fails here.
//!
//! References to modules are read from the source text: `super::sibling`,
//! `crate::jit::name::…`, and a parent's `name::…` of a child it declares with `mod name;`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top to bottom.
const LAYERS: &[&str] = &[
    "jit",
    "lower",
    // The blocked tier (NCHW16c, over the micro-kernels).
    "blocked",
    "blocked::channels",
    "blocked::pool",
    "blocked::gemm_grad",
    "blocked::conv",
    "blocked::winograd",
    "blocked::common",
    // The portable tier (plain NCHW, pure Cranelift).
    "portable",
    "portable::conv",
    "portable::conv_grad",
    "portable::linear",
    "portable::linear_grad",
    "portable::pool",
    "portable::pool_grad",
    "portable::epilogue",
    // Layout-agnostic kernels, used by both tiers (and the training ones).
    "eltwise_grad",
    "eltwise",
    // What every kernel is built from.
    "cx",
    "plan",
    "tables",
    "math",
    "codegen",
    "team",
    // The register tiles, called from generated code.
    "microkernel",
    "microkernel::conv",
    "microkernel::gemm",
    "microkernel::plane",
    "microkernel::pool",
    "microkernel::winograd_grad",
    "microkernel::winograd",
    "microkernel::epilogue",
    "microkernel::simd",
    "microkernel::isa",
];

fn jit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/jit")
}

/// Every `.rs` file below `dir`, as (module path relative to `jit`, source).
fn modules(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            let p = if prefix.is_empty() { name.clone() } else { format!("{prefix}::{name}") };
            modules(&path, &p, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let module = match (prefix, name.as_str()) {
                ("", "mod") => "jit".to_string(),
                (p, "mod") => p.to_string(),
                ("", n) => n.to_string(),
                (p, n) => format!("{p}::{n}"),
            };
            out.insert(module, std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// Source without comments (so doc links do not count as imports).
fn code(src: &str) -> String {
    src.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The identifiers following each occurrence of `pat` (`pat` then `[a-z_]+`).
fn idents_after<'a>(s: &'a str, pat: &str) -> Vec<&'a str> {
    let mut out = vec![];
    let mut rest = s;
    while let Some(i) = rest.find(pat) {
        let after = &rest[i + pat.len()..];
        let end =
            after.find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())).unwrap_or(after.len());
        let preceded_ok = i == 0 || !rest.as_bytes()[i - 1].is_ascii_alphanumeric();
        if end > 0 && preceded_ok {
            out.push(&after[..end]);
        }
        rest = &after[end..];
    }
    out
}

/// The jit modules `module` refers to.
fn references(module: &str, src: &str, all: &BTreeMap<String, String>) -> Vec<String> {
    let s = code(src);
    let parent = module.rsplit_once("::").map_or("jit", |(p, _)| p);
    let join = |base: &str, name: &str| if base == "jit" { name.to_string() } else { format!("{base}::{name}") };
    let mut refs = vec![];
    // `crate::jit::a::b`: the deepest listed module.
    let mut rest = s.as_str();
    while let Some(i) = rest.find("crate::jit::") {
        let after = &rest[i + "crate::jit::".len()..];
        let path: Vec<&str> = after
            .split(|c: char| !(c.is_ascii_lowercase() || c == '_' || c == ':'))
            .next()
            .unwrap_or("")
            .split("::")
            .filter(|p| !p.is_empty())
            .collect();
        for n in (1..=path.len()).rev() {
            let m = path[..n].join("::");
            if all.contains_key(&m) {
                refs.push(m);
                break;
            }
        }
        rest = after;
    }
    // `super::name` from a file module names a sibling module (other `super::` paths are
    // items, of the parent or, from an inline `mod x86 { … }`, of the file itself).
    if module != "jit" {
        for name in idents_after(&s, "super::") {
            let sibling = join(parent, name);
            if all.contains_key(&sibling) {
                refs.push(sibling);
            }
        }
    }
    // A parent naming the children it declares.
    for child in idents_after(&s, "mod ") {
        let c = join(module, child);
        if all.contains_key(&c) {
            for name in [format!("{child}::"), format!("use {child}::")] {
                if s.contains(&name) {
                    refs.push(c.clone());
                }
            }
        }
    }
    refs.retain(|r| r != module);
    refs.sort();
    refs.dedup();
    refs
}

#[test]
fn jit_imports_only_go_downward() {
    let mut all = BTreeMap::new();
    modules(&jit_dir(), "", &mut all);
    let rank: BTreeMap<&str, usize> = LAYERS.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let unlisted: Vec<&String> = all.keys().filter(|m| !rank.contains_key(m.as_str())).collect();
    assert!(unlisted.is_empty(), "modules missing from LAYERS: {unlisted:?}");
    let gone: Vec<&&str> = LAYERS.iter().filter(|m| !all.contains_key(**m)).collect();
    assert!(gone.is_empty(), "LAYERS lists modules that do not exist: {gone:?}");
    let mut upward = vec![];
    let mut edges = 0;
    for (m, src) in &all {
        for r in references(m, src, &all) {
            edges += 1;
            if rank[r.as_str()] <= rank[m.as_str()] {
                upward.push(format!("{m} → {r}"));
            }
        }
    }
    assert!(upward.is_empty(), "imports that do not go downward: {upward:#?}");
    // The reader sees the structure (a dispatcher that calls both tiers, tiers that call
    // the tiles): a parser that found nothing would pass vacuously.
    assert!(edges > 40, "only {edges} references found");
}

#[test]
fn the_reference_reader_sees_an_upward_import() {
    let mut all = BTreeMap::new();
    modules(&jit_dir(), "", &mut all);
    let bad = "use crate::jit::lower::lower;\nfn f() {}";
    assert_eq!(references("microkernel::simd", bad, &all), ["lower"]);
    assert_eq!(references("portable::conv", "use super::epilogue::Epi;", &all), ["portable::epilogue"]);
    assert_eq!(references("microkernel::conv", "use super::isa::Isa; super::conv_body()", &all), ["microkernel::isa"]);
    assert_eq!(references("jit", "mod lower;\nfn f() { lower::lower() }", &all), ["lower"]);
}
