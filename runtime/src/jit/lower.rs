//! Lowering: one kernel per step of the memory plan, chosen by the node's op. This is the
//! only place that dispatches on [`Op`] in the JIT.

use super::codegen::Jit;
use super::plan::{self, Layout, Plan, Step};
use super::{blocked, conv, conv_tiles, eltwise, linear, pool};
use crate::error::{Error, Result};
use crate::weights::Weights;
use cnnc_compiler::graph::{Graph, Node};
use cnnc_compiler::ops::Op;
use cnnc_compiler::shape::TensorType;

/// What a lowering needs to know about one node.
pub(super) struct NodeCx<'a> {
    /// The node.
    pub node: &'a Node,
    /// All weights (the node's are found through `node.params`).
    pub weights: &'a Weights,
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

    /// The values of the parameter with this suffix, in standard order.
    pub fn param(&self, suffix: &str) -> Result<Vec<f32>> {
        Ok(self.param_ref(suffix)?.into_owned())
    }

    /// As [`NodeCx::param`], borrowed when the stored array is contiguous (a model's big
    /// weights are read once, while packing).
    pub fn param_ref(&self, suffix: &str) -> Result<std::borrow::Cow<'_, [f32]>> {
        let missing = || Error::Unsupported(format!("`{}` has no f32 parameter `{suffix}`", self.node.name));
        let pos = self.node.op.def().params().iter().position(|p| p.suffix == suffix).ok_or_else(missing)?;
        let id = *self.node.params.get(pos).ok_or_else(missing)?;
        let a = self.weights.f32(id).ok_or_else(missing)?;
        Ok(match a.as_slice() {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(crate::weights::to_vec(a)),
        })
    }
}

/// Emits the kernels of every step, in order.
pub(super) fn lower(jit: &mut Jit, graph: &Graph, weights: &Weights, plan: &Plan) -> Result<()> {
    for step in &plan.steps {
        match step {
            Step::Node { id, inputs, output, scratch } => {
                let node = graph.node(*id);
                let in_tys = graph.operands(*id).into_iter().map(|o| &graph.node(o).ty).collect();
                let cx = NodeCx {
                    node,
                    weights,
                    inputs: inputs.clone(),
                    in_tys,
                    output: *output,
                    in_layouts: inputs.iter().map(|s| plan.slots[*s].layout).collect(),
                    out_layout: plan.slots[*output].layout,
                    in_lens: inputs.iter().map(|s| plan.slots[*s].size).collect(),
                    out_len: plan.slots[*output].size,
                    scratch: *scratch,
                };
                let tiled = cx.out_layout.is_blocked();
                match &node.op {
                    Op::Conv2d(c) if tiled => conv_tiles::conv(jit, &cx, c)?,
                    Op::Conv2d(c)
                        if cx.in_layouts[0] == Layout::Plain && cx.scratch.is_some() && plan::plane_conv(c) =>
                    {
                        let isa = jit.isa.ok_or_else(|| Error::Unsupported("plane conv without an ISA".into()))?;
                        conv_tiles::plane_conv(jit, &cx, c, isa)?
                    }
                    Op::Conv2d(c) => conv::lower(jit, &cx, c)?,
                    Op::Linear(l) => linear::lower(jit, &cx, l)?,
                    Op::MaxPool2d(p) if tiled => blocked::max_pool(jit, &cx, p)?,
                    Op::MaxPool2d(p) => pool::max_pool(jit, &cx, p)?,
                    Op::AvgPool2d(p) if tiled => blocked::avg_pool(jit, &cx, p)?,
                    Op::AvgPool2d(p) => pool::avg_pool(jit, &cx, p)?,
                    Op::AdaptiveAvgPool2d(_) if tiled => blocked::adaptive_avg_pool(jit, &cx)?,
                    Op::AdaptiveAvgPool2d(_) => pool::adaptive_avg_pool(jit, &cx)?,
                    Op::BatchNorm2d(bn) if tiled => blocked::batchnorm(jit, &cx, bn)?,
                    Op::BatchNorm2d(bn) => eltwise::batchnorm(jit, &cx, bn)?,
                    Op::Activation(a) => eltwise::activation(jit, &cx, *a)?,
                    Op::Add(_) => eltwise::add(jit, &cx)?,
                    Op::Concat(_) if tiled => blocked::concat(jit, &cx)?,
                    Op::Concat(cat) => eltwise::concat(jit, &cx, cat)?,
                    Op::Reduce(r) => eltwise::reduce(jit, &cx, r)?,
                    Op::Train(_) => {
                        return Err(Error::Unsupported(format!(
                            "`{}` ({}): the JIT has no training kernels yet; run training graphs on the interpreter",
                            node.name,
                            node.op.kind()
                        )));
                    }
                    Op::Input | Op::Flatten(_) | Op::Dropout(_) => {
                        return Err(Error::Unsupported(format!(
                            "`{}` ({}) has no kernel; the plan should have aliased it",
                            node.name,
                            node.op.kind()
                        )));
                    }
                }
            }
            Step::Copy { from, to } => {
                eltwise::copy(jit, "<output copy>", *from, *to, plan.slots[*to].size)?;
            }
            Step::Reorder { from, to } => {
                blocked::reorder(jit, (*from, plan.slots[*from].layout), (*to, plan.slots[*to].layout))?;
            }
        }
    }
    Ok(())
}
