//! `cnnc fuse-report` and `cnnc dot --fused`: the fusion passes' result and report.

use crate::fail::{Fail, input};
use crate::source::{self, NetFile};
use clap::Args;
use cnnc::compiler::graph::Graph;

/// Arguments of `cnnc fuse-report`.
#[derive(Args, Debug)]
pub struct FuseArgs {
    #[command(flatten)]
    pub net: NetFile,
    /// Override the declared input shape (as for `cnnc summary`).
    #[arg(long = "input", value_name = "DIMS")]
    pub shapes: Vec<String>,
}

/// The fused graph and the report's text.
pub fn fuse(_graph: &Graph) -> Result<(Graph, String), Fail> {
    Err(input("the fusion passes are not part of this build yet"))
}

/// Prints the fusion report of the selected net.
pub fn run(args: &FuseArgs) -> Result<(), Fail> {
    let (_, graph) = source::load_net(&args.net, &args.shapes)?;
    let (_, report) = fuse(&graph)?;
    print!("{report}");
    Ok(())
}
