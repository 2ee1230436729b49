//! The memory plan: which buffer every value lives in, and where intermediates sit in the
//! arena.
//!
//! Values live in *slots*. A graph input's slot is the caller's array; an output's slot is
//! the output array the run returns (the producing kernel writes straight into it);
//! everything else lives in the arena. Flatten and Dropout get no slot of their own: they
//! alias their operand's slot, so they cost nothing. An output that is an input, an alias
//! of an already-claimed slot, or named twice gets a copy step at the end.
//!
//! Offsets are per sample, in floats, assigned at compile time by liveness: a value is live
//! from the step that produces it to the last step that reads it (through aliases), and is
//! placed at the lowest 16-float-aligned offset that does not overlap any value live at the
//! same time, so a buffer is reused once its last consumer ran. A kernel's output never
//! shares memory with its inputs (their live ranges meet at that step).
//!
//! The batch scales the plan: for a chunk of `nb` samples, slot `s` at per-sample offset
//! `o` starts at `arena + o·nb` and holds `nb` consecutive samples, so every buffer is one
//! contiguous `[nb, …]` tensor in NCHW order, like the inputs and outputs.

use crate::error::{Error, Result};
use cnnc_compiler::graph::{Graph, NodeId};
use cnnc_compiler::ops::Op;
use cnnc_compiler::shape::Batch;
use std::collections::HashMap;

/// Where a slot's memory comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SlotKind {
    /// The caller's input array `i`.
    Input(usize),
    /// The returned output array `j`.
    Output(usize),
    /// The arena, at this per-sample offset (floats).
    Arena(usize),
}

/// A buffer: its kind and its per-sample size in floats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Slot {
    /// Where it lives.
    pub kind: SlotKind,
    /// Floats per sample.
    pub size: usize,
}

/// One step of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Run the kernel of a node reading `inputs` (slots, in operand order) and writing
    /// `output`.
    Node {
        /// The node.
        id: NodeId,
        /// Operand slots.
        inputs: Vec<usize>,
        /// Result slot.
        output: usize,
    },
    /// Copy slot `from` into slot `to` (an output that has no kernel of its own).
    Copy {
        /// Source slot.
        from: usize,
        /// Destination slot.
        to: usize,
    },
}

/// The memory plan of a graph.
#[derive(Clone, Debug)]
pub(super) struct Plan {
    /// Every buffer; a kernel reads slot `s`'s address from `table[s]`.
    pub slots: Vec<Slot>,
    /// Steps in execution order.
    pub steps: Vec<Step>,
    /// Arena floats per sample.
    pub arena: usize,
}

const ALIGN: usize = 16;

fn align(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// Plans a verified graph.
pub(super) fn plan(graph: &Graph) -> Result<Plan> {
    let order = graph.topo_order()?;
    // Only what some output depends on is computed.
    let mut needed: HashMap<NodeId, bool> = HashMap::new();
    let mut stack: Vec<NodeId> = graph.outputs.iter().map(|(_, id)| *id).collect();
    while let Some(id) = stack.pop() {
        if needed.insert(id, true).is_none() {
            stack.extend(graph.operands(id));
        }
    }
    let batches: Vec<_> =
        order.iter().filter(|id| needed.contains_key(id)).map(|id| graph.node(*id).ty.batch).collect();
    if batches.windows(2).any(|w| w[0] != w[1]) {
        let kinds: std::collections::BTreeSet<String> = batches
            .iter()
            .map(|b| match b {
                Batch::Symbolic => "N".to_string(),
                Batch::Fixed(n) => n.to_string(),
            })
            .collect();
        return Err(Error::Unsupported(format!(
            "net `{}` mixes batch dimensions ({}); the JIT needs one batch size for every tensor",
            graph.name,
            kinds.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }

    let mut slots: Vec<Slot> = vec![];
    // Arena slots not yet given an offset are marked with `usize::MAX`.
    let unplaced = SlotKind::Arena(usize::MAX);
    let mut value: HashMap<NodeId, usize> = HashMap::new();
    let mut steps = vec![];
    for id in order {
        if !needed.contains_key(&id) {
            continue;
        }
        let node = graph.node(id);
        let size = node.ty.numel_per_sample();
        match &node.op {
            Op::Input => {
                let i = graph.inputs.iter().position(|(_, n)| *n == id).ok_or_else(|| {
                    Error::Unsupported(format!("input node `{}` is not among the graph's inputs", node.name))
                })?;
                slots.push(Slot { kind: SlotKind::Input(i), size });
                value.insert(id, slots.len() - 1);
            }
            Op::Flatten(_) | Op::Dropout(_) => {
                let src = graph.operands(id)[0];
                value.insert(id, value[&src]);
            }
            _ => {
                let inputs = graph.operands(id).iter().map(|o| value[o]).collect();
                slots.push(Slot { kind: unplaced, size });
                let output = slots.len() - 1;
                value.insert(id, output);
                steps.push(Step::Node { id, inputs, output });
            }
        }
    }
    for (j, (_, id)) in graph.outputs.iter().enumerate() {
        let s = value[id];
        if slots[s].kind == unplaced {
            slots[s].kind = SlotKind::Output(j);
        } else {
            slots.push(Slot { kind: SlotKind::Output(j), size: slots[s].size });
            steps.push(Step::Copy { from: s, to: slots.len() - 1 });
        }
    }

    // Live ranges of arena slots: [producing step, last reading step].
    let mut live: HashMap<usize, (usize, usize)> = HashMap::new();
    for (i, step) in steps.iter().enumerate() {
        let (reads, writes): (Vec<usize>, usize) = match step {
            Step::Node { inputs, output, .. } => (inputs.clone(), *output),
            Step::Copy { from, to } => (vec![*from], *to),
        };
        if slots[writes].kind == unplaced {
            live.insert(writes, (i, i));
        }
        for r in reads {
            if let Some(l) = live.get_mut(&r) {
                l.1 = i;
            }
        }
    }
    let mut order: Vec<usize> = live.keys().copied().collect();
    order.sort_by_key(|s| (live[s].0, *s));
    let mut placed: Vec<(usize, usize, usize)> = vec![]; // (slot, offset, aligned size)
    let mut arena = 0;
    for s in order {
        let (a, b) = live[&s];
        let len = align(slots[s].size.max(1));
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|(o, _, _)| {
                let (c, d) = live[o];
                c <= b && a <= d
            })
            .map(|(_, off, l)| (*off, off + l))
            .collect();
        busy.sort();
        let mut offset = 0;
        for (lo, hi) in busy {
            if offset + len <= lo {
                break;
            }
            offset = offset.max(hi);
        }
        slots[s].kind = SlotKind::Arena(offset);
        arena = arena.max(offset + len);
        placed.push((s, offset, len));
    }
    Ok(Plan { slots, steps, arena })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnc_compiler::GraphBuilder;
    use cnnc_compiler::ops::{Activation, Flatten, Linear};
    use cnnc_compiler::shape::TensorType;

    fn chain(len: usize) -> Graph {
        let mut b = GraphBuilder::new("chain");
        let mut x = b.input("x", TensorType::new(vec![8, 4, 4]));
        for i in 0..len {
            x = b.layer(&format!("act{i}"), Op::Activation(Activation::Relu), &[x]).unwrap();
        }
        let f = b.layer("flat", Op::Flatten(Flatten { start_dim: 1, end_dim: -1 }), &[x]).unwrap();
        let y = b
            .layer(
                "fc",
                Op::Linear(Linear { in_features: 128, out_features: 3, bias: true, epilogue: Default::default() }),
                &[f],
            )
            .unwrap();
        b.output("y", y);
        b.finish()
    }

    #[test]
    fn a_chain_ping_pongs_between_two_buffers() {
        let p = plan(&chain(5)).unwrap();
        let offsets: Vec<usize> = p
            .slots
            .iter()
            .filter_map(|s| match s.kind {
                SlotKind::Arena(o) => Some(o),
                _ => None,
            })
            .collect();
        assert_eq!(offsets, vec![0, 128, 0, 128, 0]);
        assert_eq!(p.arena, 256);
        assert_eq!(p.steps.len(), 6, "Flatten has no step");
    }

    #[test]
    fn outputs_are_written_in_place_or_copied() {
        let mut b = GraphBuilder::new("io");
        let x = b.input("x", TensorType::new(vec![3]));
        let r = b.layer("r", Op::Activation(Activation::Relu), &[x]).unwrap();
        b.output("a", r);
        b.output("b", r);
        b.output("c", x);
        let p = plan(&b.finish()).unwrap();
        assert_eq!(p.slots[1].kind, SlotKind::Output(0));
        assert_eq!(p.steps[1], Step::Copy { from: 1, to: 2 });
        assert_eq!(p.steps[2], Step::Copy { from: 0, to: 3 });
        assert_eq!(p.arena, 0);
    }
}
