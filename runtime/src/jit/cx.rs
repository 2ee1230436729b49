//! The lowering context: what a kernel generator needs to know about one node (its slots,
//! types, layouts and parameters). The bottom of the kernel tiers: every kernel takes one,
//! [`super::lower`] makes them.

use super::plan::Layout;
use crate::error::{Error, Result};
use crate::weights::ParamSource;
use cnnc_compiler::graph::{Node, ParamId};
use cnnc_compiler::shape::TensorType;

/// What a lowering needs to know about one node.
pub(in crate::jit) struct NodeCx<'a> {
    /// The node.
    pub node: &'a Node,
    /// All weights (the node's are found through `node.params`).
    pub weights: &'a dyn ParamSource,
    /// Operand slots, in operand order.
    pub inputs: Vec<usize>,
    /// Operand types, in operand order.
    pub in_tys: Vec<&'a TensorType>,
    /// Result slot.
    pub output: usize,
    /// Operand layouts, in operand order.
    pub in_layouts: Vec<Layout>,
    /// Result layout.
    pub out_layout: Layout,
    /// Floats per sample of the operand buffers.
    pub in_lens: Vec<usize>,
    /// Floats per sample of the result buffer.
    pub out_len: usize,
    /// The step's scratch slot, if the plan gave it one.
    pub scratch: Option<usize>,
    /// Whether a convolution kernel reads the node's `weight` (`[O, I, kh, kw]`) as the
    /// flipped, transposed weights `W'[i][o][ky][kx] = W[o][i][kh − 1 − ky][kw − 1 − kx]`
    /// (a Conv2d's input gradient run as a forward convolution, `plan::input_grad_conv`).
    pub flipped: bool,
}

impl NodeCx<'_> {
    /// Floats per sample of the result.
    pub fn out_size(&self) -> usize {
        self.node.ty.numel_per_sample()
    }

    fn chw(&self, t: &TensorType) -> Result<(usize, usize, usize)> {
        t.chw().ok_or_else(|| Error::Unsupported(format!("`{}`: expected an NCHW tensor, got {t}", self.node.name)))
    }

    /// `(C, H, W)` of the result.
    pub fn out_chw(&self) -> Result<(usize, usize, usize)> {
        self.chw(&self.node.ty)
    }

    /// `(C, H, W)` of operand `i`.
    pub fn in_chw(&self, i: usize) -> Result<(usize, usize, usize)> {
        self.chw(self.in_tys[i])
    }

    /// The step's scratch slot, which this kernel needs.
    pub fn scratch_slot(&self) -> Result<usize> {
        self.scratch.ok_or_else(|| Error::Unsupported(format!("`{}`: the plan gave no scratch", self.node.name)))
    }

    /// The values of the parameter with this suffix, in standard order.
    pub fn param(&self, suffix: &str) -> Result<Vec<f32>> {
        Ok(self.param_ref(suffix)?.into_owned())
    }

    /// As [`NodeCx::param`], borrowed when the stored array is contiguous (a model's big
    /// weights are read once, while packing).
    pub fn param_ref(&self, suffix: &str) -> Result<std::borrow::Cow<'_, [f32]>> {
        let missing = || Error::Unsupported(format!("`{}` has no f32 parameter `{suffix}`", self.node.name));
        self.weights.f32_values(self.param_id(suffix)?).ok_or_else(missing)
    }

    /// The id of the parameter with this suffix.
    pub fn param_id(&self, suffix: &str) -> Result<ParamId> {
        let missing = || Error::Unsupported(format!("`{}` has no f32 parameter `{suffix}`", self.node.name));
        let pos = self.node.op.def().params().iter().position(|p| p.suffix == suffix).ok_or_else(missing)?;
        self.node.params.get(pos).copied().ok_or_else(missing)
    }
}
