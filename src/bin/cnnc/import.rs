//! `.onnx` files: `cnnc import` (a model to `.cnn` text and a safetensors state_dict), and the
//! loading every other command does when given an `.onnx` file instead of a `.cnn` one (the
//! model's weights are then the default weights of `run`, `bench` and `fuse-report`).

use crate::fail::{Fail, input};
use crate::source::{self, Source};
use clap::Args;
use cnnc::compiler::graph::Graph;
use cnnc::compiler::summary::thousands;
use cnnc::runtime::weights::Weights;
use cnnc::{Summary, onnx};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Arguments of `cnnc import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The `.onnx` model (external data is read from its folder).
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// Where to write the `.cnn` text [default: stdout].
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Where to write the weights as a safetensors state_dict (keys as in the `.cnn` text).
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Per-sample input shape for models with symbolic dimensions: `N,3,224,224` or
    /// `input=N,3,224,224` (the batch stays symbolic).
    #[arg(long = "input", value_name = "SHAPE")]
    pub shapes: Vec<String>,
    /// The net's name in the `.cnn` text [default: from the file name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

/// Whether `path` names an ONNX model.
pub fn is_onnx(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// The weights of the last `.onnx` file loaded by this process (the CLI loads one net per run).
static IMPORTED: Mutex<Option<Weights>> = Mutex::new(None);

/// The weights that came with the loaded `.onnx` model, if that is what `graph` is (taken:
/// a command asks once).
pub fn imported_weights(graph: &Graph) -> Option<Weights> {
    let mut slot = IMPORTED.lock().ok()?;
    if slot.as_ref()?.check(graph).is_ok() { slot.take() } else { None }
}

/// Imports a model, printing what the importer folded as notes on stderr.
pub fn import(path: &Path, shapes: &[String], name: Option<&str>) -> Result<onnx::Imported, Fail> {
    let mut opts = onnx::Options { name: name.map(String::from), ..onnx::Options::default() };
    for s in shapes {
        let shape = source::parse_shape(s)?;
        // The first dimension is the batch, which stays symbolic.
        let dims: Vec<usize> = shape.dims[1..].iter().map(|d| d.parse().unwrap_or(0)).collect();
        opts.dims.push((shape.name, dims));
    }
    let imported = onnx::import_file(path, &opts).map_err(|e| input(format!("`{}`: {e}", path.display())))?;
    for n in &imported.notes {
        eprintln!("note: {n}");
    }
    Ok(imported)
}

/// Loads an `.onnx` file as the net of a command: the graph, and its weights kept for
/// [`imported_weights`].
pub fn load(path: &Path, shapes: &[String]) -> Result<(Source, Graph), Fail> {
    let imported = import(path, shapes, None)?;
    let text = imported.source.clone();
    let (graph, w) = onnx::split(imported)?;
    if let Ok(mut slot) = IMPORTED.lock() {
        *slot = Some(w);
    }
    Ok((Source { shown: path.display().to_string(), text }, graph))
}

/// `cnnc import`.
pub fn run(args: &ImportArgs) -> Result<(), Fail> {
    let imported = import(&args.model, &args.shapes, args.name.as_deref())?;
    match &args.output {
        Some(p) => std::fs::write(p, &imported.source)
            .map_err(|e| input(format!("cannot write `{}`: {}", p.display(), source::io_text(&e))))?,
        None => print!("{}", imported.source),
    }
    let (producer, opset) = (imported.producer.clone(), imported.opset);
    let (graph, w) = onnx::split(imported)?;
    if let Some(p) = &args.weights {
        w.save(&graph, p)?;
    }
    let s = Summary::of(&graph);
    eprintln!(
        "imported `{}` ({}opset {}): {} layers, {} params{}{}",
        graph.name,
        if producer.is_empty() { String::new() } else { format!("{producer}, ") },
        opset,
        s.rows.len(),
        thousands(s.total_params as u64),
        args.output.as_ref().map(|p| format!("; net in {}", p.display())).unwrap_or_default(),
        args.weights.as_ref().map(|p| format!("; weights in {}", p.display())).unwrap_or_default(),
    );
    Ok(())
}
