//! Per-layer accounting: output shape, parameters, MACs and activation memory for every
//! node, with totals, printed as a torchinfo-style table (`Display`).

use crate::graph::{Graph, ParamId};
use crate::ops::{Op, ParamKind};
use std::collections::HashSet;
use std::fmt;

/// One row of the summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRow {
    /// Module path (`layer1.0.conv1`).
    pub name: String,
    /// PyTorch class name.
    pub kind: String,
    /// Output shape, e.g. `[N, 64, 56, 56]`.
    pub output: String,
    /// Output dims including the batch (symbolic batch shown as 1).
    pub output_dims: Vec<usize>,
    /// Learnable parameters first seen at this node (shared weights count once).
    pub params: usize,
    /// Buffer elements first seen at this node.
    pub buffers: usize,
    /// MACs per sample.
    pub macs: u64,
    /// Output bytes per sample (f32).
    pub activation_bytes: usize,
}

/// The whole table with totals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Net name.
    pub name: String,
    /// Inputs as `name: type`.
    pub inputs: Vec<String>,
    /// One row per op, in execution order.
    pub rows: Vec<LayerRow>,
    /// Learnable parameters (as `sum(p.numel())`; includes declared but unused modules).
    pub total_params: usize,
    /// Buffer elements.
    pub total_buffers: usize,
    /// MACs per sample.
    pub total_macs: u64,
    /// Sum of all op outputs per sample, bytes.
    pub activation_bytes: usize,
    /// Input bytes per sample.
    pub input_bytes: usize,
}

impl Summary {
    /// Accounts for every node of `graph`.
    pub fn of(graph: &Graph) -> Summary {
        let order = graph.topo_order().unwrap_or_else(|_| graph.node_ids());
        let mut seen: HashSet<ParamId> = HashSet::new();
        let mut rows = vec![];
        let mut input_bytes = 0;
        for id in order {
            let n = graph.node(id);
            if matches!(n.op, Op::Input) {
                input_bytes += n.ty.numel_per_sample() * 4;
                continue;
            }
            let (mut params, mut buffers) = (0, 0);
            for p in &n.params {
                if seen.insert(*p) {
                    let spec = &graph.param(*p).spec;
                    let count: usize = spec.shape.iter().product();
                    if spec.kind == ParamKind::Buffer {
                        buffers += count;
                    } else {
                        params += count;
                    }
                }
            }
            let inputs: Vec<_> = graph.operands(id).iter().map(|o| graph.node(*o).ty.clone()).collect();
            let input_refs: Vec<_> = inputs.iter().collect();
            rows.push(LayerRow {
                name: n.name.clone(),
                kind: n.op.kind().to_string(),
                output: n.ty.to_string(),
                output_dims: n.ty.concrete(1),
                params,
                buffers,
                macs: n.op.def().macs(&input_refs, &n.ty),
                activation_bytes: n.ty.numel_per_sample() * 4,
            });
        }
        Summary {
            name: graph.name.clone(),
            inputs: graph.inputs.iter().map(|(n, id)| format!("{n}: {}", graph.node(*id).ty)).collect(),
            total_params: graph.param_count(),
            total_buffers: graph.buffer_count(),
            // One layer's MACs fit in u64 (see `shape::MAX_SIZE`); a sum of many may not.
            total_macs: rows.iter().fold(0u64, |t, r| t.saturating_add(r.macs)),
            activation_bytes: rows.iter().map(|r| r.activation_bytes).sum(),
            input_bytes,
            rows,
        }
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(bytes: usize) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name_w = self.rows.iter().map(|r| r.name.chars().count() + r.kind.len() + 3).max().unwrap_or(10).max(24);
        let shape_w = self.rows.iter().map(|r| r.output.len()).max().unwrap_or(12).max(16);
        let width = name_w + shape_w + 14 + 16 + 12 + 8;
        let rule = "=".repeat(width);
        writeln!(f, "{rule}")?;
        writeln!(
            f,
            "{:<name_w$}  {:<shape_w$}  {:>14}  {:>16}  {:>12}",
            "Layer (type)", "Output Shape", "Param #", "MACs", "Act. memory"
        )?;
        writeln!(f, "{rule}")?;
        for r in &self.rows {
            let label = format!("{} ({})", r.name, r.kind);
            let params = if r.params > 0 { thousands(r.params as u64) } else { "--".into() };
            let macs = if r.macs > 0 { thousands(r.macs) } else { "--".into() };
            writeln!(
                f,
                "{label:<name_w$}  {:<shape_w$}  {params:>14}  {macs:>16}  {:>12}",
                r.output,
                mib(r.activation_bytes)
            )?;
        }
        writeln!(f, "{rule}")?;
        writeln!(f, "Net: {}({})", self.name, self.inputs.join(", "))?;
        writeln!(f, "Total params: {}", thousands(self.total_params as u64))?;
        writeln!(f, "Trainable params: {}", thousands(self.total_params as u64))?;
        writeln!(f, "Buffers (BatchNorm statistics, not params): {}", thousands(self.total_buffers as u64))?;
        writeln!(f, "MACs per sample: {} ({:.3} G)", thousands(self.total_macs), self.total_macs as f64 / 1e9)?;
        writeln!(f, "{rule}")?;
        writeln!(f, "Input size per sample: {}", mib(self.input_bytes))?;
        writeln!(f, "Activations per sample (sum of layer outputs): {}", mib(self.activation_bytes))?;
        writeln!(f, "Params size: {}", mib((self.total_params + self.total_buffers) * 4))?;
        writeln!(f, "{rule}")
    }
}
