//! The reference interpreter: plain ndarray and loop code that evaluates a [`Graph`] node by
//! node in [`Graph::topo_order`], NCHW, f32 in and out. It is the spec of every op — the JIT
//! is tested against it — so it favours obviously-correct code over speed.
//!
//! Semantics are PyTorch's in eval mode. Numerics: sums of products (Conv2d, Linear) and of
//! window elements (AvgPool2d, AdaptiveAvgPool2d, mean) are accumulated in f64 and rounded to
//! f32 once; BatchNorm2d is computed in f64 as `(x − mean) / sqrt(var + eps) · weight + bias`
//! and rounded once. A fused epilogue (`scale`/`shift`, residual, activation) is then
//! applied in f32, step by step, as the unfused ops would. Max reductions propagate NaN.
//!
//! Before running, the graph is verified ([`Graph::verify`]), the weights are checked against
//! its parameter table ([`Weights::check`]) and the inputs against its declared types
//! ([`check_inputs`]); after each node the result's shape is checked against the node's type.

mod conv;
mod pool;
mod tensor;
mod train;

use crate::error::{Error, Result};
use crate::weights::{ParamData, Weights};
use cnnc_compiler::graph::{Graph, Node, NodeId, VerifyError};
use cnnc_compiler::ops::Op;
use cnnc_compiler::shape::{Batch, TensorType};
use ndarray::{ArrayD, ArrayViewD};
use std::collections::HashMap;

/// Checks the inputs against the graph's declared inputs: count, shape (a symbolic batch `N`
/// matches any size ≥ 1, the same for every input; a fixed batch must match), and standard
/// (C-contiguous) layout. Returns the batch size: the size given for `N`, or, when no input
/// has a symbolic batch, the first input's fixed batch (1 for a net without inputs).
///
/// Errors: [`Error::InputCount`], [`Error::InputShape`], [`Error::Batch`] (batch 0),
/// [`Error::NonContiguous`].
pub fn check_inputs(graph: &Graph, inputs: &[ArrayViewD<'_, f32>]) -> Result<usize> {
    if inputs.len() != graph.inputs.len() {
        return Err(Error::InputCount { net: graph.name.clone(), expected: graph.inputs.len(), got: inputs.len() });
    }
    let mut symbolic: Option<(usize, &str)> = None;
    let mut fixed: Option<usize> = None;
    for ((name, id), x) in graph.inputs.iter().zip(inputs) {
        if !graph.contains(*id) {
            return Err(VerifyError::Dangling { what: name.clone() }.into());
        }
        let ty: &TensorType = &graph.node(*id).ty;
        let shape = x.shape();
        let shape_error = |expected: String| Error::InputShape { name: name.clone(), expected, found: shape.to_vec() };
        if shape.len() != ty.rank() || shape[1..] != ty.dims[..] {
            return Err(shape_error(ty.to_string()));
        }
        let batch = shape[0];
        match ty.batch {
            Batch::Fixed(b) if b != batch => return Err(shape_error(ty.to_string())),
            Batch::Fixed(b) => {
                fixed.get_or_insert(b);
            }
            Batch::Symbolic => match symbolic {
                Some((n, first)) if n != batch && batch != 0 => {
                    return Err(shape_error(format!("{ty} with N = {n} (the batch of input `{first}`)")));
                }
                _ => {
                    symbolic.get_or_insert((batch, name));
                }
            },
        }
        if batch == 0 {
            return Err(Error::Batch {
                name: name.clone(),
                batch,
                why: "the batch must have at least one sample".into(),
            });
        }
        if !x.is_standard_layout() {
            return Err(Error::NonContiguous {
                name: name.clone(),
                shape: shape.to_vec(),
                strides: x.strides().to_vec(),
            });
        }
    }
    Ok(symbolic.map(|(n, _)| n).or(fixed).unwrap_or(1))
}

/// Runs the net on `inputs` (one per [`Graph::inputs`] entry, in order) and returns the
/// outputs in [`Graph::outputs`] order.
pub fn run(graph: &Graph, weights: &Weights, inputs: &[ArrayViewD<'_, f32>]) -> Result<Vec<ArrayD<f32>>> {
    run_inspecting(graph, weights, inputs, |_, _| false).map(|(outs, _)| outs)
}

/// Runs the net as [`run`] does and names the first node, in the order computed, whose
/// value holds a NaN or an infinity (`None` if every value is finite). Used to say where a
/// training step went wrong.
pub fn first_non_finite(graph: &Graph, weights: &Weights, inputs: &[ArrayViewD<'_, f32>]) -> Result<Option<String>> {
    let mut found = None;
    run_inspecting(graph, weights, inputs, |node, v| {
        let bad = v.iter().any(|x| !x.is_finite());
        if bad {
            found = Some(node.name.clone());
        }
        bad
    })?;
    Ok(found)
}

/// [`run`], calling `stop(node, value)` after each node; a `true` ends the run early (the
/// outputs are then empty, and the flag is returned).
fn run_inspecting(
    graph: &Graph,
    weights: &Weights,
    inputs: &[ArrayViewD<'_, f32>],
    mut stop: impl FnMut(&Node, &ArrayD<f32>) -> bool,
) -> Result<(Vec<ArrayD<f32>>, bool)> {
    graph.verify()?;
    let batch = check_inputs(graph, inputs)?;
    weights.check(graph)?;
    let order = graph.topo_order()?;

    // How many more times each value is read; outputs are never released.
    let mut pending: HashMap<NodeId, usize> = HashMap::new();
    for &id in &order {
        for o in graph.operands(id) {
            *pending.entry(o).or_default() += 1;
        }
    }
    let mut values: HashMap<NodeId, ArrayD<f32>> = HashMap::new();
    for id in order {
        let node = graph.node(id);
        let operands = graph.operands(id);
        let args = operands
            .iter()
            .map(|o| values.get(o).map(|a| a.view()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| internal(node, "an operand was not computed"))?;
        let out = match node.op {
            Op::Input => {
                let k = graph
                    .inputs
                    .iter()
                    .position(|(_, i)| *i == id)
                    .ok_or_else(|| internal(node, "an input node that is not among the graph's inputs"))?;
                inputs[k].to_owned()
            }
            _ => eval(node, &args, &NodeParams::new(node, weights))?,
        };
        let expected = node.ty.concrete(batch);
        if out.shape() != expected.as_slice() {
            return Err(VerifyError::Type {
                node: node.name.clone(),
                recorded: format!("{expected:?}"),
                inferred: format!("{:?} (computed)", out.shape()),
            }
            .into());
        }
        if stop(node, &out) {
            return Ok((vec![], true));
        }
        for o in operands {
            if let Some(p) = pending.get_mut(&o) {
                *p -= 1;
                if *p == 0 && !graph.is_output(o) {
                    values.remove(&o);
                }
            }
        }
        values.insert(id, out);
    }
    let outs = graph
        .outputs
        .iter()
        .map(|(name, id)| values.get(id).cloned().ok_or_else(|| VerifyError::Dangling { what: name.clone() }.into()))
        .collect::<Result<_>>()?;
    Ok((outs, false))
}

/// An internal inconsistency, reported as a graph error rather than a panic.
fn internal(node: &Node, message: &str) -> Error {
    VerifyError::Shape { node: node.name.clone(), message: message.to_string() }.into()
}

/// A node's parameters, looked up by `state_dict` suffix.
pub(crate) struct NodeParams<'a> {
    node: &'a Node,
    by_suffix: Vec<(&'static str, &'a ParamData)>,
}

impl<'a> NodeParams<'a> {
    fn new(node: &'a Node, weights: &'a Weights) -> Self {
        let specs = node.op.def().params();
        let by_suffix = specs.iter().zip(&node.params).map(|(s, id)| (s.suffix, weights.get(*id))).collect();
        NodeParams { node, by_suffix }
    }

    /// The f32 parameter with this suffix, if the op declares it.
    pub(crate) fn opt(&self, suffix: &str) -> Option<&'a [f32]> {
        self.by_suffix.iter().find(|(s, _)| *s == suffix).and_then(|(_, d)| d.as_f32()).and_then(|a| a.as_slice())
    }

    /// The f32 parameter with this suffix, which the op must declare.
    pub(crate) fn req(&self, suffix: &str) -> Result<&'a [f32]> {
        self.opt(suffix).ok_or_else(|| {
            VerifyError::Params { node: self.node.name.clone(), detail: format!("`{suffix}` is missing") }.into()
        })
    }

    /// The node (for messages).
    pub(crate) fn node(&self) -> &'a Node {
        self.node
    }
}

/// Evaluates one non-input op.
fn eval(node: &Node, args: &[ArrayViewD<'_, f32>], params: &NodeParams<'_>) -> Result<ArrayD<f32>> {
    let arg = |i: usize| args.get(i).ok_or_else(|| internal(node, "an operand is missing"));
    Ok(match &node.op {
        Op::Input => return Err(internal(node, "inputs are not evaluated")),
        Op::Conv2d(c) => conv::conv2d(c, arg(0)?, args.get(1), params)?,
        Op::Linear(l) => conv::linear(l, arg(0)?, args.get(1), params)?,
        Op::MaxPool2d(p) => pool::max_pool2d(p, arg(0)?, node)?,
        Op::AvgPool2d(p) => pool::avg_pool2d(p, arg(0)?, node)?,
        Op::AdaptiveAvgPool2d(p) => pool::adaptive_avg_pool2d(p, arg(0)?, node)?,
        Op::BatchNorm2d(b) if !b.track_running_stats => train::bn_batch(b, arg(0)?, params)?,
        Op::BatchNorm2d(b) => tensor::batch_norm2d(b, arg(0)?, params)?,
        Op::Activation(a) => arg(0)?.mapv(|v| a.apply(v)),
        Op::Dropout(_) => arg(0)?.to_owned(),
        Op::Flatten(f) => tensor::flatten(f, arg(0)?, node)?,
        Op::Add(_) => tensor::add(arg(0)?, arg(1)?, node)?,
        Op::Concat(c) => tensor::concat(c, args, node)?,
        Op::Reduce(r) => tensor::reduce(r, arg(0)?, node)?,
        Op::Softmax(sm) => tensor::softmax(sm, arg(0)?, node)?,
        Op::Train(t) => train::eval(t, args, params)?,
    })
}

#[cfg(test)]
mod tests;
