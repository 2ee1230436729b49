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
//! contiguous `[nb, …]` tensor.
//!
//! **Layouts.** When the Conv2d micro-kernels are in use, a `[C, H, W]` value may live in
//! the *blocked* layout `[⌈C/16⌉, H, W, 16]` (NCHW16c: sixteen consecutive channels of one
//! pixel are one 64-byte line), which is what those kernels read and write; the planner
//! picks each value's layout ([`Layout`]) from what produces and consumes it, and inserts a
//! [`Step::Reorder`] where a consumer needs the other one. Inputs and outputs are always
//! plain (row-major, as the caller's arrays). The lanes of the last block past `C` are
//! padding: every kernel that writes a blocked value keeps them finite (zero, or a finite
//! function of zero), and no kernel lets them reach a real channel.

use crate::error::{Error, Result};
use cnnc_compiler::graph::{Graph, NodeId};
use cnnc_compiler::ops::train::TrainOp;
use cnnc_compiler::ops::{Conv2d, MaxPool2d, Op, PaddingMode};
use cnnc_compiler::shape::{Batch, TensorType};
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
    /// The fixed part of the arena (after the per-sample part), at this offset (floats): a
    /// value whose size does not scale with the batch (a training graph's parameter
    /// gradients, batch statistics, loss).
    Fixed(usize),
}

/// How a value's elements are arranged in its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Layout {
    /// Row-major over the value's own dims (NCHW for images).
    Plain,
    /// `[⌈c/16⌉, h, w, 16]`: the value is `[c, h, w]`, or its flattening `[c·h·w]`.
    Blocked {
        /// Channels (the lanes past `c` in the last block are padding).
        c: usize,
        /// Height.
        h: usize,
        /// Width.
        w: usize,
    },
}

/// Channels per block of [`Layout::Blocked`].
pub(super) const BLOCK: usize = 16;

impl Layout {
    /// Floats per sample of a value of `numel` elements in this layout.
    pub fn size(self, numel: usize) -> usize {
        match self {
            Layout::Plain => numel,
            Layout::Blocked { c, h, w } => c.div_ceil(BLOCK) * BLOCK * h * w,
        }
    }

    /// Whether this is [`Layout::Blocked`].
    pub fn is_blocked(self) -> bool {
        matches!(self, Layout::Blocked { .. })
    }
}

/// A buffer: its kind, its per-sample size in floats and its layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Slot {
    /// Where it lives.
    pub kind: SlotKind,
    /// Floats per sample.
    pub size: usize,
    /// Arrangement of the elements.
    pub layout: Layout,
    /// Whether the buffer is batch-major, `size` floats per sample (every slot but the
    /// fixed-size values and scratch regions of a training graph).
    pub batched: bool,
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
        /// An arena slot the node's kernels may use during this step only (a convolution's
        /// zero-padded copy of its operand).
        scratch: Option<usize>,
    },
    /// Copy slot `from` into slot `to` (an output that has no kernel of its own).
    Copy {
        /// Source slot.
        from: usize,
        /// Destination slot.
        to: usize,
    },
    /// Rewrite slot `from` in slot `to`'s layout (one is plain, the other blocked; both
    /// hold the same `[c, h, w]` value, or its flattening).
    Reorder {
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
    /// Floats of the arena's fixed part (values that do not scale with the batch).
    pub fixed: usize,
    /// Whether the plan must run the whole batch as one chunk: a training graph, whose
    /// reductions over the batch (weight gradients, batch statistics, the loss) see every
    /// sample at once.
    pub whole_batch: bool,
}

const ALIGN: usize = 16;

/// Arena slots not yet given an offset.
const UNPLACED: SlotKind = SlotKind::Arena(usize::MAX);
/// Fixed-size arena slots not yet given an offset.
const UNPLACED_FIXED: SlotKind = SlotKind::Fixed(usize::MAX);

/// Slots and steps under construction.
struct Builder {
    slots: Vec<Slot>,
    steps: Vec<Step>,
    /// `(slot, layout)` → the slot holding the same value in that layout.
    converted: HashMap<(usize, Layout), usize>,
}

impl Builder {
    /// The slot holding slot `s`'s value in layout `want` (a reorder step the first time).
    fn convert(&mut self, s: usize, want: Layout) -> usize {
        let have = self.slots[s].layout;
        if have == want {
            return s;
        }
        if let Some(&t) = self.converted.get(&(s, want)) {
            return t;
        }
        let numel = match (have, want) {
            (Layout::Blocked { c, h, w }, _) | (_, Layout::Blocked { c, h, w }) => c * h * w,
            (Layout::Plain, Layout::Plain) => self.slots[s].size,
        };
        self.slots.push(Slot { kind: UNPLACED, size: want.size(numel), layout: want, batched: true });
        let t = self.slots.len() - 1;
        self.steps.push(Step::Reorder { from: s, to: t });
        self.converted.insert((s, want), t);
        t
    }
}

/// Floats per sample of the copy of its operand that a blocked convolution reads instead
/// of the operand itself, if it makes one: with zero padding, a zero-padded copy (so that
/// every output pixel sees a whole window), `[c][h + pt + pb][w + pl + pr]` for a blocked
/// operand (`c` rounded up to whole blocks); and a plain operand (few channels, a net's
/// first layer) is always copied pixel-major, `[h′][w′][c]` (padded likewise for zero
/// padding; the other padding modes read it through their remapping tables).
pub(super) fn staged_input(conv: &Conv2d, in_ty: &TensorType, layout: Layout) -> Option<usize> {
    let (c, h, w) = in_ty.chw()?;
    let zeros = conv.padding_mode == cnnc_compiler::ops::PaddingMode::Zeros;
    let (pt, pb, pl, pr) = if zeros { conv.pads() } else { (0, 0, 0, 0) };
    let padded = (h + pt + pb) * (w + pl + pr);
    match layout {
        Layout::Plain => Some(c * padded),
        Layout::Blocked { .. } if zeros && (pt, pb, pl, pr) != (0, 0, 0, 0) => Some(c.div_ceil(BLOCK) * BLOCK * padded),
        Layout::Blocked { .. } => None,
    }
}

/// Whether a convolution on a plain operand runs on the plane tiles (see
/// `blocked::conv::plane_conv`): one group, few input and output channels, stride 1, zero
/// padding — a net's first layer with a handful of filters, where blocks of 16 output
/// channels would be mostly padding.
pub(super) fn plane_conv(conv: &Conv2d) -> bool {
    conv.groups == 1
        && conv.in_channels < BLOCK
        && conv.out_channels <= PLANE_MAX_OC
        && conv.stride == (1, 1)
        && conv.padding_mode == cnnc_compiler::ops::PaddingMode::Zeros
}

/// Most output channels of a plane convolution.
pub(super) const PLANE_MAX_OC: usize = 8;

/// Floats per sample of a plane convolution's staged operand: the zero-padded planes
/// `[c][h + pt + pb][w + pl + pr]`, plus a vector's worth of slack for the last row's
/// overhanging loads.
pub(super) fn plane_staged_input(conv: &Conv2d, in_ty: &TensorType) -> usize {
    let (c, h, w) = in_ty.chw().unwrap_or((0, 0, 0));
    let (pt, pb, pl, pr) = conv.pads();
    c * (h + pt + pb) * (w + pl + pr) + 4 * BLOCK
}

/// Whether a convolution runs on the blocked micro-kernels: every group's input and output
/// channels are whole blocks, or there is one group.
pub(super) fn conv_blocked(conv: &Conv2d) -> bool {
    let (icg, ocg) = (conv.in_channels / conv.groups, conv.out_channels / conv.groups);
    conv.groups == 1 || (icg % BLOCK == 0 && ocg % BLOCK == 0)
}

/// The layout of a node's result and the layouts it needs its operands in, given the
/// layouts they have.
fn choose(op: &Op, ty: &TensorType, in_tys: &[&TensorType], have: &[Layout], blocked: bool) -> (Layout, Vec<Layout>) {
    let plain = (Layout::Plain, vec![Layout::Plain; have.len()]);
    let out_blocked = || ty.chw().map(|(c, h, w)| Layout::Blocked { c, h, w });
    // `have[0]` is blocked and is the operand's own `[c, h, w]` (not a flattening).
    let blocked_image = |i: usize| match have[i] {
        Layout::Blocked { c, h, w } => in_tys[i].dims == [c, h, w],
        Layout::Plain => false,
    };
    match op {
        // Few output channels from a plain operand: pixels in the vector lanes, plain result.
        Op::Conv2d(conv) if blocked && have[0] == Layout::Plain && plane_conv(conv) => plain,
        Op::Conv2d(conv) if blocked && conv_blocked(conv) => match (out_blocked(), have[0]) {
            // A plain operand with few channels (a net's first layer) is read as it is;
            // with whole blocks of them it is worth a reorder.
            (Some(out), Layout::Plain) if conv.in_channels / conv.groups < BLOCK => (out, vec![Layout::Plain]),
            (Some(out), Layout::Plain) => match in_tys[0].chw() {
                Some((c, h, w)) => (out, vec![Layout::Blocked { c, h, w }]),
                None => plain,
            },
            (Some(out), _) if blocked_image(0) => (out, vec![have[0]]),
            _ => plain,
        },
        Op::Activation(_) if have[0].is_blocked() => (have[0], vec![have[0]]),
        Op::BatchNorm2d(_) | Op::MaxPool2d(_) | Op::AvgPool2d(_) | Op::AdaptiveAvgPool2d(_) if blocked_image(0) => {
            match out_blocked() {
                Some(out) => (out, vec![have[0]]),
                None => plain,
            }
        }
        Op::Add(_) if have[0].is_blocked() && have.iter().all(|l| *l == have[0]) => (have[0], have.to_vec()),
        Op::Concat(cat) if cat.dim == 1 && (0..have.len()).all(blocked_image) => {
            let aligned =
                have[..have.len() - 1].iter().all(|l| matches!(l, Layout::Blocked { c, .. } if c % BLOCK == 0));
            match out_blocked() {
                Some(out) if aligned => (out, have.to_vec()),
                _ => plain,
            }
        }
        // Backward ops of a training graph on the blocked operands the convolutions leave
        // (only where the micro-kernels make blocked values at all): elementwise gradients
        // keep the layout, a Conv2d's bias and weight gradients read a blocked output
        // gradient, a max-pool's tiling windows go backward blocked.
        Op::Train(TrainOp::ActivationGrad(_)) if blocked_image(0) => (have[0], vec![have[0], have[0]]),
        // Train-mode BatchNorm: its statistics and parameter gradients are plain `[C]`
        // arrays, what it normalises and its input gradient keep the operand's layout.
        Op::Train(TrainOp::BatchStats(_)) if blocked_image(0) => (Layout::Plain, vec![have[0]]),
        Op::Train(TrainOp::BatchNormTrain(_)) if blocked_image(0) => (have[0], vec![have[0], Layout::Plain]),
        Op::Train(TrainOp::BatchNormInputGrad(_)) if blocked_image(0) => {
            (have[0], vec![have[0], Layout::Plain, have[0]])
        }
        Op::Train(TrainOp::BatchNormWeightGrad(_)) if blocked_image(0) => {
            (Layout::Plain, vec![have[0], Layout::Plain, have[0]])
        }
        Op::Train(TrainOp::BiasGrad(0)) if blocked_image(0) => (Layout::Plain, vec![have[0]]),
        Op::Train(TrainOp::ConvWeightGrad(conv)) if blocked_image(0) || blocked_image(1) => {
            let zeros = conv.padding_mode == PaddingMode::Zeros || conv.pads() == (0, 0, 0, 0);
            let x = if zeros && blocked_image(0) { have[0] } else { Layout::Plain };
            let dy = if blocked_image(1) { have[1] } else { Layout::Plain };
            (Layout::Plain, vec![x, dy])
        }
        Op::Train(TrainOp::MaxPoolGrad(p)) if blocked_image(0) => match (in_tys[0].chw(), in_tys[1].chw()) {
            (Some((c, h, w)), Some((_, oh, ow))) if max_pool_grad_blocked(p, (h, w), (oh, ow)) => {
                (have[0], vec![have[0], Layout::Blocked { c, h: oh, w: ow }])
            }
            _ => plain,
        },
        Op::Linear(lin) => match have[0] {
            Layout::Blocked { c, h, w } if in_tys[0].dims == [c * h * w] && lin.in_features == c * h * w => {
                (Layout::Plain, vec![have[0]])
            }
            _ => plain,
        },
        _ => plain,
    }
}

/// Whether a MaxPool2d's backward runs on the blocked layout
/// (`blocked::pool::max_pool_grad`): windows that tile the input without overlap or padding
/// (`stride = kernel`, the usual `MaxPool2d(2)`), every window whole (rows and columns past
/// the last window get no gradient).
pub(super) fn max_pool_grad_tiles(p: &MaxPool2d, (h, w): (usize, usize), (oh, ow): (usize, usize)) -> bool {
    p.padding == (0, 0)
        && p.dilation == (1, 1)
        && p.stride == p.kernel
        && p.kernel.0 * p.kernel.1 > 0
        && oh * p.kernel.0 <= h
        && ow * p.kernel.1 <= w
}

/// Whether a MaxPool2d's backward runs on the blocked layout: windows that tile the map
/// ([`max_pool_grad_tiles`]), or any windows each with a tap inside the input (overlapping or
/// padded, `blocked::pool`'s scatter form).
fn max_pool_grad_blocked(p: &MaxPool2d, (h, w): (usize, usize), (oh, ow): (usize, usize)) -> bool {
    use crate::jit::tables::max_pool_taps;
    max_pool_grad_tiles(p, (h, w), (oh, ow))
        || (max_pool_taps(oh, p.kernel.0, p.stride.0, p.dilation.0, p.padding.0, h, 1).is_some()
            && max_pool_taps(ow, p.kernel.1, p.stride.1, p.dilation.1, p.padding.1, w, 1).is_some())
}

fn align(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// Plans a verified graph. `blocked`: whether the blocked layout may be used (the Conv2d
/// micro-kernels are available).
///
/// A graph with training ops ([`Op::Train`]) runs the whole batch as one chunk, in the plain
/// layout but for what the convolution tiles make and what can take it as it is: the
/// forward Conv2d and a stride-1 Conv2d's input gradient (with their fused activations)
/// write blocked values, and activation gradients, a Conv2d's bias and weight gradients
/// (from a blocked output gradient) and a max-pool's backward read them without a
/// reorder, and so does train-mode BatchNorm (statistics, normalisation, gradients); the
/// other pools and the rest are plain. its values of the first input's batch are per-sample slots as
/// usual, every other value (of a fixed shape) gets a fixed slot. `parts`: the most threads
/// that may share one of its kernels (each gets its own copy of a fixed scratch region).
pub(super) fn plan(graph: &Graph, blocked: bool, parts: usize) -> Result<Plan> {
    let order = graph.topo_order()?;
    let training = order.iter().any(|id| matches!(graph.node(*id).op, Op::Train(_)));
    // With the micro-kernels, Conv2d and Linear backward run as GEMMs over their tile.
    let gemm = blocked;
    let blocked = blocked && !training;
    let sample_batch = graph.inputs.first().map(|(_, id)| graph.node(*id).ty.batch);
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
    if !training && batches.windows(2).any(|w| w[0] != w[1]) {
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

    let mut b = Builder { slots: vec![], steps: vec![], converted: HashMap::new() };
    let mut value: HashMap<NodeId, usize> = HashMap::new();
    for id in order {
        if !needed.contains_key(&id) {
            continue;
        }
        let node = graph.node(id);
        let numel = node.ty.numel_per_sample();
        match &node.op {
            Op::Input => {
                let i = graph.inputs.iter().position(|(_, n)| *n == id).ok_or_else(|| {
                    Error::Unsupported(format!("input node `{}` is not among the graph's inputs", node.name))
                })?;
                b.slots.push(Slot { kind: SlotKind::Input(i), size: numel, layout: Layout::Plain, batched: true });
                value.insert(id, b.slots.len() - 1);
            }
            Op::Flatten(_) | Op::Dropout(_) | Op::Train(TrainOp::Reshape(_)) => {
                let src = value[&graph.operands(id)[0]];
                // A blocked value stays blocked through Dropout, and through a Flatten of all
                // its dims (a Linear reads it with its weights permuted to match); any other
                // reshape needs the plain layout.
                let keep = match b.slots[src].layout {
                    Layout::Blocked { c, h, w } => node.ty.dims == [c, h, w] || node.ty.dims == [c * h * w],
                    Layout::Plain => true,
                };
                let s = if keep { src } else { b.convert(src, Layout::Plain) };
                value.insert(id, s);
            }
            _ => {
                let operands = graph.operands(id);
                let have: Vec<Layout> = operands.iter().map(|o| b.slots[value[o]].layout).collect();
                let in_tys: Vec<&TensorType> = operands.iter().map(|o| &graph.node(*o).ty).collect();
                // In a training graph only the forward Conv2d runs on the blocked tier (the
                // inference kernels, twice as fast as its GEMM form); the ops around it
                // take its result in whatever layout their kernels read, reordered once.
                // So does a stride-1 Conv2d's input gradient, as the forward convolution it
                // is ([`input_grad_conv`]).
                let flipped = match &node.op {
                    Op::Train(TrainOp::ConvInputGrad(conv, _)) if gemm => input_grad_conv(conv).map(Op::Conv2d),
                    _ => None,
                };
                let op = flipped.as_ref().unwrap_or(&node.op);
                let may_block = match op {
                    Op::Conv2d(conv) if training => gemm && conv_blocked(conv) && !plane_conv(conv),
                    _ => blocked,
                };
                let (out, mut want) = choose(op, &node.ty, &in_tys, &have, may_block);
                // The input gradient's own GEMM form where the blocked conv is not used.
                let op = if out.is_blocked() { op } else { &node.op };
                // A fused residual operand has the result's layout.
                want.resize(have.len(), out);
                let inputs: Vec<usize> = operands.iter().zip(want).map(|(o, l)| b.convert(value[o], l)).collect();
                let (kind, size) = match sample_batch {
                    Some(sb) if training && node.ty.batch != sb => {
                        (UNPLACED_FIXED, node.ty.concrete(1).iter().product())
                    }
                    _ => (UNPLACED, out.size(numel)),
                };
                b.slots.push(Slot { kind, size, layout: out, batched: kind != UNPLACED_FIXED });
                let output = b.slots.len() - 1;
                value.insert(id, output);
                let in_layout = b.slots[inputs[0]].layout;
                let mut fixed_scratch = false;
                let staged = match op {
                    Op::Conv2d(conv) if blocked && in_layout == Layout::Plain && plane_conv(conv) => {
                        Some(plane_staged_input(conv, in_tys[0]))
                    }
                    Op::Conv2d(conv) if out.is_blocked() => staged_input(conv, in_tys[0], in_layout),
                    // A training graph's plane convolution (few channels from a plain
                    // operand) runs on the plane tiles as at inference.
                    Op::Conv2d(conv) if gemm && training && in_layout == Layout::Plain && plane_conv(conv) => {
                        Some(plane_staged_input(conv, in_tys[0]))
                    }
                    Op::Conv2d(conv) if gemm && training => {
                        let (Some(i), Some(r)) = (in_tys[0].chw(), node.ty.chw()) else {
                            return Err(Error::Unsupported(format!("`{}`: a Conv2d needs NCHW", node.name)));
                        };
                        fixed_scratch = true;
                        Some(GradScratch::conv_forward(conv, i, r).total)
                    }
                    Op::Train(t) if gemm => match GradScratch::of(t, &in_tys, &node.ty) {
                        Some(g) => {
                            fixed_scratch = true;
                            Some(g.total)
                        }
                        None => train_scratch(t, &in_tys, &node.ty),
                    },
                    Op::Train(t) => train_scratch(t, &in_tys, &node.ty),
                    _ => None,
                };
                let kind = if fixed_scratch { UNPLACED_FIXED } else { UNPLACED };
                let scratch = staged.map(|size| {
                    // A fixed scratch region: one copy per thread (sample-wise and
                    // column-split kernels use copy `part`).
                    let size = if fixed_scratch { size * parts.max(1) } else { size };
                    b.slots.push(Slot { kind, size, layout: Layout::Plain, batched: !fixed_scratch });
                    b.slots.len() - 1
                });
                b.steps.push(Step::Node { id, inputs, output, scratch });
            }
        }
    }
    for (j, (_, id)) in graph.outputs.iter().enumerate() {
        let s = value[id];
        let numel = match b.slots[s].kind {
            SlotKind::Fixed(_) => b.slots[s].size,
            _ => graph.node(*id).ty.numel_per_sample(),
        };
        let batched = b.slots[s].batched;
        let out = Slot { kind: SlotKind::Output(j), size: numel, layout: Layout::Plain, batched };
        if b.slots[s].layout.is_blocked() {
            b.slots.push(out);
            b.steps.push(Step::Reorder { from: s, to: b.slots.len() - 1 });
        } else if b.slots[s].kind == UNPLACED || b.slots[s].kind == UNPLACED_FIXED {
            b.slots[s].kind = SlotKind::Output(j);
        } else {
            b.slots.push(out);
            b.steps.push(Step::Copy { from: s, to: b.slots.len() - 1 });
        }
    }
    let Builder { mut slots, steps, .. } = b;
    let unplaced = UNPLACED;
    // Fixed scratch regions live during their own step only: they share the fixed part of
    // the arena by live range, after the fixed values.
    let fixed_scratch: std::collections::HashSet<usize> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Node { scratch: Some(t), .. } if slots[*t].kind == UNPLACED_FIXED => Some(*t),
            _ => None,
        })
        .collect();
    // Fixed values: one after the other, for the whole run (they are small: gradients of
    // parameters and per-channel statistics).
    let mut fixed = 0;
    for (_, s) in slots.iter_mut().enumerate().filter(|(i, s)| s.kind == UNPLACED_FIXED && !fixed_scratch.contains(i)) {
        s.kind = SlotKind::Fixed(fixed);
        fixed += align(s.size.max(1));
    }

    // Live ranges of arena slots: [producing step, last reading step].
    let mut live: HashMap<usize, (usize, usize)> = HashMap::new();
    for (i, step) in steps.iter().enumerate() {
        if let Step::Node { scratch: Some(t), .. } = step {
            live.insert(*t, (i, i));
        }
        let (reads, writes): (Vec<usize>, usize) = match step {
            Step::Node { inputs, output, .. } => (inputs.clone(), *output),
            Step::Copy { from, to } | Step::Reorder { from, to } => (vec![*from], *to),
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
    // Per-sample slots in the arena, fixed scratch in the fixed part: each at the lowest
    // offset free over its live range.
    let mut placed: [Vec<(usize, usize, usize)>; 2] = [vec![], vec![]]; // (slot, offset, aligned size)
    let mut ends = [0, 0];
    for s in order {
        let pool = usize::from(fixed_scratch.contains(&s));
        let (a, b) = live[&s];
        let len = align(slots[s].size.max(1));
        let mut busy: Vec<(usize, usize)> = placed[pool]
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
        slots[s].kind = if pool == 1 { SlotKind::Fixed(fixed + offset) } else { SlotKind::Arena(offset) };
        ends[pool] = ends[pool].max(offset + len);
        placed[pool].push((s, offset, len));
    }
    let [arena, scratch] = ends;
    Ok(Plan { slots, steps, arena, fixed: fixed + scratch, whole_batch: training })
}

/// Samples per block of a GEMM weight gradient whose reduction has `pixels` terms per
/// sample: blocks of at least 256 reduction steps, so each tile call does enough work to
/// pay for loading and storing its partial sums.
pub(super) fn grad_block(pixels: usize) -> usize {
    256usize.div_ceil(pixels.max(1))
}

/// A Conv2d weight gradient of at most this many taps per output channel (one or two
/// column tiles of the GEMM: a stem's 7×7 of one channel, 5×5 of three) shares its work
/// between threads by ranges of sample blocks, each thread summing into a partial of its
/// own (`blocked::gemm_grad::conv_weight_grad`), not by column tiles.
pub(super) const WGRAD_KSPLIT_MAX_KC: usize = 128;

/// Samples per block of a Conv2d's GEMM weight gradient with `pixels` output pixels per
/// sample and an `o × kc` gradient: as [`grad_block`], but on maps of 5–64 pixels with a
/// gradient larger than the L2 cache (ResNet's last stage, 3×3 or 7×7 maps, 9.4 MB) blocks
/// of ≥ 1024 steps, so a batch of up to 1024/pixels samples reduces in one pass over the
/// gradient instead of two or more (the seed ResNet's layer4 weight gradients at batch 32
/// on 3×3 maps, in blocks of 29 and 3 samples before: ~17% faster; at batch 8 on 7×7 maps,
/// blocks of 6 and 2: ~10%).
pub(super) fn conv_grad_block(pixels: usize, o: usize, kc: usize) -> usize {
    if (5..=64).contains(&pixels) && 4 * o * kc > 2 << 20 { 1024usize.div_ceil(pixels) } else { grad_block(pixels) }
}

/// Samples per block of a GEMM whose rows are output pixels (a training graph's forward
/// Conv2d, a transposed input gradient) and whose other operand is the weights `[·, kc]`:
/// the rows of several samples share one pass over the weights, which on small maps are
/// larger than the cache (ResNet's last stage: 9.4 MB) and would otherwise be read from
/// memory once per sample. At least 256 rows, while a block's `kc`-wide rows take at most
/// 2 MiB.
pub(super) fn row_block(p: usize, kc: usize) -> usize {
    let by_rows = 256usize.div_ceil(p.max(1));
    let by_bytes = ((2 << 20) / (4 * p.max(1) * kc.max(1))).max(1);
    by_rows.min(by_bytes).max(1)
}

/// A stride-1 Conv2d's input gradient as a forward convolution of the output gradient:
/// `dx = conv(dy, W')` with `W'[ci][co] = W[co][ci]` flipped in both spatial axes and
/// padding `k − 1 − p`, so it runs on the blocked tier's kernels (`None` where that form
/// does not hold — strides, dilation, groups, asymmetric or non-zero padding, a padding
/// wider than `k − 1` — or does not pay: fewer than 16 input channels, the gradient's
/// channels, would fill part of one block).
pub(super) fn input_grad_conv(conv: &Conv2d) -> Option<Conv2d> {
    let (pt, pb, pl, pr) = conv.pads();
    let (kh, kw) = conv.kernel;
    let ok = conv.stride == (1, 1)
        && conv.in_channels >= BLOCK
        && conv.dilation == (1, 1)
        && conv.groups == 1
        && conv.padding_mode == cnnc_compiler::ops::PaddingMode::Zeros
        && pt == pb
        && pl == pr
        && pt < kh
        && pl < kw
        && conv.epilogue == Default::default();
    ok.then(|| Conv2d {
        in_channels: conv.out_channels,
        out_channels: conv.in_channels,
        padding: cnnc_compiler::ops::PaddingSpec::Explicit(kh - 1 - pt, kw - 1 - pl),
        bias: false,
        ..conv.clone()
    })
}

/// Output rows per chunk of a Conv2d's input gradient as `cols = Wᵀ·dy` (an `oh × ow` map,
/// `kc` taps): at least 256 pixels, while the chunk's columns (`kc` rows of them) take at
/// most 1 MiB, so they are still in cache when col2im reads them.
pub(super) fn input_grad_rows(oh: usize, ow: usize, kc: usize) -> usize {
    let by_pixels = 256usize.div_ceil(ow.max(1));
    let by_bytes = (1 << 20) / (4 * ow.max(1) * kc.max(1));
    by_pixels.min(by_bytes).clamp(1, oh.max(1))
}

/// Whether a Conv2d's input gradient on `p` output pixels runs as the transposed GEMM
/// `colsᵀ = dyᵀ·W` (pixels as the tile's rows, the `C·kh·kw` taps as its columns) rather
/// than `cols = Wᵀ·dy` (pixels as columns): on small maps, where fewer than 64 pixels fill
/// less than one 64-column tile (ResNet's last stages at small inputs). Ungrouped convs
/// only.
pub(super) fn input_grad_transposed(p: usize, groups: usize) -> bool {
    p < 64 && groups <= 1
}

/// The fixed scratch of a Conv2d or Linear backward run as a GEMM over the micro-kernel
/// tile (`blocked/gemm_grad.rs`), as offsets in floats, each 16-float aligned. One region
/// for the whole run (not per sample): the kernels work on one sample, or one block of
/// [`grad_block`] samples, at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct GradScratch {
    /// Samples per block (weight gradients; 1 for the input gradient).
    pub block: usize,
    /// Where the padded input (weight gradient: the block's samples) or the padded
    /// input's gradient (input gradient) starts; unused without padding.
    pub pad: usize,
    /// The packed `A` operand (weight gradients: the output gradient, a row per channel;
    /// a transposed input gradient: the output gradient transposed, a row per pixel).
    pub a: usize,
    /// The packed `B` operand.
    pub b: usize,
    /// The input gradient's columns (`[C/groups·kh·kw, oh·ow]`, or transposed) before they
    /// are scattered; for a weight gradient of few taps ([`WGRAD_KSPLIT_MAX_KC`]), the
    /// parts' record (an i64 in 16 floats' room) and this part's partial gradient.
    pub col: usize,
    /// Floats in all.
    pub total: usize,
}

impl GradScratch {
    /// The layout for a training graph's forward Conv2d as a GEMM (a block of [`row_block`]
    /// samples at a time): the block's padded inputs at `pad`, its im2col (`[block·oh·ow,
    /// C/groups·kh·kw]`) at `a`, the transposed result of one group (`[block·oh·ow,
    /// O/groups]`) at `col`.
    pub fn conv_forward(
        conv: &Conv2d,
        (cin, h, w): (usize, usize, usize),
        (o, oh, ow): (usize, usize, usize),
    ) -> GradScratch {
        let g = conv.groups.max(1);
        let (pt, pb, pl, pr) = conv.pads();
        let p = oh * ow;
        let kc = cin / g * conv.kernel.0 * conv.kernel.1;
        let block = row_block(p, kc);
        let pad = if conv.pads() == (0, 0, 0, 0) { 0 } else { block * cin * (h + pt + pb) * (w + pl + pr) };
        let (a0, b0) = (align(pad), align(pad) + align(block * p * kc));
        GradScratch { block, pad: 0, a: a0, b: b0, col: b0, total: b0 + align(block * p * (o / g)) }
    }

    /// The layout for a training op that has a GEMM form, else `None`.
    pub fn of(op: &TrainOp, in_tys: &[&TensorType], ty: &TensorType) -> Option<GradScratch> {
        // Packed `B` of `n` columns by `k` steps: whole vectors of at most 16 floats.
        let packed = |n: usize, k: usize| n.next_multiple_of(16) * k;
        let lay = |block, pad: usize, a: usize, b: usize, col: usize| {
            let (p0, a0) = (0, align(pad));
            let b0 = a0 + align(a);
            let c0 = b0 + align(b);
            GradScratch { block, pad: p0, a: a0, b: b0, col: c0, total: c0 + align(col) }
        };
        match op {
            TrainOp::ConvWeightGrad(conv) => {
                let (cin, h, w) = in_tys[0].chw()?;
                let (o, oh, ow) = in_tys[1].chw()?;
                let g = conv.groups.max(1);
                let (pt, pb, pl, pr) = conv.pads();
                let p = oh * ow;
                let kc = cin / g * conv.kernel.0 * conv.kernel.1;
                let block = conv_grad_block(p, o / g, kc);
                // The padded input (or, unpadded, a blocked input unblocked).
                let pad = block * cin * (h + pt + pb) * (w + pl + pr);
                // `B` holds one column tile (of at most 64 taps) at a time; with few taps, a
                // record of the parts (16 floats' room) and this part's partial gradient.
                let partial = if kc <= WGRAD_KSPLIT_MAX_KC { 16 + o * kc } else { 0 };
                let mut s = lay(block, pad, o * block * p, packed(kc.min(64), block * p), partial);
                // Room for the shifted-row and Winograd forms too, where they may be chosen.
                if let Some(r) = wgrad_rows(conv, (cin, h, w), (o, oh, ow)) {
                    s.total = s.total.max(r.total);
                }
                if wgrad_winograd_fits(conv) {
                    let w = crate::jit::microkernel::WgradScratch::new(conv.kernel.0, cin, (h, w), (oh, ow));
                    s.total = s.total.max(w.total.next_multiple_of(ALIGN));
                }
                Some(s)
            }
            TrainOp::ConvInputGrad(conv, _) => {
                let (cin, h, w) = ty.chw()?;
                let (o, oh, ow) = in_tys[0].chw()?;
                let g = conv.groups.max(1);
                let (pt, pb, pl, pr) = conv.pads();
                let p = oh * ow;
                let pad = if conv.pads() == (0, 0, 0, 0) { 0 } else { cin * (h + pt + pb) * (w + pl + pr) };
                let kc = cin / g * conv.kernel.0 * conv.kernel.1;
                if input_grad_transposed(p, g) {
                    let block = row_block(p, kc);
                    Some(lay(block, pad, block * p * (o / g), 0, block * kc * p))
                } else {
                    let n = input_grad_rows(oh, ow, kc) * ow;
                    Some(lay(1, pad, 0, packed(n, o / g), kc * n))
                }
            }
            TrainOp::LinearWeightGrad(l) => {
                let rows = in_tys[0].numel_per_sample() / l.in_features.max(1);
                let block = grad_block(rows);
                let k = block * rows;
                Some(lay(block, 0, l.out_features * k, packed(l.in_features, k), 0))
            }
            _ => None,
        }
    }
}

/// Whether a Conv2d's weight gradient can run as Winograd (`blocked::winograd::weight_grad`):
/// stride 1, dilation 1, one group, a 3×3 or 5×5 kernel, zero padding.
pub(super) fn wgrad_winograd_fits(conv: &Conv2d) -> bool {
    conv.stride == (1, 1)
        && conv.dilation == (1, 1)
        && conv.groups == 1
        && (conv.kernel == (3, 3) || conv.kernel == (5, 5))
        && conv.padding_mode == PaddingMode::Zeros
}

/// Where a Conv2d's weight gradient takes the shifted-row form
/// (`blocked::gemm_grad::conv_weight_grad_rows`) and that form's scratch layout (floats
/// from a part's scratch): the padded input of one sample at `pad` (with room past it for
/// the last row's shifted reads), the sample's output gradient packed as `B` at `b`, the
/// transposed gradient `[C·kh·kw, O]` at `c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct WgradRows {
    pub pad: usize,
    pub b: usize,
    pub c: usize,
    pub total: usize,
}

/// The shifted-row weight gradient's layout where it applies and pays: stride 1, no
/// dilation or groups, kernels 3 to 6 wide (a row of taps is at most `gemm_mr` rows, so
/// at least one channel's fits a tile), at least 16 output channels (a tile row of whole vectors), a padded
/// width at most 4/3 of the output's (the padded columns are computed and dropped) and a
/// transposed gradient of at most 512 KB (it stays in L2 across the samples) — the
/// CIFAR-10 net's 5×5 convolutions; `None` elsewhere.
pub(super) fn wgrad_rows(
    conv: &Conv2d,
    (cin, h, w): (usize, usize, usize),
    (o, oh, ow): (usize, usize, usize),
) -> Option<WgradRows> {
    let (kh, kw) = conv.kernel;
    let (pt, pb, pl, pr) = conv.pads();
    let (ph, pw) = (h + pt + pb, w + pl + pr);
    let kc = cin * kh * kw;
    let fits = conv.stride == (1, 1)
        && conv.dilation == (1, 1)
        && conv.groups == 1
        && (3..=6).contains(&kw)
        && o >= 16
        && 3 * pw <= 4 * ow
        && 4 * kc * o <= 512 << 10;
    if !fits {
        return None;
    }
    let b = align(cin * ph * pw + 16);
    let c = b + align(o.next_multiple_of(64) * oh * pw);
    Some(WgradRows { pad: 0, b, c, total: c + align(kc * o) })
}

/// Floats per sample of the scratch a training kernel uses during its step, if any: a
/// convolution's input gradient accumulates the padded input's gradient in f64 (two floats
/// each) before folding it into the input; its weight gradient reads a padded copy of the
/// input.
fn train_scratch(op: &TrainOp, in_tys: &[&TensorType], ty: &TensorType) -> Option<usize> {
    let padded = |conv: &Conv2d, (c, h, w): (usize, usize, usize)| {
        let (pt, pb, pl, pr) = conv.pads();
        c * (h + pt + pb) * (w + pl + pr)
    };
    match op {
        TrainOp::ConvInputGrad(conv, _) => Some(2 * padded(conv, ty.chw()?)),
        TrainOp::ConvWeightGrad(conv) => Some(padded(conv, in_tys[0].chw()?)),
        // One input plane's gradient in f64.
        // The f64 plane of the general form, or the padded input and gradient planes of
        // the vectorised one (`tables::max_pool_plane`).
        TrainOp::MaxPoolGrad(p) => {
            let (_, h, w) = ty.chw()?;
            let (_, oh, ow) = in_tys[1].chw()?;
            let padded = super::tables::max_pool_plane(p.kernel, p.stride, p.dilation, p.padding, (h, w), (oh, ow));
            Some(padded.map_or(0, |(r, c)| 2 * r * c).max(2 * h * w))
        }
        TrainOp::AvgPoolGrad(..) | TrainOp::AdaptiveAvgPoolGrad(..) => ty.chw().map(|(_, h, w)| 2 * h * w),
        TrainOp::ReduceGrad(r) => (r.kind == cnnc_compiler::ops::ReduceKind::Max).then(|| {
            let kept: usize = in_tys[0]
                .dims
                .iter()
                .enumerate()
                .map(|(i, s)| if r.dims.contains(&(i + 1)) { 1 } else { *s })
                .product();
            2 * kept
        }),
        _ => None,
    }
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
        let p = plan(&chain(5), false, 1).unwrap();
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
        let p = plan(&b.finish(), false, 1).unwrap();
        assert_eq!(p.slots[1].kind, SlotKind::Output(0));
        assert_eq!(p.steps[1], Step::Copy { from: 1, to: 2 });
        assert_eq!(p.steps[2], Step::Copy { from: 0, to: 3 });
        assert_eq!(p.arena, 0);
    }
}
