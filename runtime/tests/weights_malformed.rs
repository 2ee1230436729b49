//! Malformed and ill-fitting safetensors files are typed errors, never a panic: truncated
//! or oversized headers, header lengths that overflow, headers that are not the format,
//! offsets that disagree with shapes and dtypes, element types a parameter cannot take —
//! one hand-written case each, then a property test that generates headers with random
//! dtypes, shapes, byte lengths, dropped and extra keys, and predicts the exact outcome
//! (format error, one mismatch error listing every bad key, dtype error, or success), and
//! one that flips and cuts the bytes of a valid file.

use cnnc_compiler::Graph;
use cnnc_compiler::dsl::compile_str;
use cnnc_compiler::ops::DType;
use cnnc_runtime::weights::{ParamData, Weights};
use cnnc_runtime::{WeightsError, interp};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use proptest::sample::Index;

/// `conv.weight [3, 2, 3, 3]`, `conv.bias [3]`, `bn.*` (with the I64 counter), `fc.weight
/// [4, 27]`, `fc.bias [4]`.
fn net() -> Graph {
    let out = compile_str(
        "net W(x: [N, 2, 5, 5]) {
            conv = Conv2d(2, 3, 3);
            bn = BatchNorm2d(3);
            fc = Linear(27, 4);
            fn forward(self, x) { self.fc(flatten(self.bn(self.conv(x)), 1)) }
        }",
    );
    assert!(!out.has_errors(), "{:?}", out.errors().map(|d| d.full_message()).collect::<Vec<_>>());
    out.nets.into_iter().next().expect("one net")
}

/// A file: the 8-byte little-endian header length, the header, the data.
fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// One header entry.
fn entry(key: &str, dtype: &str, shape: &[usize], start: usize, end: usize) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!(r#""{key}":{{"dtype":"{dtype}","shape":[{}],"data_offsets":[{start},{end}]}}"#, dims.join(","))
}

/// A valid file for `net()` in which `key` is stored with `dtype` (`bytes_per` bytes per
/// element), every other tensor as PyTorch stores it.
fn file_with(g: &Graph, key: &str, dtype: &str, bytes_per: usize) -> Vec<u8> {
    let mut entries = vec![];
    let mut at = 0;
    for p in &g.params {
        let n: usize = p.spec.shape.iter().product();
        let (d, size) = match (p.name == key, p.spec.dtype) {
            (true, _) => (dtype, bytes_per),
            (false, DType::F32) => ("F32", 4),
            (false, DType::I64) => ("I64", 8),
        };
        entries.push(entry(&p.name, d, &p.spec.shape, at, at + n * size));
        at += n * size;
    }
    file(&format!("{{{}}}", entries.join(",")), &vec![0x3c; at])
}

fn is_format(r: Result<Weights, WeightsError>) -> bool {
    matches!(r, Err(WeightsError::Format { .. }))
}

#[test]
fn truncated_and_oversized_headers() {
    let g = net();
    let good = Weights::random(&g, 1).to_safetensors(&g).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    // Cut inside the length, inside the header, right after it, and inside the data.
    for cut in [0, 3, 7, 8, 9, 8 + header_len / 2, 8 + header_len, good.len() - 1] {
        assert!(is_format(Weights::from_safetensors(&g, &good[..cut])), "cut at {cut}");
    }
    // A length that overflows `8 + n`, exceeds the format's limit, or exceeds the file.
    for n in [u64::MAX, u64::MAX - 7, (usize::MAX - 3) as u64, 100_000_001, good.len() as u64] {
        let mut bad = good.clone();
        bad[..8].copy_from_slice(&n.to_le_bytes());
        assert!(is_format(Weights::from_safetensors(&g, &bad)), "header length {n}");
    }
    // Trailing bytes after the data.
    let mut long = good.clone();
    long.extend_from_slice(&[0; 4]);
    assert!(is_format(Weights::from_safetensors(&g, &long)));
}

#[test]
fn headers_that_are_not_the_format() {
    let g = net();
    let conv = entry("conv.weight", "F32", &[3, 2, 3, 3], 0, 216);
    for header in [
        "",
        "[]",
        "{",
        "null",
        r#"{"conv.weight":7}"#,
        r#"{"conv.weight":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}"#,
        r#"{"conv.weight":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
        r#"{"conv.weight":{"dtype":"F32","shape":"3","data_offsets":[0,4]}}"#,
        r#"{"conv.weight":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
        r#"{"conv.weight":{"dtype":"F32","shape":[1]}}"#,
    ] {
        assert!(is_format(Weights::from_safetensors(&g, &file(header, &[0; 4]))), "{header:?}");
    }
    // Not UTF-8.
    assert!(is_format(Weights::from_safetensors(&g, &file_bytes(b"{\"\xff\xfe\":1}"))));
    // Offsets that disagree with shape × dtype, overlap, or leave a gap.
    for header in [
        format!("{{{}}}", entry("conv.weight", "F32", &[3, 2, 3, 3], 0, 200)),
        format!("{{{conv},{}}}", entry("conv.bias", "F32", &[3], 0, 12)),
        format!("{{{conv},{}}}", entry("conv.bias", "F32", &[3], 220, 232)),
        format!("{{{}}}", entry("conv.weight", "F16", &[3, 2, 3, 3], 0, 216)),
        format!("{{{}}}", entry("conv.weight", "F4", &[3], 0, 1)),
        // 2^40 · 2^40 · 16 elements overflow the size computation.
        format!("{{{}}}", entry("conv.weight", "F32", &[1 << 40, 1 << 40, 16], 0, 4)),
    ] {
        assert!(is_format(Weights::from_safetensors(&g, &file(&header, &[0; 232]))), "{header}");
    }
}

/// `bytes` as a file with that header.
fn file_bytes(header: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes
}

#[test]
fn element_types_a_parameter_cannot_take_name_the_key() {
    let g = net();
    for (key, dtype, size) in [
        ("conv.weight", "I64", 8),
        ("fc.weight", "I32", 4),
        ("fc.bias", "U8", 1),
        ("bn.running_var", "BOOL", 1),
        ("conv.bias", "F8_E4M3", 1),
        ("bn.num_batches_tracked", "F32", 4),
        ("bn.num_batches_tracked", "I32", 4),
    ] {
        let err = Weights::from_safetensors(&g, &file_with(&g, key, dtype, size)).unwrap_err();
        let WeightsError::DType { key: k, found, .. } = &err else { panic!("{key} as {dtype}: {err}") };
        assert_eq!((k.as_str(), found.as_str()), (key, dtype), "{err}");
        let text = err.to_string();
        assert!(text.contains(key) && text.contains(dtype), "{text}");
    }
    // Other float types are converted: 0x3c3c is 1.0586 in f16 and 0.0115 in bf16.
    for (dtype, size, value) in [("F16", 2, 1.058_594), ("BF16", 2, 0.011_474_609), ("F64", 8, 0.0)] {
        let w = Weights::from_safetensors(&g, &file_with(&g, "fc.weight", dtype, size)).unwrap();
        let fc = w.by_name(&g, "fc.weight").and_then(ParamData::as_f32).unwrap();
        assert_eq!(fc.shape(), &[4, 27]);
        if dtype == "F64" {
            assert!(fc.iter().all(|v| *v == f64::from_le_bytes([0x3c; 8]) as f32));
        } else {
            assert!(fc.iter().all(|v| (v - value).abs() < 1e-6), "{dtype}: {}", fc[[0, 0]]);
        }
    }
}

// ---- generated headers ----------------------------------------------------------------------

/// Element types a header may name, with their size in bits (`None`: not a safetensors
/// type at all).
const DTYPES: &[(&str, Option<usize>)] = &[
    ("F32", Some(32)),
    ("F64", Some(64)),
    ("F16", Some(16)),
    ("BF16", Some(16)),
    ("I64", Some(64)),
    ("I32", Some(32)),
    ("U8", Some(8)),
    ("BOOL", Some(8)),
    ("F8_E5M2", Some(8)),
    ("F4", Some(4)),
    ("Q7", None),
];

/// What to do to one parameter's entry.
#[derive(Clone, Debug)]
struct Edit {
    /// Index into [`DTYPES`], or `None` for the parameter's own dtype.
    dtype: Option<usize>,
    /// A different shape.
    shape: Option<Vec<usize>>,
    /// Bytes added to (or taken from) the data the offsets span.
    delta: i64,
    /// Leave the key out.
    drop: bool,
}

fn edit() -> impl Strategy<Value = Edit> {
    (
        // Rare per key, so that about a third of the files are clean and load.
        prop::option::weighted(0.05, 0..DTYPES.len()),
        prop::option::weighted(0.05, prop::collection::vec(0usize..5, 0..4)),
        prop_oneof![40 => Just(0i64), 1 => -3i64..=3],
        prop::bool::weighted(0.03),
    )
        .prop_map(|(dtype, shape, delta, drop)| Edit { dtype, shape, delta, drop })
}

/// What loading must give.
#[derive(Debug, PartialEq)]
enum Outcome {
    Format,
    Mismatch { missing: Vec<String>, unexpected: Vec<String>, misshaped: Vec<String> },
    DType(String),
    Loaded,
}

/// Builds the file the edits describe and predicts the outcome from the documented rules.
fn generated(g: &Graph, edits: &[Edit], extra: Option<usize>, seed: u8) -> (Vec<u8>, Outcome) {
    let mut entries = vec![];
    let mut at = 0usize;
    let mut format = false;
    let (mut missing, mut unexpected, mut misshaped) = (vec![], vec![], vec![]);
    let mut bad_dtype = None;
    let mut dropped_counters = 0;
    let mut add = |key: &str, dtype: &str, bits: Option<usize>, shape: &[usize], delta: i64, at: &mut usize| {
        let n: usize = shape.iter().product();
        let bits = bits.unwrap_or(8);
        let exact = (n * bits).div_ceil(8);
        let bytes = (exact as i64 + delta).max(0) as usize;
        // The format rejects unknown types, sizes that disagree with shape × dtype, and
        // sub-byte tensors that do not fill their last byte.
        let ok =
            DTYPES.iter().any(|(d, b)| *d == dtype && b.is_some()) && bytes == exact && (n * bits).is_multiple_of(8);
        entries.push(entry(key, dtype, shape, *at, *at + bytes));
        *at += bytes;
        ok
    };
    for (p, e) in g.params.iter().zip(edits) {
        let counter = p.spec.dtype == DType::I64;
        if e.drop {
            if counter {
                dropped_counters += 1;
            } else {
                missing.push(p.name.clone());
            }
            continue;
        }
        let own = if counter { ("I64", Some(64)) } else { ("F32", Some(32)) };
        let (dtype, bits) = e.dtype.map_or(own, |i| DTYPES[i]);
        let shape = e.shape.clone().unwrap_or_else(|| p.spec.shape.clone());
        format |= !add(&p.name, dtype, bits, &shape, e.delta, &mut at);
        if shape != p.spec.shape {
            misshaped.push(p.name.clone());
        }
        let allowed: &[&str] = if counter { &["I64"] } else { &["F32", "F64", "F16", "BF16"] };
        if !allowed.contains(&dtype) && bad_dtype.is_none() {
            bad_dtype = Some(p.name.clone());
        }
    }
    // A file without any counter is accepted; the net has one.
    let counters = g.params.iter().filter(|p| p.spec.dtype == DType::I64).count();
    if dropped_counters > 0 && dropped_counters < counters {
        unreachable!("the test net has a single counter");
    }
    if let Some(n) = extra {
        unexpected.push(format!("extra.{n}"));
        format |= !add(&format!("extra.{n}"), "F32", Some(32), &[n], 0, &mut at);
    }
    let data: Vec<u8> = (0..at).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    let bytes = file(&format!("{{{}}}", entries.join(",")), &data);
    let outcome = if format {
        Outcome::Format
    } else if !(missing.is_empty() && unexpected.is_empty() && misshaped.is_empty()) {
        Outcome::Mismatch { missing, unexpected, misshaped }
    } else if let Some(k) = bad_dtype {
        Outcome::DType(k)
    } else {
        Outcome::Loaded
    };
    (bytes, outcome)
}

fn observed(r: &Result<Weights, WeightsError>) -> Outcome {
    match r {
        Ok(_) => Outcome::Loaded,
        Err(WeightsError::Format { .. }) => Outcome::Format,
        Err(WeightsError::DType { key, .. }) => Outcome::DType(key.clone()),
        Err(WeightsError::Mismatch { missing, unexpected, misshaped, .. }) => Outcome::Mismatch {
            missing: missing.clone(),
            unexpected: unexpected.clone(),
            misshaped: misshaped.iter().map(|(k, _, _)| k.clone()).collect(),
        },
        Err(other) => panic!("unexpected error {other}"),
    }
}

/// Loaded weights fit the net and run.
fn runs(g: &Graph, w: &Weights) -> Result<(), TestCaseError> {
    w.check(g).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let x = ArrayD::from_elem(IxDyn(&[1, 2, 5, 5]), 0.5f32);
    interp::run(g, w, &[x.view()]).map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn generated_headers_give_the_predicted_outcome(
        edits in prop::collection::vec(edit(), 9),
        extra in prop::option::weighted(0.1, 1usize..4),
        seed in any::<u8>(),
    ) {
        let g = net();
        prop_assert_eq!(g.params.len(), 9);
        let (bytes, want) = generated(&g, &edits, extra, seed);
        let got = Weights::from_safetensors(&g, &bytes);
        prop_assert_eq!(observed(&got), want, "{}", String::from_utf8_lossy(&bytes[8..bytes.len().min(600)]));
        if let Ok(w) = &got {
            runs(&g, w)?;
        }
    }

    #[test]
    fn flipped_and_cut_bytes_never_panic(
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 0..6),
        cut in prop::option::weighted(0.3, any::<Index>()),
        seed in any::<u64>(),
    ) {
        let g = net();
        let mut bytes = Weights::random(&g, seed).to_safetensors(&g).unwrap();
        for (at, v) in &flips {
            let i = at.index(bytes.len());
            bytes[i] = *v;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        // Any result is fine as long as it is one; what loads must fit the net and run.
        if let Ok(w) = Weights::from_safetensors(&g, &bytes) {
            runs(&g, &w)?;
        }
    }
}
