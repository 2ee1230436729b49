//! Lowering: one kernel per step of the memory plan, chosen by the node's op. This is the
//! only place that dispatches on [`Op`] in the JIT. In a training graph the forward Conv2d
//! and a stride-1 Conv2d's input gradient (as the forward convolution of `dy` with the
//! flipped, transposed weights, `plan::input_grad_conv`) run on the blocked tier's
//! convolution; the other Conv2d and Linear backward ops (and forward convolutions the
//! blocked kernels do not take) as GEMMs over the micro-kernel tile
//! (`blocked/gemm_grad.rs`; their scalar forms in `portable/` without a micro-kernel ISA),
//! pooling backward in `portable/`, everything else in `eltwise_grad.rs`. Which kernels
//! threads may run on ranges of samples is decided here ([`samplewise_work`]).

use super::codegen::Jit;
use super::cx::NodeCx;
use super::plan::{self, Layout, Plan, Step};
use super::{blocked, eltwise, eltwise_grad, portable};
use crate::error::{Error, Result};
use crate::weights::ParamSource;
use cnnc_compiler::graph::{Graph, Node};
use cnnc_compiler::ops::Op;
use cnnc_compiler::ops::train::TrainOp;
use cnnc_compiler::shape::TensorType;

/// Emits the kernels of every step, in order.
pub(super) fn lower(jit: &mut Jit, graph: &Graph, weights: &dyn ParamSource, plan: &Plan) -> Result<()> {
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
                    flipped: false,
                };
                let tiled = cx.out_layout.is_blocked();
                let first = jit.funcs.len();
                let samplewise = if plan.whole_batch && plan.slots[*output].batched {
                    samplewise_work(node, &cx.in_tys)
                } else {
                    None
                };
                match &node.op {
                    Op::Conv2d(c) if tiled => blocked::conv::conv(jit, &cx, c)?,
                    Op::Conv2d(c)
                        if cx.in_layouts[0] == Layout::Plain && cx.scratch.is_some() && plan::plane_conv(c) =>
                    {
                        let isa = jit.isa.ok_or_else(|| Error::Unsupported("plane conv without an ISA".into()))?;
                        blocked::conv::plane_conv(jit, &cx, c, isa)?
                    }
                    Op::Conv2d(c) if plan.whole_batch && jit.isa.is_some() => {
                        let isa = jit.isa.ok_or_else(|| Error::Unsupported("no ISA".into()))?;
                        blocked::gemm_grad::conv_forward(jit, &cx, c, isa)?
                    }
                    Op::Conv2d(c) => portable::conv::lower(jit, &cx, c)?,
                    Op::Linear(l) => match jit.isa {
                        Some(isa) => blocked::conv::linear(jit, &cx, l, isa)?,
                        None => portable::linear::lower(jit, &cx, l)?,
                    },
                    Op::MaxPool2d(p) if tiled => blocked::pool::max_pool(jit, &cx, p)?,
                    Op::MaxPool2d(p) => portable::pool::max_pool(jit, &cx, p)?,
                    Op::AvgPool2d(p) if tiled => blocked::pool::avg_pool(jit, &cx, p)?,
                    Op::AvgPool2d(p) => portable::pool::avg_pool(jit, &cx, p)?,
                    Op::AdaptiveAvgPool2d(_) if tiled => blocked::pool::adaptive_avg_pool(jit, &cx)?,
                    Op::AdaptiveAvgPool2d(_) => portable::pool::adaptive_avg_pool(jit, &cx)?,
                    Op::BatchNorm2d(bn) if tiled => blocked::channels::batchnorm(jit, &cx, bn)?,
                    Op::BatchNorm2d(bn) => eltwise::batchnorm(jit, &cx, bn)?,
                    Op::Activation(a) => eltwise::activation(jit, &cx, *a)?,
                    Op::Add(_) => eltwise::add(jit, &cx)?,
                    Op::Concat(_) if tiled => blocked::channels::concat(jit, &cx)?,
                    Op::Concat(cat) => eltwise::concat(jit, &cx, cat)?,
                    Op::Reduce(r) => eltwise::reduce(jit, &cx, r)?,
                    Op::Softmax(sm) => eltwise::softmax(jit, &cx, sm)?,
                    Op::Train(TrainOp::ConvInputGrad(c, _)) if tiled => {
                        // The forward convolution of the output gradient (`plan::input_grad_conv`).
                        let flipped = plan::input_grad_conv(c).ok_or_else(|| {
                            Error::Unsupported(format!("`{}`: no convolution form of this input gradient", node.name))
                        })?;
                        let cx = NodeCx { flipped: true, ..cx };
                        blocked::conv::conv(jit, &cx, &flipped)?
                    }
                    Op::Train(t) => match t {
                        TrainOp::BatchStats(_) if cx.in_layouts[0].is_blocked() => {
                            blocked::channels::batch_stats(jit, &cx)?
                        }
                        TrainOp::BatchStats(_) => eltwise_grad::batch_stats(jit, &cx)?,
                        TrainOp::BatchNormTrain(bn) if tiled => blocked::channels::bn_train(jit, &cx, bn)?,
                        TrainOp::BatchNormTrain(bn) => eltwise_grad::bn_train(jit, &cx, bn)?,
                        TrainOp::DropoutMask(_) => eltwise_grad::dropout_mask(jit, &cx)?,
                        TrainOp::Loss(l) => eltwise_grad::loss(jit, &cx, l, false)?,
                        TrainOp::LossGrad(l) => eltwise_grad::loss(jit, &cx, l, true)?,
                        TrainOp::ConvInputGrad(c, hw) => match jit.isa {
                            Some(isa) => blocked::gemm_grad::conv_input_grad(jit, &cx, t, c, *hw, isa)?,
                            None => portable::conv_grad::conv_input_grad(jit, &cx, c, *hw)?,
                        },
                        TrainOp::ConvWeightGrad(c) => match jit.isa {
                            Some(isa) => {
                                if !blocked::winograd::weight_grad(jit, &cx, c, isa)?
                                    && !blocked::gemm_grad::conv_weight_grad_rows(jit, &cx, t, c, isa)?
                                {
                                    blocked::gemm_grad::conv_weight_grad(jit, &cx, t, c, isa)?
                                }
                            }
                            None => portable::conv_grad::conv_weight_grad(jit, &cx, c)?,
                        },
                        TrainOp::LinearInputGrad(l) => match jit.isa {
                            Some(isa) => blocked::gemm_grad::linear_input_grad(jit, &cx, l, isa)?,
                            None => portable::linear_grad::linear_input_grad(jit, &cx, l)?,
                        },
                        TrainOp::LinearWeightGrad(l) => match jit.isa {
                            Some(isa) => blocked::gemm_grad::linear_weight_grad(jit, &cx, t, l, isa)?,
                            None => portable::linear_grad::linear_weight_grad(jit, &cx, l)?,
                        },
                        TrainOp::BiasGrad(_) if cx.in_layouts[0].is_blocked() => {
                            blocked::channels::bias_grad(jit, &cx)?
                        }
                        TrainOp::BiasGrad(axis) => eltwise_grad::bias_grad(jit, &cx, *axis)?,
                        TrainOp::MaxPoolGrad(p) if tiled => blocked::pool::max_pool_grad(jit, &cx, p)?,
                        TrainOp::MaxPoolGrad(p) => portable::pool_grad::max_pool_grad(jit, &cx, p)?,
                        TrainOp::AvgPoolGrad(p, hw) => portable::pool_grad::avg_pool_grad(jit, &cx, p, *hw)?,
                        TrainOp::AdaptiveAvgPoolGrad(_, hw) => {
                            portable::pool_grad::adaptive_avg_pool_grad(jit, &cx, *hw)?
                        }
                        TrainOp::BatchNormInputGrad(bn) if tiled => {
                            blocked::channels::bn_train_grad(jit, &cx, bn, true)?
                        }
                        TrainOp::BatchNormInputGrad(bn) => eltwise_grad::bn_train_grad(jit, &cx, bn, true)?,
                        TrainOp::BatchNormWeightGrad(bn) if cx.in_layouts[0].is_blocked() => {
                            blocked::channels::bn_train_grad(jit, &cx, bn, false)?
                        }
                        TrainOp::BatchNormWeightGrad(bn) => eltwise_grad::bn_train_grad(jit, &cx, bn, false)?,
                        TrainOp::BatchNormEvalInputGrad(bn) => eltwise_grad::bn_eval_input_grad(jit, &cx, bn)?,
                        TrainOp::BatchNormEvalWeightGrad(bn) => eltwise_grad::bn_eval_weight_grad(jit, &cx, bn)?,
                        TrainOp::ActivationGrad(a) => eltwise_grad::activation_grad(jit, &cx, *a)?,
                        TrainOp::Slice { dim, start, len } => eltwise_grad::slice(jit, &cx, *dim, *start, *len)?,
                        TrainOp::ReduceGrad(r) => eltwise_grad::reduce_grad(jit, &cx, r)?,
                        TrainOp::Reshape(_) => {
                            return Err(Error::Unsupported(format!(
                                "`{}` (Reshape) has no kernel; the plan should have aliased it",
                                node.name
                            )));
                        }
                    },
                    Op::Input | Op::Flatten(_) | Op::Dropout(_) => {
                        return Err(Error::Unsupported(format!(
                            "`{}` ({}) has no kernel; the plan should have aliased it",
                            node.name,
                            node.op.kind()
                        )));
                    }
                }
                if let Some(work) = samplewise {
                    jit.mark_samplewise(first, work);
                }
            }
            Step::Copy { from, to } => {
                eltwise::copy(jit, "<output copy>", *from, *to, plan.slots[*to].size)?;
            }
            Step::Reorder { from, to } => {
                let first = jit.funcs.len();
                blocked::channels::reorder(jit, (*from, plan.slots[*from].layout), (*to, plan.slots[*to].layout))?;
                // A reorder computes each sample alone.
                if plan.whole_batch && plan.slots[*to].batched && plan.slots[*from].batched {
                    jit.mark_samplewise(first, 2 * plan.slots[*to].size as u64);
                }
            }
        }
    }
    Ok(())
}

/// For a node of a training graph whose kernels compute every sample from that sample alone
/// (given the fixed-size operands they read, such as batch statistics): the operations
/// per sample, the measure [`Jit::mark_samplewise`] takes. `None` for an op that reduces
/// over the batch (weight and bias gradients, batch statistics, BatchNorm's training
/// backward, the losses and their gradients, which divide by the batch) or works across
/// samples (a slice of the batch dimension).
fn samplewise_work(node: &Node, in_tys: &[&TensorType]) -> Option<u64> {
    let elems = 8 * node.ty.numel_per_sample() as u64;
    let macs = 2 * node.op.def().macs(in_tys, &node.ty);
    match &node.op {
        Op::Conv2d(_) | Op::Linear(_) => Some(macs),
        Op::MaxPool2d(_)
        | Op::AvgPool2d(_)
        | Op::AdaptiveAvgPool2d(_)
        | Op::BatchNorm2d(_)
        | Op::Activation(_)
        | Op::Add(_)
        | Op::Concat(_) => Some(elems),
        Op::Softmax(_) => Some(8 * elems),
        Op::Reduce(r) if !r.dims.contains(&0) => Some(8 * in_tys.first()?.numel_per_sample() as u64),
        Op::Train(t) => match t {
            TrainOp::ConvInputGrad(..) | TrainOp::LinearInputGrad(_) => Some(macs),
            TrainOp::DropoutMask(_)
            | TrainOp::BatchNormTrain(_)
            | TrainOp::BatchNormEvalInputGrad(_)
            | TrainOp::ActivationGrad(_)
            | TrainOp::MaxPoolGrad(_)
            | TrainOp::AvgPoolGrad(..)
            | TrainOp::AdaptiveAvgPoolGrad(..) => Some(elems),
            TrainOp::Slice { dim, .. } if *dim != 0 => Some(elems),
            TrainOp::ReduceGrad(r) if !r.dims.contains(&0) => Some(elems),
            _ => None,
        },
        _ => None,
    }
}
