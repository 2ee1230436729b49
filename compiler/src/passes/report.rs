//! The fusion report: which nodes fused into which kernel, which candidates did not and why,
//! kernel counts and memory traffic before and after, and both graphs as Graphviz DOT.
//!
//! Everything is plain public fields for programs; [`Display`](std::fmt::Display) prints a
//! summary for people (the DOT text only with `{:#}`). Building a report walks each graph
//! once and the pass logs once — no tensor is touched.
//!
//! # Cost model
//!
//! A *kernel* is a node that is neither an input nor a view (Flatten, Dropout: the JIT
//! aliases them). Per sample, a kernel reads each operand once and writes its output once
//! (f32); it also reads its f32 parameters once per run, reported separately
//! ([`Cost::weight_read`]) and added in [`Cost::total_at_batch`]. This is the traffic of
//! materialising every intermediate, which is what fusion saves: a BatchNorm or ReLU after a
//! conv costs a full read and write of the conv's output.

use super::cleanup::is_view;
use super::{Absorbed, PassLog};
use crate::graph::{Graph, NodeId};
use crate::ops::{DType, Op};
use crate::summary::thousands;
use std::collections::HashMap;
use std::fmt;

/// Kernel count and memory traffic of a graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Nodes that run a kernel (not inputs, not views).
    pub kernels: usize,
    /// Activation bytes read per sample (every operand of every kernel).
    pub activation_read: u64,
    /// Activation bytes written per sample (every kernel's output).
    pub activation_written: u64,
    /// Parameter bytes read per run (each kernel's f32 parameters).
    pub weight_read: u64,
}

impl Cost {
    /// The cost of every live node of `graph`.
    pub fn of(graph: &Graph) -> Cost {
        let mut c = Cost::default();
        for id in graph.node_ids() {
            let n = graph.node(id);
            if matches!(n.op, Op::Input) || is_view(&n.op) {
                continue;
            }
            c.kernels += 1;
            c.activation_written += 4 * n.ty.numel_per_sample() as u64;
            c.activation_read +=
                graph.operands(id).iter().map(|o| 4 * graph.node(*o).ty.numel_per_sample() as u64).sum::<u64>();
            c.weight_read += n
                .params
                .iter()
                .map(|p| &graph.param(*p).spec)
                .filter(|s| s.dtype == DType::F32)
                .map(|s| 4 * s.shape.iter().product::<usize>() as u64)
                .sum::<u64>();
        }
        c
    }

    /// Activation bytes read and written per sample.
    pub fn activation_traffic(&self) -> u64 {
        self.activation_read + self.activation_written
    }

    /// All bytes moved by a run of `batch` samples.
    pub fn total_at_batch(&self, batch: u64) -> u64 {
        self.activation_traffic() * batch + self.weight_read
    }
}

/// A kernel of the optimised graph that absorbed other nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FusedKernel {
    /// The kernel's node in the optimised graph.
    pub node: NodeId,
    /// Its name (`layer1.0.conv2`).
    pub name: String,
    /// Its op as printed in the IR (`Conv2d(64, 64, …) ⇒ +residual ⇒ relu`).
    pub op: String,
    /// What it absorbed, in the order the passes absorbed it.
    pub absorbed: Vec<Absorbed>,
    /// Remarks of the passes (a bias gained, a scale/shift composed).
    pub notes: Vec<String>,
}

/// A fusion candidate left as its own kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotFused {
    /// The node (in both graphs: passes never renumber nodes).
    pub node: NodeId,
    /// Its name.
    pub name: String,
    /// Its op kind.
    pub kind: &'static str,
    /// The passes that declined it.
    pub passes: Vec<&'static str>,
    /// Why, one sentence per distinct reason, joined by `; `.
    pub reason: String,
}

/// What one pass did, in numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassSummary {
    /// The pass.
    pub name: &'static str,
    /// Rewrites applied.
    pub rewrites: usize,
    /// Candidates declined.
    pub declined: usize,
}

/// The fusion report of one net.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FusionReport {
    /// Net name.
    pub net: String,
    /// Kernels that absorbed other nodes, in execution order.
    pub kernels: Vec<FusedKernel>,
    /// Candidates that were not fused, in execution order.
    pub not_fused: Vec<NotFused>,
    /// Nodes removed outright (identity at inference, unused).
    pub removed: Vec<Absorbed>,
    /// Graph-wide remarks (parameters dropped).
    pub notes: Vec<String>,
    /// One entry per pass run, in order.
    pub passes: Vec<PassSummary>,
    /// Cost of the graph before the passes.
    pub before: Cost,
    /// Cost after.
    pub after: Cost,
    /// The graph before, as Graphviz DOT.
    pub dot_before: String,
    /// The graph after, as Graphviz DOT.
    pub dot_after: String,
}

impl FusionReport {
    /// Builds the report of the passes whose logs are `logs`, which turned `before` into
    /// `after`.
    pub fn new(before: &Graph, after: &Graph, logs: &[PassLog]) -> FusionReport {
        let mut absorbed: HashMap<NodeId, (Vec<Absorbed>, Vec<String>)> = HashMap::new();
        let mut removed = vec![];
        let mut notes = vec![];
        for log in logs {
            for (_, rw) in &log.rewrites {
                let Some(k) = rw.kernel else {
                    removed.extend(rw.absorbed.iter().cloned());
                    notes.extend(rw.note.iter().cloned());
                    continue;
                };
                // A kernel absorbed into another hands over what it had absorbed.
                let mut inherited = (vec![], vec![]);
                for a in &rw.absorbed {
                    if let Some((x, n)) = absorbed.remove(&a.node) {
                        inherited.0.extend(x);
                        inherited.1.extend(n);
                    }
                }
                let entry = absorbed.entry(k).or_default();
                entry.0.extend(inherited.0);
                entry.1.extend(inherited.1);
                entry.0.extend(rw.absorbed.iter().cloned());
                entry.1.extend(rw.note.iter().cloned());
            }
        }
        let order = after.topo_order().unwrap_or_else(|_| after.node_ids());
        let position: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut kernels: Vec<FusedKernel> = absorbed
            .into_iter()
            .filter(|(k, _)| after.contains(*k))
            .map(|(k, (absorbed, notes))| {
                let n = after.node(k);
                FusedKernel { node: k, name: n.name.clone(), op: n.op.def().describe(), absorbed, notes }
            })
            .collect();
        kernels.sort_by_key(|k| position.get(&k.node).copied().unwrap_or(usize::MAX));

        let mut not_fused: Vec<NotFused> = vec![];
        for log in logs {
            for d in &log.declined {
                let Some(node) = d.node.filter(|n| after.contains(*n)) else {
                    continue;
                };
                match not_fused.iter_mut().find(|n| n.node == node) {
                    Some(n) => {
                        if !n.passes.contains(&log.pass) {
                            n.passes.push(log.pass);
                        }
                        if !n.reason.split("; ").any(|r| r == d.reason) {
                            n.reason = format!("{}; {}", n.reason, d.reason);
                        }
                    }
                    None => not_fused.push(NotFused {
                        node,
                        name: d.name.clone(),
                        kind: d.kind,
                        passes: vec![log.pass],
                        reason: d.reason.clone(),
                    }),
                }
            }
        }
        not_fused.sort_by_key(|n| position.get(&n.node).copied().unwrap_or(usize::MAX));

        FusionReport {
            net: after.name.clone(),
            kernels,
            not_fused,
            removed,
            notes,
            passes: logs
                .iter()
                .map(|l| PassSummary { name: l.pass, rewrites: l.rewrites.len(), declined: l.declined.len() })
                .collect(),
            before: Cost::of(before),
            after: Cost::of(after),
            dot_before: before.to_dot(),
            dot_after: after.to_dot(),
        }
    }

    /// Number of nodes absorbed into kernels.
    pub fn fused_nodes(&self) -> usize {
        self.kernels.iter().map(|k| k.absorbed.len()).sum()
    }
}

fn mb(bytes: u64) -> String {
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.2} kB", bytes as f64 / 1e3),
        _ => format!("{:.2} MB", bytes as f64 / 1e6),
    }
}

fn change(before: u64, after: u64) -> String {
    if before == 0 {
        return String::new();
    }
    format!(" ({:+.1}%)", (after as f64 - before as f64) / before as f64 * 100.0)
}

impl fmt::Display for FusionReport {
    /// The summary; `{:#}` appends both graphs as DOT.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (b, a) = (&self.before, &self.after);
        writeln!(f, "Fusion report: {}", self.net)?;
        writeln!(f, "  kernels             {} → {}", b.kernels, a.kernels)?;
        writeln!(
            f,
            "  activation traffic  {} → {} per sample (read + written){}",
            mb(b.activation_traffic()),
            mb(a.activation_traffic()),
            change(b.activation_traffic(), a.activation_traffic())
        )?;
        writeln!(
            f,
            "  weight reads        {} → {} per run ({} → {} bytes)",
            mb(b.weight_read),
            mb(a.weight_read),
            thousands(b.weight_read),
            thousands(a.weight_read)
        )?;
        writeln!(f, "Fused kernels ({}):", self.kernels.len())?;
        for k in &self.kernels {
            writeln!(f, "  {}: {}", k.name, k.op)?;
            let parts: Vec<String> = k.absorbed.iter().map(|x| format!("{} ({}, {})", x.name, x.kind, x.how)).collect();
            writeln!(f, "      ⇐ {}", parts.join(", "))?;
            for n in &k.notes {
                writeln!(f, "      note: {n}")?;
            }
        }
        writeln!(f, "Not fused ({}):", self.not_fused.len())?;
        for n in &self.not_fused {
            writeln!(f, "  {} ({}): {} [{}]", n.name, n.kind, n.reason, n.passes.join(", "))?;
        }
        if !self.removed.is_empty() {
            writeln!(f, "Removed ({}):", self.removed.len())?;
            for r in &self.removed {
                writeln!(f, "  {} ({}): {}", r.name, r.kind, r.how)?;
            }
        }
        for n in &self.notes {
            writeln!(f, "Note: {n}")?;
        }
        writeln!(f, "Passes:")?;
        for p in &self.passes {
            writeln!(f, "  {:<24} {:>3} rewrites, {:>3} declined", p.name, p.rewrites, p.declined)?;
        }
        if f.alternate() {
            writeln!(f, "Before:\n{}", self.dot_before)?;
            writeln!(f, "After:\n{}", self.dot_after)?;
        }
        Ok(())
    }
}
