//! `cnnc summary`: the per-layer table (name, op, output shape, params, MACs, activation
//! memory) with totals, as text or JSON.

use crate::fail::Fail;
use crate::source::{self, NetFile};
use clap::Args;
use cnnc::Summary;
use cnnc::compiler::graph::Graph;
use serde::Serialize;

/// Arguments of `cnnc summary`.
#[derive(Args, Debug)]
pub struct SummaryArgs {
    #[command(flatten)]
    pub net: NetFile,
    /// Override the declared input shape, e.g. `1,3,224,224` (the first dimension may be `N`).
    /// Repeat for a net with several inputs, or name one: `x=1,3,64,64`.
    #[arg(long = "input", value_name = "DIMS")]
    pub shapes: Vec<String>,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One layer, for `--json`.
#[derive(Serialize)]
struct LayerJson<'a> {
    name: &'a str,
    op: &'a str,
    output_shape: &'a str,
    output_dims: &'a [usize],
    params: usize,
    buffers: usize,
    macs: u64,
    activation_bytes: usize,
}

/// A named tensor type, for `--json`.
#[derive(Serialize)]
struct IoJson {
    name: String,
    shape: String,
    dims: Vec<usize>,
}

/// The whole summary, for `--json`. Per-sample figures, a symbolic batch counted as 1.
#[derive(Serialize)]
struct SummaryJson<'a> {
    net: &'a str,
    inputs: Vec<IoJson>,
    outputs: Vec<IoJson>,
    layers: Vec<LayerJson<'a>>,
    total_params: usize,
    total_buffers: usize,
    total_macs: u64,
    activation_bytes: usize,
    input_bytes: usize,
    params_bytes: usize,
}

fn io(graph: &Graph, list: &[(String, cnnc::compiler::NodeId)]) -> Vec<IoJson> {
    list.iter()
        .map(|(name, id)| {
            let ty = &graph.node(*id).ty;
            IoJson { name: name.clone(), shape: ty.to_string(), dims: ty.concrete(1) }
        })
        .collect()
}

/// Prints the summary of the selected net.
pub fn run(args: &SummaryArgs) -> Result<(), Fail> {
    let (_, graph) = source::load_net(&args.net, &args.shapes)?;
    let s = Summary::of(&graph);
    if !args.json {
        print!("{s}");
        return Ok(());
    }
    let json = SummaryJson {
        net: &s.name,
        inputs: io(&graph, &graph.inputs),
        outputs: io(&graph, &graph.outputs),
        layers: s
            .rows
            .iter()
            .map(|r| LayerJson {
                name: &r.name,
                op: &r.kind,
                output_shape: &r.output,
                output_dims: &r.output_dims,
                params: r.params,
                buffers: r.buffers,
                macs: r.macs,
                activation_bytes: r.activation_bytes,
            })
            .collect(),
        total_params: s.total_params,
        total_buffers: s.total_buffers,
        total_macs: s.total_macs,
        activation_bytes: s.activation_bytes,
        input_bytes: s.input_bytes,
        params_bytes: (s.total_params + s.total_buffers) * 4,
    };
    crate::print_json(&json)
}
