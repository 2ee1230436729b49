//! `nn.Linear`: applied to the last dimension, as in PyTorch.

use super::args::{Bound, opt, req};
use super::{Arity, Epilogue, Inferred, LayerCtor, Op, OpDef, OpError, Operand, ParamKind, ParamSpec, collect};
use crate::diag::Diagnostic;
use crate::shape::TensorType;

/// `nn.Linear(in_features, out_features, bias=True)`, optionally with a fused epilogue.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// Input features (last dimension of the input).
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Whether there is a bias.
    pub bias: bool,
    /// Fused epilogue (set by passes).
    pub epilogue: Epilogue,
}

fn build(b: &Bound) -> Result<Op, Vec<Diagnostic>> {
    let mut errs = vec![];
    let in_features = collect(b.positive("in_features", 1), &mut errs);
    let out_features = collect(b.positive("out_features", 1), &mut errs);
    let bias = collect(b.bool("bias", true), &mut errs);
    match (in_features, out_features, bias) {
        (Some(in_features), Some(out_features), Some(bias)) => {
            Ok(Op::Linear(Linear { in_features, out_features, bias, epilogue: Epilogue::default() }))
        }
        _ => Err(errs),
    }
}

pub(super) const CTOR: LayerCtor =
    LayerCtor { name: "Linear", sig: &[req("in_features"), req("out_features"), opt("bias")], build };

impl OpDef for Linear {
    fn kind(&self) -> &'static str {
        "Linear"
    }

    fn arity(&self) -> Arity {
        Arity::Exactly(if self.epilogue.residual { 2 } else { 1 })
    }

    fn infer(&self, inputs: &[Operand<'_>]) -> Result<Inferred, OpError> {
        let x = &inputs[0];
        let mut dims = x.ty.dims.clone();
        let Some(last) = dims.last_mut() else {
            return Err(OpError::new(format!(
                "{} expects an input with features, but {} gives {}",
                self.describe(),
                x.producer,
                x.ty
            ))
            .recover(x.ty.with_dims(vec![self.out_features])));
        };
        let got = *last;
        *last = self.out_features;
        let out = x.ty.with_dims(dims);
        if got != self.in_features {
            let mut e = OpError::new(format!(
                "{} expects {} input features, but {} gives {}",
                self.describe(),
                self.in_features,
                x.producer,
                x.last_dim_text()
            ))
            .recover(out);
            if x.ty.dims.len() > 1 {
                e = e.note(format!(
                    "Linear acts on the last dimension of {}; add a Flatten before it to use all {} features",
                    x.ty,
                    x.ty.numel_per_sample()
                ));
            }
            return Err(e);
        }
        if self.epilogue.residual && inputs[1].ty != &out {
            return Err(OpError::new(format!(
                "{}: fused residual must be {out}, but {} gives {}",
                self.describe(),
                inputs[1].producer,
                inputs[1].ty
            )));
        }
        Ok(Inferred::ok(out))
    }

    fn params(&self) -> Vec<ParamSpec> {
        let mut p = vec![ParamSpec::f32("weight", vec![self.out_features, self.in_features], ParamKind::Weight)];
        if self.bias {
            p.push(ParamSpec::f32("bias", vec![self.out_features], ParamKind::Bias));
        }
        p.extend(self.epilogue.params(self.out_features));
        p
    }

    fn macs(&self, _inputs: &[&TensorType], output: &TensorType) -> u64 {
        (output.numel_per_sample() * self.in_features) as u64
    }

    fn describe(&self) -> String {
        let b = if self.bias { "" } else { ", bias=False" };
        format!("Linear({}, {}{b})", self.in_features, self.out_features) + &self.epilogue.describe()
    }
}
