//! Inference rewrites of the graph IR: clean-ups, weight folding and kernel fusion, with a
//! [`FusionReport`] of what happened.
//!
//! # Shape of a pass
//!
//! A pass is a small named function, a *rule*, tried on every live node in topological
//! order (or, for whole-graph passes, once). It either returns the [`Rewrite`] it performed
//! or a [`Skip`]: [`Skip::NoMatch`] when the node is not what the pass looks for, or
//! [`Skip::Declined`] with a reason when the node is a candidate that cannot be rewritten
//! (the reason ends up in the report). **A rule checks every condition before its first
//! edit**, so a skip leaves the graph and the store untouched.
//!
//! The pipeline is the list [`PIPELINE`]; [`run_pass`] runs one pass and [`run_pipeline`]
//! runs a list of them, optionally verifying the IR ([`Graph::verify`]) after every pass
//! (tests always do). Per-pass control ([`PassOptions::skip`], [`PassOptions::max_rewrites`])
//! lets the runtime's numeric check (`cnnc_runtime::fusion_check`) apply a pass one rewrite
//! at a time and refuse the one that changes the outputs.
//!
//! # Parameters
//!
//! Passes that change weights read and write values through a [`ParamStore`] aligned with
//! [`Graph::params`]. Conventions for the rewritten graph's parameter table:
//!
//! - a folded weight keeps its original key, with new values (`layer1.0.conv1.weight`
//!   holds `W·s` after BatchNorm folding; a folded linear chain keeps the second layer's key
//!   with the composed shape);
//! - a new parameter is keyed `{node name}.{suffix}` — `layer1.0.conv1.bias` for the bias a
//!   bias-free conv gains, `….scale`/`….shift` for an unfolded BatchNorm's epilogue — or
//!   `{node name}#k.{suffix}` when a module applied twice makes that key ambiguous;
//! - parameters no node uses any more (folded BatchNorms' statistics, declared but unused
//!   modules) are dropped at the end, and the rest ordered by first use (weight, bias,
//!   scale, shift of each kernel in execution order), so the table lists exactly what the
//!   kernels read, the way a `state_dict` of the fused net would.
//!
//! **Invariant:** no pass changes the graph's inputs, its outputs' names, order or types,
//! or (beyond rounding) their values.

mod batchnorm;
mod cleanup;
mod epilogue;
mod linear;
pub mod report;
mod store;

pub use cleanup::is_view;
pub use report::{Cost, FusedKernel, FusionReport, NotFused, PassSummary};
pub use store::{ParamStore, VecStore, add_param};

use crate::graph::{Graph, NodeId, VerifyError};
use std::fmt;

/// Why a rule did not rewrite a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The node is not what the pass looks for.
    NoMatch,
    /// The node is a candidate, but the rewrite would be wrong or impossible; the reason
    /// names what is in the way (e.g. "the conv output also feeds `shortcut`").
    Declined(String),
}

/// What a rule returns: the rewrite it performed, or why it did not.
pub type Outcome = Result<Rewrite, Skip>;

/// A rule tried on one node.
pub type NodeRule = fn(&mut Graph, &mut dyn ParamStore, NodeId) -> Outcome;

/// A rule run once on the whole graph.
pub type GraphRule = fn(&mut Graph, &mut dyn ParamStore) -> Outcome;

/// How a pass visits the graph.
#[derive(Clone, Copy)]
pub enum Rule {
    /// Tried on every live node in topological order (nodes created by the pass are not
    /// visited).
    EachNode(NodeRule),
    /// Run once.
    WholeGraph(GraphRule),
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rule::EachNode(_) => "EachNode",
            Rule::WholeGraph(_) => "WholeGraph",
        })
    }
}

/// A named pass.
#[derive(Clone, Copy, Debug)]
pub struct Pass {
    /// Kebab-case name, used in reports and errors (`fold-batchnorm`).
    pub name: &'static str,
    /// What it does, in one line.
    pub summary: &'static str,
    /// The rule.
    pub rule: Rule,
}

/// The inference pipeline, in order. Clean-ups first (so fusion sees the real producers),
/// then folding of weights, then epilogue fusion — residual before activation, because a
/// kernel's epilogue adds the residual before it activates — and the parameter table last.
pub const PIPELINE: &[Pass] = &[
    Pass {
        name: "remove-identity-views",
        summary: "Dropout (identity at inference) and Flatten that changes nothing are removed",
        rule: Rule::EachNode(cleanup::remove_identity_view),
    },
    Pass {
        name: "remove-dead-nodes",
        summary: "nodes no output depends on are removed",
        rule: Rule::EachNode(cleanup::remove_dead_node),
    },
    Pass {
        name: "fold-batchnorm",
        summary: "BatchNorm2d folded into the preceding Conv2d's weights and bias",
        rule: Rule::EachNode(batchnorm::fold_batchnorm),
    },
    Pass {
        name: "batchnorm-epilogue",
        summary: "a BatchNorm2d that cannot fold becomes the preceding Conv2d's scale/shift epilogue",
        rule: Rule::EachNode(batchnorm::batchnorm_epilogue),
    },
    Pass {
        name: "fold-linear-chain",
        summary: "Linear(Linear(x)) with nothing between becomes one Linear when that is cheaper",
        rule: Rule::EachNode(linear::fold_linear_chain),
    },
    RESIDUAL_EPILOGUE,
    ACTIVATION_EPILOGUE,
    Pass {
        name: "compact-params",
        summary: "the parameter table keeps what the kernels read, in the order they read it",
        rule: Rule::WholeGraph(cleanup::compact_params),
    },
];

const RESIDUAL_EPILOGUE: Pass = Pass {
    name: "residual-epilogue",
    summary: "conv(x) + skip runs as the conv's residual epilogue",
    rule: Rule::EachNode(epilogue::fuse_residual),
};

const ACTIVATION_EPILOGUE: Pass = Pass {
    name: "activation-epilogue",
    summary: "ReLU/Sigmoid/Tanh after a Conv2d or Linear runs as its epilogue",
    rule: Rule::EachNode(epilogue::fuse_activation),
};

/// The rewrites a training graph (one with [`crate::ops::TrainOp`] nodes, from
/// [`crate::autodiff::build`]) takes before it is compiled: the two epilogue fusions, which
/// are exact and leave the parameter table as it is (so new weights still fit, step after
/// step). They apply where the training graph lets them: an activation's backward reads the
/// activation's *output*, and no backward reads a Conv2d's or Linear's output or an add's, so
/// `sigmoid(conv(x))` is one kernel that writes what both the next layer and the sigmoid's
/// gradient read. (BatchNorm folding is not among them: in training BatchNorm normalises with
/// the batch's statistics.)
pub const TRAINING_PIPELINE: &[Pass] = &[RESIDUAL_EPILOGUE, ACTIVATION_EPILOGUE];

/// How a node disappeared into a kernel (or out of the graph).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum How {
    /// Folded into the kernel's weights and bias.
    FoldedIntoWeights,
    /// Runs as the kernel's per-channel scale/shift epilogue.
    ScaleShift,
    /// Runs as the kernel's residual-add epilogue.
    Residual,
    /// Runs as the kernel's activation epilogue.
    Activation,
    /// A Linear whose weights were composed into the kernel's.
    ComposedLinear,
    /// Removed: the identity at inference.
    Identity,
    /// Removed: no output depends on it.
    Dead,
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            How::FoldedIntoWeights => "folded into weights",
            How::ScaleShift => "scale/shift epilogue",
            How::Residual => "residual epilogue",
            How::Activation => "activation epilogue",
            How::ComposedLinear => "weights composed",
            How::Identity => "identity at inference",
            How::Dead => "unused",
        })
    }
}

/// A node a rewrite absorbed or removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Absorbed {
    /// Its id in the graph before the rewrite.
    pub node: NodeId,
    /// Its name.
    pub name: String,
    /// Its op kind (`BatchNorm2d`).
    pub kind: &'static str,
    /// What became of it.
    pub how: How,
}

impl Absorbed {
    pub(crate) fn of(graph: &Graph, node: NodeId, how: How) -> Absorbed {
        let n = graph.node(node);
        Absorbed { node, name: n.name.clone(), kind: n.op.kind(), how }
    }
}

/// One applied rewrite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    /// The kernel that now does the absorbed nodes' work; `None` when they were simply
    /// removed.
    pub kernel: Option<NodeId>,
    /// The nodes absorbed or removed.
    pub absorbed: Vec<Absorbed>,
    /// Anything else worth reporting (a bias the conv gained, parameters dropped).
    pub note: Option<String>,
}

/// A candidate a pass declined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declined {
    /// The node (`None` for a whole-graph pass).
    pub node: Option<NodeId>,
    /// Its name.
    pub name: String,
    /// Its op kind.
    pub kind: &'static str,
    /// Why.
    pub reason: String,
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassLog {
    /// The pass's name.
    pub pass: &'static str,
    /// Rewrites, each with the node the rule was tried on (`None` for a whole-graph pass).
    pub rewrites: Vec<(Option<NodeId>, Rewrite)>,
    /// Candidates declined.
    pub declined: Vec<Declined>,
}

/// Per-pass control.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassOptions {
    /// Verify the IR after the pass (tests always do; the pipeline default is on in debug
    /// builds).
    pub verify: bool,
    /// Nodes the rule is not tried on (fusions refused by a numeric check).
    pub skip: Vec<NodeId>,
    /// Stop after this many rewrites.
    pub max_rewrites: Option<usize>,
}

impl PassOptions {
    /// Verification on, nothing skipped, no limit.
    pub fn verified() -> Self {
        PassOptions { verify: true, ..PassOptions::default() }
    }
}

/// A pass left an invalid graph, or was given a store that does not match the graph.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PassError {
    /// The verifier rejected the graph after a pass.
    #[error("after pass `{pass}`: {error}")]
    Verify {
        /// The pass.
        pass: &'static str,
        /// What the verifier found.
        error: VerifyError,
    },
    /// The parameter store is not aligned with the graph's parameter table.
    #[error("before pass `{pass}`: the parameter store has {store} entries, the graph {params} parameters")]
    Store {
        /// The pass.
        pass: &'static str,
        /// Store entries.
        store: usize,
        /// Graph parameters.
        params: usize,
    },
}

/// Runs one pass over `graph`, editing it and `store` in place.
pub fn run_pass(
    pass: &Pass,
    graph: &mut Graph,
    store: &mut dyn ParamStore,
    options: &PassOptions,
) -> Result<PassLog, PassError> {
    if store.len() != graph.params.len() {
        return Err(PassError::Store { pass: pass.name, store: store.len(), params: graph.params.len() });
    }
    let mut log = PassLog { pass: pass.name, ..PassLog::default() };
    let limit = options.max_rewrites.unwrap_or(usize::MAX);
    match pass.rule {
        Rule::EachNode(rule) => {
            let order = graph.topo_order().map_err(|error| PassError::Verify { pass: pass.name, error })?;
            for id in order {
                if log.rewrites.len() >= limit {
                    break;
                }
                if !graph.contains(id) || options.skip.contains(&id) {
                    continue;
                }
                let (name, kind) = {
                    let n = graph.node(id);
                    (n.name.clone(), n.op.kind())
                };
                match rule(graph, store, id) {
                    Ok(rw) => log.rewrites.push((Some(id), rw)),
                    Err(Skip::NoMatch) => {}
                    Err(Skip::Declined(reason)) => log.declined.push(Declined { node: Some(id), name, kind, reason }),
                }
            }
        }
        Rule::WholeGraph(rule) if limit > 0 => match rule(graph, store) {
            Ok(rw) => log.rewrites.push((None, rw)),
            Err(Skip::NoMatch) => {}
            Err(Skip::Declined(reason)) => {
                log.declined.push(Declined { node: None, name: graph.name.clone(), kind: "Graph", reason })
            }
        },
        Rule::WholeGraph(_) => {}
    }
    if options.verify {
        graph.verify().map_err(|error| PassError::Verify { pass: pass.name, error })?;
    }
    Ok(log)
}

/// Runs `passes` in order, returning one log per pass.
pub fn run_pipeline(
    passes: &[Pass],
    graph: &mut Graph,
    store: &mut dyn ParamStore,
    verify: bool,
) -> Result<Vec<PassLog>, PassError> {
    let options = PassOptions { verify, ..PassOptions::default() };
    passes.iter().map(|p| run_pass(p, graph, store, &options)).collect()
}

/// Runs [`PIPELINE`] on a copy of `graph` (verifying after every pass in debug builds) and
/// reports what it did. `store` must hold the values of `graph`'s parameters and ends up
/// aligned with the returned graph's.
pub fn optimize(graph: &Graph, store: &mut dyn ParamStore) -> Result<(Graph, FusionReport), PassError> {
    let mut g = graph.clone();
    let logs = run_pipeline(PIPELINE, &mut g, store, cfg!(debug_assertions))?;
    let report = FusionReport::new(graph, &g, &logs);
    Ok((g, report))
}

/// Checks that `graph`'s output `producer` feeds only `consumer` (once) and is not a graph
/// output, so rewriting it in place changes nothing else.
pub(crate) fn sole_consumer(graph: &Graph, producer: NodeId, consumer: NodeId) -> Result<(), Skip> {
    let p = graph.node(producer);
    if let Some((out, _)) = graph.outputs.iter().find(|(_, o)| *o == producer) {
        return Err(Skip::Declined(format!("`{}`'s output is also the graph output `{out}`", p.name)));
    }
    let users = graph.users(producer);
    if let Some((other, _)) = users.iter().find(|(u, _)| *u != consumer) {
        return Err(Skip::Declined(format!(
            "`{}`'s output also feeds `{}` ({})",
            p.name,
            graph.node(*other).name,
            graph.node(*other).op.kind()
        )));
    }
    if users.len() > 1 {
        return Err(Skip::Declined(format!("`{}`'s output is used twice by the same node", p.name)));
    }
    Ok(())
}

/// Another node that reads one of `node`'s parameters (a module applied twice), if any.
pub(crate) fn sharing_params(graph: &Graph, node: NodeId) -> Option<String> {
    let mine = &graph.node(node).params;
    graph
        .node_ids()
        .into_iter()
        .filter(|id| *id != node)
        .find(|id| graph.node(*id).params.iter().any(|p| mine.contains(p)))
        .map(|id| graph.node(id).name.clone())
}

/// Whether `to` can be reached from `from` along producer → consumer edges.
pub(crate) fn reaches(graph: &Graph, from: NodeId, to: NodeId) -> bool {
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![from];
    while let Some(n) = stack.pop() {
        if n == to {
            return true;
        }
        if seen.insert(n) {
            stack.extend(graph.users(n).into_iter().map(|(u, _)| u));
        }
    }
    false
}

/// "its input comes from `name` (Kind)".
pub(crate) fn from_text(graph: &Graph, producer: NodeId) -> String {
    let p = graph.node(producer);
    match p.op {
        crate::ops::Op::Input => format!("its input is the graph input `{}`", p.name),
        _ => format!("its input comes from `{}` ({})", p.name, p.op.kind()),
    }
}

/// The single operand of a one-input node.
pub(crate) fn only_operand(graph: &Graph, node: NodeId) -> Result<NodeId, Skip> {
    match graph.operands(node).as_slice() {
        [x] => Ok(*x),
        _ => Err(Skip::NoMatch),
    }
}
