//! `cnnc check`: parse and shape-check files, printing every error and warning rustc-style.

use crate::fail::Fail;
use crate::source::{self, Source};
use clap::Args;
use cnnc::Summary;
use cnnc::compiler::summary::thousands;
use std::path::PathBuf;

/// Arguments of `cnnc check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The `.cnn` files (or `.onnx` models) to check.
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
}

/// `file: ok: Net(x: [N, 1, 28, 28]) -> (output: [N, 10]); 61,706 params, … MACs per sample`.
fn print_ok(shown: &str, g: &cnnc::Graph) {
    let s = Summary::of(g);
    let outs: Vec<String> = g.outputs.iter().map(|(n, id)| format!("{n}: {}", g.node(*id).ty)).collect();
    println!(
        "{shown}: ok: {}({}) -> ({}); {} params, {} MACs per sample",
        g.name,
        s.inputs.join(", "),
        outs.join(", "),
        thousands(s.total_params as u64),
        thousands(s.total_macs)
    );
}

/// Checks every file; all diagnostics of all files are printed before failing.
pub fn run(args: &CheckArgs) -> Result<(), Fail> {
    let (mut errors, mut warnings) = (0, 0);
    let mut unreadable = None;
    for path in &args.files {
        if crate::import::is_onnx(path) {
            match crate::import::import(path, &[], None) {
                Ok(m) => print_ok(&path.display().to_string(), &m.graph),
                Err(e) => {
                    eprintln!("error: {e}");
                    errors += 1;
                }
            }
            continue;
        }
        let src = match Source::read(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                unreadable.get_or_insert(e);
                continue;
            }
        };
        let compiled = source::compile(&src);
        errors += compiled.errors;
        warnings += compiled.warnings;
        if compiled.errors > 0 {
            continue;
        }
        if compiled.nets.is_empty() {
            println!("{}: ok (no nets, only blocks and constants)", src.shown);
        }
        for g in &compiled.nets {
            print_ok(&src.shown, g);
        }
    }
    if errors > 0 {
        return Err(Fail::reported(source::aborting(errors, warnings)));
    }
    if warnings > 0 {
        eprintln!("warning: {}", source::warnings_emitted(warnings));
    }
    match unreadable {
        // Already printed; exit with its status.
        Some(e) => Err(Fail { code: e.code, message: String::new() }),
        None => Ok(()),
    }
}
