//! `cnnc`: the command-line tool for nets kept in `.cnn` files (the grammar of `cnn! { … }`) or
//! imported from `.onnx` models.
//!
//! Commands: `check`, `summary`, `dot`, `fuse-report`, `run`, `bench`, `train`, `gradcam`, `import` — see
//! `docs/cli.md`.
//! Exit status: 0 on success, 1 when an input (a `.cnn`, `.onnx`, `.npy` or `.safetensors` file) is
//! wrong, 2 when the command line is (unknown option, bad `--input` shape, missing `dot`).
//! Every failure is one `error: …` message on stderr, never a panic.

mod bench;
mod check;
mod dot;
mod fail;
mod fusion;
mod gradcam;
mod import;
mod npy;
mod run;
mod source;
mod summary;
mod train;

use clap::{Parser, Subcommand};
use fail::Fail;
use std::io::Write;
use std::time::Duration;

const EXAMPLES: &str = "\
Examples:
  cnnc check examples/nets/*.cnn
  cnnc summary examples/nets/resnet18.cnn --input 1,3,64,64
  cnnc dot examples/nets/lenet.cnn --fused -o lenet.dot
  cnnc run examples/nets/lenet.cnn --weights lenet.safetensors --input x.npy --output y.npy
  cnnc bench examples/nets/lenet.cnn --batch 1,64 --threads 1,2

Exit status: 0 success, 1 a wrong input file, 2 a wrong command line.";

/// cnnc: check, inspect, run and benchmark CNNs written in the cnnc network language.
#[derive(Parser, Debug)]
#[command(name = "cnnc", version, after_help = EXAMPLES, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Parse and shape-check `.cnn` files; print every error and warning rustc-style.
    #[command(after_help = "\
Examples:
  cnnc check examples/nets/lenet.cnn
  cnnc check examples/nets/*.cnn

Exit status: 0 when every file is clean (warnings allowed), 1 on any error.")]
    Check(check::CheckArgs),
    /// The per-layer table: output shape, params, MACs, activation memory, and totals.
    #[command(after_help = "\
Examples:
  cnnc summary examples/nets/lenet.cnn
  cnnc summary examples/nets/resnet18.cnn --input 1,3,64,64
  cnnc summary examples/nets/vgg11.cnn --json")]
    Summary(summary::SummaryArgs),
    /// Graphviz DOT of the graph IR, before or after fusion; `--svg`/`--png` render it.
    #[command(after_help = "\
Examples:
  cnnc dot examples/nets/lenet.cnn > lenet.dot
  cnnc dot examples/nets/seed_resnet.cnn --fused -o seed_resnet.dot
  cnnc dot examples/nets/nonlinear.cnn --svg -o nonlinear.svg   (needs Graphviz)")]
    Dot(dot::DotArgs),
    /// What the fusion passes did to the net (which ops were folded into which kernel).
    #[command(after_help = "\
Examples:
  cnnc fuse-report examples/nets/resnet18.cnn")]
    FuseReport(fusion::FuseArgs),
    /// JIT-compile a net and run it on `.npy` inputs.
    #[command(after_help = "\
Prints each output (the top classes per sample for an [N, classes] output) unless --output is
given. With --output y.npy, a net with several outputs writes its first output to y.npy and
output NAME to y.NAME.npy. Timing goes to stderr.

Examples:
  cnnc run examples/nets/lenet.cnn --weights lenet.safetensors --input digits.npy
  cnnc run examples/nets/lenet.cnn --weights lenet.safetensors --input digits.npy --output logits.npy
  cnnc run examples/nets/nonlinear.cnn --seed 7 --input x.npy --output y.npy   (random weights)")]
    Run(run::RunArgs),
    /// Benchmark the JIT: compile time, latency p50/p90/p99, throughput, GFLOP/s, % of peak.
    #[command(after_help = "\
GFLOP/s is 2·MACs·batch over the median latency; % of peak divides it by one core's peak
(--peak, else measured on this machine with an FMA loop) times the thread count. The net is
fused first unless --unfused. A progress bar runs on stderr when it is a terminal.

Examples:
  cnnc bench examples/nets/lenet.cnn --batch 1,64 --threads 1,2
  cnnc bench examples/nets/resnet18.cnn --input N,3,64,64 --batch 8 --iters 20 --time 2
  cnnc bench examples/nets/cifar10.cnn --batch 32 --json")]
    Bench(bench::BenchArgs),
    /// Train a net on `.npz` data: a loss, a torch.optim optimizer, per-epoch loss and accuracy.
    #[command(after_help = "\
The data is an .npz with arrays x (float32 [N, ...]) and y (int64 class indices for
cross_entropy, float32 targets for mse and bce_with_logits). Per-epoch loss, accuracy and time
go to stderr (a progress bar on a terminal); --json prints one JSON object per step on stdout,
then a summary. --save writes the trained state_dict (loadable with load_state_dict).

Examples:
  cnnc train examples/nets/lenet.cnn --data train.npz --val val.npz --optimizer adam --lr 3e-3 --epochs 10 --batch-size 32 --save lenet.safetensors
  cnnc train examples/nets/conv1x2.cnn --data edge.npz --loss mse --reduction sum --lr 0.03 --batch-size 1 --epochs 20 --no-shuffle")]
    Train(train::TrainArgs),
    /// Grad-CAM: where a layer's activations make the net see a class, as an overlay PNG.
    #[command(after_help = "\
For each input, the class explained (the predicted one unless --class) and its score go to
stdout with where the map peaks; the overlay (jet colormap over the de-normalised input,
0.5/0.5) goes to -o, a row of overlays for several inputs; --raw writes the maps [N, h, w]
at the layer's resolution.

Examples:
  cnnc gradcam examples/nets/lenet.cnn --weights lenet.safetensors --input digits4.npy --layer 3 -o cam.png
  cnnc gradcam net.cnn --weights w.safetensors --image cat.jpg --layer layer4 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225")]
    Gradcam(gradcam::GradcamArgs),
    /// Import an ONNX model: readable `.cnn` text and its weights as a safetensors state_dict.
    #[command(after_help = "\
Every other command also takes an .onnx file where it takes a .cnn one (run, bench and
fuse-report then use the model's own weights unless --weights is given). What the importer
folded (shape arithmetic into Flatten, MatMul + Add into Linear, a Pad into the next Conv) is
noted on stderr; a model with unsupported ops is refused with every such node listed.

Examples:
  cnnc import resnet18.onnx -o resnet18.cnn --weights resnet18.safetensors
  cnnc import model.onnx --input N,3,224,224 > model.cnn   (symbolic height and width)
  cnnc run resnet18.onnx --input images.npy")]
    Import(import::ImportArgs),
}

/// Prints a value as one line of JSON on stdout.
fn print_json_line<T: serde::Serialize>(value: &T) -> Result<(), Fail> {
    let text = serde_json::to_string(value).map_err(|e| fail::input(format!("cannot encode JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// Prints a value as pretty JSON on stdout.
fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Fail> {
    let text = serde_json::to_string_pretty(value).map_err(|e| fail::input(format!("cannot encode JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// `12.3 ms` / `850 µs`.
fn ms(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 { format!("{us:.0} µs") } else { format!("{:.1} ms", us / 1000.0) }
}

/// A failure that reaches the panic handler is still one line on stderr, without a backtrace;
/// a closed stdout (`cnnc dot … | head`) ends the program quietly.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        if msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let _ = writeln!(std::io::stderr(), "error: internal error{at}: {msg}");
        std::process::exit(101);
    }));
}

fn main() {
    install_panic_hook();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Check(a) => check::run(a),
        Command::Summary(a) => summary::run(a),
        Command::Dot(a) => dot::run(a),
        Command::FuseReport(a) => fusion::run(a),
        Command::Run(a) => run::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Train(a) => train::run(a),
        Command::Gradcam(a) => gradcam::run(a),
        Command::Import(a) => import::run(a),
    };
    if let Err(e) = result {
        if !e.message.is_empty() {
            eprintln!("error: {}", e.message);
        }
        std::process::exit(e.code);
    }
}
