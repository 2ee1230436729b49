//! The graph IR: a petgraph DAG of ops with a static [`TensorType`] on every value, the
//! parameter table in PyTorch `state_dict` order, named inputs and outputs, a verifier and a
//! text form.
//!
//! Edges run from producer to consumer and carry the operand slot. Nodes are stored in a
//! `StableGraph`, so passes can remove nodes without invalidating other [`NodeId`]s.

use crate::ops::{Arity, Op, Operand, ParamKind, ParamSpec};
use crate::shape::TensorType;
use petgraph::Direction;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use std::collections::HashMap;
use std::fmt;

/// A node (one value-producing op) in a [`Graph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub NodeIndex);

impl NodeId {
    /// The node's index (stable across removals of other nodes).
    pub fn index(self) -> usize {
        self.0.index()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0.index())
    }
}

/// A parameter tensor in the graph's parameter table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub usize);

/// A parameter: its full `state_dict` key and its spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    /// Full key, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// Shape, kind, dtype.
    pub spec: ParamSpec,
}

/// One op in the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Module path (`features.0`, `layer1.0.conv1`), or a generated name for functional ops
    /// (`add`, `mean`) and inputs (the input's name).
    pub name: String,
    /// The op.
    pub op: Op,
    /// The output type.
    pub ty: TensorType,
    /// Parameters, aligned with `op.def().params()`.
    pub params: Vec<ParamId>,
}

/// The graph IR of one net.
#[derive(Clone, Debug)]
pub struct Graph {
    /// Net name.
    pub name: String,
    g: StableDiGraph<Node, usize>,
    /// Named inputs, in declaration order.
    pub inputs: Vec<(String, NodeId)>,
    /// Named outputs, in declaration order.
    pub outputs: Vec<(String, NodeId)>,
    /// Parameters in `state_dict` order (declared modules, used or not).
    pub params: Vec<Param>,
}

/// What the verifier found wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The graph has a cycle.
    #[error("the graph has a cycle")]
    Cycle,
    /// Wrong number of inputs for the op.
    #[error("{node} ({kind}) has {got} inputs, expected {expected}")]
    Arity {
        /// Node.
        node: String,
        /// Op kind.
        kind: &'static str,
        /// Found.
        got: usize,
        /// Wanted.
        expected: String,
    },
    /// Operand slots are not 0..n.
    #[error("{node}: operand slots are not 0..n")]
    Slots {
        /// Node.
        node: String,
    },
    /// Re-inference disagrees with the recorded type.
    #[error("{node}: recorded type {recorded}, but the shape rule gives {inferred}")]
    Type {
        /// Node.
        node: String,
        /// Recorded.
        recorded: String,
        /// Re-inferred.
        inferred: String,
    },
    /// Re-inference fails.
    #[error("{node}: {message}")]
    Shape {
        /// Node.
        node: String,
        /// The shape rule's message.
        message: String,
    },
    /// Parameters do not match the op's declaration.
    #[error("{node}: parameter {detail}")]
    Params {
        /// Node.
        node: String,
        /// What is wrong.
        detail: String,
    },
    /// An input or output refers to a missing node.
    #[error("{what} refers to a missing node")]
    Dangling {
        /// Input or output name.
        what: String,
    },
}

impl Graph {
    /// An empty graph.
    pub fn new(name: impl Into<String>) -> Self {
        Graph { name: name.into(), g: StableDiGraph::new(), inputs: vec![], outputs: vec![], params: vec![] }
    }

    /// Adds a parameter to the table.
    pub fn add_param(&mut self, name: String, spec: ParamSpec) -> ParamId {
        self.params.push(Param { name, spec });
        ParamId(self.params.len() - 1)
    }

    /// The parameter behind an id.
    pub fn param(&self, id: ParamId) -> &Param {
        &self.params[id.0]
    }

    /// Adds a graph input.
    pub fn add_input(&mut self, name: impl Into<String>, ty: TensorType) -> NodeId {
        let name = name.into();
        let id = NodeId(self.g.add_node(Node { name: name.clone(), op: Op::Input, ty, params: vec![] }));
        self.inputs.push((name, id));
        id
    }

    /// Adds an op node consuming `inputs` (in slot order).
    pub fn add_node(&mut self, node: Node, inputs: &[NodeId]) -> NodeId {
        let id = NodeId(self.g.add_node(node));
        for (slot, i) in inputs.iter().enumerate() {
            self.g.add_edge(i.0, id.0, slot);
        }
        id
    }

    /// The node behind an id.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id.0]
    }

    /// Mutable access to a node (passes).
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.g[id.0]
    }

    /// Whether the id refers to a live node.
    pub fn contains(&self, id: NodeId) -> bool {
        self.g.contains_node(id.0)
    }

    /// Number of nodes (inputs included).
    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    /// The node's operands, in slot order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut e: Vec<(usize, NodeId)> =
            self.g.edges_directed(id.0, Direction::Incoming).map(|e| (*e.weight(), NodeId(e.source()))).collect();
        e.sort();
        e.into_iter().map(|(_, n)| n).collect()
    }

    /// Nodes that consume `id`, with the slot they consume it in (sorted, may repeat).
    pub fn users(&self, id: NodeId) -> Vec<(NodeId, usize)> {
        let mut u: Vec<(NodeId, usize)> =
            self.g.edges_directed(id.0, Direction::Outgoing).map(|e| (NodeId(e.target()), *e.weight())).collect();
        u.sort();
        u
    }

    /// Whether `id` is a graph output.
    pub fn is_output(&self, id: NodeId) -> bool {
        self.outputs.iter().any(|(_, o)| *o == id)
    }

    /// Replaces the operand list of `id`.
    pub fn set_operands(&mut self, id: NodeId, inputs: &[NodeId]) {
        let old: Vec<_> = self.g.edges_directed(id.0, Direction::Incoming).map(|e| e.id()).collect();
        for e in old {
            self.g.remove_edge(e);
        }
        for (slot, i) in inputs.iter().enumerate() {
            self.g.add_edge(i.0, id.0, slot);
        }
    }

    /// Makes every user of `old` (and every output naming it) use `new` instead.
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId) {
        for (user, _) in self.users(old) {
            let ops: Vec<NodeId> = self.operands(user).into_iter().map(|o| if o == old { new } else { o }).collect();
            self.set_operands(user, &ops);
        }
        for (_, o) in self.outputs.iter_mut() {
            if *o == old {
                *o = new;
            }
        }
    }

    /// Removes a node and its edges.
    pub fn remove_node(&mut self, id: NodeId) {
        self.g.remove_node(id.0);
    }

    /// All live node ids in index order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.g.node_indices().map(NodeId).collect()
    }

    /// Nodes in a topological order (producers first; ties broken by creation order so the
    /// order follows the source).
    pub fn topo_order(&self) -> Result<Vec<NodeId>, VerifyError> {
        let mut indeg: HashMap<NodeIndex, usize> = HashMap::new();
        for n in self.g.node_indices() {
            indeg.insert(n, self.g.edges_directed(n, Direction::Incoming).count());
        }
        let mut ready: std::collections::BTreeSet<NodeIndex> =
            indeg.iter().filter(|(_, d)| **d == 0).map(|(n, _)| *n).collect();
        let mut order = Vec::with_capacity(indeg.len());
        while let Some(n) = ready.pop_first() {
            order.push(NodeId(n));
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("edge target is a node");
                *d -= 1;
                if *d == 0 {
                    ready.insert(e.target());
                }
            }
        }
        if order.len() != indeg.len() {
            return Err(VerifyError::Cycle);
        }
        Ok(order)
    }

    /// Runs the node's shape rule on its current operands.
    pub fn reinfer(&self, id: NodeId) -> Result<crate::ops::Inferred, crate::ops::OpError> {
        let ops = self.operands(id);
        let operands: Vec<Operand<'_>> = ops
            .iter()
            .map(|o| {
                let n = self.node(*o);
                Operand { ty: &n.ty, producer: &n.name, factors: None }
            })
            .collect();
        self.node(id).op.def().infer(&operands)
    }

    /// Checks the IR's invariants: acyclic, operand counts and slots, types equal to what the
    /// shape rules give, parameters matching each op's declaration, inputs/outputs live.
    pub fn verify(&self) -> Result<(), VerifyError> {
        let order = self.topo_order()?;
        for (name, id) in self.inputs.iter().chain(self.outputs.iter()) {
            if !self.contains(*id) {
                return Err(VerifyError::Dangling { what: name.clone() });
            }
        }
        for id in order {
            let node = self.node(id);
            let ops = self.operands(id);
            let def = node.op.def();
            let ok = match def.arity() {
                Arity::Exactly(n) => ops.len() == n,
                Arity::AtLeast(n) => ops.len() >= n,
            };
            if !ok {
                return Err(VerifyError::Arity {
                    node: node.name.clone(),
                    kind: def.kind(),
                    got: ops.len(),
                    expected: format!("{:?}", def.arity()),
                });
            }
            let mut slots: Vec<usize> = self.g.edges_directed(id.0, Direction::Incoming).map(|e| *e.weight()).collect();
            slots.sort();
            if slots.iter().enumerate().any(|(i, s)| i != *s) {
                return Err(VerifyError::Slots { node: node.name.clone() });
            }
            if matches!(node.op, Op::Input) {
                continue;
            }
            match self.reinfer(id) {
                Ok(inf) if inf.ty == node.ty => {}
                Ok(inf) => {
                    return Err(VerifyError::Type {
                        node: node.name.clone(),
                        recorded: node.ty.to_string(),
                        inferred: inf.ty.to_string(),
                    });
                }
                Err(e) => return Err(VerifyError::Shape { node: node.name.clone(), message: e.message }),
            }
            let specs = def.params();
            if specs.len() != node.params.len() {
                return Err(VerifyError::Params {
                    node: node.name.clone(),
                    detail: format!("count {} but the op declares {}", node.params.len(), specs.len()),
                });
            }
            for (spec, pid) in specs.iter().zip(&node.params) {
                let Some(p) = self.params.get(pid.0) else {
                    return Err(VerifyError::Params { node: node.name.clone(), detail: format!("#{} missing", pid.0) });
                };
                if p.spec.shape != spec.shape || p.spec.dtype != spec.dtype || !p.name.ends_with(spec.suffix) {
                    return Err(VerifyError::Params {
                        node: node.name.clone(),
                        detail: format!(
                            "{} is {:?}, the op declares {} {:?}",
                            p.name, p.spec.shape, spec.suffix, spec.shape
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Learnable parameter count (`sum(p.numel() for p in model.parameters())`).
    pub fn param_count(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.spec.kind != ParamKind::Buffer)
            .map(|p| p.spec.shape.iter().product::<usize>())
            .sum()
    }

    /// Buffer element count (BatchNorm running statistics and counters).
    pub fn buffer_count(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.spec.kind == ParamKind::Buffer)
            .map(|p| p.spec.shape.iter().product::<usize>())
            .sum()
    }

    /// `state_dict` keys in PyTorch's order.
    pub fn state_dict_keys(&self) -> Vec<&str> {
        self.params.iter().map(|p| p.name.as_str()).collect()
    }

    /// Graphviz DOT of the graph (one box per op, edges labelled with shapes).
    pub fn to_dot(&self) -> String {
        let mut s =
            format!("digraph \"{}\" {{\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\"];\n", self.name);
        let order = self.topo_order().unwrap_or_else(|_| self.node_ids());
        for id in &order {
            let n = self.node(*id);
            let label = match n.op {
                Op::Input => format!("input {}\\n{}", n.name, n.ty),
                _ => format!("{}\\n{}", n.name, n.op.def().describe().replace('"', "'")),
            };
            let style = if matches!(n.op, Op::Input) { ", shape=ellipse" } else { "" };
            s += &format!("  n{} [label=\"{label}\"{style}];\n", id.index());
        }
        for id in &order {
            for (slot, o) in self.operands(*id).iter().enumerate() {
                let extra = if slot > 0 { format!(" (#{slot})") } else { String::new() };
                s += &format!("  n{} -> n{} [label=\"{}{extra}\"];\n", o.index(), id.index(), self.node(*o).ty);
            }
        }
        for (name, o) in &self.outputs {
            s += &format!("  out_{name} [label=\"output {name}\", shape=ellipse];\n  n{} -> out_{name};\n", o.index());
        }
        s + "}\n"
    }
}

impl fmt::Display for Graph {
    /// The text form: one line per node in topological order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ins: Vec<String> = self.inputs.iter().map(|(n, id)| format!("{n}: {}", self.node(*id).ty)).collect();
        let outs: Vec<&str> = self.outputs.iter().map(|(n, _)| n.as_str()).collect();
        writeln!(f, "net {}({}) -> ({}) {{", self.name, ins.join(", "), outs.join(", "))?;
        let order = self.topo_order().unwrap_or_else(|_| self.node_ids());
        for id in order {
            let n = self.node(id);
            if matches!(n.op, Op::Input) {
                writeln!(f, "  {id} = input {} : {}", n.name, n.ty)?;
                continue;
            }
            let ops: Vec<String> = self.operands(id).iter().map(|o| o.to_string()).collect();
            write!(f, "  {id} = {}({}) : {}", n.op.def().describe(), ops.join(", "), n.ty)?;
            write!(f, "  # {}", n.name)?;
            writeln!(f)?;
        }
        for (name, id) in &self.outputs {
            writeln!(f, "  return {name} = {id}")?;
        }
        writeln!(f, "}}")
    }
}
