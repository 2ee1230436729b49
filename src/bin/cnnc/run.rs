//! `cnnc run`: JIT-compile a net and run it on `.npy` inputs, printing the outputs (top-k
//! classes for a classifier) or writing them to `.npy` files.

use crate::fail::{Fail, input, usage};
use crate::npy;
use crate::source::{self, NetFile};
use clap::Args;
use cnnc::compiler::graph::Graph;
use cnnc::compiler::shape::Batch;
use cnnc::runtime::weights::Weights;
use cnnc::runtime::{Compiled, Options, interp};
use ndarray::{ArrayD, ArrayViewD, Axis};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Arguments of `cnnc run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub net: NetFile,
    /// Input tensor as `.npy` (float32, or float64 converted), batch first. Repeat for a net
    /// with several inputs, in declaration order.
    #[arg(long = "input", value_name = "X.npy", required_unless_present = "images", conflicts_with = "images")]
    pub inputs: Vec<PathBuf>,
    /// PNG or JPEG pictures, one sample each: resized (bilinear) to the net's input size,
    /// scaled to [0, 1] and normalised by --mean/--std, as torchvision's ToTensor, Resize,
    /// Normalize.
    #[arg(long = "image", value_name = "IMG")]
    pub images: Vec<PathBuf>,
    /// Per-channel mean for --image [default: 0].
    #[arg(long, value_name = "M1,M2,M3", value_delimiter = ',')]
    pub mean: Vec<f32>,
    /// Per-channel std for --image [default: 1].
    #[arg(long, value_name = "S1,S2,S3", value_delimiter = ',')]
    pub std: Vec<f32>,
    /// Class names, one per line, to show beside the top-k indices.
    #[arg(long, value_name = "labels.txt")]
    pub labels: Option<PathBuf>,
    /// Weights: a PyTorch `state_dict` saved with `safetensors.torch.save_file`
    /// [default: random, PyTorch's default initialisation, seeded by --seed].
    #[arg(long, value_name = "W.safetensors")]
    pub weights: Option<PathBuf>,
    /// Seed of the random weights when --weights is not given.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the first output to this `.npy` file and output `NAME` of a multi-output net to
    /// `<stem>.NAME.npy` beside it, instead of printing them.
    #[arg(short, long, value_name = "Y.npy")]
    pub output: Option<PathBuf>,
    /// Threads to run on (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Classes shown per sample for a classifier's `[N, classes]` output.
    #[arg(long, default_value_t = 5, value_name = "K")]
    pub top: usize,
    /// Run the reference interpreter instead of the JIT.
    #[arg(long)]
    pub interp: bool,
    /// Apply the fusion passes (see `cnnc fuse-report`) first. The JIT does by default; with
    /// `--interp`, interpret the fused graph instead of the declared one.
    #[arg(long, conflicts_with = "unfused")]
    pub fused: bool,
    /// Compile the net exactly as declared, without the fusion passes.
    #[arg(long)]
    pub unfused: bool,
    /// The stride-1 3×3 convolutions' algorithm (JIT): per layer by the cost model, or forced.
    #[arg(long, value_enum, default_value_t = crate::bench::Conv::Auto)]
    pub conv: crate::bench::Conv,
}

/// Loads weights from `path`, else takes an `.onnx` model's own, else makes seeded random ones
/// (saying so on stderr).
pub fn weights(graph: &Graph, path: Option<&Path>, seed: u64) -> Result<Weights, Fail> {
    if path.is_none()
        && let Some(w) = crate::import::imported_weights(graph)
    {
        return Ok(w);
    }
    match path {
        Some(p) => Weights::load(graph, p).map_err(|e| {
            let f = Fail::from(e);
            if f.message.contains(&p.display().to_string()) {
                f
            } else {
                input(format!("`{}`: {}", p.display(), f.message))
            }
        }),
        None => {
            eprintln!(
                "note: no --weights given: using random weights (PyTorch's default initialisation, seed {seed}; \
                 choose another with --seed)"
            );
            Ok(Weights::random(graph, seed))
        }
    }
}

/// Checks `.npy` arrays against the net's declared inputs, naming the file on a mismatch.
fn check_inputs(graph: &Graph, files: &[PathBuf], arrays: &[ArrayD<f32>]) -> Result<(), Fail> {
    if arrays.len() != graph.inputs.len() {
        let names: Vec<String> = graph.inputs.iter().map(|(n, id)| format!("{n}: {}", graph.node(*id).ty)).collect();
        return Err(usage(format!(
            "net `{}` takes {} input(s) ({}), but {} --input file(s) were given",
            graph.name,
            graph.inputs.len(),
            names.join(", "),
            arrays.len()
        )));
    }
    let mut batch: Option<(usize, &Path)> = None;
    for (((name, id), file), x) in graph.inputs.iter().zip(files).zip(arrays) {
        let ty = &graph.node(*id).ty;
        let shape = x.shape();
        let fits = shape.len() == ty.rank()
            && shape[1..] == ty.dims[..]
            && shape[0] > 0
            && match ty.batch {
                Batch::Fixed(b) => shape[0] == b,
                Batch::Symbolic => true,
            };
        if !fits {
            let mut msg =
                format!("`{}` has shape {shape:?}, but input `{name}` of net `{}` is {ty}", file.display(), graph.name);
            if shape == ty.dims.as_slice() {
                msg += "\n  = help: add the batch dimension (`x[None]` in NumPy)";
            }
            return Err(input(msg));
        }
        if ty.batch == Batch::Symbolic {
            match batch {
                Some((n, first)) if n != shape[0] => {
                    return Err(input(format!(
                        "`{}` has batch {}, but `{}` has batch {n}: inputs must share N",
                        file.display(),
                        shape[0],
                        first.display()
                    )));
                }
                _ => batch = Some((shape[0], file)),
            }
        }
    }
    Ok(())
}

/// Refuses a batch whose largest tensor alone needs more memory than the machine has, so an
/// absurd `--batch` or `.npy` fails with a message instead of an allocation abort. It is a
/// lower bound: a batch that passes may still be too large for the inputs, weights and
/// every live activation together.
pub fn check_memory(graph: &Graph, batch: usize, fail: fn(String) -> Fail) -> Result<(), Fail> {
    let Some(total) = physical_memory() else { return Ok(()) };
    let Some(largest) = graph.node_ids().into_iter().max_by_key(|id| graph.node(*id).ty.numel_per_sample()) else {
        return Ok(());
    };
    let node = graph.node(largest);
    let need = node.ty.numel_per_sample() as u128 * batch as u128 * 4;
    if need <= u128::from(total) {
        return Ok(());
    }
    let what = match node.op {
        cnnc::compiler::ops::Op::Input => format!("input `{}`", node.name),
        _ => format!("`{}` ({})", node.name, node.op.kind()),
    };
    Err(fail(format!(
        "a batch of {batch} does not fit in memory: {what} alone is {} f32 values per sample, {} for the batch, \
         and this machine has {}",
        node.ty.numel_per_sample(),
        bytes_text(need),
        bytes_text(u128::from(total))
    )))
}

/// Total physical memory in bytes (Linux `/proc/meminfo`), if known.
fn physical_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.trim_start_matches("MemTotal:").trim().trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// `23.5 GiB`, `2.9 PiB`.
fn bytes_text(bytes: u128) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}

/// `y.npy` for the first output, `y.NAME.npy` for the others.
pub fn output_path(base: &Path, index: usize, name: &str) -> PathBuf {
    if index == 0 {
        return base.to_path_buf();
    }
    let stem = base.file_stem().map_or_else(|| "output".into(), |s| s.to_string_lossy().into_owned());
    let ext = base.extension().map_or_else(|| "npy".into(), |s| s.to_string_lossy().into_owned());
    base.with_file_name(format!("{stem}.{name}.{ext}"))
}

/// Runs the net and prints or writes its outputs.
pub fn run(args: &RunArgs) -> Result<(), Fail> {
    let (_, mut graph) = source::load_net(&args.net, &[])?;
    let arrays: Vec<ArrayD<f32>> = if args.images.is_empty() {
        args.inputs.iter().map(|p| npy::read(p)).collect::<Result<_, _>>()?
    } else {
        vec![image_batch(&graph, &args.images, &args.mean, &args.std)?]
    };
    let labels = match &args.labels {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| input(format!("cannot read `{}`: {}", p.display(), crate::source::io_text(&e))))?
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>(),
        ),
        None => None,
    };
    if arrays.len() == 1 && !args.images.is_empty() {
        check_inputs(&graph, &[PathBuf::from("--image")], &arrays)?;
    } else {
        check_inputs(&graph, &args.inputs, &arrays)?;
    }
    let batch = arrays.first().map_or(1, |a| a.shape()[0]);
    check_memory(&graph, batch, input)?;
    let mut weights = weights(&graph, args.weights.as_deref(), args.seed)?;
    // The JIT runs the fused graph unless told otherwise; the interpreter, the spec, runs
    // the declared one unless told otherwise.
    let fuse = if args.interp { args.fused } else { !args.unfused };
    if fuse {
        let fused = crate::fusion::optimize_owned(&graph, weights)?;
        (graph, weights) = (fused.graph, fused.weights);
    }
    let views: Vec<ArrayViewD<'_, f32>> = arrays.iter().map(|a| a.view()).collect();
    let outputs = if args.interp {
        let start = Instant::now();
        let out = interp::run(&graph, &weights, &views)?;
        eprintln!("{}: interpreted {batch} sample(s) in {}", graph.name, crate::ms(start.elapsed()));
        out
    } else {
        // Fused above when asked for.
        // The model takes the weights (they are not needed after): its Linear layers are
        // packed in their own memory.
        let compiled = Compiled::from_owned(
            &graph,
            weights,
            &Options { threads: args.threads, fuse: false, conv: args.conv.algorithm(), ..Options::default() },
        )?;
        let start = Instant::now();
        let out = compiled.run(&views)?;
        eprintln!(
            "{}: compiled {} kernel{} in {}; ran {batch} sample(s) in {}",
            graph.name,
            compiled.kernel_count(),
            if compiled.kernel_count() == 1 { "" } else { "s" },
            crate::ms(compiled.compile_time()),
            crate::ms(start.elapsed())
        );
        out
    };
    match &args.output {
        Some(base) => {
            for (i, ((name, _), y)) in graph.outputs.iter().zip(&outputs).enumerate() {
                let path = output_path(base, i, name);
                npy::write(&path, y)?;
                eprintln!("wrote {} {:?} to {}", name, y.shape(), path.display());
            }
        }
        None => {
            for ((name, _), y) in graph.outputs.iter().zip(&outputs) {
                print_output(name, y, args.top, labels.as_deref());
            }
        }
    }
    Ok(())
}

/// The pictures as one batch for the net's only `[N, C, H, W]` input.
fn image_batch(graph: &Graph, paths: &[PathBuf], mean: &[f32], std: &[f32]) -> Result<ArrayD<f32>, Fail> {
    let chw = match graph.inputs.as_slice() {
        [(_, id)] => graph.node(*id).ty.chw(),
        _ => None,
    };
    let Some((c, h, w)) = chw else {
        return Err(input(format!("--image needs a net with one [N, C, H, W] input; `{}` has another", graph.name)));
    };
    let mean = if mean.is_empty() { vec![0.0; c] } else { mean.to_vec() };
    let std = if std.is_empty() { vec![1.0; c] } else { std.to_vec() };
    if mean.len() != c || std.len() != c {
        return Err(usage(format!(
            "--mean and --std need {c} value(s) each, one per input channel of `{}`",
            graph.name
        )));
    }
    Ok(cnnc::images::batch(paths, c, (h, w), &mean, &std).map_err(|e| input(e.to_string()))?.into_dyn())
}

/// Prints one output: top-k classes per sample for `[N, classes]`, else the array.
fn print_output(name: &str, y: &ArrayD<f32>, top: usize, labels: Option<&[String]>) {
    let shape = y.shape();
    if shape.len() == 2 && shape[1] >= 2 && top > 0 {
        let k = top.min(shape[1]);
        println!("{name} {shape:?}: top {k} of {} classes per sample (class: value)", shape[1]);
        for (i, row) in y.axis_iter(Axis(0)).enumerate() {
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|a, b| row[*b].total_cmp(&row[*a]).then(a.cmp(b)));
            let best: Vec<String> = idx[..k]
                .iter()
                .map(|c| match labels.and_then(|l| l.get(*c)) {
                    Some(label) => format!("{c} {label}: {:.4}", row[*c]),
                    None => format!("{c}: {:.4}", row[*c]),
                })
                .collect();
            println!("  [{i}] {}", best.join("   "));
        }
    } else {
        println!("{name} {shape:?}:");
        println!("{y:.4}");
    }
}
