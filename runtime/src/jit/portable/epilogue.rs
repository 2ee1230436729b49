//! The fused epilogue of Conv2d and Linear, applied to accumulators while they are still in
//! registers: `y = acc + bias[c]`, then `y = y·scale[c] + shift[c]`, then `y += residual`,
//! then the activation — the order of [`cnnc_compiler::ops::Epilogue`].
//!
//! Per-channel parameters come either splatted (every lane is the same channel: conv tiles
//! that run along a row) or lane by lane (lanes are consecutive channels: conv border
//! pixels, Linear).

use crate::error::Result;
use crate::jit::codegen::{Fx, Jit};
use crate::jit::cx::NodeCx;
use crate::jit::math::act_v;
use cnnc_compiler::ops::{Activation, Epilogue};
use cranelift_codegen::ir::{InstBuilder, Value};

/// Addresses of a kernel's per-channel parameters and what else the epilogue does.
#[derive(Clone, Copy, Debug)]
pub(in crate::jit) struct Epi {
    bias: Option<i64>,
    scale_shift: Option<(i64, i64)>,
    /// The residual operand's slot.
    pub residual: Option<usize>,
    act: Option<Activation>,
}

/// Per-channel parameters loaded for one group of lanes.
#[derive(Clone, Copy, Debug)]
pub(in crate::jit) struct ChanParams {
    bias: Option<Value>,
    scale_shift: Option<(Value, Value)>,
}

impl Epi {
    /// Stores the node's bias and scale/shift in the constant pool.
    pub fn new(jit: &mut Jit, cx: &NodeCx<'_>, bias: bool, e: &Epilogue) -> Result<Epi> {
        let bias = if bias { Some(jit.consts.f32s(cx.param("bias")?)) } else { None };
        let scale_shift = if e.scale_shift {
            Some((jit.consts.f32s(cx.param("scale")?), jit.consts.f32s(cx.param("shift")?)))
        } else {
            None
        };
        let residual = if e.residual { Some(cx.inputs[1]) } else { None };
        Ok(Epi { bias, scale_shift, residual, act: e.act })
    }

    /// Channel `ch`'s parameters in every lane.
    pub fn splat(&self, fx: &mut Fx<'_>, ch: Value) -> ChanParams {
        let one = |fx: &mut Fx<'_>, a: i64| {
            let base = fx.addr(a);
            let p = fx.elem(base, ch);
            fx.load_splat(p, 0)
        };
        let bias = self.bias.map(|a| one(fx, a));
        let scale_shift = self.scale_shift.map(|(s, t)| (one(fx, s), one(fx, t)));
        ChanParams { bias, scale_shift }
    }

    /// Channels `ch0 .. ch0 + lanes` in lanes `0 .. lanes` (`lanes ≤ 4`).
    pub fn lanes(&self, fx: &mut Fx<'_>, ch0: Value, lanes: usize) -> ChanParams {
        let one = |fx: &mut Fx<'_>, a: i64| {
            let base = fx.addr(a);
            let p = fx.elem(base, ch0);
            fx.load_partial(p, 0, lanes)
        };
        let bias = self.bias.map(|a| one(fx, a));
        let scale_shift = self.scale_shift.map(|(s, t)| (one(fx, s), one(fx, t)));
        ChanParams { bias, scale_shift }
    }

    /// Applies the epilogue to an accumulator vector; `residual` is the matching residual
    /// vector when the epilogue has one.
    pub fn finish(&self, fx: &mut Fx<'_>, acc: Value, p: &ChanParams, residual: Option<Value>) -> Value {
        let mut y = acc;
        if let Some(b) = p.bias {
            y = fx.b.ins().fadd(y, b);
        }
        if let Some((s, t)) = p.scale_shift {
            y = fx.fma(y, s, t);
        }
        if let Some(r) = residual {
            y = fx.b.ins().fadd(y, r);
        }
        if let Some(a) = self.act {
            y = act_v(fx, a, y);
        }
        y
    }
}
