//! Training ops: the forward in training mode (BatchNorm with batch statistics, Dropout as a
//! mask product), the losses, and every backward op the autodiff pass
//! ([`crate::autodiff`]) emits. Each op is declared here once, with its operands, its shape
//! rule and the parameters it reads; the interpreter implements its semantics (PyTorch's).
//!
//! Types: a per-parameter gradient has the parameter's shape, written as a [`TensorType`]
//! whose leading dimension is fixed ([`param_type`]); a loss is `[1]` ([`scalar`]); the
//! batch statistics of a BatchNorm are `[2, C]` (mean, then biased variance).

use super::{
    Activation, AdaptiveAvgPool2d, Arity, AvgPool2d, BatchNorm2d, Conv2d, Inferred, Linear, MaxPool2d, OpDef, OpError,
    Operand, ParamKind, ParamSpec, Reduce, need_nchw,
};
use crate::shape::{Batch, TensorType};

/// The type of a tensor of a fixed shape (a parameter, its gradient): the first dimension is
/// the fixed "batch".
pub fn param_type(shape: &[usize]) -> TensorType {
    match shape.split_first() {
        Some((first, rest)) => TensorType { batch: Batch::Fixed(*first), dims: rest.to_vec() },
        None => scalar(),
    }
}

/// The type of a loss: one element, `[1]`.
pub fn scalar() -> TensorType {
    TensorType { batch: Batch::Fixed(1), dims: vec![] }
}

/// How a loss reduces over elements (PyTorch's `reduction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// The mean (PyTorch's default).
    Mean,
    /// The sum.
    Sum,
}

impl Reduction {
    /// PyTorch's name.
    pub fn name(self) -> &'static str {
        match self {
            Reduction::Mean => "mean",
            Reduction::Sum => "sum",
        }
    }
}

/// A loss function, as `torch.nn`'s.
#[derive(Clone, Debug, PartialEq)]
pub enum Loss {
    /// `nn.MSELoss`: `(pred − target)²`, reduced; target of the prediction's shape.
    Mse {
        /// Mean or sum.
        reduction: Reduction,
    },
    /// `nn.CrossEntropyLoss` on logits `[N, C]` with class indices `[N]` (given as floats),
    /// with optional label smoothing.
    CrossEntropy {
        /// Mean (over samples) or sum.
        reduction: Reduction,
        /// `label_smoothing` in `[0, 1]`.
        label_smoothing: f64,
    },
    /// `nn.BCEWithLogitsLoss`: `−[p·y·log σ(x) + (1 − y)·log(1 − σ(x))]`, computed stably,
    /// target of the logits' shape; `pos_weight` (one per class, the last dimension).
    BceWithLogits {
        /// Mean or sum.
        reduction: Reduction,
        /// Weight of positive examples per class, broadcast over the last dimension.
        pos_weight: Option<Vec<f64>>,
    },
}

impl Loss {
    /// PyTorch's class name.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Loss::Mse { .. } => "MSELoss",
            Loss::CrossEntropy { .. } => "CrossEntropyLoss",
            Loss::BceWithLogits { .. } => "BCEWithLogitsLoss",
        }
    }

    /// The target's type for a prediction of type `pred`.
    pub fn target_type(&self, pred: &TensorType) -> TensorType {
        match self {
            Loss::CrossEntropy { .. } => pred.with_dims(vec![]),
            _ => pred.clone(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Loss::Mse { reduction } => format!("MSELoss(reduction='{}')", reduction.name()),
            Loss::CrossEntropy { reduction, label_smoothing } => {
                format!("CrossEntropyLoss(reduction='{}', label_smoothing={label_smoothing})", reduction.name())
            }
            Loss::BceWithLogits { reduction, pos_weight } => {
                let pw = pos_weight.as_ref().map_or(String::new(), |p| format!(", pos_weight=[{} values]", p.len()));
                format!("BCEWithLogitsLoss(reduction='{}'{pw})", reduction.name())
            }
        }
    }

    fn check(&self, pred: &Operand<'_>, target: &Operand<'_>) -> Result<(), OpError> {
        let want = self.target_type(pred.ty);
        if let Loss::CrossEntropy { label_smoothing, .. } = self {
            if pred.ty.dims.len() != 1 {
                return Err(OpError::new(format!(
                    "{} expects logits [N, C], but {} gives {}",
                    self.kind_name(),
                    pred.producer,
                    pred.ty
                )));
            }
            if !(0.0..=1.0).contains(label_smoothing) {
                return Err(OpError::new(format!(
                    "{}: label_smoothing must be in [0, 1], found {label_smoothing}",
                    self.kind_name()
                )));
            }
        }
        if let Loss::BceWithLogits { pos_weight: Some(p), .. } = self {
            let last = pred.ty.dims.last().copied().unwrap_or(0);
            if p.len() != last {
                return Err(OpError::new(format!(
                    "{}: pos_weight has {} values, but the logits' last dimension is {last} ({})",
                    self.kind_name(),
                    p.len(),
                    pred.ty
                )));
            }
        }
        if target.ty != &want {
            return Err(OpError::new(format!(
                "{} of {} from {} needs a target {want}, but {} is {}",
                self.kind_name(),
                pred.ty,
                pred.producer,
                target.producer,
                target.ty
            )));
        }
        Ok(())
    }
}

/// A training op.
#[derive(Clone, Debug, PartialEq)]
pub enum TrainOp {
    /// `(x [N, C, H, W]) → [2, C]`: the batch mean and biased variance per channel.
    BatchStats(BatchNorm2d),
    /// `(x, stats) → y`: BatchNorm2d in training mode, normalising with the batch statistics;
    /// reads `weight`, `bias` when affine.
    BatchNormTrain(BatchNorm2d),
    /// `(x, mask) → x·mask`: Dropout in training mode, the mask holding `0` or `1/(1 − p)`.
    DropoutMask(f64),
    /// `(pred, target) → [1]`.
    Loss(Loss),
    /// `(pred, target) → ∂loss/∂pred`.
    LossGrad(Loss),
    /// `(dy) → dx` of a Conv2d with input height and width `in_hw`; reads `weight`.
    ConvInputGrad(Conv2d, (usize, usize)),
    /// `(x, dy) → ∂/∂weight` of a Conv2d.
    ConvWeightGrad(Conv2d),
    /// `(dy) → dx` of a Linear; reads `weight`.
    LinearInputGrad(Linear),
    /// `(x, dy) → ∂/∂weight` of a Linear (summed over every leading dimension).
    LinearWeightGrad(Linear),
    /// `(dy) → [C]`: the sum over every dimension but per-sample axis `axis` (a bias's
    /// gradient: axis 0 for channels, the last for features).
    BiasGrad(usize),
    /// `(x, dy) → dx` of a MaxPool2d: each window's gradient goes to its first maximal
    /// element (PyTorch's tie rule).
    MaxPoolGrad(MaxPool2d),
    /// `(dy) → dx` of an AvgPool2d on an input of `in_hw`, with the forward's divisors.
    AvgPoolGrad(AvgPool2d, (usize, usize)),
    /// `(dy) → dx` of an AdaptiveAvgPool2d on an input of `in_hw`.
    AdaptiveAvgPoolGrad(AdaptiveAvgPool2d, (usize, usize)),
    /// `(x, stats, dy) → dx` of a training-mode BatchNorm2d; reads `weight` when affine.
    BatchNormInputGrad(BatchNorm2d),
    /// `(x, stats, dy) → [C]`: `Σ dy·x̂`, the gradient of `weight`.
    BatchNormWeightGrad(BatchNorm2d),
    /// `(dy) → dx` of an eval-mode BatchNorm2d; reads `weight` (when affine) and `running_var`.
    BatchNormEvalInputGrad(BatchNorm2d),
    /// `(x, dy) → [C]`: `Σ dy·x̂` with the running statistics; reads `running_mean`,
    /// `running_var`.
    BatchNormEvalWeightGrad(BatchNorm2d),
    /// `(y, dy) → dx` of an activation, from its output `y`.
    ActivationGrad(Activation),
    /// `(dy) → dy` viewed with these per-sample dims (the backward of Flatten).
    Reshape(Vec<usize>),
    /// `(dy) → dy[…, start..start + len, …]` along `dim` (counting the batch; the backward
    /// of a concatenation).
    Slice {
        /// Dimension (≥ 1).
        dim: usize,
        /// First index.
        start: usize,
        /// Length.
        len: usize,
    },
    /// `(x, dy) → dx` of a mean or amax reduction (amax shares the gradient equally between
    /// tied maxima, as PyTorch's).
    ReduceGrad(Reduce),
}

/// Checks that a forward op, applied to `x`, gives `dy`'s type.
fn matches_forward(op: &dyn OpDef, x: &TensorType, dy: &Operand<'_>) -> Result<(), OpError> {
    let operand = Operand { ty: x, producer: "the forward input", factors: None };
    let y = op.infer(&[operand])?.ty;
    if &y != dy.ty {
        return Err(OpError::new(format!(
            "the gradient of {} on {x} must be {y}, but {} gives {}",
            op.describe(),
            dy.producer,
            dy.ty
        )));
    }
    Ok(())
}

fn same_type(what: &str, a: &Operand<'_>, b: &Operand<'_>) -> Result<(), OpError> {
    if a.ty != b.ty {
        return Err(OpError::new(format!(
            "{what} needs operands of one type, but {} is {} and {} is {}",
            a.producer, a.ty, b.producer, b.ty
        )));
    }
    Ok(())
}

fn stats_type(bn: &BatchNorm2d) -> TensorType {
    TensorType { batch: Batch::Fixed(2), dims: vec![bn.num_features] }
}

fn check_stats(bn: &BatchNorm2d, stats: &Operand<'_>) -> Result<(), OpError> {
    if stats.ty != &stats_type(bn) {
        return Err(OpError::new(format!(
            "{}: batch statistics must be {}, but {} gives {}",
            bn.describe(),
            stats_type(bn),
            stats.producer,
            stats.ty
        )));
    }
    Ok(())
}

fn bn_affine(bn: &BatchNorm2d, p: &mut Vec<ParamSpec>, bias: bool) {
    if bn.affine {
        p.push(ParamSpec::f32("weight", vec![bn.num_features], ParamKind::Weight));
        if bias {
            p.push(ParamSpec::f32("bias", vec![bn.num_features], ParamKind::Bias));
        }
    }
}

impl OpDef for TrainOp {
    fn kind(&self) -> &'static str {
        match self {
            TrainOp::BatchStats(_) => "BatchStats",
            TrainOp::BatchNormTrain(_) => "BatchNorm2dTrain",
            TrainOp::DropoutMask(_) => "DropoutTrain",
            TrainOp::Loss(l) => l.kind_name(),
            TrainOp::LossGrad(_) => "LossGrad",
            TrainOp::ConvInputGrad(..) => "Conv2dInputGrad",
            TrainOp::ConvWeightGrad(_) => "Conv2dWeightGrad",
            TrainOp::LinearInputGrad(_) => "LinearInputGrad",
            TrainOp::LinearWeightGrad(_) => "LinearWeightGrad",
            TrainOp::BiasGrad(_) => "BiasGrad",
            TrainOp::MaxPoolGrad(_) => "MaxPool2dGrad",
            TrainOp::AvgPoolGrad(..) => "AvgPool2dGrad",
            TrainOp::AdaptiveAvgPoolGrad(..) => "AdaptiveAvgPool2dGrad",
            TrainOp::BatchNormInputGrad(_) => "BatchNorm2dInputGrad",
            TrainOp::BatchNormWeightGrad(_) => "BatchNorm2dWeightGrad",
            TrainOp::BatchNormEvalInputGrad(_) => "BatchNorm2dEvalInputGrad",
            TrainOp::BatchNormEvalWeightGrad(_) => "BatchNorm2dEvalWeightGrad",
            TrainOp::ActivationGrad(_) => "ActivationGrad",
            TrainOp::Reshape(_) => "Reshape",
            TrainOp::Slice { .. } => "Slice",
            TrainOp::ReduceGrad(_) => "ReduceGrad",
        }
    }

    fn arity(&self) -> Arity {
        Arity::Exactly(match self {
            TrainOp::BatchStats(_)
            | TrainOp::ConvInputGrad(..)
            | TrainOp::LinearInputGrad(_)
            | TrainOp::BiasGrad(_)
            | TrainOp::AvgPoolGrad(..)
            | TrainOp::AdaptiveAvgPoolGrad(..)
            | TrainOp::BatchNormEvalInputGrad(_)
            | TrainOp::Reshape(_)
            | TrainOp::Slice { .. } => 1,
            TrainOp::BatchNormInputGrad(_) | TrainOp::BatchNormWeightGrad(_) => 3,
            _ => 2,
        })
    }

    fn infer(&self, inputs: &[Operand<'_>]) -> Result<Inferred, OpError> {
        let x = &inputs[0];
        let ty = match self {
            TrainOp::BatchStats(bn) => {
                bn.infer(&inputs[..1])?;
                stats_type(bn)
            }
            TrainOp::BatchNormTrain(bn) => {
                check_stats(bn, &inputs[1])?;
                bn.infer(&inputs[..1])?.ty
            }
            TrainOp::DropoutMask(_) => {
                same_type("Dropout's mask", x, &inputs[1])?;
                x.ty.clone()
            }
            TrainOp::Loss(l) => {
                l.check(x, &inputs[1])?;
                scalar()
            }
            TrainOp::LossGrad(l) => {
                l.check(x, &inputs[1])?;
                x.ty.clone()
            }
            TrainOp::ConvInputGrad(c, (h, w)) => {
                let xt = x.ty.with_dims(vec![c.in_channels, *h, *w]);
                matches_forward(c, &xt, x)?;
                xt
            }
            TrainOp::ConvWeightGrad(c) => {
                matches_forward(c, inputs[0].ty, &inputs[1])?;
                param_type(&c.weight_shape())
            }
            TrainOp::LinearInputGrad(l) => {
                let mut dims = x.ty.dims.clone();
                match dims.last_mut() {
                    Some(d) if *d == l.out_features => *d = l.in_features,
                    _ => {
                        return Err(OpError::new(format!(
                            "the gradient of {} must end in {} features, but {} gives {}",
                            l.describe(),
                            l.out_features,
                            x.producer,
                            x.ty
                        )));
                    }
                }
                x.ty.with_dims(dims)
            }
            TrainOp::LinearWeightGrad(l) => {
                matches_forward(l, inputs[0].ty, &inputs[1])?;
                param_type(&[l.out_features, l.in_features])
            }
            TrainOp::BiasGrad(axis) => match x.ty.dims.get(*axis) {
                Some(c) => param_type(&[*c]),
                None => return Err(OpError::new(format!("bias gradient: {} has no axis {axis}", x.ty))),
            },
            TrainOp::MaxPoolGrad(p) => {
                matches_forward(p, inputs[0].ty, &inputs[1])?;
                x.ty.clone()
            }
            TrainOp::AvgPoolGrad(p, (h, w)) => {
                let Some((c, _, _)) = x.ty.chw() else { return Err(need_nchw(&p.describe(), x)) };
                let xt = x.ty.with_dims(vec![c, *h, *w]);
                matches_forward(p, &xt, x)?;
                xt
            }
            TrainOp::AdaptiveAvgPoolGrad(p, (h, w)) => {
                let Some((c, _, _)) = x.ty.chw() else { return Err(need_nchw(&p.describe(), x)) };
                let xt = x.ty.with_dims(vec![c, *h, *w]);
                matches_forward(p, &xt, x)?;
                xt
            }
            TrainOp::BatchNormInputGrad(bn) | TrainOp::BatchNormWeightGrad(bn) => {
                check_stats(bn, &inputs[1])?;
                matches_forward(bn, inputs[0].ty, &inputs[2])?;
                if matches!(self, TrainOp::BatchNormInputGrad(_)) {
                    x.ty.clone()
                } else {
                    param_type(&[bn.num_features])
                }
            }
            TrainOp::BatchNormEvalInputGrad(bn) => {
                matches_forward(bn, x.ty, x)?;
                x.ty.clone()
            }
            TrainOp::BatchNormEvalWeightGrad(bn) => {
                matches_forward(bn, x.ty, &inputs[1])?;
                param_type(&[bn.num_features])
            }
            TrainOp::ActivationGrad(_) => {
                same_type("an activation's gradient", x, &inputs[1])?;
                x.ty.clone()
            }
            TrainOp::Reshape(dims) => {
                if dims.iter().product::<usize>() != x.ty.numel_per_sample() {
                    return Err(OpError::new(format!(
                        "reshape of {} from {} to {dims:?} changes the element count",
                        x.ty, x.producer
                    )));
                }
                x.ty.with_dims(dims.clone())
            }
            TrainOp::Slice { dim, start, len } => {
                let Some(size) = dim.checked_sub(1).and_then(|d| x.ty.dims.get(d)) else {
                    return Err(OpError::new(format!("slice: dim {dim} is out of range for {}", x.ty)));
                };
                if start + len > *size {
                    return Err(OpError::new(format!(
                        "slice {start}..{} of dim {dim} is out of range for {}",
                        start + len,
                        x.ty
                    )));
                }
                let mut dims = x.ty.dims.clone();
                dims[dim - 1] = *len;
                x.ty.with_dims(dims)
            }
            TrainOp::ReduceGrad(r) => {
                matches_forward(r, x.ty, &inputs[1])?;
                x.ty.clone()
            }
        };
        Ok(Inferred::ok(ty))
    }

    fn params(&self) -> Vec<ParamSpec> {
        let mut p = vec![];
        match self {
            TrainOp::BatchNormTrain(bn) => bn_affine(bn, &mut p, true),
            TrainOp::BatchNormInputGrad(bn) => bn_affine(bn, &mut p, false),
            TrainOp::BatchNormEvalInputGrad(bn) => {
                bn_affine(bn, &mut p, false);
                p.push(ParamSpec::f32("running_var", vec![bn.num_features], ParamKind::Buffer));
            }
            TrainOp::BatchNormEvalWeightGrad(bn) => {
                p.push(ParamSpec::f32("running_mean", vec![bn.num_features], ParamKind::Buffer));
                p.push(ParamSpec::f32("running_var", vec![bn.num_features], ParamKind::Buffer));
            }
            TrainOp::ConvInputGrad(c, _) => p.push(ParamSpec::f32("weight", c.weight_shape(), ParamKind::Weight)),
            TrainOp::LinearInputGrad(l) => {
                p.push(ParamSpec::f32("weight", vec![l.out_features, l.in_features], ParamKind::Weight))
            }
            _ => {}
        }
        p
    }

    fn macs(&self, inputs: &[&TensorType], output: &TensorType) -> u64 {
        match self {
            // Each is one product per (weight element, output pixel) pair, as the forward.
            TrainOp::ConvInputGrad(c, _) => {
                let per_pixel = (c.in_channels / c.groups.max(1) * c.kernel.0 * c.kernel.1) as u64;
                inputs.first().map_or(0, |dy| dy.numel_per_sample() as u64 * per_pixel)
            }
            TrainOp::ConvWeightGrad(c) => {
                let per_pixel = (c.in_channels / c.groups.max(1) * c.kernel.0 * c.kernel.1) as u64;
                inputs.get(1).map_or(0, |dy| dy.numel_per_sample() as u64 * per_pixel)
            }
            TrainOp::LinearInputGrad(l) => output.numel_per_sample() as u64 * l.out_features as u64,
            TrainOp::LinearWeightGrad(l) => {
                inputs.get(1).map_or(0, |dy| dy.numel_per_sample() as u64) * l.in_features as u64
            }
            _ => 0,
        }
    }

    fn describe(&self) -> String {
        match self {
            TrainOp::BatchStats(bn) => format!("batch_stats[{}]", bn.describe()),
            TrainOp::BatchNormTrain(bn) => format!("{}.train()", bn.describe()),
            TrainOp::DropoutMask(p) => format!("Dropout(p={p}).train()"),
            TrainOp::Loss(l) => l.describe(),
            TrainOp::LossGrad(l) => format!("grad[{}]", l.describe()),
            TrainOp::ConvInputGrad(c, _) => format!("input_grad[{}]", c.describe()),
            TrainOp::ConvWeightGrad(c) => format!("weight_grad[{}]", c.describe()),
            TrainOp::LinearInputGrad(l) => format!("input_grad[{}]", l.describe()),
            TrainOp::LinearWeightGrad(l) => format!("weight_grad[{}]", l.describe()),
            TrainOp::BiasGrad(axis) => format!("bias_grad(axis={axis})"),
            TrainOp::MaxPoolGrad(p) => format!("grad[{}]", p.describe()),
            TrainOp::AvgPoolGrad(p, _) => format!("grad[{}]", p.describe()),
            TrainOp::AdaptiveAvgPoolGrad(p, _) => format!("grad[{}]", p.describe()),
            TrainOp::BatchNormInputGrad(bn) => format!("input_grad[{}.train()]", bn.describe()),
            TrainOp::BatchNormWeightGrad(bn) => format!("weight_grad[{}.train()]", bn.describe()),
            TrainOp::BatchNormEvalInputGrad(bn) => format!("input_grad[{}]", bn.describe()),
            TrainOp::BatchNormEvalWeightGrad(bn) => format!("weight_grad[{}]", bn.describe()),
            TrainOp::ActivationGrad(a) => format!("grad[{}()]", a.kind_name()),
            TrainOp::Reshape(d) => format!("reshape({d:?})"),
            TrainOp::Slice { dim, start, len } => format!("slice(dim={dim}, {start}..{})", start + len),
            TrainOp::ReduceGrad(r) => format!("grad[{}]", r.describe()),
        }
    }
}
