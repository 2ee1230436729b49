//! `cnnc fuse-report` and the fused graph behind `dot --fused`, `run --fused` and
//! `bench --fused`: the compiler's fusion passes run with the net's weights (given, or
//! seeded random ones — the report's structure does not depend on the values).

use crate::fail::{Fail, input};
use crate::source::{self, NetFile};
use clap::Args;
use cnnc::compiler::graph::Graph;
use cnnc::runtime::fusion_check::{self, NumericCheck, Optimized};
use cnnc::runtime::weights::Weights;
use std::path::PathBuf;

/// Arguments of `cnnc fuse-report`.
#[derive(Args, Debug)]
pub struct FuseArgs {
    #[command(flatten)]
    pub net: NetFile,
    /// Override the declared input shape (as for `cnnc summary`).
    #[arg(long = "input", value_name = "DIMS")]
    pub shapes: Vec<String>,
    /// Weights to fold [default: random, seeded by --seed].
    #[arg(long, value_name = "W.safetensors")]
    pub weights: Option<PathBuf>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run the passes under the numeric check: each pass is compared with the unfused net
    /// on random inputs (reference interpreter), and a fusion that changes the outputs by
    /// more than --tolerance (relative) is refused.
    #[arg(long)]
    pub check: bool,
    /// Tolerance of --check.
    #[arg(long, default_value_t = 1e-5, requires = "check")]
    pub tolerance: f64,
    /// Append both graphs (before and after) as Graphviz DOT.
    #[arg(long)]
    pub dot: bool,
}

/// Runs the fusion pipeline on `graph` with `weights`.
pub fn optimize(graph: &Graph, weights: &Weights) -> Result<Optimized, Fail> {
    fusion_check::optimize(graph, weights).map_err(|e| input(format!("fusion of `{}` failed: {e}", graph.name)))
}

/// As [`optimize`], moving the weights in (the untouched ones are not copied).
pub fn optimize_owned(graph: &Graph, weights: Weights) -> Result<Optimized, Fail> {
    fusion_check::optimize_owned(graph, weights).map_err(|e| input(format!("fusion of `{}` failed: {e}", graph.name)))
}

/// The fused graph with seeded random weights (for `dot --fused`, where values do not show).
pub fn fuse(graph: &Graph) -> Result<Graph, Fail> {
    Ok(optimize(graph, &Weights::random(graph, 0))?.graph)
}

/// Prints the fusion report of the selected net.
pub fn run(args: &FuseArgs) -> Result<(), Fail> {
    let (_, graph) = source::load_net(&args.net, &args.shapes)?;
    let weights = match &args.weights {
        Some(_) => crate::run::weights(&graph, args.weights.as_deref(), args.seed)?,
        None => crate::import::imported_weights(&graph).unwrap_or_else(|| Weights::random(&graph, args.seed)),
    };
    let out = if args.check {
        let check = NumericCheck { tolerance: args.tolerance, seed: args.seed, ..NumericCheck::default() };
        fusion_check::optimize_checked(&graph, &weights, &check)
            .map_err(|e| input(format!("fusion of `{}` failed: {e}", graph.name)))?
    } else {
        optimize(&graph, &weights)?
    };
    if args.dot {
        print!("{:#}", out.report);
    } else {
        print!("{}", out.report);
    }
    if let Some(c) = &out.check {
        print!("{c}");
    }
    Ok(())
}
