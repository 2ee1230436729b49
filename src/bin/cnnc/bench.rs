//! `cnnc bench`: compile time, latency percentiles, throughput and GFLOP/s of the JIT for
//! every combination of batch size and thread count, with a progress bar on stderr.
//!
//! GFLOP/s counts `2 · MACs` per sample over the median latency; "% of peak" divides it by
//! one core's peak times the thread count: `--peak`, or else measured on this machine
//! (`cnnc::runtime::jit::peak_gflops`, an FMA loop on the widest vectors the micro-kernels
//! use), or else [`PEAK_GFLOPS_PER_CORE`].

use crate::fail::{Fail, usage};
use crate::source::{self, NetFile};
use clap::Args;
use cnnc::Summary;
use cnnc::compiler::shape::Batch;
use cnnc::runtime::{Compiled, ConvAlgorithm, Options};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Peak f32 throughput of one core assumed when it cannot be measured (no AVX2 on the host):
/// an AVX-512 core with two FMA units at ~1.8 GHz, 2 × 16 lanes × 2 FLOP × 1.8 GHz.
pub const PEAK_GFLOPS_PER_CORE: f64 = 116.0;

/// Arguments of `cnnc bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub net: NetFile,
    /// Override the declared input shape (as for `cnnc summary`).
    #[arg(long = "input", value_name = "DIMS")]
    pub shapes: Vec<String>,
    /// Batch sizes to measure [default: 1, or the net's fixed batch].
    #[arg(long, value_delimiter = ',', value_name = "B,…")]
    pub batch: Vec<usize>,
    /// Thread counts to measure (0: all cores).
    #[arg(long, value_delimiter = ',', default_value = "1", value_name = "T,…")]
    pub threads: Vec<usize>,
    /// Most timed runs per configuration.
    #[arg(long, default_value_t = 100)]
    pub iters: usize,
    /// Untimed runs before timing each configuration.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Time budget of the timed runs of one configuration, in seconds (at least one run).
    #[arg(long = "time", default_value_t = 5.0, value_name = "SECONDS")]
    pub budget: f64,
    /// Peak GFLOP/s of one core, for "% of peak" [default: measured on this machine].
    #[arg(long, value_name = "GFLOPS")]
    pub peak: Option<f64>,
    /// Weights to load [default: random, seeded by --seed]; timing does not depend on them.
    #[arg(long, value_name = "W.safetensors")]
    pub weights: Option<PathBuf>,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Apply the fusion passes (see `cnnc fuse-report`) before compiling: the default.
    #[arg(long, conflicts_with = "unfused")]
    pub fused: bool,
    /// Benchmark the net exactly as declared, without the fusion passes.
    #[arg(long)]
    pub unfused: bool,
    /// The stride-1 3×3 convolutions' algorithm: per layer by the cost model, or forced.
    #[arg(long, value_enum, default_value_t = Conv::Auto)]
    pub conv: Conv,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `--conv`: [`cnnc::runtime::ConvAlgorithm`] on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conv {
    /// Winograd F(2×2, 3×3) where the cost model expects it to be faster.
    Auto,
    /// The direct convolution everywhere.
    Direct,
    /// Winograd F(2×2, 3×3) wherever it applies.
    Winograd,
}

impl Conv {
    /// The library's option.
    pub fn algorithm(self) -> ConvAlgorithm {
        match self {
            Conv::Auto => ConvAlgorithm::Auto,
            Conv::Direct => ConvAlgorithm::Direct,
            Conv::Winograd => ConvAlgorithm::Winograd,
        }
    }
}

/// The algorithm one convolution was compiled with.
#[derive(Serialize, Debug)]
struct Choice {
    node: String,
    algorithm: String,
    reason: String,
}

/// One measured configuration.
#[derive(Serialize, Debug)]
struct Row {
    batch: usize,
    threads: usize,
    compile_ms: f64,
    iters: usize,
    mean_ms: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    samples_per_s: f64,
    gflops: f64,
    percent_of_peak: f64,
}

/// The whole benchmark, for `--json`.
#[derive(Serialize, Debug)]
struct Report<'a> {
    net: &'a str,
    fused: bool,
    macs_per_sample: u64,
    peak_gflops_per_core: f64,
    results: &'a [Row],
    /// Each convolution on the micro-kernels: its algorithm and why.
    convolutions: &'a [Choice],
}

/// Nearest-rank percentile of sorted durations, in milliseconds.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e3
}

/// Uniform `[0, 1)` values from a SplitMix64 stream.
fn random_input(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut state = seed;
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    })
}

/// Runs the benchmark and prints the table or JSON.
pub fn run(args: &BenchArgs) -> Result<(), Fail> {
    if args.iters == 0 {
        return Err(usage("--iters must be at least 1"));
    }
    if !(args.budget > 0.0 && args.budget.is_finite()) {
        return Err(usage("--time must be a positive number of seconds"));
    }
    if args.peak.is_some_and(|p| !(p > 0.0 && p.is_finite())) {
        return Err(usage("--peak must be a positive number of GFLOP/s"));
    }
    let peak = args.peak.or_else(cnnc::runtime::jit::peak_gflops).unwrap_or(PEAK_GFLOPS_PER_CORE);
    let (_, mut graph) = source::load_net(&args.net, &args.shapes)?;
    let fixed = graph.inputs.iter().find_map(|(_, id)| match graph.node(*id).ty.batch {
        Batch::Fixed(b) => Some(b),
        Batch::Symbolic => None,
    });
    let symbolic = graph.inputs.iter().any(|(_, id)| graph.node(*id).ty.batch == Batch::Symbolic);
    let batches = match (args.batch.is_empty(), fixed) {
        (true, Some(b)) if !symbolic => vec![b],
        (true, _) => vec![1],
        (false, _) => args.batch.clone(),
    };
    if batches.contains(&0) {
        return Err(usage("--batch sizes must be at least 1"));
    }
    if let Some(b) = fixed
        && let Some(other) = batches.iter().find(|n| **n != b)
    {
        return Err(usage(format!("net `{}` has a fixed batch of {b}; it cannot run --batch {other}", graph.name)));
    }
    for &b in &batches {
        crate::run::check_memory(&graph, b, usage)?;
    }
    let threads: Vec<usize> = args
        .threads
        .iter()
        .map(|t| if *t == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { *t })
        .collect();
    // MACs of the net as written: fusion must not change the work credited to it.
    let macs = Summary::of(&graph).total_macs;
    let mut weights = crate::run::weights(&graph, args.weights.as_deref(), args.seed)?;
    let fuse = !args.unfused;
    if fuse {
        let fused = crate::fusion::optimize_owned(&graph, weights)?;
        (graph, weights) = (fused.graph, fused.weights);
    }

    let per_config = (args.warmup + args.iters) as u64;
    let bar = if args.quiet || args.json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::with_draw_target(
            Some(per_config * (batches.len() * threads.len()) as u64),
            ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = ProgressStyle::with_template("{prefix:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
        {
            bar.set_style(style);
        }
        bar.set_prefix(graph.name.clone());
        bar
    };

    let mut rows = vec![];
    let mut choices = vec![];
    for &t in &threads {
        bar.set_message(format!("compiling for {t} thread(s)"));
        // Fused above unless `--unfused`.
        let options = Options { threads: t, fuse: false, conv: args.conv.algorithm(), ..Options::default() };
        let compiled = Compiled::new(&graph, &weights, &options)?;
        choices = compiled
            .conv_choices()
            .iter()
            .map(|c| Choice { node: c.node.clone(), algorithm: format!("{:?}", c.algorithm), reason: c.reason.clone() })
            .collect();
        let compile_ms = compiled.compile_time().as_secs_f64() * 1e3;
        for &b in &batches {
            bar.set_message(format!("batch {b}, {t} thread(s)"));
            let inputs: Vec<ArrayD<f32>> = graph
                .inputs
                .iter()
                .enumerate()
                .map(|(i, (_, id))| random_input(&graph.node(*id).ty.concrete(b), args.seed ^ (i as u64 + 1)))
                .collect();
            let views: Vec<ArrayViewD<'_, f32>> = inputs.iter().map(|a| a.view()).collect();
            for _ in 0..args.warmup {
                compiled.run(&views)?;
                bar.inc(1);
            }
            let budget = Duration::from_secs_f64(args.budget);
            let start = Instant::now();
            let mut times = Vec::with_capacity(args.iters);
            while times.len() < args.iters && (times.is_empty() || start.elapsed() < budget) {
                let t0 = Instant::now();
                let out = compiled.run(&views)?;
                times.push(t0.elapsed());
                drop(out);
                bar.inc(1);
            }
            bar.inc((args.iters - times.len()) as u64);
            let mean = times.iter().sum::<Duration>().as_secs_f64() / times.len() as f64;
            times.sort();
            let p50 = percentile(&times, 50.0);
            let gflops = 2.0 * macs as f64 * b as f64 / (p50 / 1e3) / 1e9;
            rows.push(Row {
                batch: b,
                threads: t,
                compile_ms,
                iters: times.len(),
                mean_ms: mean * 1e3,
                p50_ms: p50,
                p90_ms: percentile(&times, 90.0),
                p99_ms: percentile(&times, 99.0),
                samples_per_s: b as f64 / (p50 / 1e3),
                gflops,
                percent_of_peak: 100.0 * gflops / (peak * t as f64),
            });
        }
    }
    bar.finish_and_clear();

    if args.json {
        return crate::print_json(&Report {
            net: &graph.name,
            fused: fuse,
            macs_per_sample: macs,
            peak_gflops_per_core: peak,
            results: &rows,
            convolutions: &choices,
        });
    }
    println!(
        "{}{}: {} per sample; peak {:.0} GFLOP/s per core; latency over at most {} runs or {}s each",
        graph.name,
        if fuse { " (fused)" } else { "" },
        if macs >= 100_000_000 {
            format!("{:.3} GMACs", macs as f64 / 1e9)
        } else {
            format!("{:.3} MMACs", macs as f64 / 1e6)
        },
        peak,
        args.iters,
        args.budget
    );
    println!(
        "{:>6} {:>8} {:>11} {:>6} {:>10} {:>10} {:>10} {:>12} {:>9} {:>7}",
        "batch", "threads", "compile ms", "runs", "p50 ms", "p90 ms", "p99 ms", "samples/s", "GFLOP/s", "% peak"
    );
    for r in &rows {
        println!(
            "{:>6} {:>8} {:>11.1} {:>6} {:>10.3} {:>10.3} {:>10.3} {:>12.1} {:>9.2} {:>6.1}%",
            r.batch,
            r.threads,
            r.compile_ms,
            r.iters,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.samples_per_s,
            r.gflops,
            r.percent_of_peak
        );
    }
    if !choices.is_empty() {
        println!("convolutions on the micro-kernels:");
        let width = choices.iter().map(|c| c.node.len()).max().unwrap_or(0);
        for c in &choices {
            println!("  {:<width$}  {:<8}  {}", c.node, c.algorithm, c.reason);
        }
    }
    Ok(())
}
