//! BatchNorm2d after a Conv2d: folded into the conv's weights and bias
//! ([`fold_batchnorm`]), or, when the weights cannot change, run as the conv's per-channel
//! scale/shift epilogue ([`batchnorm_epilogue`]).
//!
//! Inference BatchNorm is the per-channel affine map `y·s + t` with
//! `s = weight / √(running_var + eps)` and `t = bias − running_mean·s`. After
//! `y = W∗x + b` it folds to `W' = W·s[oc]`, `b' = b·s + t`. Both are computed in f64 and
//! rounded once, so the folded kernel differs from the unfolded pair only by the rounding of
//! `W'` (and of the conv's f32 output, which the unfolded pair rounds before the BatchNorm).

use super::store::{add_param, values};
use super::{
    Absorbed, How, Outcome, ParamStore, Rewrite, Skip, from_text, only_operand, sharing_params, sole_consumer,
};
use crate::graph::{Graph, NodeId, ParamId};
use crate::ops::{Op, ParamKind, ParamSpec};

/// The parameter of `node` with this `state_dict` suffix.
pub(super) fn param_of(graph: &Graph, node: NodeId, suffix: &str) -> Option<ParamId> {
    let n = graph.node(node);
    n.op.def().params().iter().zip(&n.params).find(|(s, _)| s.suffix == suffix).map(|(_, id)| *id)
}

/// The f32 values of `node`'s parameter `suffix`, or a decline saying why they are missing.
fn param_values<'s>(graph: &Graph, store: &'s dyn ParamStore, node: NodeId, suffix: &str) -> Result<&'s [f32], Skip> {
    let id = param_of(graph, node, suffix)
        .ok_or_else(|| Skip::Declined(format!("`{}` has no `{suffix}` parameter", graph.node(node).name)))?;
    values(graph, store, id).map_err(Skip::Declined)
}

/// The BatchNorm's per-channel `(s, t)` in f64.
fn affine(graph: &Graph, store: &dyn ParamStore, bn: NodeId) -> Result<(Vec<f64>, Vec<f64>), Skip> {
    let Op::BatchNorm2d(b) = &graph.node(bn).op else {
        return Err(Skip::NoMatch);
    };
    let mean = param_values(graph, store, bn, "running_mean")?;
    let var = param_values(graph, store, bn, "running_var")?;
    let (gamma, beta) = if b.affine {
        (Some(param_values(graph, store, bn, "weight")?), Some(param_values(graph, store, bn, "bias")?))
    } else {
        (None, None)
    };
    let mut s = Vec::with_capacity(b.num_features);
    let mut t = Vec::with_capacity(b.num_features);
    for c in 0..b.num_features {
        let denom = f64::from(var[c]) + b.eps;
        if !(denom > 0.0 && denom.is_finite()) {
            return Err(Skip::Declined(format!("running_var + eps is {denom} at channel {c}, not a positive number")));
        }
        let sc = gamma.map_or(1.0, |g| f64::from(g[c])) / denom.sqrt();
        let sh = beta.map_or(0.0, |b| f64::from(b[c])) - f64::from(mean[c]) * sc;
        if !(sc.is_finite() && sh.is_finite()) {
            return Err(Skip::Declined(format!("the folded scale or shift is not finite at channel {c}")));
        }
        s.push(sc);
        t.push(sh);
    }
    Ok((s, t))
}

/// The Conv2d feeding `bn`, or a decline naming what feeds it instead.
fn conv_before(graph: &Graph, bn: NodeId) -> Result<NodeId, Skip> {
    if !matches!(graph.node(bn).op, Op::BatchNorm2d(_)) {
        return Err(Skip::NoMatch);
    }
    let x = only_operand(graph, bn)?;
    match graph.node(x).op {
        Op::Conv2d(_) => Ok(x),
        _ => Err(Skip::Declined(format!("{}, not a Conv2d", from_text(graph, x)))),
    }
}

/// Replaces `bn` by the kernel `conv` that now computes it.
fn absorb(graph: &mut Graph, bn: NodeId, conv: NodeId, how: How, note: Option<String>) -> Rewrite {
    let absorbed = vec![Absorbed::of(graph, bn, how)];
    graph.replace_uses(bn, conv);
    graph.remove_node(bn);
    Rewrite { kernel: Some(conv), absorbed, note }
}

/// `BatchNorm2d(Conv2d(x))` → `Conv2d'(x)` with `W' = W·s`, `b' = b·s + t`; a conv without
/// bias gains one (`{conv}.bias`).
///
/// Declines when the conv already has an epilogue (it would run after the fold), when its
/// output is used elsewhere or is a graph output, or when its weights are shared with
/// another node (a module applied twice): [`batchnorm_epilogue`] handles the last case.
pub(super) fn fold_batchnorm(graph: &mut Graph, store: &mut dyn ParamStore, bn: NodeId) -> Outcome {
    let x = conv_before(graph, bn)?;
    let Op::Conv2d(conv) = &graph.node(x).op else {
        return Err(Skip::NoMatch);
    };
    let name = graph.node(x).name.clone();
    if !conv.epilogue.is_empty() {
        return Err(Skip::Declined(format!("`{name}` already has a fused epilogue, which would run after the fold")));
    }
    sole_consumer(graph, x, bn)?;
    if let Some(other) = sharing_params(graph, x) {
        return Err(Skip::Declined(format!("`{name}` shares its weights with `{other}`, which a fold would change")));
    }
    let (s, t) = affine(graph, store, bn)?;
    let (channels, has_bias) = (conv.out_channels, conv.bias);
    let w = param_values(graph, store, x, "weight")?;
    let per = w.len() / channels.max(1);
    let mut new_w = Vec::with_capacity(w.len());
    for (row, s) in w.chunks(per.max(1)).zip(&s) {
        new_w.extend(row.iter().map(|v| (f64::from(*v) * s) as f32));
    }
    let b = if has_bias { Some(param_values(graph, store, x, "bias")?) } else { None };
    let new_b: Vec<f32> = (0..channels).map(|c| (b.map_or(0.0, |b| f64::from(b[c])) * s[c] + t[c]) as f32).collect();
    let w_id = param_of(graph, x, "weight").ok_or(Skip::NoMatch)?;

    store.set(w_id, new_w);
    let note = match param_of(graph, x, "bias") {
        Some(b_id) => {
            store.set(b_id, new_b);
            None
        }
        None => {
            let spec = ParamSpec::f32("bias", vec![channels], ParamKind::Bias);
            let b_id = add_param(graph, store, &name, spec, new_b);
            let node = graph.node_mut(x);
            node.params.insert(1, b_id);
            if let Op::Conv2d(c) = &mut node.op {
                c.bias = true;
            }
            Some(format!("`{name}` gained the bias `{}`", graph.param(b_id).name))
        }
    };
    Ok(absorb(graph, bn, x, How::FoldedIntoWeights, note))
}

/// `BatchNorm2d(Conv2d(x))` → `Conv2d(x)` with a scale/shift epilogue (`{conv}.scale`,
/// `{conv}.shift`), composed into an existing one. For BatchNorms [`fold_batchnorm`]
/// declined because the conv's weights are shared or it already has a scale/shift.
///
/// Declines when the BatchNorm does not follow a Conv2d, when the conv's output is used
/// elsewhere, or when the conv already adds a residual or activates (those run after the
/// scale/shift in the epilogue's fixed order).
pub(super) fn batchnorm_epilogue(graph: &mut Graph, store: &mut dyn ParamStore, bn: NodeId) -> Outcome {
    let x = conv_before(graph, bn)?;
    let Op::Conv2d(conv) = &graph.node(x).op else {
        return Err(Skip::NoMatch);
    };
    let name = graph.node(x).name.clone();
    if conv.epilogue.residual || conv.epilogue.act.is_some() {
        return Err(Skip::Declined(format!(
            "`{name}` already adds a residual or activates, which its epilogue does after any scale/shift"
        )));
    }
    sole_consumer(graph, x, bn)?;
    let (s, t) = affine(graph, store, bn)?;
    let channels = conv.out_channels;
    if conv.epilogue.scale_shift {
        let (Some(sc_id), Some(sh_id)) = (param_of(graph, x, "scale"), param_of(graph, x, "shift")) else {
            return Err(Skip::NoMatch);
        };
        let users = |p| graph.node_ids().into_iter().filter(|n| graph.node(*n).params.contains(&p)).count();
        if users(sc_id) > 1 || users(sh_id) > 1 {
            return Err(Skip::Declined(format!("`{name}`'s scale/shift are shared with another node")));
        }
        let (sc, sh) = (
            values(graph, store, sc_id).map_err(Skip::Declined)?,
            values(graph, store, sh_id).map_err(Skip::Declined)?,
        );
        let new_sc: Vec<f32> = (0..channels).map(|c| (f64::from(sc[c]) * s[c]) as f32).collect();
        let new_sh: Vec<f32> = (0..channels).map(|c| (f64::from(sh[c]) * s[c] + t[c]) as f32).collect();
        store.set(sc_id, new_sc);
        store.set(sh_id, new_sh);
        return Ok(absorb(graph, bn, x, How::ScaleShift, Some(format!("composed into `{name}`'s scale/shift"))));
    }
    let to_f32 = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
    let sc_id = add_param(graph, store, &name, ParamSpec::f32("scale", vec![channels], ParamKind::Buffer), to_f32(&s));
    let sh_id = add_param(graph, store, &name, ParamSpec::f32("shift", vec![channels], ParamKind::Buffer), to_f32(&t));
    let node = graph.node_mut(x);
    node.params.extend([sc_id, sh_id]);
    if let Op::Conv2d(c) = &mut node.op {
        c.epilogue.scale_shift = true;
    }
    Ok(absorb(graph, bn, x, How::ScaleShift, None))
}
