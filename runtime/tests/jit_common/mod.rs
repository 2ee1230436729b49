//! Helpers shared by the JIT tests: building one-layer graphs from PyTorch-style arguments,
//! deterministic inputs and weights, and the JIT-versus-interpreter comparison.
#![allow(dead_code)]

use cnnc_compiler::ops::args::{Arg, ArgValue};
use cnnc_compiler::ops::{self, Epilogue, Op};
use cnnc_compiler::{Graph, GraphBuilder, NodeId, TensorType};
use cnnc_runtime::weights::Weights;
use cnnc_runtime::{Compiled, Error, Kernels, Options, interp};
use ndarray::{ArrayD, IxDyn};

/// An integer argument.
pub fn int(v: i64) -> ArgValue {
    ArgValue::Int(v)
}

/// An `(h, w)` argument.
pub fn pair(h: i64, w: i64) -> ArgValue {
    ArgValue::Tuple(vec![ArgValue::Int(h), ArgValue::Int(w)])
}

/// A string argument.
pub fn s(v: &str) -> ArgValue {
    ArgValue::Str(v.to_string())
}

/// A bool argument.
pub fn b(v: bool) -> ArgValue {
    ArgValue::Bool(v)
}

/// Constructs a layer the way the DSL does: positional arguments, then keywords.
pub fn layer(name: &str, positional: &[ArgValue], keywords: &[(&str, ArgValue)]) -> Op {
    let span = proc_macro2::Span::call_site();
    let mut args: Vec<Arg> =
        positional.iter().map(|v| Arg { keyword: None, value: v.clone(), span: span.into() }).collect();
    args.extend(keywords.iter().map(|(k, v)| Arg {
        keyword: Some(k.to_string()),
        value: v.clone(),
        span: span.into(),
    }));
    let ctor = ops::layer_ctor(name).unwrap_or_else(|| panic!("no layer {name}"));
    ops::construct(ctor, &args, span.into()).unwrap_or_else(|e| panic!("{name}: {e:?}"))
}

/// Like [`layer`], but `None` when the arguments are rejected.
pub fn try_layer(name: &str, positional: &[ArgValue], keywords: &[(&str, ArgValue)]) -> Option<Op> {
    let span = proc_macro2::Span::call_site();
    let mut args: Vec<Arg> =
        positional.iter().map(|v| Arg { keyword: None, value: v.clone(), span: span.into() }).collect();
    args.extend(keywords.iter().map(|(k, v)| Arg {
        keyword: Some(k.to_string()),
        value: v.clone(),
        span: span.into(),
    }));
    ops::construct(ops::layer_ctor(name)?, &args, span.into()).ok()
}

/// Like [`one_layer`], but `None` when the op does not accept the input shape.
pub fn try_one_layer(dims: &[usize], op: Op) -> Option<Graph> {
    let mut g = GraphBuilder::new("one");
    let x = g.input("x", TensorType::new(dims.to_vec()));
    let y = g.layer("layer", op, &[x]).ok()?;
    g.output("y", y);
    Some(g.finish())
}

/// Sets the epilogue of a Conv2d or Linear.
pub fn with_epilogue(mut op: Op, e: Epilogue) -> Op {
    match &mut op {
        Op::Conv2d(c) => c.epilogue = e,
        Op::Linear(l) => l.epilogue = e,
        other => panic!("{} has no epilogue", other.kind()),
    }
    op
}

/// `x → op → y` with a symbolic batch.
pub fn one_layer(dims: &[usize], op: Op) -> Graph {
    let mut g = GraphBuilder::new("one");
    let x = g.input("x", TensorType::new(dims.to_vec()));
    let y = g.layer("layer", op, &[x]).unwrap_or_else(|e| panic!("{e:?}"));
    g.output("y", y);
    g.finish()
}

/// `x → op(x, residual) → y` where the residual is a second input shaped like the output.
pub fn one_layer_residual(dims: &[usize], op: Op) -> Graph {
    let mut g = GraphBuilder::new("residual");
    let x = g.input("x", TensorType::new(dims.to_vec()));
    let probe = with_epilogue(op.clone(), Epilogue::default());
    let out_ty = g.infer(&probe, &[x], &[]).unwrap_or_else(|e| panic!("{e:?}")).ty;
    let r = g.input("r", out_ty);
    let y = g.layer("layer", op, &[x, r]).unwrap_or_else(|e| panic!("{e:?}"));
    g.output("y", y);
    g.finish()
}

/// A small deterministic generator (SplitMix64).
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// A tensor of the given shape with uniform values in `[-1, 1)`.
pub fn random(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut r = Rng(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || r.uniform())
}

/// Random weights with non-trivial BatchNorm statistics and epilogue scale/shift.
pub fn weights(g: &Graph, seed: u64) -> Weights {
    let mut w = Weights::random(g, seed);
    w.randomize_batchnorm(g, seed);
    w
}

/// Random inputs for every graph input at batch `n`.
pub fn inputs(g: &Graph, n: usize, seed: u64) -> Vec<ArrayD<f32>> {
    g.inputs.iter().enumerate().map(|(i, (_, id))| random(&g.node(*id).ty.concrete(n), seed + i as u64)).collect()
}

/// `max |got − want| / max(1, max |want|)`; a NaN where the other is not counts as infinite.
pub fn error(got: &ArrayD<f32>, want: &ArrayD<f32>) -> f32 {
    assert_eq!(got.shape(), want.shape(), "shapes differ");
    let scale = want.iter().filter(|v| v.is_finite()).fold(1f32, |m, v| m.max(v.abs()));
    got.iter().zip(want).fold(0f32, |m, (g, w)| {
        let e = if g.is_nan() || w.is_nan() {
            if g.is_nan() && w.is_nan() { 0.0 } else { f32::INFINITY }
        } else if g == w {
            0.0
        } else {
            (g - w).abs()
        };
        m.max(e / scale)
    })
}

/// Tolerance of every comparison: `1e-5 · max(1, max |y|)`.
pub const TOL: f32 = 1e-5;

/// Runs `g` through the JIT and the interpreter on the same inputs and returns the worst
/// normalised error over all outputs.
pub fn jit_vs_interp(g: &Graph, w: &Weights, xs: &[ArrayD<f32>], opts: &Options) -> f32 {
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    let want = interp::run(g, w, &views).unwrap_or_else(|e| panic!("interp: {e}"));
    let net = Compiled::new(g, w, opts).unwrap_or_else(|e| panic!("compile: {e}"));
    let got = net.run(&views).unwrap_or_else(|e| panic!("run: {e}"));
    assert_eq!(got.len(), want.len());
    assert_overwrites(&net, &views, &got);
    got.iter().zip(&want).map(|(a, b)| error(a, b)).fold(0f32, f32::max)
}

/// Asserts that a run into reused outputs filled with NaN (`Compiled::run_reusing`, which
/// does not clear them) gives `got` bit for bit: every kernel writes all of its result.
pub fn assert_overwrites(net: &Compiled, views: &[ndarray::ArrayViewD<'_, f32>], got: &[ArrayD<f32>]) {
    let stale = got.iter().map(|a| a.mapv(|_| f32::NAN)).collect();
    let again = net.run_reusing(views, stale).unwrap_or_else(|e| panic!("run_reusing: {e}"));
    for (i, (a, b)) in again.iter().zip(got).enumerate() {
        let same = a.shape() == b.shape() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "output {i}: a run into stale outputs differs from a fresh one");
    }
}

/// Asserts the JIT matches the interpreter for `g` at batch `n` (default options, and the
/// portable path with two threads).
pub fn check(what: &str, g: &Graph, n: usize, seed: u64) {
    let w = weights(g, seed);
    let xs = inputs(g, n, seed ^ 0x5eed);
    for opts in [
        Options { threads: 1, portable: false, fuse: false, ..Default::default() },
        Options { threads: 2, portable: true, fuse: false, ..Default::default() },
    ] {
        let e = jit_vs_interp(g, &w, &xs, &opts);
        assert!(e <= TOL, "{what} (batch {n}, {opts:?}): worst error {e:e} > {TOL:e}\n{g}");
    }
}

/// The node ids of a graph's outputs.
pub fn outputs(g: &Graph) -> Vec<NodeId> {
    g.outputs.iter().map(|(_, id)| *id).collect()
}

/// `g` compiled with the given micro-kernels, every splittable kernel shared between the
/// threads; `None` when the CPU lacks those kernels (any other error fails the test).
pub fn compile_split(what: &str, g: &Graph, w: &Weights, opts: &Options, kernels: Kernels) -> Option<Compiled> {
    match Compiled::with_kernels(g, w, opts, kernels) {
        Ok(net) => Some(net.with_parallel_threshold(0)),
        Err(Error::Unsupported(why)) if why.contains("cannot run") => None,
        Err(e) => panic!("{what}: compile with {kernels:?}: {e}"),
    }
}
