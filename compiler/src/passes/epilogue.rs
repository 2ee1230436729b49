//! Epilogue fusion: the residual add ([`fuse_residual`]) and the activation
//! ([`fuse_activation`]) that follow a Conv2d or Linear run inside its kernel, on the
//! result while it is still in registers. The epilogue's fixed order is bias → scale/shift →
//! residual → activation, so a residual can only join a kernel that does not activate yet,
//! and the residual pass runs first: `relu(conv(x) + skip)` becomes one kernel.
//!
//! Both rewrites are exact: the kernel computes the same f32 operations in the same order
//! as the separate nodes did.

use super::{Absorbed, How, Outcome, ParamStore, Rewrite, Skip, from_text, only_operand, reaches, sole_consumer};
use crate::graph::{Graph, NodeId};
use crate::ops::{Epilogue, Op};

/// The epilogue of a Conv2d or Linear.
fn epilogue_of(op: &Op) -> Option<&Epilogue> {
    match op {
        Op::Conv2d(c) => Some(&c.epilogue),
        Op::Linear(l) => Some(&l.epilogue),
        _ => None,
    }
}

fn epilogue_mut(op: &mut Op) -> Option<&mut Epilogue> {
    match op {
        Op::Conv2d(c) => Some(&mut c.epilogue),
        Op::Linear(l) => Some(&mut l.epilogue),
        _ => None,
    }
}

/// Whether `kernel` can take `skip` as its residual in place of the add `add`.
fn residual_candidate(graph: &Graph, kernel: NodeId, skip: NodeId, add: NodeId) -> Result<(), String> {
    let k = graph.node(kernel);
    let Some(e) = epilogue_of(&k.op) else {
        return Err(match k.op {
            Op::Input => format!("`{}` is the graph input, not a Conv2d or Linear", k.name),
            _ => {
                let kind = k.op.kind();
                let article = if kind.starts_with(['A', 'E', 'I', 'O', 'U']) { "an" } else { "a" };
                format!("`{}` is {article} {kind}, not a Conv2d or Linear", k.name)
            }
        });
    };
    if e.residual {
        return Err(format!("`{}` already adds a residual", k.name));
    }
    if e.act.is_some() {
        return Err(format!("`{}` already activates, and its epilogue adds the residual before that", k.name));
    }
    if kernel == skip {
        return Err(format!("both operands are `{}`", k.name));
    }
    sole_consumer(graph, kernel, add).map_err(|s| match s {
        Skip::Declined(r) => r,
        Skip::NoMatch => String::new(),
    })?;
    // The fused kernel reads `skip`, so `skip` must be computable before it: not downstream
    // of the kernel (which would make a cycle).
    if reaches(graph, kernel, skip) {
        return Err(format!("the skip `{}` is computed from `{}`'s output", graph.node(skip).name, k.name));
    }
    Ok(())
}

/// `Add(kernel(x), skip)` (either order) → `kernel(x, skip)` with a residual epilogue, for a
/// Conv2d or Linear kernel (with or without bias) that has no residual or activation yet,
/// whose output feeds only the add, and whose output `skip` does not depend on. The left
/// operand is preferred when both qualify (`out += identity` fuses into `out`'s conv).
pub(super) fn fuse_residual(graph: &mut Graph, _store: &mut dyn ParamStore, add: NodeId) -> Outcome {
    if !matches!(graph.node(add).op, Op::Add(_)) {
        return Err(Skip::NoMatch);
    }
    let &[a, b] = graph.operands(add).as_slice() else {
        return Err(Skip::NoMatch);
    };
    let mut why = vec![];
    for (kernel, skip) in [(a, b), (b, a)] {
        match residual_candidate(graph, kernel, skip, add) {
            Ok(()) => {
                let x = graph.operands(kernel).first().copied().ok_or(Skip::NoMatch)?;
                let absorbed = vec![Absorbed::of(graph, add, How::Residual)];
                let node = graph.node_mut(kernel);
                if let Some(e) = epilogue_mut(&mut node.op) {
                    e.residual = true;
                }
                graph.set_operands(kernel, &[x, skip]);
                graph.replace_uses(add, kernel);
                graph.remove_node(add);
                return Ok(Rewrite { kernel: Some(kernel), absorbed, note: None });
            }
            Err(r) => why.push(r),
        }
        if a == b {
            break;
        }
    }
    why.dedup();
    Err(Skip::Declined(why.join("; ")))
}

/// `Activation(kernel(…))` → `kernel(…)` with an activation epilogue, for a Conv2d or
/// Linear that does not activate yet and whose output feeds only the activation.
pub(super) fn fuse_activation(graph: &mut Graph, _store: &mut dyn ParamStore, act: NodeId) -> Outcome {
    let Op::Activation(a) = graph.node(act).op else {
        return Err(Skip::NoMatch);
    };
    let x = only_operand(graph, act)?;
    let k = graph.node(x);
    let Some(e) = epilogue_of(&k.op) else {
        return Err(Skip::Declined(format!("{}, not a Conv2d or Linear", from_text(graph, x))));
    };
    if let Some(prev) = e.act {
        return Err(Skip::Declined(format!("`{}` already applies {}", k.name, prev.kind_name())));
    }
    sole_consumer(graph, x, act)?;
    let absorbed = vec![Absorbed::of(graph, act, How::Activation)];
    if let Some(e) = epilogue_mut(&mut graph.node_mut(x).op) {
        e.act = Some(a);
    }
    graph.replace_uses(act, x);
    graph.remove_node(act);
    Ok(Rewrite { kernel: Some(x), absorbed, note: None })
}
