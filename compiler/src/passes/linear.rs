//! Constant folding of a Linear chain: `Linear₂(Linear₁(x))` with nothing between them is
//! the single affine map `W = W₂·W₁`, `b = W₂·b₁ + b₂`, computed once at compile time in
//! f64 and rounded once. Done only when it is cheaper (`o₂·i₁ < o₁·i₁ + o₂·o₁` MACs), as in
//! the CIFAR-10 net's `Linear(1024, 64) → Linear(64, 10)`.

use super::batchnorm::param_of;
use super::store::{add_param, values};
use super::{Absorbed, How, Outcome, ParamStore, Rewrite, Skip, sharing_params, sole_consumer};
use crate::graph::{Graph, NodeId};
use crate::ops::{Op, ParamKind, ParamSpec};

/// `Linear₂(Linear₁(x))` → `Linear₂'(x)`; the second layer keeps its keys (its weight takes
/// the composed shape `[o₂, i₁]`; a missing bias is added as `{name}.bias`).
pub(super) fn fold_linear_chain(graph: &mut Graph, store: &mut dyn ParamStore, l2: NodeId) -> Outcome {
    let Op::Linear(second) = &graph.node(l2).op else {
        return Err(Skip::NoMatch);
    };
    let ops = graph.operands(l2);
    let Some(&l1) = ops.first() else {
        return Err(Skip::NoMatch);
    };
    let Op::Linear(first) = &graph.node(l1).op else {
        return Err(Skip::NoMatch);
    };
    let (i1, o1, o2) = (first.in_features, first.out_features, second.out_features);
    let (b1_exists, b2_exists) = (first.bias, second.bias);
    let (n1, n2) = (graph.node(l1).name.clone(), graph.node(l2).name.clone());
    if !first.epilogue.is_empty() {
        return Err(Skip::Declined(format!("`{n1}` has an epilogue between the two Linears")));
    }
    if o2 * i1 >= o1 * i1 + o2 * o1 {
        return Err(Skip::Declined(format!(
            "the composed {o2}×{i1} weight would cost more than `{n1}` and `{n2}` together ({} ≥ {} MACs)",
            o2 * i1,
            o1 * i1 + o2 * o1
        )));
    }
    sole_consumer(graph, l1, l2)?;
    for n in [l1, l2] {
        if let Some(other) = sharing_params(graph, n) {
            return Err(Skip::Declined(format!("`{}` shares its weights with `{other}`", graph.node(n).name)));
        }
    }
    let get = |node: NodeId, suffix: &str| -> Result<Option<&[f32]>, Skip> {
        match param_of(graph, node, suffix) {
            Some(id) => values(graph, &*store, id).map(Some).map_err(Skip::Declined),
            None => Ok(None),
        }
    };
    let (Some(w1), Some(w2)) = (get(l1, "weight")?, get(l2, "weight")?) else {
        return Err(Skip::NoMatch);
    };
    let (b1, b2) = (get(l1, "bias")?, get(l2, "bias")?);
    let mut w = vec![0f32; o2 * i1];
    let mut b = vec![0f32; o2];
    for o in 0..o2 {
        let row2 = &w2[o * o1..][..o1];
        for (j, out) in w[o * i1..][..i1].iter_mut().enumerate() {
            *out = row2.iter().enumerate().map(|(k, v)| f64::from(*v) * f64::from(w1[k * i1 + j])).sum::<f64>() as f32;
        }
        let from_b1: f64 = b1.map_or(0.0, |b1| row2.iter().zip(b1).map(|(v, c)| f64::from(*v) * f64::from(*c)).sum());
        b[o] = (from_b1 + b2.map_or(0.0, |b2| f64::from(b2[o]))) as f32;
    }
    let Some(w2_id) = param_of(graph, l2, "weight") else {
        return Err(Skip::NoMatch);
    };
    let x = graph.operands(l1).first().copied().ok_or(Skip::NoMatch)?;

    graph.params[w2_id.0].spec.shape = vec![o2, i1];
    store.set(w2_id, w);
    let mut note = None;
    match param_of(graph, l2, "bias") {
        Some(b2_id) => store.set(b2_id, b),
        None if b1_exists => {
            let b_id = add_param(graph, store, &n2, ParamSpec::f32("bias", vec![o2], ParamKind::Bias), b);
            graph.node_mut(l2).params.insert(1, b_id);
            note = Some(format!("`{n2}` gained the bias `{}`", graph.param(b_id).name));
        }
        None => {}
    }
    if let Op::Linear(l) = &mut graph.node_mut(l2).op {
        l.in_features = i1;
        l.bias = b1_exists || b2_exists;
    }
    let mut new_ops = ops;
    new_ops[0] = x;
    graph.set_operands(l2, &new_ops);
    let absorbed = vec![Absorbed::of(graph, l1, How::ComposedLinear)];
    graph.remove_node(l1);
    Ok(Rewrite { kernel: Some(l2), absorbed, note })
}
