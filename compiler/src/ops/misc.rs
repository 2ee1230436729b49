//! Shape-preserving and reshaping ops: activations, Dropout, Flatten, the residual add,
//! channel concatenation and mean/max reductions.

use super::args::{Bound, opt};
use super::{Arity, Inferred, LayerCtor, Op, OpDef, OpError, Operand, collect};
use crate::diag::Diagnostic;

/// An elementwise activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `1 / (1 + e^−x)`.
    Sigmoid,
    /// `tanh(x)`.
    Tanh,
    /// `clamp(x, min, max)`: `nn.Hardtanh(min_val, max_val)`, `nn.ReLU6` (`(0, 6)`), ONNX's
    /// `Clip`. NaN passes through, as in PyTorch.
    Hardtanh(Limit, Limit),
    /// `x < 0 ? slope·x : x`: `nn.LeakyReLU(negative_slope)`, ONNX's `LeakyRelu`.
    LeakyRelu(Limit),
}

/// An f32 bound of [`Activation::Hardtanh`], kept as its bits so activations stay `Eq + Hash`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit(u32);

impl Limit {
    /// The bound `v` (`-0.0` is kept as `0.0`).
    pub fn new(v: f32) -> Limit {
        Limit(if v == 0.0 { 0 } else { v.to_bits() })
    }
    /// The bound's value.
    pub fn get(self) -> f32 {
        f32::from_bits(self.0)
    }
}

impl std::fmt::Debug for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.get())
    }
}

impl Activation {
    /// `nn.Hardtanh(min_val, max_val)`.
    pub fn hardtanh(min: f32, max: f32) -> Activation {
        Activation::Hardtanh(Limit::new(min), Limit::new(max))
    }

    /// `nn.ReLU6()`.
    pub fn relu6() -> Activation {
        Activation::hardtanh(0.0, 6.0)
    }

    /// The bounds of a Hardtanh.
    pub fn limits(self) -> Option<(f32, f32)> {
        match self {
            Activation::Hardtanh(lo, hi) => Some((lo.get(), hi.get())),
            _ => None,
        }
    }

    /// PyTorch class name.
    pub fn kind_name(self) -> &'static str {
        match self {
            Activation::Relu => "ReLU",
            Activation::Sigmoid => "Sigmoid",
            Activation::Tanh => "Tanh",
            a if a == Activation::relu6() => "ReLU6",
            Activation::Hardtanh(..) => "Hardtanh",
            Activation::LeakyRelu(_) => "LeakyReLU",
        }
    }

    /// Scalar reference semantics in f32 (used by the interpreter and by tests).
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Relu => {
                if x.is_nan() {
                    x
                } else {
                    x.max(0.0)
                }
            }
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::Tanh => x.tanh(),
            // As ATen: `x > 0 ? x : x·slope` (NaN passes through).
            Activation::LeakyRelu(slope) => {
                if x > 0.0 {
                    x
                } else {
                    x * slope.get()
                }
            }
            // Compare-and-select like ATen's clamp: NaN and −0.0 pass through.
            Activation::Hardtanh(lo, hi) => {
                if x < lo.get() {
                    lo.get()
                } else if x > hi.get() {
                    hi.get()
                } else {
                    x
                }
            }
        }
    }
}

fn build_act(b: &Bound, a: Activation) -> Result<Op, Vec<Diagnostic>> {
    let mut errs = vec![];
    collect(b.bool("inplace", false), &mut errs);
    if errs.is_empty() { Ok(Op::Activation(a)) } else { Err(errs) }
}

pub(super) const RELU_CTOR: LayerCtor =
    LayerCtor { name: "ReLU", sig: &[opt("inplace")], build: |b| build_act(b, Activation::Relu) };
pub(super) const SIGMOID_CTOR: LayerCtor =
    LayerCtor { name: "Sigmoid", sig: &[], build: |b| build_act_noarg(b, Activation::Sigmoid) };
pub(super) const TANH_CTOR: LayerCtor =
    LayerCtor { name: "Tanh", sig: &[], build: |b| build_act_noarg(b, Activation::Tanh) };
pub(super) const RELU6_CTOR: LayerCtor =
    LayerCtor { name: "ReLU6", sig: &[opt("inplace")], build: |b| build_act(b, Activation::relu6()) };
pub(super) const LEAKY_RELU_CTOR: LayerCtor = LayerCtor {
    name: "LeakyReLU",
    sig: &[opt("negative_slope"), opt("inplace")],
    build: |b| {
        let mut errs = vec![];
        let slope = collect(b.float("negative_slope", 0.01), &mut errs);
        collect(b.bool("inplace", false), &mut errs);
        match slope {
            Some(s) if errs.is_empty() && s.is_finite() => {
                Ok(Op::Activation(Activation::LeakyRelu(Limit::new(s as f32))))
            }
            Some(s) if errs.is_empty() => Err(vec![Diagnostic::error(
                b.span_of("negative_slope"),
                format!("LeakyReLU: negative_slope must be finite, found {s}"),
            )]),
            _ => Err(errs),
        }
    },
};
pub(super) const HARDTANH_CTOR: LayerCtor = LayerCtor {
    name: "Hardtanh",
    sig: &[opt("min_val"), opt("max_val"), opt("inplace")],
    build: |b| {
        let mut errs = vec![];
        let lo = collect(b.float("min_val", -1.0), &mut errs);
        let hi = collect(b.float("max_val", 1.0), &mut errs);
        collect(b.bool("inplace", false), &mut errs);
        match (lo, hi) {
            (Some(lo), Some(hi)) if errs.is_empty() => {
                if lo.is_finite() && hi.is_finite() && lo <= hi {
                    Ok(Op::Activation(Activation::hardtanh(lo as f32, hi as f32)))
                } else {
                    Err(vec![Diagnostic::error(
                        b.span_of("max_val"),
                        format!("Hardtanh: max_val ({hi}) must be finite and at least min_val ({lo})"),
                    )])
                }
            }
            _ => Err(errs),
        }
    },
};

fn build_act_noarg(_b: &Bound, a: Activation) -> Result<Op, Vec<Diagnostic>> {
    Ok(Op::Activation(a))
}

impl OpDef for Activation {
    fn kind(&self) -> &'static str {
        self.kind_name()
    }
    fn infer(&self, inputs: &[Operand<'_>]) -> Result<Inferred, OpError> {
        Ok(Inferred::ok(inputs[0].ty.clone()))
    }
    fn describe(&self) -> String {
        match self {
            Activation::Hardtanh(lo, hi) if *self != Activation::relu6() => {
                format!("Hardtanh(min_val={:?}, max_val={:?})", lo.get(), hi.get())
            }
            Activation::LeakyRelu(s) => format!("LeakyReLU(negative_slope={:?})", s.get()),
            _ => format!("{}()", self.kind_name()),
        }
    }
}

/// `nn.Softmax(dim)`: `exp(x − max) / Σ exp(x − max)` along one axis (`dim` counts the batch,
/// as in PyTorch; negative from the end). Inference only: train on logits with
/// `CrossEntropyLoss`, which includes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Softmax {
    /// The axis, as written.
    pub dim: i64,
}

impl Softmax {
    /// The axis as an index of the full shape (batch = 0) for a tensor of `rank`, if valid and
    /// not the batch.
    pub fn axis(&self, rank: usize) -> Option<usize> {
        let r = rank as i64;
        let d = if self.dim < 0 { self.dim + r } else { self.dim };
        (1..r).contains(&d).then_some(d as usize)
    }
}

pub(super) const SOFTMAX_CTOR: LayerCtor = LayerCtor {
    name: "Softmax",
    sig: &[opt("dim")],
    build: |b| match b.raw("dim") {
        None | Some((super::args::ArgValue::None, _)) => Err(vec![
            Diagnostic::error(b.span, "Softmax: give `dim` (PyTorch's implicit choice is deprecated)")
                .help("for class scores [N, classes]: Softmax(dim = 1)"),
        ]),
        Some(_) => b.int("dim", 1).map(|dim| Op::Softmax(Softmax { dim })).map_err(|e| vec![e]),
    },
};

impl OpDef for Softmax {
    fn kind(&self) -> &'static str {
        "Softmax"
    }
    fn infer(&self, inputs: &[Operand<'_>]) -> Result<Inferred, OpError> {
        let x = &inputs[0];
        match self.axis(x.ty.rank()) {
            Some(_) => Ok(Inferred::ok(x.ty.clone())),
            None => Err(OpError::new(format!(
                "Softmax(dim={}) on {} from {}: dim must name a non-batch axis (1..{} or negative)",
                self.dim,
                x.ty,
                x.producer,
                x.ty.rank()
            ))
            .recover(x.ty.clone())),
        }
    }
    fn describe(&self) -> String {
        format!("Softmax(dim={})", self.dim)
    }
}

/// `nn.Dropout(p)`: the identity at inference.
#[derive(Clone, Debug, PartialEq)]
pub struct Dropout {
    /// Drop probability (training only).
    pub p: f64,
}

pub(super) const DROPOUT_CTOR: LayerCtor = LayerCtor {
    name: "Dropout",
    sig: &[opt("p"), opt("inplace")],
    build: |b| {
        let mut errs = vec![];
        let p = collect(b.float("p", 0.5), &mut errs);
        collect(b.bool("inplace", false), &mut errs);
        match p {
            Some(p) if !(0.0..=1.0).contains(&p) => {
                Err(vec![Diagnostic::error(b.span_of("p"), format!("Dropout: p must be in [0, 1], found {p}"))])
            }
            Some(p) if errs.is_empty() => Ok(Op::Dropout(Dropout { p })),
            _ => Err(errs),
        }
    },
};

impl OpDef for Dropout {
    fn kind(&self) -> &'static str {
        "Dropout"
    }
    fn infer(&self, inputs: &[Operand<'_>]) -> Result<Inferred, OpError> {
        Ok(Inferred::ok(inputs[0].ty.clone()))
    }
    fn describe(&self) -> String {
        format!("Dropout(p={})", self.p)
    }
}

/// `nn.Flatten(start_dim=1, end_dim=-1)` (dims count the batch, as in PyTorch).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Flatten {
    /// First dimension flattened.
    pub start_dim: i64,
    /// Last dimension flattened.
    pub end_dim: i64,
}

impl Flatten {
    /// `(start, end)` as per-sample dimension indices (batch excluded), inclusive.
    pub fn range(&self, rank: usize) -> Result<(usize, usize), OpError> {
        let norm = |d: i64| if d < 0 { d + rank as i64 } else { d };
        let (s, e) = (norm(self.start_dim), norm(self.end_dim));
        if s < 1 || e >= rank as i64 || s > e {
            return Err(OpError::new(format!(
                "{}: dims {}..={} are out of range for a rank-{rank} input (the batch dim 0 cannot be flattened)",
                self.describe(),
                self.start_dim,
                self.end_dim
            )));
        }
        Ok((s as usize - 1, e as usize - 1))
    }
}

pub(super) const FLATTEN_CTOR: LayerCtor = LayerCtor {
    name: "Flatten",
    sig: &[opt("start_dim"), opt("end_dim")],
    build: |b| {
        let mut errs = vec![];
        let s = collect(b.int("start_dim", 1), &mut errs);
        let e = collect(b.int("end_dim", -1), &mut errs);
        match (s, e) {
            (Some(start_dim), Some(end_dim)) => Ok(Op::Flatten(Flatten { start_dim, end_dim })),
            _ => Err(errs),
        }
    },
};

impl OpDef for Flatten {
    fn kind(&self) -> &'static str {
        "Flatten"
    }
    fn infer(&self, inputs: &[Operand<'_>]) -> Result<Inferred, OpError> {
        let x = &inputs[0];
        let (s, e) = self.range(x.ty.rank())?;
        let mut dims = x.ty.dims[..s].to_vec();
        dims.push(x.ty.dims[s..=e].iter().product());
        dims.extend_from_slice(&x.ty.dims[e + 1..]);
        Ok(Inferred::ok(x.ty.with_dims(dims)))
    }
    fn describe(&self) -> String {
        if (self.start_dim, self.end_dim) == (1, -1) {
            "Flatten()".into()
        } else {
            format!("Flatten(start_dim={}, end_dim={})", self.start_dim, self.end_dim)
        }
    }
}

/// Elementwise `a + b` of two equal-shaped tensors (the residual add).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Add;

impl OpDef for Add {
    fn kind(&self) -> &'static str {
        "Add"
    }
    fn arity(&self) -> Arity {
        Arity::Exactly(2)
    }
    fn infer(&self, inputs: &[Operand<'_>]) -> Result<Inferred, OpError> {
        let (a, b) = (&inputs[0], &inputs[1]);
        if a.ty != b.ty {
            return Err(OpError::new(format!(
                "`+` needs two tensors of the same shape, but the left side ({}) is {} and the right side ({}) is {}",
                a.producer, a.ty, b.producer, b.ty
            ))
            .note("cnnc does not broadcast in `+`; a residual branch must keep the shape, or project it (e.g. a 1×1 Conv2d with the same stride)")
            .recover(a.ty.clone()));
        }
        Ok(Inferred::ok(a.ty.clone()))
    }
    fn describe(&self) -> String {
        "Add()".into()
    }
}

/// `torch.cat(xs, dim)` (dim counts the batch; dim 0 is not allowed).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Concat {
    /// The concatenation dimension (≥ 1).
    pub dim: usize,
}

impl OpDef for Concat {
    fn kind(&self) -> &'static str {
        "Concat"
    }
    fn arity(&self) -> Arity {
        Arity::AtLeast(1)
    }
    fn infer(&self, inputs: &[Operand<'_>]) -> Result<Inferred, OpError> {
        let first = &inputs[0];
        let rank = first.ty.rank();
        if self.dim == 0 || self.dim >= rank {
            return Err(OpError::new(format!(
                "cat: dim {} is out of range for rank-{rank} inputs (dim 0, the batch, cannot be concatenated)",
                self.dim
            )));
        }
        let d = self.dim - 1;
        let mut total = 0;
        for x in inputs {
            let same_rank = x.ty.rank() == rank;
            let others_equal = same_rank
                && x.ty.batch == first.ty.batch
                && x.ty.dims.iter().zip(&first.ty.dims).enumerate().all(|(i, (a, b))| i == d || a == b);
            if !others_equal {
                let spatial = |t: &crate::shape::TensorType| {
                    t.dims
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != d)
                        .map(|(_, v)| v.to_string())
                        .collect::<Vec<_>>()
                        .join("×")
                };
                return Err(OpError::new(format!(
                    "cat along dim {} needs equal sizes in every other dim, but {} is {} and {} is {} ({} vs {})",
                    self.dim,
                    first.producer,
                    first.ty,
                    x.producer,
                    x.ty,
                    spatial(first.ty),
                    spatial(x.ty)
                )));
            }
            total += x.ty.dims[d];
        }
        let mut dims = first.ty.dims.clone();
        dims[d] = total;
        Ok(Inferred::ok(first.ty.with_dims(dims)))
    }
    fn describe(&self) -> String {
        format!("cat(dim={})", self.dim)
    }
}

/// What a reduction computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceKind {
    /// Arithmetic mean.
    Mean,
    /// Maximum (NaN propagates, as in PyTorch).
    Max,
}

/// A reduction over some non-batch dims (`x.mean(dim=[2, 3])`, `x.amax(dim=(2, 3))`,
/// `x.max(dim=2)[0]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reduce {
    /// Mean or max.
    pub kind: ReduceKind,
    /// Dims reduced, PyTorch numbering (≥ 1), sorted, unique.
    pub dims: Vec<usize>,
    /// Keep reduced dims as size 1.
    pub keepdim: bool,
}

impl OpDef for Reduce {
    fn kind(&self) -> &'static str {
        match self.kind {
            ReduceKind::Mean => "Mean",
            ReduceKind::Max => "Max",
        }
    }
    fn infer(&self, inputs: &[Operand<'_>]) -> Result<Inferred, OpError> {
        let x = &inputs[0];
        let rank = x.ty.rank();
        if let Some(bad) = self.dims.iter().find(|d| **d == 0 || **d >= rank) {
            return Err(OpError::new(format!(
                "{}: dim {bad} is out of range for {} from {} (rank {rank}; the batch dim 0 cannot be reduced)",
                self.describe(),
                x.ty,
                x.producer
            )));
        }
        let mut dims = vec![];
        for (i, v) in x.ty.dims.iter().enumerate() {
            if self.dims.contains(&(i + 1)) {
                if self.keepdim {
                    dims.push(1);
                }
            } else {
                dims.push(*v);
            }
        }
        Ok(Inferred::ok(x.ty.with_dims(dims)))
    }
    fn describe(&self) -> String {
        let name = match self.kind {
            ReduceKind::Mean => "mean",
            ReduceKind::Max => "amax",
        };
        let dims: Vec<String> = self.dims.iter().map(|d| d.to_string()).collect();
        let k = if self.keepdim { ", keepdim=True" } else { "" };
        format!("{name}(dim=[{}]{k})", dims.join(", "))
    }
}
