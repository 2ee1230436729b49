//! Inference clean-ups: identity views ([`remove_identity_view`]), dead nodes
//! ([`remove_dead_node`]) and unused parameters ([`prune_params`]).
//!
//! A Flatten that changes the shape stays: it is a *view* (the JIT aliases its operand's
//! buffer, and the report counts it as neither a kernel nor traffic).

use super::{Absorbed, How, Outcome, ParamStore, Rewrite, Skip, only_operand};
use crate::graph::{Graph, NodeId};
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

/// Drops parameters no node reads (folded BatchNorms' statistics, unused modules) from the
/// table and the store, renumbering the rest in order.
pub(super) fn prune_params(graph: &mut Graph, store: &mut dyn ParamStore) -> Outcome {
    let mut keep = vec![false; graph.params.len()];
    let nodes = graph.node_ids();
    for id in &nodes {
        for p in &graph.node(*id).params {
            if let Some(k) = keep.get_mut(p.0) {
                *k = true;
            }
        }
    }
    let dropped = keep.iter().filter(|k| !**k).count();
    if dropped == 0 {
        return Err(Skip::NoMatch);
    }
    let mut new_index = vec![usize::MAX; keep.len()];
    let mut next = 0;
    for (i, k) in keep.iter().enumerate() {
        if *k {
            new_index[i] = next;
            next += 1;
        }
    }
    let mut i = 0;
    graph.params.retain(|_| {
        i += 1;
        keep[i - 1]
    });
    store.retain(&keep);
    for id in nodes {
        for p in graph.node_mut(id).params.iter_mut() {
            p.0 = new_index[p.0];
        }
    }
    Ok(Rewrite { kernel: None, absorbed: vec![], note: Some(format!("{dropped} unused parameters dropped")) })
}
