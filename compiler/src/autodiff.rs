//! Reverse-mode automatic differentiation as a graph-to-graph transform.
//!
//! [`build`] takes a declared (unfused) forward [`Graph`] and a [`GradSpec`] and returns a
//! [`TrainGraph`]: one graph in the same IR that computes, in one pass,
//!
//! - the forward in training mode ([`Mode::Train`]: BatchNorm2d normalises with batch
//!   statistics, Dropout multiplies by a mask given as an input) or in eval mode;
//! - the loss of one forward output against a `target` input ([`Seed::Loss`]), or nothing
//!   when the output's gradient is itself an input ([`Seed::OutputGrad`], a vector–Jacobian
//!   product, as `y.backward(dy)`);
//! - the backward: the gradient of every learnable parameter (keyed by its `state_dict`
//!   name; a parameter used by several layers gets the sum), of any named layer's output or
//!   input, and each training-mode BatchNorm's batch statistics (for the running averages).
//!
//! Saved activations are ordinary values read by the backward ops, so a memory plan sees
//! their lifetimes. The backward ops are declared in [`crate::ops::train`]; this module only
//! wires them. It knows nothing of values: the runtime evaluates the graph.
//!
//! Inference rewrites (BatchNorm folding, epilogue fusion) must not have run on the input:
//! a fused graph is refused ([`AutodiffError::Fused`]).

use crate::graph::{Graph, Node, NodeId, ParamId, VerifyError};
use crate::ops::train::{Loss, TrainOp};
use crate::ops::{BatchNorm2d, Op, Operand, ParamKind};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Whether the forward runs as in `model.train()` or `model.eval()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// BatchNorm uses batch statistics; Dropout drops.
    #[default]
    Train,
    /// BatchNorm uses its running statistics; Dropout is the identity.
    Eval,
}

/// Where the backward starts.
#[derive(Clone, Debug, PartialEq)]
pub enum Seed {
    /// The gradient of a loss of the output against an input named `target`.
    Loss(Loss),
    /// The output's gradient is an input named `grad.<output>` (`y.backward(dy)`).
    OutputGrad,
}

/// What to differentiate.
#[derive(Clone, Debug, PartialEq)]
pub struct GradSpec {
    /// Where the backward starts.
    pub seed: Seed,
    /// The forward output it starts from; `None` for a net with one output.
    pub output: Option<String>,
    /// Training or eval mode.
    pub mode: Mode,
    /// Whether to compute every learnable parameter's gradient.
    pub params: bool,
    /// Layers (module paths, e.g. `layer4`, `features.6`) or inputs whose output's gradient
    /// to compute as well.
    pub wrt: Vec<String>,
}

impl GradSpec {
    /// Parameter gradients of a loss, in training mode.
    pub fn training(loss: Loss) -> Self {
        GradSpec { seed: Seed::Loss(loss), output: None, mode: Mode::Train, params: true, wrt: vec![] }
    }
}

/// A Dropout mask input of a training graph.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskInput {
    /// Index in the training graph's inputs.
    pub input: usize,
    /// The Dropout layer.
    pub node: String,
    /// Its drop probability.
    pub p: f64,
}

/// A training-mode BatchNorm whose batch statistics are an output.
#[derive(Clone, Debug, PartialEq)]
pub struct BnStats {
    /// The layer.
    pub node: String,
    /// Index in the training graph's outputs of its `[2, C]` statistics (mean, biased variance).
    pub output: usize,
    /// The layer's settings (momentum).
    pub bn: BatchNorm2d,
    /// `running_mean`.
    pub running_mean: ParamId,
    /// `running_var`.
    pub running_var: ParamId,
    /// `num_batches_tracked`.
    pub num_batches_tracked: ParamId,
    /// Pixels per channel and sample (`H·W`): the statistics average `N·H·W` values.
    pub plane: usize,
}

/// The result of [`build`]: the graph and what its inputs and outputs are.
#[derive(Clone, Debug)]
pub struct TrainGraph {
    /// The training graph. Its parameter table is the forward graph's, so the same weights
    /// run both. Inputs: the forward's in their order, with the Dropout masks and the target
    /// (or output gradient) at the indices [`TrainGraph::masks`] and
    /// [`TrainGraph::seed_input`] give.
    pub graph: Graph,
    /// The mode it was built for.
    pub mode: Mode,
    /// Index of the `target` (or `grad.<output>`) input.
    pub seed_input: usize,
    /// Dropout masks to feed.
    pub masks: Vec<MaskInput>,
    /// Index of the `loss` output (`[1]`), for a [`Seed::Loss`].
    pub loss: Option<usize>,
    /// Index of the forward output the seed applies to.
    pub prediction: usize,
    /// `(parameter, output index)` for every parameter that gets a gradient, in `state_dict`
    /// order.
    pub param_grads: Vec<(ParamId, usize)>,
    /// Training-mode BatchNorms.
    pub bn_stats: Vec<BnStats>,
    /// `(requested name, output index)` of each gradient asked for in [`GradSpec::wrt`].
    pub node_grads: Vec<(String, usize)>,
    /// `(requested name, output index)` of the value (the forward output) of each layer in
    /// [`GradSpec::wrt`], beside its gradient (Grad-CAM reads both).
    pub node_values: Vec<(String, usize)>,
}

/// Why a training graph could not be built.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AutodiffError {
    /// The named output does not exist.
    #[error("net `{net}` has no output named `{name}` (its outputs: {available})")]
    UnknownOutput {
        /// Net.
        net: String,
        /// Asked for.
        name: String,
        /// What exists.
        available: String,
    },
    /// Several outputs and none named.
    #[error("net `{net}` has several outputs ({available}); say which one the loss reads")]
    AmbiguousOutput {
        /// Net.
        net: String,
        /// What exists.
        available: String,
    },
    /// A requested layer does not exist.
    #[error("net `{net}` has no layer or input named `{name}`{suggestion}")]
    UnknownNode {
        /// Net.
        net: String,
        /// Asked for.
        name: String,
        /// `; did you mean `…`?`, or empty.
        suggestion: String,
    },
    /// The graph has been through the fusion passes.
    #[error(
        "layer `{node}` ({kind}) carries a fused epilogue or folded parameters: gradients need the declared graph, before the inference passes"
    )]
    Fused {
        /// Layer.
        node: String,
        /// Op.
        kind: &'static str,
    },
    /// The loss does not fit the output.
    #[error("loss: {0}")]
    Loss(String),
    /// Nothing depends on a learnable parameter.
    #[error("nothing to differentiate: the output of net `{net}` depends on no learnable parameter")]
    NothingToDifferentiate {
        /// Net.
        net: String,
    },
    /// An op without a backward.
    #[error("layer `{node}` ({kind}) has no gradient: {why}")]
    Unsupported {
        /// Layer.
        node: String,
        /// Op.
        kind: &'static str,
        /// Why.
        why: String,
    },
    /// The forward graph or the result fails the verifier.
    #[error("the training graph is malformed: {0}")]
    Verify(#[from] VerifyError),
}

/// Resolves a layer name: an exact node name, else the last node (in topological order)
/// inside the module `name` (`layer4` → the output of `layer4.1.relu`).
pub fn resolve_node(graph: &Graph, name: &str) -> Result<NodeId, AutodiffError> {
    let order = graph.topo_order()?;
    if let Some(id) = order.iter().find(|id| graph.node(**id).name == name) {
        return Ok(*id);
    }
    let prefix = format!("{name}.");
    if let Some(id) = order.iter().rev().find(|id| graph.node(**id).name.starts_with(&prefix)) {
        return Ok(*id);
    }
    let names: Vec<&str> = order.iter().map(|id| graph.node(*id).name.as_str()).collect();
    let suggestion = crate::diag::suggest(name, &names).map_or(String::new(), |s| format!("; did you mean `{s}`?"));
    Err(AutodiffError::UnknownNode { net: graph.name.clone(), name: name.to_string(), suggestion })
}

fn unique_input_name(g: &Graph, base: &str) -> String {
    let mut name = base.to_string();
    while g.inputs.iter().any(|(n, _)| *n == name) {
        name.push('_');
    }
    name
}

struct Builder {
    g: Graph,
}

impl Builder {
    fn push(
        &mut self,
        name: String,
        op: TrainOp,
        params: Vec<ParamId>,
        inputs: &[NodeId],
    ) -> Result<NodeId, AutodiffError> {
        let op = Op::Train(op);
        let operands: Vec<Operand<'_>> = inputs
            .iter()
            .map(|i| {
                let n = self.g.node(*i);
                Operand { ty: &n.ty, producer: &n.name, factors: None }
            })
            .collect();
        let ty = op.def().infer(&operands).map_err(|e| AutodiffError::Unsupported {
            node: name.clone(),
            kind: op.kind(),
            why: e.message,
        })?;
        Ok(self.g.add_node(Node { name, op, ty: ty.ty, params }, inputs))
    }

    /// `Σ parts`, as a chain of adds.
    fn sum(&mut self, name: &str, parts: &[NodeId]) -> NodeId {
        let mut acc = parts[0];
        for p in &parts[1..] {
            let ty = self.g.node(acc).ty.clone();
            acc = self.g.add_node(
                Node { name: format!("{name}.acc"), op: Op::Add(crate::ops::Add), ty, params: vec![] },
                &[acc, *p],
            );
        }
        acc
    }
}

/// Builds the training graph of `forward` (see the module docs).
pub fn build(forward: &Graph, spec: &GradSpec) -> Result<TrainGraph, AutodiffError> {
    forward.verify()?;
    let net = forward.name.clone();
    let available = || forward.outputs.iter().map(|(n, _)| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    let pred_index = match &spec.output {
        Some(name) => forward.outputs.iter().position(|(n, _)| n == name).ok_or_else(|| {
            AutodiffError::UnknownOutput { net: net.clone(), name: name.clone(), available: available() }
        })?,
        None if forward.outputs.len() == 1 => 0,
        None => return Err(AutodiffError::AmbiguousOutput { net: net.clone(), available: available() }),
    };
    for id in forward.node_ids() {
        let n = forward.node(id);
        let fused = match &n.op {
            Op::Conv2d(c) => !c.epilogue.is_empty(),
            Op::Linear(l) => !l.epilogue.is_empty(),
            Op::Train(_) => {
                return Err(AutodiffError::Unsupported {
                    node: n.name.clone(),
                    kind: n.op.kind(),
                    why: "the graph is already a training graph".into(),
                });
            }
            _ => false,
        };
        if fused {
            return Err(AutodiffError::Fused { node: n.name.clone(), kind: n.op.kind() });
        }
    }
    let wrt: Vec<(String, NodeId)> =
        spec.wrt.iter().map(|w| resolve_node(forward, w).map(|id| (w.clone(), id))).collect::<Result<_, _>>()?;

    let mut b = Builder { g: forward.clone() };
    let order = forward.topo_order()?;

    // The forward in training mode: BatchNorm2d → stats + normalise; Dropout → mask product.
    let mut masks = vec![];
    let mut bn_nodes: Vec<(NodeId, NodeId, BatchNorm2d, Vec<ParamId>)> = vec![]; // (train node, stats node, bn, all params)
    for &id in &order {
        let node = forward.node(id).clone();
        match &node.op {
            // Batch statistics in training mode, and always without running statistics.
            Op::BatchNorm2d(bn) if spec.mode == Mode::Train || !bn.track_running_stats => {
                let x = forward.operands(id)[0];
                let stats =
                    b.push(format!("{}.batch_stats", node.name), TrainOp::BatchStats(bn.clone()), vec![], &[x])?;
                let affine = if bn.affine { node.params[..2].to_vec() } else { vec![] };
                let y = b.push(node.name.clone(), TrainOp::BatchNormTrain(bn.clone()), affine, &[x, stats])?;
                b.g.replace_uses(id, y);
                b.g.remove_node(id);
                bn_nodes.push((y, stats, bn.clone(), node.params.clone()));
            }
            Op::Dropout(d) if spec.mode == Mode::Train => {
                let x = forward.operands(id)[0];
                let name = unique_input_name(&b.g, &format!("{}.mask", node.name));
                let mask = b.g.add_input(name, node.ty.clone());
                masks.push(MaskInput { input: b.g.inputs.len() - 1, node: node.name.clone(), p: d.p });
                let y = b.push(node.name.clone(), TrainOp::DropoutMask(d.p), vec![], &[x, mask])?;
                b.g.replace_uses(id, y);
                b.g.remove_node(id);
            }
            _ => {}
        }
    }
    let pred = b.g.outputs[pred_index].1;
    let wrt: Vec<(String, NodeId)> = wrt
        .into_iter()
        .map(|(n, id)| {
            // A replaced BatchNorm/Dropout keeps its name on its replacement.
            if b.g.contains(id) {
                (n, id)
            } else {
                let name = &forward.node(id).name;
                let new = b.g.node_ids().into_iter().find(|i| &b.g.node(*i).name == name).unwrap_or(id);
                (n, new)
            }
        })
        .collect();

    // The seed. With no gradient asked for, the graph computes the forward and the loss only.
    let backward = spec.params || !spec.wrt.is_empty();
    let pred_ty = b.g.node(pred).ty.clone();
    let (seed_input, loss, seed_grad) = match &spec.seed {
        Seed::Loss(l) => {
            let name = unique_input_name(&b.g, "target");
            let target = b.g.add_input(name, l.target_type(&pred_ty));
            let ti = b.g.inputs.len() - 1;
            let lossn =
                b.push("loss".into(), TrainOp::Loss(l.clone()), vec![], &[pred, target]).map_err(|e| match e {
                    AutodiffError::Unsupported { why, .. } => AutodiffError::Loss(why),
                    e => e,
                })?;
            let grad = if backward {
                b.push("loss.grad".into(), TrainOp::LossGrad(l.clone()), vec![], &[pred, target])?
            } else {
                lossn
            };
            (ti, Some(lossn), grad)
        }
        Seed::OutputGrad => {
            let name = unique_input_name(&b.g, &format!("grad.{}", forward.outputs[pred_index].0));
            let g = b.g.add_input(name, pred_ty);
            (b.g.inputs.len() - 1, None, g)
        }
    };

    // Which values need a gradient: those depending on a learnable parameter or a requested node.
    let torder = b.g.topo_order()?;
    let wrt_ids: HashSet<NodeId> = wrt.iter().map(|(_, id)| *id).collect();
    let mut requires: HashSet<NodeId> = HashSet::new();
    let mut any_param = false;
    let upstream = ancestors_or_self(&b.g, pred);
    for &id in &torder {
        let n = b.g.node(id);
        let learnable = spec.params && n.params.iter().any(|p| b.g.param(*p).spec.kind != ParamKind::Buffer);
        any_param |= learnable && upstream.contains(&id);
        if learnable || wrt_ids.contains(&id) || b.g.operands(id).iter().any(|o| requires.contains(o)) {
            requires.insert(id);
        }
    }
    if backward && !any_param && wrt.is_empty() {
        return Err(AutodiffError::NothingToDifferentiate { net });
    }

    let mut grads: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    if backward {
        grads.insert(pred, vec![seed_grad]);
    }
    let mut param_parts: BTreeMap<ParamId, Vec<NodeId>> = BTreeMap::new();
    let mut node_grad: HashMap<NodeId, NodeId> = HashMap::new();
    let bn_info: HashMap<NodeId, (NodeId, Vec<ParamId>)> =
        bn_nodes.iter().map(|(y, s, _, p)| (*y, (*s, p.clone()))).collect();

    for &id in torder.iter().rev() {
        let Some(parts) = grads.remove(&id) else { continue };
        let node = b.g.node(id).clone();
        let g = b.sum(&format!("{}.grad", node.name), &parts);
        if wrt_ids.contains(&id) {
            node_grad.insert(id, g);
        }
        let ops = b.g.operands(id);
        let needs = |i: usize| ops.get(i).is_some_and(|o| requires.contains(o));
        let want_params = spec.params;
        let name = |what: &str| format!("{}.{what}", node.name);
        let give =
            |grads: &mut HashMap<NodeId, Vec<NodeId>>, to: NodeId, g: NodeId| grads.entry(to).or_default().push(g);
        let unsupported =
            |why: &str| AutodiffError::Unsupported { node: node.name.clone(), kind: node.op.kind(), why: why.into() };
        match &node.op {
            Op::Input => {}
            Op::Conv2d(c) => {
                let x = ops[0];
                if want_params {
                    let dw = b.push(name("weight.grad"), TrainOp::ConvWeightGrad(c.clone()), vec![], &[x, g])?;
                    param_parts.entry(node.params[0]).or_default().push(dw);
                    if c.bias {
                        let db = b.push(name("bias.grad"), TrainOp::BiasGrad(0), vec![], &[g])?;
                        param_parts.entry(node.params[1]).or_default().push(db);
                    }
                }
                if needs(0) {
                    let (_, h, w) = b.g.node(x).ty.chw().ok_or_else(|| unsupported("the input is not NCHW"))?;
                    let dx = b.push(
                        name("input.grad"),
                        TrainOp::ConvInputGrad(c.clone(), (h, w)),
                        vec![node.params[0]],
                        &[g],
                    )?;
                    give(&mut grads, x, dx);
                }
            }
            Op::Linear(l) => {
                let x = ops[0];
                if want_params {
                    let dw = b.push(name("weight.grad"), TrainOp::LinearWeightGrad(l.clone()), vec![], &[x, g])?;
                    param_parts.entry(node.params[0]).or_default().push(dw);
                    if l.bias {
                        let axis = node.ty.dims.len() - 1;
                        let db = b.push(name("bias.grad"), TrainOp::BiasGrad(axis), vec![], &[g])?;
                        param_parts.entry(node.params[1]).or_default().push(db);
                    }
                }
                if needs(0) {
                    let dx =
                        b.push(name("input.grad"), TrainOp::LinearInputGrad(l.clone()), vec![node.params[0]], &[g])?;
                    give(&mut grads, x, dx);
                }
            }
            Op::MaxPool2d(p) if needs(0) => {
                let dx = b.push(name("input.grad"), TrainOp::MaxPoolGrad(p.clone()), vec![], &[ops[0], g])?;
                give(&mut grads, ops[0], dx);
            }
            Op::AvgPool2d(p) if needs(0) => {
                let (_, h, w) = b.g.node(ops[0]).ty.chw().ok_or_else(|| unsupported("the input is not NCHW"))?;
                let dx = b.push(name("input.grad"), TrainOp::AvgPoolGrad(p.clone(), (h, w)), vec![], &[g])?;
                give(&mut grads, ops[0], dx);
            }
            Op::AdaptiveAvgPool2d(p) if needs(0) => {
                let (_, h, w) = b.g.node(ops[0]).ty.chw().ok_or_else(|| unsupported("the input is not NCHW"))?;
                let dx = b.push(name("input.grad"), TrainOp::AdaptiveAvgPoolGrad(p.clone(), (h, w)), vec![], &[g])?;
                give(&mut grads, ops[0], dx);
            }
            Op::BatchNorm2d(bn) => {
                // Eval mode: an affine map with the running statistics.
                // params: [weight, bias]?, running_mean, running_var, num_batches_tracked
                let k = if bn.affine { 2 } else { 0 };
                let (rm, rv) = (node.params[k], node.params[k + 1]);
                if want_params && bn.affine {
                    let dw = b.push(
                        name("weight.grad"),
                        TrainOp::BatchNormEvalWeightGrad(bn.clone()),
                        vec![rm, rv],
                        &[ops[0], g],
                    )?;
                    param_parts.entry(node.params[0]).or_default().push(dw);
                    let db = b.push(name("bias.grad"), TrainOp::BiasGrad(0), vec![], &[g])?;
                    param_parts.entry(node.params[1]).or_default().push(db);
                }
                if needs(0) {
                    let mut p = if bn.affine { vec![node.params[0]] } else { vec![] };
                    p.push(rv);
                    let dx = b.push(name("input.grad"), TrainOp::BatchNormEvalInputGrad(bn.clone()), p, &[g])?;
                    give(&mut grads, ops[0], dx);
                }
            }
            Op::Train(TrainOp::BatchNormTrain(bn)) => {
                let (x, stats) = (ops[0], ops[1]);
                let (_, all) = bn_info.get(&id).ok_or_else(|| unsupported("a BatchNorm the pass did not make"))?;
                if want_params && bn.affine {
                    let dw =
                        b.push(name("weight.grad"), TrainOp::BatchNormWeightGrad(bn.clone()), vec![], &[x, stats, g])?;
                    param_parts.entry(all[0]).or_default().push(dw);
                    let db = b.push(name("bias.grad"), TrainOp::BiasGrad(0), vec![], &[g])?;
                    param_parts.entry(all[1]).or_default().push(db);
                }
                if needs(0) {
                    let p = if bn.affine { vec![all[0]] } else { vec![] };
                    let dx = b.push(name("input.grad"), TrainOp::BatchNormInputGrad(bn.clone()), p, &[x, stats, g])?;
                    give(&mut grads, x, dx);
                }
            }
            Op::Train(TrainOp::DropoutMask(p)) if needs(0) => {
                let dx = b.push(name("input.grad"), TrainOp::DropoutMask(*p), vec![], &[g, ops[1]])?;
                give(&mut grads, ops[0], dx);
            }
            Op::Activation(crate::ops::Activation::LeakyRelu(s)) if needs(0) && (s.get() < 0.0 || s.get().is_nan()) => {
                return Err(unsupported(
                    "LeakyReLU with a negative slope: its backward needs the input, which is not saved",
                ));
            }
            Op::Activation(a) if needs(0) => {
                let dx = b.push(name("input.grad"), TrainOp::ActivationGrad(*a), vec![], &[id, g])?;
                give(&mut grads, ops[0], dx);
            }
            Op::Dropout(_) if needs(0) => give(&mut grads, ops[0], g),
            Op::Flatten(_) if needs(0) => {
                let dims = b.g.node(ops[0]).ty.dims.clone();
                let dx = b.push(name("input.grad"), TrainOp::Reshape(dims), vec![], &[g])?;
                give(&mut grads, ops[0], dx);
            }
            Op::Add(_) => {
                for (i, o) in ops.iter().enumerate() {
                    if needs(i) {
                        give(&mut grads, *o, g);
                    }
                }
            }
            Op::Concat(c) => {
                let mut start = 0;
                for (i, o) in ops.iter().enumerate() {
                    let len = b.g.node(*o).ty.dims[c.dim - 1];
                    if needs(i) {
                        let op = TrainOp::Slice { dim: c.dim, start, len };
                        let dx = b.push(name(&format!("input{i}.grad")), op, vec![], &[g])?;
                        give(&mut grads, *o, dx);
                    }
                    start += len;
                }
            }
            Op::Reduce(r) if needs(0) => {
                let dx = b.push(name("input.grad"), TrainOp::ReduceGrad(r.clone()), vec![], &[ops[0], g])?;
                give(&mut grads, ops[0], dx);
            }
            Op::Train(_) => return Err(unsupported("a training op inside the forward")),
            Op::Softmax(_) if needs(0) => {
                return Err(unsupported(
                    "Softmax has no backward; train on the logits with CrossEntropyLoss, which applies log-softmax itself",
                ));
            }
            _ => {}
        }
    }

    // Outputs: loss, the forward's outputs, batch statistics, parameter and node gradients.
    let forward_outputs = std::mem::take(&mut b.g.outputs);
    let mut outputs: Vec<(String, NodeId)> = vec![];
    let loss_out = loss.map(|l| {
        outputs.push(("loss".into(), l));
        0
    });
    let prediction = outputs.len() + pred_index;
    outputs.extend(forward_outputs);
    let mut bn_stats = vec![];
    for (y, stats, bn, all) in
        bn_nodes.iter().filter(|(_, _, bn, _)| bn.track_running_stats && spec.mode == Mode::Train)
    {
        let k = if bn.affine { 2 } else { 0 };
        let node = b.g.node(*y).name.clone();
        outputs.push((format!("{node}.batch_stats"), *stats));
        bn_stats.push(BnStats {
            node,
            output: outputs.len() - 1,
            bn: bn.clone(),
            running_mean: all[k],
            running_var: all[k + 1],
            num_batches_tracked: all[k + 2],
            plane: b.g.node(*y).ty.dims[1..].iter().product(),
        });
    }
    let mut param_grads = vec![];
    for (pid, parts) in param_parts {
        let name = format!("grad.{}", b.g.param(pid).name);
        let g = b.sum(&name, &parts);
        outputs.push((name, g));
        param_grads.push((pid, outputs.len() - 1));
    }
    let mut node_grads = vec![];
    for (name, id) in &wrt {
        let g = node_grad.get(id).copied().ok_or_else(|| AutodiffError::Unsupported {
            node: name.clone(),
            kind: b.g.node(*id).op.kind(),
            why: "the differentiated output does not depend on it".into(),
        })?;
        outputs.push((format!("grad.{name}"), g));
        node_grads.push((name.clone(), outputs.len() - 1));
    }
    let mut node_values = vec![];
    for (name, id) in &wrt {
        outputs.push((format!("value.{name}"), *id));
        node_values.push((name.clone(), outputs.len() - 1));
    }
    b.g.outputs = outputs;
    b.g.name = format!("{}.train", forward.name);
    b.g.verify()?;
    Ok(TrainGraph {
        graph: b.g,
        mode: spec.mode,
        seed_input,
        masks,
        loss: loss_out,
        prediction,
        param_grads,
        bn_stats,
        node_grads,
        node_values,
    })
}

/// `b` and every node it depends on.
fn ancestors_or_self(g: &Graph, b: NodeId) -> HashSet<NodeId> {
    let mut stack = vec![b];
    let mut seen = HashSet::new();
    while let Some(n) = stack.pop() {
        if seen.insert(n) {
            stack.extend(g.operands(n));
        }
    }
    seen
}
