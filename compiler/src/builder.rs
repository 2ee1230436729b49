//! [`GraphBuilder`]: adds layers to a [`Graph`] by module path, registering their parameters
//! under PyTorch `state_dict` keys and running each op's shape rule. The DSL front end, the
//! passes and hand-written tests all build graphs through it.

use crate::graph::{Graph, Node, NodeId, ParamId};
use crate::ops::{Inferred, Op, OpError, Operand};
use crate::shape::TensorType;

/// Builds a [`Graph`] one layer at a time.
#[derive(Debug)]
pub struct GraphBuilder {
    graph: Graph,
}

impl GraphBuilder {
    /// Starts a graph.
    pub fn new(name: impl Into<String>) -> Self {
        GraphBuilder { graph: Graph::new(name) }
    }

    /// Adds a named input.
    pub fn input(&mut self, name: &str, ty: TensorType) -> NodeId {
        self.graph.add_input(name, ty)
    }

    /// Registers the parameters `op` declares under `path.<suffix>` (PyTorch's key), in
    /// declaration order. Call once per module, even if the module is applied many times.
    pub fn register_params(&mut self, path: &str, op: &Op) -> Vec<ParamId> {
        op.def()
            .params()
            .into_iter()
            .map(|spec| {
                let name = if path.is_empty() { spec.suffix.to_string() } else { format!("{path}.{}", spec.suffix) };
                self.graph.add_param(name, spec)
            })
            .collect()
    }

    /// Infers the type of `op` applied to `inputs` without adding it.
    pub fn infer(&self, op: &Op, inputs: &[NodeId], factors: &[Option<&[usize]>]) -> Result<Inferred, OpError> {
        let operands: Vec<Operand<'_>> = inputs
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let n = self.graph.node(*id);
                Operand { ty: &n.ty, producer: &n.name, factors: factors.get(i).copied().flatten() }
            })
            .collect();
        // The same limit the DSL applies: no value larger than `MAX_SIZE` elements per sample.
        op.def().infer(&operands).and_then(|inf| match crate::shape::checked_numel(&inf.ty.dims) {
            Some(_) => Ok(inf),
            None => Err(OpError::new(format!(
                "{}: output {}",
                op.def().describe(),
                crate::shape::too_many_elements(&inf.ty.dims)
            ))),
        })
    }

    /// Adds a node with an already-known type and parameter ids.
    pub fn push(&mut self, name: &str, op: Op, ty: TensorType, params: Vec<ParamId>, inputs: &[NodeId]) -> NodeId {
        self.graph.add_node(Node { name: name.to_string(), op, ty, params }, inputs)
    }

    /// Registers the op's parameters under `path`, infers its type and adds it: the one-call
    /// form for layers applied once.
    pub fn layer(&mut self, path: &str, op: Op, inputs: &[NodeId]) -> Result<NodeId, OpError> {
        let inferred = self.infer(&op, inputs, &[])?;
        let params = self.register_params(path, &op);
        Ok(self.push(path, op, inferred.ty, params, inputs))
    }

    /// Marks a node as a named output.
    pub fn output(&mut self, name: &str, id: NodeId) {
        self.graph.outputs.push((name.to_string(), id));
    }

    /// The graph so far.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Finishes the graph.
    pub fn finish(self) -> Graph {
        self.graph
    }
}
