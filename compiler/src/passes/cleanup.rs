//! Inference clean-ups: identity views ([`remove_identity_view`]), dead nodes
//! ([`remove_dead_node`]) and the parameter table ([`compact_params`]).
//!
//! A Flatten that changes the shape stays: it is a *view* (the JIT aliases its operand's
//! buffer, and the report counts it as neither a kernel nor traffic).

use super::{Absorbed, How, Outcome, ParamStore, Rewrite, Skip, only_operand};
use crate::graph::{Graph, NodeId, ParamId};
use crate::ops::Op;

/// Whether an op is a view of its operand: no kernel, no memory traffic.
pub fn is_view(op: &Op) -> bool {
    matches!(op, Op::Flatten(_) | Op::Dropout(_))
}

/// `Dropout(x)` → `x` (the identity at inference); `Flatten(x)` → `x` when it leaves the
/// type unchanged.
pub(super) fn remove_identity_view(graph: &mut Graph, _store: &mut dyn ParamStore, id: NodeId) -> Outcome {
    let n = graph.node(id);
    let identity = match &n.op {
        Op::Dropout(_) => true,
        Op::Flatten(_) => {
            let x = only_operand(graph, id)?;
            graph.node(x).ty == n.ty
        }
        _ => return Err(Skip::NoMatch),
    };
    if !identity {
        return Err(Skip::NoMatch);
    }
    let x = only_operand(graph, id)?;
    let absorbed = vec![Absorbed::of(graph, id, How::Identity)];
    graph.replace_uses(id, x);
    graph.remove_node(id);
    Ok(Rewrite { kernel: None, absorbed, note: None })
}

/// A node no graph output depends on, and with it every producer that then has no users
/// (inputs stay: they are the net's signature).
pub(super) fn remove_dead_node(graph: &mut Graph, _store: &mut dyn ParamStore, id: NodeId) -> Outcome {
    let dead = |g: &Graph, n: NodeId| {
        g.contains(n) && !matches!(g.node(n).op, Op::Input) && !g.is_output(n) && g.users(n).is_empty()
    };
    if !dead(graph, id) {
        return Err(Skip::NoMatch);
    }
    let mut absorbed = vec![];
    let mut stack = vec![id];
    while let Some(n) = stack.pop() {
        if !dead(graph, n) {
            continue;
        }
        let operands = graph.operands(n);
        absorbed.push(Absorbed::of(graph, n, How::Dead));
        graph.remove_node(n);
        stack.extend(operands);
    }
    Ok(Rewrite { kernel: None, absorbed, note: None })
}

/// Rebuilds the parameter table in the order the kernels first read it (a node's weight,
/// bias, scale, shift, node by node in execution order, as a `state_dict` lists them) and
/// drops parameters no node reads (folded BatchNorms' statistics, unused modules); the
/// store follows.
pub(super) fn compact_params(graph: &mut Graph, store: &mut dyn ParamStore) -> Outcome {
    let order = graph.topo_order().map_err(|_| Skip::NoMatch)?;
    let mut new_index: Vec<Option<usize>> = vec![None; graph.params.len()];
    let mut selected: Vec<ParamId> = vec![];
    for id in &order {
        for p in &graph.node(*id).params {
            if let Some(slot @ None) = new_index.get_mut(p.0) {
                *slot = Some(selected.len());
                selected.push(*p);
            }
        }
    }
    let dropped = graph.params.len() - selected.len();
    if selected.iter().enumerate().all(|(i, p)| p.0 == i) && dropped == 0 {
        return Err(Skip::NoMatch);
    }
    graph.params = selected.iter().map(|p| graph.params[p.0].clone()).collect();
    store.select(&selected);
    for id in order {
        for p in graph.node_mut(id).params.iter_mut() {
            if let Some(Some(i)) = new_index.get(p.0) {
                p.0 = *i;
            }
        }
    }
    let note = match dropped {
        0 => "parameters reordered by first use".to_string(),
        n => format!("{n} unused parameters dropped, the rest ordered by first use"),
    };
    Ok(Rewrite { kernel: None, absorbed: vec![], note: Some(note) })
}
