//! Fuzz harnesses: one per input format cnnc reads, and one differential harness. The
//! `fuzz/` targets (cargo-fuzz, libFuzzer) call these, and `tests/fuzz_corpus.rs` replays the
//! committed corpus through them in `cargo test` with no fuzz engine. Each returns normally on
//! any input; a panic (or a JIT/interpreter disagreement in [`differential`]) is a finding.

use crate::onnx;
use cnnc_compiler::Graph;
use cnnc_compiler::dsl::compile_str;
use cnnc_runtime::weights::Weights;
use cnnc_runtime::{Compiled, ConvAlgorithm, Options, interp};
use ndarray::{ArrayD, IxDyn};
use std::sync::OnceLock;

/// `.cnn` source: parse, check, and on success summarise, verify and print the graph.
pub fn cnn_source(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let out = compile_str(text);
    for d in &out.diagnostics {
        let _ = d.render("fuzz.cnn", text);
    }
    for g in &out.nets {
        g.verify().expect("a checked net verifies");
        let _ = cnnc_compiler::Summary::of(g).to_string();
        let _ = g.to_string();
        let _ = g.to_dot();
    }
}

fn nets() -> &'static [Graph] {
    static NETS: OnceLock<Vec<Graph>> = OnceLock::new();
    NETS.get_or_init(|| {
        let src = "net A(x: [N, 1, 8, 8]) = Sequential(Conv2d(1, 2, 3), BatchNorm2d(2), ReLU, Flatten, Linear(72, 3));";
        compile_str(src).nets
    })
}

/// safetensors bytes loaded as the weights of a small net with a BatchNorm (f32 and i64
/// tensors); loaded weights must then check against the net.
pub fn safetensors(data: &[u8]) {
    for g in nets() {
        if let Ok(w) = Weights::from_safetensors(g, data) {
            w.check(g).expect("loaded weights fit the net");
        }
    }
}

/// `.npy` bytes read as an f32 array, and `.npz` bytes read as a training set.
pub fn npy(data: &[u8]) {
    if let Ok(a) = crate::data::read_npy(data) {
        assert!(a.is_standard_layout());
    }
    for t in [crate::data::Targets::Classes, crate::data::Targets::Floats("mse")] {
        if let Ok((x, y)) = crate::data::read_npz(std::io::Cursor::new(data), t) {
            assert_eq!(x.shape()[0], y.shape()[0]);
        }
    }
}

/// ONNX bytes imported; a small imported model is then compiled and run on zeros on the JIT
/// and the interpreter, and its `.cnn` text must compile to a net with the same parameters.
pub fn onnx(data: &[u8]) {
    let Ok(m) = onnx::import_bytes(data, None, &onnx::Options::default()) else { return };
    let w = onnx::weights(&m).expect("imported weights fit the imported graph");
    let out = compile_str(&m.source);
    assert!(out.errors().next().is_none(), "the .cnn text of an imported model compiles:\n{}", m.source);
    assert_eq!(out.nets.last().map(|g| &g.params), Some(&m.graph.params));
    let s = cnnc_compiler::Summary::of(&m.graph);
    if s.total_macs > 2_000_000
        || m.graph.inputs.iter().any(|(_, id)| m.graph.node(*id).ty.numel_per_sample() > 100_000)
    {
        return;
    }
    let xs: Vec<ArrayD<f32>> =
        m.graph.inputs.iter().map(|(_, id)| ArrayD::zeros(IxDyn(&m.graph.node(*id).ty.concrete(1)))).collect();
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    let _ = interp::run(&m.graph, &w, &views);
    if let Ok(net) = Compiled::new(&m.graph, &w, &Options { threads: 1, ..Options::default() }) {
        let _ = net.run(&views);
    }
}

/// Reads choices from the fuzz input.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self, n: usize) -> usize {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                usize::from(*b) % n.max(1)
            }
            None => 0,
        }
    }
}

/// The layer text and output channels of one randomly chosen layer after `c` channels.
fn layer(b: &mut Bytes<'_>, c: usize) -> (String, usize) {
    match b.next(9) {
        0 | 1 => {
            let groups = if b.next(3) == 0 && c > 1 { c } else { 1 };
            let out = if groups > 1 { c * (1 + b.next(2)) } else { 1 + b.next(20) };
            let (k, s, d) = (1 + b.next(3), 1 + b.next(2), 1 + b.next(2));
            let pad = match b.next(4) {
                0 => "0".to_string(),
                1 => "1".to_string(),
                2 => format!("({}, {}, {}, {})", b.next(2), b.next(3), b.next(3), b.next(2)),
                _ if s == 1 => "\"same\"".to_string(),
                _ => "1".to_string(),
            };
            let mode = ["zeros", "reflect", "replicate", "circular"][b.next(4)];
            let bias = if b.next(2) == 0 { "True" } else { "False" };
            (
                format!(
                    "Conv2d({c}, {out}, {k}, stride = {s}, padding = {pad}, dilation = {d}, groups = {groups}, bias = {bias}, padding_mode = \"{mode}\")"
                ),
                out,
            )
        }
        2 => (format!("MaxPool2d({}, stride = {}, ceil_mode = {})", 1 + b.next(3), 1 + b.next(2), b.next(2) == 0), c),
        3 => (
            format!("AvgPool2d({}, padding = {}, count_include_pad = {})", 2 + b.next(2), b.next(2), b.next(2) == 0),
            c,
        ),
        4 => (format!("BatchNorm2d({c})"), c),
        5 => (
            ["ReLU()", "Sigmoid()", "Tanh()", "ReLU6()", "Hardtanh(-0.5, 0.25)", "Softmax(dim = 1)"][b.next(6)]
                .to_string(),
            c,
        ),
        6 => (format!("AdaptiveAvgPool2d({})", 1 + b.next(3)), c),
        _ => ("Dropout(0.5)".to_string(), c),
    }
}

/// Differential: a small random conv net built from the input's bytes (convolutions with
/// every padding form and mode, pools, BatchNorm, activations, a Linear head), with weights
/// and inputs seeded by it, must give the same outputs on the JIT (fused, 1 or 2 threads,
/// micro-kernel or portable code, 3×3 convolutions by the cost model, direct or Winograd) as
/// on the reference interpreter.
pub fn differential(data: &[u8]) {
    let mut b = Bytes(data);
    let (c0, h, w) = (1 + b.next(4), 3 + b.next(14), 3 + b.next(14));
    let mut layers = vec![];
    let mut c = c0;
    for _ in 0..1 + b.next(5) {
        let (text, out) = layer(&mut b, c);
        layers.push(text);
        c = out;
    }
    let classes = 1 + b.next(5);
    let src = format!("net D(x: [N, {c0}, {h}, {w}]) = Sequential({}, Flatten(), LazyHead);", layers.join(", "));
    // The head's input size comes from the checked shapes: compile the body first.
    let body = src.replace(", Flatten(), LazyHead", "");
    let Some(g) = compile_str(&body).nets.into_iter().last() else { return };
    let out = &g.node(g.outputs[0].1).ty;
    let features = out.numel_per_sample();
    if features == 0 || features > 4096 {
        return;
    }
    let src = src.replace("LazyHead", &format!("Linear({features}, {classes})"));
    let Some(g) = compile_str(&src).nets.into_iter().last() else { return };
    let seed = b.next(256) as u64;
    let mut weights = Weights::random(&g, seed);
    weights.randomize_batchnorm(&g, seed);
    let n = 1 + b.next(3);
    let shape = g.node(g.inputs[0].1).ty.concrete(n);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let x = ArrayD::from_shape_simple_fn(IxDyn(&shape), || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    });
    let want = interp::run(&g, &weights, &[x.view()]).expect("the interpreter runs a checked net").remove(0);
    let (threads, portable, fuse) = (1 + b.next(2), b.next(2) == 0, b.next(2) == 0);
    let conv = [ConvAlgorithm::Auto, ConvAlgorithm::Direct, ConvAlgorithm::Winograd][b.next(3)];
    let opts = Options { threads, portable, fuse, conv };
    let net = Compiled::new(&g, &weights, &opts).expect("the JIT compiles a checked net");
    let got = net.run(&[x.view()]).expect("the JIT runs").remove(0);
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (a, e)) in got.iter().zip(want.iter()).enumerate() {
        assert!(
            (a - e).abs() <= 1e-4 * scale || (a.is_nan() && e.is_nan()),
            "JIT {a} vs interpreter {e} at {i} ({opts:?})\n{src}"
        );
    }
}
