//! The cnnc engine of the training benchmark (`bench/compare_train.py`): builds a
//! [`Trainer`] for a `.cnn` net from given weights, loss and SGD settings, and times whole
//! training steps — `zero_grad`, forward, loss, backward, optimizer update, new weights
//! given to the compiled code — on a fixed batch, as PyTorch's eager loop does them.
//!
//! ```text
//! cargo run --release --example train_engine -- --net examples/nets/lenet.cnn \
//!     --weights w.safetensors --data batch.safetensors --loss cross_entropy \
//!     --lr 0.01 --momentum 0.9 --threads 1 --serve
//! ```
//!
//! Options:
//!
//! - `--net FILE` the `.cnn` file (required; its last net);
//! - `--weights FILE` the initial `state_dict` (safetensors); default `Weights::random`
//!   seeded by `--seed`;
//! - `--data FILE` a safetensors file with `x` (f32, the batch) and `y` (f32 targets: class
//!   indices for cross-entropy, else the prediction's shape); default: a uniform `[-1, 1)`
//!   batch of `--batch` samples with class 0 / zero targets;
//! - `--loss mse|mse_sum|cross_entropy|bce_with_logits` (default `cross_entropy`);
//! - `--lr`, `--momentum` (SGD; defaults 0.01 and 0.9), `--threads T` (default 1), `--interp`
//!   (the reference interpreter instead of the JIT);
//! - `--save-weights FILE`: the weights after the first step (safetensors), for checking
//!   against PyTorch's;
//! - `--steps N`, `--warmup W`: without `--serve`, time N steps after W untimed ones and print
//!   the median;
//! - `--serve`: take the first step (compiling; its loss and time are in the `{"ready": …}`
//!   line), then for every stdin line `WARMUP ITERS` take that many steps and print one JSON
//!   line with the step times (`times_ms`) and the last loss; an empty line, `quit` or end of
//!   input stops it.

use cnnc::compiler::dsl;
use cnnc::compiler::ops::train::{Loss, Reduction};
use cnnc::runtime::jit::Options;
use cnnc::runtime::train::{Optimizer, Sgd, Trainer};
use cnnc::runtime::weights::Weights;
use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};
use std::error::Error;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

type Res<T> = Result<T, Box<dyn Error>>;

const USAGE: &str = "usage: train_engine --net FILE.cnn [--weights W.safetensors] [--data D.safetensors | --batch B] \
[--loss mse|mse_sum|cross_entropy|bce_with_logits] [--lr LR] [--momentum M] [--threads T] [--interp] [--seed S] \
[--save-weights OUT.safetensors] [--steps N] [--warmup W] [--serve]";

/// Command-line options (see the module docs).
struct Args {
    net: PathBuf,
    weights: Option<PathBuf>,
    data: Option<PathBuf>,
    batch: usize,
    loss: String,
    lr: f64,
    momentum: f64,
    threads: usize,
    interp: bool,
    seed: u64,
    save_weights: Option<PathBuf>,
    steps: usize,
    warmup: usize,
    serve: bool,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        net: PathBuf::new(),
        weights: None,
        data: None,
        batch: 64,
        loss: "cross_entropy".into(),
        lr: 0.01,
        momentum: 0.9,
        threads: 1,
        interp: false,
        seed: 0,
        save_weights: None,
        steps: 20,
        warmup: 3,
        serve: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--net" => a.net = value()?.into(),
            "--weights" => a.weights = Some(value()?.into()),
            "--data" => a.data = Some(value()?.into()),
            "--batch" => a.batch = value()?.parse()?,
            "--loss" => a.loss = value()?,
            "--lr" => a.lr = value()?.parse()?,
            "--momentum" => a.momentum = value()?.parse()?,
            "--threads" => a.threads = value()?.parse()?,
            "--seed" => a.seed = value()?.parse()?,
            "--save-weights" => a.save_weights = Some(value()?.into()),
            "--steps" => a.steps = value()?.parse()?,
            "--warmup" => a.warmup = value()?.parse()?,
            "--interp" => a.interp = true,
            "--serve" => a.serve = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown option `{other}`\n{USAGE}").into()),
        }
    }
    if a.net.as_os_str().is_empty() {
        return Err(format!("--net is required\n{USAGE}").into());
    }
    Ok(a)
}

/// Tensor `key` of a safetensors file, as f32.
fn load_f32(st: &SafeTensors<'_>, path: &Path, key: &str) -> Res<ArrayD<f32>> {
    let t = st.tensor(key).map_err(|e| format!("`{}`: no tensor `{key}` ({e})", path.display()))?;
    if t.dtype() != Dtype::F32 {
        return Err(format!("`{}`: `{key}` is {:?}, expected F32", path.display(), t.dtype()).into());
    }
    let data = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok(ArrayD::from_shape_vec(IxDyn(t.shape()), data)?)
}

fn loss_of(name: &str) -> Res<Loss> {
    Ok(match name {
        "mse" => Loss::Mse { reduction: Reduction::Mean },
        "mse_sum" => Loss::Mse { reduction: Reduction::Sum },
        "cross_entropy" => Loss::CrossEntropy { reduction: Reduction::Mean, label_smoothing: 0.0 },
        "bce_with_logits" => Loss::BceWithLogits { reduction: Reduction::Mean, pos_weight: None },
        other => return Err(format!("unknown loss `{other}`").into()),
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("train_engine: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let args = parse_args()?;
    let text = std::fs::read_to_string(&args.net).map_err(|e| format!("cannot read `{}`: {e}", args.net.display()))?;
    let out = dsl::compile_str(&text);
    if out.has_errors() {
        let msgs: Vec<String> = out.errors().map(|d| d.render(&args.net.display().to_string(), &text)).collect();
        return Err(msgs.join("\n").into());
    }
    let graph = out.nets.last().ok_or("the file declares no net")?.clone();
    let weights = match &args.weights {
        Some(p) => Weights::load(&graph, p)?,
        None => Weights::random(&graph, args.seed),
    };
    let (x, y) = match &args.data {
        Some(p) => {
            let bytes = std::fs::read(p).map_err(|e| format!("cannot read `{}`: {e}", p.display()))?;
            let st = SafeTensors::deserialize(&bytes)?;
            (load_f32(&st, p, "x")?, load_f32(&st, p, "y")?)
        }
        None => {
            let ty = &graph.node(graph.inputs[0].1).ty;
            let shape = ty.concrete(args.batch);
            let mut s = args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let x = ArrayD::from_shape_simple_fn(IxDyn(&shape), || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            });
            let out_ty = &graph.node(graph.outputs[0].1).ty;
            let y = match args.loss.as_str() {
                "cross_entropy" => ArrayD::zeros(IxDyn(&[args.batch])),
                _ => ArrayD::zeros(IxDyn(&out_ty.concrete(args.batch))),
            };
            (x, y)
        }
    };
    let opt = Optimizer::Sgd(Sgd {
        lr: args.lr,
        momentum: args.momentum,
        dampening: 0.0,
        nesterov: false,
        weight_decay: 0.0,
    });
    let mut trainer = Trainer::new(&graph, weights, loss_of(&args.loss)?, opt)?;
    if args.interp {
        trainer.use_interpreter();
    } else {
        trainer.use_jit(Options { threads: args.threads, ..Options::default() });
    }
    let t0 = Instant::now();
    let first = trainer.step(x.view(), y.view())?.loss;
    let first_ms = t0.elapsed().as_secs_f64() * 1e3;
    if let Some(p) = &args.save_weights {
        trainer.weights().save(&graph, p)?;
    }
    let mut step = |n: usize| -> Res<(Vec<f64>, f32)> {
        let mut times = Vec::with_capacity(n);
        let mut loss = f32::NAN;
        for _ in 0..n {
            let t = Instant::now();
            loss = trainer.step(x.view(), y.view())?.loss;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok((times, loss))
    };
    let list = |v: &[f64]| format!("[{}]", v.iter().map(|t| format!("{t:.6}")).collect::<Vec<_>>().join(", "));
    if args.serve {
        let stdout = std::io::stdout();
        let mut w = stdout.lock();
        writeln!(
            w,
            "{{\"ready\": true, \"net\": \"{}\", \"threads\": {}, \"first_step_ms\": {first_ms:.3}, \"loss\": {first}}}",
            graph.name, args.threads
        )?;
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
            step(warmup)?;
            let (times, loss) = step(iters)?;
            writeln!(w, "{{\"times_ms\": {}, \"loss\": {loss}}}", list(&times))?;
            w.flush()?;
        }
        return Ok(());
    }
    step(args.warmup)?;
    let (mut times, loss) = step(args.steps)?;
    times.sort_by(f64::total_cmp);
    println!(
        "{}: first step (compiling) {first_ms:.1} ms, loss {first}; median step {:.3} ms over {} steps (last loss {loss})",
        graph.name,
        times[times.len() / 2],
        times.len()
    );
    Ok(())
}
