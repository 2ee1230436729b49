//! `nn.BatchNorm2d` in inference mode: `y = (x − running_mean) / sqrt(running_var + eps) · weight + bias`
//! (with `track_running_stats=False`, the batch's mean and biased variance instead).

use super::args::{ArgValue, Bound, opt, req};
use super::{DType, Inferred, LayerCtor, Op, OpDef, OpError, Operand, ParamKind, ParamSpec, collect, need_nchw};
use crate::diag::Diagnostic;
use crate::shape::TensorType;

/// `nn.BatchNorm2d(num_features, eps=1e-5, momentum=0.1, affine=True)`.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm2d {
    /// Channels.
    pub num_features: usize,
    /// Added to the variance.
    pub eps: f64,
    /// Running-average momentum (training only, so inference ignores it); `NaN` stands for
    /// PyTorch's `momentum=None` (a cumulative average).
    pub momentum: f64,
    /// Whether there are `weight` and `bias`.
    pub affine: bool,
    /// Whether there are running statistics (`running_mean`, `running_var`,
    /// `num_batches_tracked`); without them the batch statistics normalise in eval mode too.
    pub track_running_stats: bool,
}

fn build(b: &Bound) -> Result<Op, Vec<Diagnostic>> {
    let mut errs = vec![];
    let num_features = collect(b.positive("num_features", 1), &mut errs);
    let eps = collect(b.float("eps", 1e-5), &mut errs);
    let momentum = match b.raw("momentum") {
        Some((ArgValue::None, _)) => Some(f64::NAN),
        _ => collect(b.float("momentum", 0.1), &mut errs),
    };
    let affine = collect(b.bool("affine", true), &mut errs);
    let track = collect(b.bool("track_running_stats", true), &mut errs);
    if let Some(e) = eps
        && e <= 0.0
    {
        errs.push(Diagnostic::error(b.span_of("eps"), format!("BatchNorm2d: eps must be positive, found {e}")));
    }
    match (num_features, eps, momentum, affine, track) {
        (Some(num_features), Some(eps), Some(momentum), Some(affine), Some(track_running_stats)) if errs.is_empty() => {
            Ok(Op::BatchNorm2d(BatchNorm2d { num_features, eps, momentum, affine, track_running_stats }))
        }
        _ => Err(errs),
    }
}

pub(super) const CTOR: LayerCtor = LayerCtor {
    name: "BatchNorm2d",
    sig: &[req("num_features"), opt("eps"), opt("momentum"), opt("affine"), opt("track_running_stats")],
    build,
};

impl OpDef for BatchNorm2d {
    fn kind(&self) -> &'static str {
        "BatchNorm2d"
    }

    fn infer(&self, inputs: &[Operand<'_>]) -> Result<Inferred, OpError> {
        let x = &inputs[0];
        let Some((c, _, _)) = x.ty.chw() else {
            return Err(need_nchw(&self.describe(), x));
        };
        if c != self.num_features {
            return Err(OpError::new(format!(
                "{} expects {} channels, but {} gives {c} channels ({})",
                self.describe(),
                self.num_features,
                x.producer,
                x.ty
            ))
            .recover(x.ty.with_dims(vec![self.num_features, x.ty.dims[1], x.ty.dims[2]])));
        }
        Ok(Inferred::ok(x.ty.clone()))
    }

    fn params(&self) -> Vec<ParamSpec> {
        let c = self.num_features;
        let mut p = vec![];
        if self.affine {
            p.push(ParamSpec::f32("weight", vec![c], ParamKind::Weight));
            p.push(ParamSpec::f32("bias", vec![c], ParamKind::Bias));
        }
        if self.track_running_stats {
            p.push(ParamSpec::f32("running_mean", vec![c], ParamKind::Buffer));
            p.push(ParamSpec::f32("running_var", vec![c], ParamKind::Buffer));
            p.push(ParamSpec {
                suffix: "num_batches_tracked",
                shape: vec![],
                kind: ParamKind::Buffer,
                dtype: DType::I64,
            });
        }
        p
    }

    fn macs(&self, _inputs: &[&TensorType], output: &TensorType) -> u64 {
        output.numel_per_sample() as u64
    }

    fn describe(&self) -> String {
        let mut s = format!("BatchNorm2d({}", self.num_features);
        if self.eps != 1e-5 {
            s += &format!(", eps={:e}", self.eps);
        }
        if !self.affine {
            s += ", affine=False";
        }
        if !self.track_running_stats {
            s += ", track_running_stats=False";
        }
        s + ")"
    }
}
