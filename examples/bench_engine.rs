//! One engine of the side-by-side benchmark (`bench/compare.py`): compiles a `.cnn` net with
//! the JIT, times `Compiled::run` on a fixed input, and prints the result as JSON (or text).
//!
//! ```text
//! cargo run --release --example bench_engine -- --net examples/nets/resnet18.cnn \
//!     --weights w.safetensors --batch 1 --threads 1 --iters 50 --warmup 5 --json
//! ```
//!
//! Options:
//!
//! - `--net FILE` the `.cnn` file, or an `.onnx` model (imported with its own weights)
//!   (required); `--name NAME` picks a net of a `.cnn` file (default: the last);
//! - `--weights FILE` a PyTorch `state_dict` saved with `safetensors.torch.save_file`
//!   (default: `Weights::random` seeded by `--seed`);
//! - `--input FILE` a safetensors file whose tensor `input` is the batch (f32, the net's input
//!   shape); otherwise a uniform `[-1, 1)` input of `--batch` samples seeded by `--seed`;
//! - `--batch B` (default 1), `--threads T` (default 1; 0 = all cores), `--portable`;
//! - `--fused` runs the compiler's fusion passes (`fusion_check::optimize_owned`, as `cnnc run
//!   --fused`) on the net and its weights before compiling;
//! - `--conv auto|direct|winograd` chooses the stride-1 3×3 convolutions' algorithm
//!   (`Options::conv`; per layer by the cost model by default);
//! - `--profile` prints each kernel's median time (`Compiled::profile`) instead of timing
//!   whole runs;
//! - `--iters N` timed runs (default 20), `--warmup W` untimed runs first (default 3);
//! - `--values K` how many leading output values to print (default 8);
//! - `--save-output FILE` writes every output to a safetensors file (`output`, `output1`, …);
//! - `--json` one JSON object on stdout instead of text;
//! - `--serve` (implies JSON) compiles once, prints a `{"ready": …}` line, then for every stdin
//!   line `WARMUP ITERS` runs them and prints one JSON line with the timings (`times_ms`);
//!   an empty line, `quit` or end of input stops it. `compare.py` uses this to interleave
//!   engines without recompiling.
//!
//! Only the `run` call is timed: output allocation is part of it, input creation is not.

use cnnc::compiler::dsl;
use cnnc::runtime::fusion_check;
use cnnc::runtime::jit::{Compiled, ConvAlgorithm, Options};
use cnnc::runtime::weights::Weights;
use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};
use std::error::Error;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

type Res<T> = Result<T, Box<dyn Error>>;

/// Command-line options (see the module docs).
struct Args {
    net: PathBuf,
    name: Option<String>,
    weights: Option<PathBuf>,
    input: Option<PathBuf>,
    batch: usize,
    threads: usize,
    portable: bool,
    fused: bool,
    conv: ConvAlgorithm,
    profile: bool,
    iters: usize,
    warmup: usize,
    seed: u64,
    values: usize,
    save_output: Option<PathBuf>,
    json: bool,
    serve: bool,
}

const USAGE: &str = "usage: bench_engine --net FILE.cnn [--name NET] [--weights W.safetensors] \
[--input X.safetensors] [--batch B] [--threads T] [--portable] [--fused] [--conv auto|direct|winograd] [--profile] [--iters N] [--warmup W] [--seed S] \
[--values K] [--save-output OUT.safetensors] [--json] [--serve]";

fn parse_args() -> Res<Args> {
    let mut a = Args {
        net: PathBuf::new(),
        name: None,
        weights: None,
        input: None,
        batch: 1,
        threads: 1,
        portable: false,
        fused: false,
        conv: ConvAlgorithm::Auto,
        profile: false,
        iters: 20,
        warmup: 3,
        seed: 0,
        values: 8,
        save_output: None,
        json: false,
        serve: false,
    };
    let mut net = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--net" => net = Some(PathBuf::from(value()?)),
            "--name" => a.name = Some(value()?),
            "--weights" => a.weights = Some(PathBuf::from(value()?)),
            "--input" => a.input = Some(PathBuf::from(value()?)),
            "--batch" => a.batch = value()?.parse()?,
            "--threads" => a.threads = value()?.parse()?,
            "--iters" => a.iters = value()?.parse()?,
            "--warmup" => a.warmup = value()?.parse()?,
            "--seed" => a.seed = value()?.parse()?,
            "--values" => a.values = value()?.parse()?,
            "--save-output" => a.save_output = Some(PathBuf::from(value()?)),
            "--portable" => a.portable = true,
            "--fused" => a.fused = true,
            "--conv" => {
                a.conv = match value()?.as_str() {
                    "auto" => ConvAlgorithm::Auto,
                    "direct" => ConvAlgorithm::Direct,
                    "winograd" => ConvAlgorithm::Winograd,
                    other => return Err(format!("--conv: `{other}` is not auto, direct or winograd").into()),
                }
            }
            "--profile" => a.profile = true,
            "--json" => a.json = true,
            "--serve" => a.serve = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`\n{USAGE}").into()),
        }
    }
    a.net = net.ok_or(USAGE)?;
    if a.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    Ok(a)
}

/// SplitMix64: a fixed, dependency-free source of the random input.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// The `input` tensor of a safetensors file, as f32.
fn load_input(path: &Path) -> Res<ArrayD<f32>> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)?;
    let t = st.tensor("input").map_err(|e| format!("`{}`: no tensor `input` ({e})", path.display()))?;
    if t.dtype() != Dtype::F32 {
        return Err(format!("`{}`: `input` is {:?}, expected F32", path.display(), t.dtype()).into());
    }
    let data = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok(ArrayD::from_shape_vec(IxDyn(t.shape()), data)?)
}

/// Writes the outputs as `output`, `output1`, … (f32, little-endian).
fn save_outputs(path: &Path, outputs: &[ArrayD<f32>]) -> Res<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let key = if i == 0 { "output".to_string() } else { format!("output{i}") };
            (key, o.shape().to_vec(), o.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, shape, data)| {
            Ok((k.as_str(), safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)?))
        })
        .collect::<Res<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path)?;
    Ok(())
}

/// The `q`-quantile (0..=1) of sorted values, linearly interpolated.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// A JSON number (`null` for NaN/∞, which JSON cannot express).
fn num(v: f64) -> String {
    if v.is_finite() { format!("{v}") } else { "null".into() }
}

/// A JSON string literal.
fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list(values: impl IntoIterator<Item = f64>) -> String {
    let items: Vec<String> = values.into_iter().map(num).collect();
    format!("[{}]", items.join(", "))
}

/// Median, p10 and p90 of timings in ms, as JSON fields.
fn stats_fields(times: &[f64]) -> String {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mean = if sorted.is_empty() { f64::NAN } else { sorted.iter().sum::<f64>() / sorted.len() as f64 };
    format!(
        "\"iters\": {}, \"median_ms\": {}, \"p10_ms\": {}, \"p90_ms\": {}, \"mean_ms\": {}, \"min_ms\": {}",
        sorted.len(),
        num(quantile(&sorted, 0.5)),
        num(quantile(&sorted, 0.1)),
        num(quantile(&sorted, 0.9)),
        num(mean),
        num(sorted.first().copied().unwrap_or(f64::NAN)),
    )
}

/// Runs `warmup` untimed and `iters` timed runs; returns the timings in ms and the last outputs.
fn measure(model: &Compiled, x: &ArrayD<f32>, warmup: usize, iters: usize) -> Res<(Vec<f64>, Vec<ArrayD<f32>>)> {
    let mut last = vec![];
    for _ in 0..warmup {
        last = model.run(&[x.view()])?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let out = model.run(&[x.view()])?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        last = out;
    }
    if last.is_empty() {
        last = model.run(&[x.view()])?;
    }
    Ok((times, last))
}

/// The net of `--net`: a `.cnn` file compiled, or an `.onnx` model imported with its weights.
fn load_net(args: &Args) -> Res<(cnnc::Graph, Option<Weights>)> {
    if args.net.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")) {
        let m = cnnc::onnx::import_file(&args.net, &cnnc::onnx::Options::default())?;
        let w = cnnc::onnx::weights(&m)?;
        return Ok((m.graph, Some(w)));
    }
    let text = std::fs::read_to_string(&args.net).map_err(|e| format!("cannot read `{}`: {e}", args.net.display()))?;
    let out = dsl::compile_str(&text);
    if out.has_errors() {
        for d in out.errors() {
            eprintln!("{}", d.render(&args.net.display().to_string(), &text));
        }
        return Err(format!("`{}` does not compile", args.net.display()).into());
    }
    let graph = match &args.name {
        Some(n) => out.net(n).ok_or_else(|| format!("no net `{n}` in `{}`", args.net.display()))?,
        None => out.nets.last().ok_or_else(|| format!("no net in `{}`", args.net.display()))?,
    };
    Ok((graph.clone(), None))
}

fn main() -> Res<()> {
    let args = parse_args()?;
    let (graph, onnx_weights) = load_net(&args)?;
    let graph = &graph;
    if graph.inputs.len() != 1 {
        return Err(
            format!("net `{}` has {} inputs; bench_engine feeds exactly one", graph.name, graph.inputs.len()).into()
        );
    }
    let weights = match (&args.weights, onnx_weights) {
        (Some(p), _) => Weights::load(graph, p)?,
        (None, Some(w)) => w,
        (None, None) => Weights::random(graph, args.seed),
    };
    let x = match &args.input {
        Some(p) => load_input(p)?,
        None => {
            let ty = &graph.node(graph.inputs[0].1).ty;
            let shape = ty.concrete(args.batch);
            let mut rng = SplitMix(args.seed ^ 0x5EED_1A9E);
            ArrayD::from_shape_simple_fn(IxDyn(&shape), || rng.uniform())
        }
    };
    let batch = x.shape().first().copied().unwrap_or(1);

    let t = Instant::now();
    // The weights move through the passes: the ones no pass rewrites are not copied.
    let (fused_graph, weights) = if args.fused {
        let f = fusion_check::optimize_owned(graph, weights)?;
        (Some(f.graph), f.weights)
    } else {
        (None, weights)
    };
    let fuse_ms = t.elapsed().as_secs_f64() * 1e3;
    let graph = fused_graph.as_ref().unwrap_or(graph);
    let t = Instant::now();
    // The model takes the weights: its Linear layers are packed in their own memory.
    let model = Compiled::from_owned(
        graph,
        weights,
        &Options { threads: args.threads, portable: args.portable, fuse: false, conv: args.conv },
    )?;
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;

    let head = format!(
        "\"net\": {}, \"file\": {}, \"batch\": {batch}, \"threads\": {}, \"portable\": {}, \"fused\": {}, \"fuse_ms\": {}, \"compile_ms\": {}, \"kernels\": {}",
        string(&graph.name),
        string(&args.net.display().to_string()),
        args.threads,
        args.portable,
        args.fused,
        num(if args.fused { fuse_ms } else { 0.0 }),
        num(compile_ms),
        model.kernel_count(),
    );

    if args.profile {
        let prof = model.profile(&[x.view()], args.iters.max(1))?;
        let total: f64 = prof.iter().map(|k| k.median.as_secs_f64()).sum();
        let peak = cnnc::runtime::jit::peak_gflops();
        println!(
            "{:<28} {:>10} {:>10} {:>7} {:>9} {:>7}",
            "kernel", "median µs", "min µs", "share", "GFLOP/s", "% peak"
        );
        for k in &prof {
            let t = k.median.as_secs_f64();
            let tmin = k.min.as_secs_f64();
            // GFLOP/s of the least disturbed run.
            let gf = k.flops.map(|f| f as f64 / tmin / 1e9);
            let cell = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.1}"));
            println!(
                "{:<28} {:>10.1} {:>10.1} {:>6.1}% {:>9} {:>7}",
                k.name,
                t * 1e6,
                tmin * 1e6,
                100.0 * t / total,
                cell(gf),
                cell(gf.zip(peak).map(|(g, p)| 100.0 * g / (p * args.threads.max(1) as f64))),
            );
        }
        println!("{:<28} {:>10.1}   (compile {compile_ms:.1} ms)", "total", total * 1e6);
        return Ok(());
    }

    if args.serve {
        // First run doubles as the correctness sample.
        let outputs = model.run(&[x.view()])?;
        if let Some(p) = &args.save_output {
            save_outputs(p, &outputs)?;
        }
        let first = outputs.first().map(|o| o.iter().take(args.values).map(|&v| v as f64).collect::<Vec<_>>());
        let stdout = std::io::stdout();
        let mut w = stdout.lock();
        writeln!(w, "{{\"ready\": true, {head}, \"output\": {}}}", list(first.unwrap_or_default()))?;
        w.flush()?;
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            let words: Vec<&str> = line.split_whitespace().collect();
            let (warmup, iters) = match words.as_slice() {
                [] | ["quit"] => break,
                [n] => (0, n.parse()?),
                [wu, n] => (wu.parse()?, n.parse()?),
                _ => return Err(format!("bad request `{line}`: expected `WARMUP ITERS`").into()),
            };
            let (times, _) = measure(&model, &x, warmup, iters)?;
            writeln!(w, "{{{}, \"times_ms\": {}}}", stats_fields(&times), list(times.iter().copied()))?;
            w.flush()?;
        }
        return Ok(());
    }

    let (times, outputs) = measure(&model, &x, args.warmup, args.iters)?;
    if let Some(p) = &args.save_output {
        save_outputs(p, &outputs)?;
    }
    let first: Vec<f64> =
        outputs.first().map(|o| o.iter().take(args.values).map(|&v| v as f64).collect()).unwrap_or_default();
    let shape = outputs.first().map(|o| o.shape().to_vec()).unwrap_or_default();
    if args.json {
        println!(
            "{{{head}, \"warmup\": {}, {}, \"output_shape\": {}, \"output\": {}, \"times_ms\": {}}}",
            args.warmup,
            stats_fields(&times),
            list(shape.iter().map(|&d| d as f64)),
            list(first),
            list(times.iter().copied()),
        );
    } else {
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        println!("net          {} ({})", graph.name, args.net.display());
        println!(
            "batch        {batch}, threads {}{}{}",
            args.threads,
            if args.portable { ", portable" } else { "" },
            if args.fused { ", fused" } else { "" }
        );
        if args.fused {
            println!("fusion       {fuse_ms:.2} ms");
        }
        println!("compile      {compile_ms:.2} ms ({} kernels)", model.kernel_count());
        println!(
            "latency      median {:.3} ms, p10 {:.3} ms, p90 {:.3} ms ({} runs after {} warm-up)",
            quantile(&sorted, 0.5),
            quantile(&sorted, 0.1),
            quantile(&sorted, 0.9),
            sorted.len(),
            args.warmup
        );
        println!("throughput   {:.1} samples/s", batch as f64 * 1e3 / quantile(&sorted, 0.5));
        println!("output       {shape:?}, first values {first:?}");
    }
    Ok(())
}
