//! `cnnc train`: train a net on `.npz` data with a loss and a torch.optim optimizer, print
//! per-epoch loss (and accuracy, and validation in eval mode), save the weights.

use crate::fail::{Fail, input, usage};
use crate::source::{self, NetFile, io_text};
use clap::{Args, ValueEnum};
use cnnc::compiler::graph::Graph;
use cnnc::compiler::ops::train::{Loss, Reduction};
use cnnc::data::Targets;
use cnnc::runtime::train::{Adam, Optimizer, Sgd, Trainer};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::{ArrayD, Axis};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The loss.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LossArg {
    /// `nn.MSELoss`: float32 targets of the output's shape.
    Mse,
    /// `nn.CrossEntropyLoss`: int64 class indices `[N]`.
    #[value(name = "cross_entropy")]
    CrossEntropy,
    /// `nn.BCEWithLogitsLoss`: float32 targets in [0, 1] of the output's shape.
    #[value(name = "bce_with_logits")]
    BceWithLogits,
}

/// The optimizer.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum OptArg {
    /// `torch.optim.SGD`.
    Sgd,
    /// `torch.optim.Adam`.
    Adam,
    /// `torch.optim.AdamW`.
    Adamw,
}

/// `mean` or `sum`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ReductionArg {
    /// The mean (PyTorch's default).
    Mean,
    /// The sum.
    Sum,
}

/// Arguments of `cnnc train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub net: NetFile,
    /// Training data: an `.npz` with `x` (float32 `[N, …]`, the net's input) and `y`
    /// (int64 class indices for cross_entropy, float32 targets otherwise).
    #[arg(long, value_name = "TRAIN.npz")]
    pub data: PathBuf,
    /// Validation data (same arrays): loss and accuracy in eval mode after every epoch.
    #[arg(long, value_name = "VAL.npz")]
    pub val: Option<PathBuf>,
    /// The loss.
    #[arg(long, value_enum, default_value_t = LossArg::CrossEntropy)]
    pub loss: LossArg,
    /// The loss's reduction.
    #[arg(long, value_enum, default_value_t = ReductionArg::Mean)]
    pub reduction: ReductionArg,
    /// CrossEntropyLoss's label_smoothing.
    #[arg(long, default_value_t = 0.0, value_name = "EPS")]
    pub label_smoothing: f64,
    /// The optimizer.
    #[arg(long, value_enum, default_value_t = OptArg::Sgd)]
    pub optimizer: OptArg,
    /// Learning rate [default: 0.01 for sgd, 0.001 for adam/adamw].
    #[arg(long)]
    pub lr: Option<f64>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.0)]
    pub momentum: f64,
    /// SGD dampening.
    #[arg(long, default_value_t = 0.0)]
    pub dampening: f64,
    /// SGD Nesterov momentum.
    #[arg(long)]
    pub nesterov: bool,
    /// Weight decay [default: 0, 0.01 for adamw].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Adam's betas.
    #[arg(long, value_name = "B1,B2", default_value = "0.9,0.999")]
    pub betas: String,
    /// Adam's eps.
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// The AMSGrad variant of Adam/AdamW.
    #[arg(long)]
    pub amsgrad: bool,
    /// Samples per step (the last, partial batch is kept, as DataLoader's default).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Passes over the data.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Batches in file order instead of a seeded shuffle every epoch.
    #[arg(long)]
    pub no_shuffle: bool,
    /// Seed of the shuffle, the Dropout masks and (without --weights) the initial weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Initial weights (a `state_dict` in safetensors) [default: PyTorch's default init].
    #[arg(long, value_name = "INIT.safetensors")]
    pub weights: Option<PathBuf>,
    /// Write the trained weights here (a temporary file renamed into place).
    #[arg(long, value_name = "OUT.safetensors")]
    pub save: Option<PathBuf>,
    /// Run the training graph on the reference interpreter (f64 sums, the spec; many times
    /// slower) instead of the JIT.
    #[arg(long, conflicts_with = "jit")]
    pub interp: bool,
    /// Run the training graph JIT-compiled: the default (same numbers as the interpreter,
    /// within 1e-5).
    #[arg(long)]
    pub jit: bool,
    /// Threads of the JIT (0: all cores; the interpreter runs on one).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// One JSON object per step on stdout (epoch, step, loss), then a summary.
    #[arg(long)]
    pub json: bool,
}

/// A data set: inputs and targets (as f32; class indices are exact integers).
struct Data {
    x: ArrayD<f32>,
    y: ArrayD<f32>,
}

fn read_data(path: &Path, loss: LossArg) -> Result<Data, Fail> {
    let file =
        std::fs::File::open(path).map_err(|e| input(format!("cannot read `{}`: {}", path.display(), io_text(&e))))?;
    let targets = match loss {
        LossArg::CrossEntropy => Targets::Classes,
        LossArg::Mse => Targets::Floats("mse"),
        LossArg::BceWithLogits => Targets::Floats("bce_with_logits"),
    };
    let (x, y) = cnnc::data::read_npz(std::io::BufReader::new(file), targets)
        .map_err(|e| input(format!("`{}`{e}", path.display())))?;
    Ok(Data { x, y })
}

/// Checks the targets against the net's output and the loss, naming the file.
fn check_targets(path: &Path, data: &Data, graph: &Graph, loss: LossArg) -> Result<(), Fail> {
    let out = &graph.node(graph.outputs[0].1).ty;
    let n = data.x.shape()[0];
    let want: Vec<usize> = if loss == LossArg::CrossEntropy { vec![n] } else { out.concrete(n) };
    if data.y.shape() != want.as_slice() {
        let what = if loss == LossArg::CrossEntropy {
            "class indices".to_string()
        } else {
            format!("targets of the output's shape {out}")
        };
        return Err(input(format!(
            "`{}`: `y` has shape {:?}, but the loss needs {what}: {want:?}",
            path.display(),
            data.y.shape()
        )));
    }
    match loss {
        LossArg::CrossEntropy => {
            let classes = out.dims.first().copied().unwrap_or(0);
            if out.dims.len() != 1 {
                return Err(input(format!("cross_entropy needs logits [N, classes], but the net's output is {out}")));
            }
            if let Some((i, v)) = data.y.iter().enumerate().find(|(_, v)| **v as usize >= classes) {
                return Err(input(format!(
                    "`{}`: sample {i} has class index {v}, but the net has {classes} classes (0..{})",
                    path.display(),
                    classes.saturating_sub(1)
                )));
            }
        }
        LossArg::BceWithLogits => {
            if let Some((i, v)) = data.y.iter().enumerate().find(|(_, v)| !(0.0..=1.0).contains(*v)) {
                return Err(input(format!(
                    "`{}`: element {i} of `y` is {v}, but bce_with_logits targets must be in [0, 1]",
                    path.display()
                )));
            }
        }
        LossArg::Mse => {
            if let Some((i, v)) = data.y.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(input(format!("`{}`: element {i} of `y` is {v}", path.display())));
            }
        }
    }
    Ok(())
}

fn rows(a: &ArrayD<f32>, idx: &[usize]) -> ArrayD<f32> {
    a.select(Axis(0), idx).as_standard_layout().into_owned()
}

/// Correct predictions: argmax for class indices; `logit > 0` for BCE targets of 0/1.
fn correct(loss: LossArg, output: &ArrayD<f32>, y: &ArrayD<f32>) -> Option<usize> {
    match loss {
        LossArg::CrossEntropy => Some(
            output
                .outer_iter()
                .zip(y.iter())
                .filter(|(row, t)| {
                    let best = row
                        .iter()
                        .enumerate()
                        .fold((0, f32::NEG_INFINITY), |b, (i, v)| if *v > b.1 { (i, *v) } else { b });
                    best.0 as f32 == **t
                })
                .count(),
        ),
        LossArg::BceWithLogits => {
            let per = output.len() / output.shape()[0].max(1);
            let hits = output.iter().zip(y.iter()).filter(|(o, t)| (**o > 0.0) == (**t >= 0.5)).count();
            Some(hits / per.max(1))
        }
        LossArg::Mse => None,
    }
}

/// A seeded Fisher–Yates shuffle (SplitMix64).
fn shuffle(idx: &mut [usize], state: &mut u64) {
    let mut next = || {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..idx.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
}

#[derive(Serialize)]
struct StepJson {
    epoch: usize,
    step: u64,
    loss: f32,
}

#[derive(Serialize)]
struct EpochJson {
    epoch: usize,
    loss: f64,
    accuracy: Option<f64>,
    val_loss: Option<f64>,
    val_accuracy: Option<f64>,
    seconds: f64,
}

#[derive(Serialize)]
struct SummaryJson {
    net: String,
    steps: u64,
    epochs: Vec<EpochJson>,
    saved: Option<String>,
}

fn optimizer(args: &TrainArgs) -> Result<Optimizer, Fail> {
    let parse_betas = || -> Result<(f64, f64), Fail> {
        let parts: Vec<&str> = args.betas.split(',').collect();
        match parts.as_slice() {
            [a, b] => match (a.trim().parse(), b.trim().parse()) {
                (Ok(a), Ok(b)) => Ok((a, b)),
                _ => Err(usage(format!("--betas `{}`: expected two numbers, B1,B2", args.betas))),
            },
            _ => Err(usage(format!("--betas `{}`: expected two numbers, B1,B2", args.betas))),
        }
    };
    let opt = match args.optimizer {
        OptArg::Sgd => Optimizer::Sgd(Sgd {
            lr: args.lr.unwrap_or(0.01),
            momentum: args.momentum,
            dampening: args.dampening,
            nesterov: args.nesterov,
            weight_decay: args.weight_decay.unwrap_or(0.0),
        }),
        OptArg::Adam | OptArg::Adamw => {
            let decoupled = args.optimizer == OptArg::Adamw;
            Optimizer::Adam(Adam {
                lr: args.lr.unwrap_or(1e-3),
                betas: parse_betas()?,
                eps: args.eps,
                weight_decay: args.weight_decay.unwrap_or(if decoupled { 0.01 } else { 0.0 }),
                amsgrad: args.amsgrad,
                decoupled,
            })
        }
    };
    opt.validate().map_err(|e| usage(e.to_string()))?;
    Ok(opt)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into place.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Fail> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "weights".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| input(format!("cannot write `{}`: {}", tmp.display(), io_text(&e))))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        input(format!("cannot write `{}`: {}", path.display(), io_text(&e)))
    })
}

pub fn run(args: &TrainArgs) -> Result<(), Fail> {
    if args.batch_size == 0 {
        return Err(usage("--batch-size must be at least 1"));
    }
    let opt = optimizer(args)?;
    let (_, graph) = source::load_net(&args.net, &[])?;
    let data = read_data(&args.data, args.loss)?;
    check_targets(&args.data, &data, &graph, args.loss)?;
    let val = match &args.val {
        Some(p) => {
            let v = read_data(p, args.loss)?;
            check_targets(p, &v, &graph, args.loss)?;
            Some(v)
        }
        None => None,
    };
    let weights = crate::run::weights(&graph, args.weights.as_deref(), args.seed)?;
    let reduction = match args.reduction {
        ReductionArg::Mean => Reduction::Mean,
        ReductionArg::Sum => Reduction::Sum,
    };
    let loss = match args.loss {
        LossArg::Mse => Loss::Mse { reduction },
        LossArg::CrossEntropy => Loss::CrossEntropy { reduction, label_smoothing: args.label_smoothing },
        LossArg::BceWithLogits => Loss::BceWithLogits { reduction, pos_weight: None },
    };
    let mut trainer = Trainer::new(&graph, weights, loss, opt)?;
    if args.interp {
        trainer.use_interpreter();
    } else {
        trainer.use_jit(cnnc::runtime::Options { threads: args.threads, ..cnnc::runtime::Options::default() });
    }
    trainer.seed_dropout(args.seed);
    let n = data.x.shape()[0];
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = args.seed ^ 0x5348_5546_464c_4521;
    let batches = n.div_ceil(args.batch_size);
    let tty = std::io::stderr().is_terminal() && !args.json;
    let mut epochs = vec![];
    eprintln!(
        "{}: {} samples, {batches} batches of {} per epoch, {}, {} (training graph on the {})",
        graph.name,
        n,
        args.batch_size,
        trainer.optimizer().name(),
        args.loss.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string()),
        if args.interp { "interpreter" } else { "JIT" }
    );
    for epoch in 1..=args.epochs {
        let start = Instant::now();
        if !args.no_shuffle {
            shuffle(&mut order, &mut rng);
        }
        let bar = if tty {
            let bar = ProgressBar::with_draw_target(Some(batches as u64), ProgressDrawTarget::stderr());
            if let Ok(style) =
                ProgressStyle::with_template("epoch {prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} loss {msg}")
            {
                bar.set_style(style);
            }
            bar.set_prefix(epoch.to_string());
            bar
        } else {
            ProgressBar::hidden()
        };
        let (mut total, mut hits, mut counted) = (0f64, 0usize, false);
        trainer.train();
        for chunk in order.chunks(args.batch_size) {
            let (x, y) = (rows(&data.x, chunk), rows(&data.y, chunk));
            let step = trainer.step(x.view(), y.view())?;
            let per_sample = match reduction {
                Reduction::Mean => f64::from(step.loss) * chunk.len() as f64,
                Reduction::Sum => f64::from(step.loss),
            };
            total += per_sample;
            if let Some(c) = correct(args.loss, &step.output, &y) {
                hits += c;
                counted = true;
            }
            if args.json {
                crate::print_json_line(&StepJson { epoch, step: trainer.steps(), loss: step.loss })?;
            }
            bar.set_message(format!("{:.4}", step.loss));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let mut e = EpochJson {
            epoch,
            loss: total / n as f64,
            accuracy: counted.then(|| hits as f64 / n as f64),
            val_loss: None,
            val_accuracy: None,
            seconds: 0.0,
        };
        if let Some(v) = &val {
            let (mut vl, mut vh) = (0f64, 0usize);
            let vn = v.x.shape()[0];
            let idx: Vec<usize> = (0..vn).collect();
            for chunk in idx.chunks(args.batch_size.max(64)) {
                let (x, y) = (rows(&v.x, chunk), rows(&v.y, chunk));
                let (l, out) = trainer.evaluate(&[x.view()], y.view())?;
                vl += match reduction {
                    Reduction::Mean => f64::from(l) * chunk.len() as f64,
                    Reduction::Sum => f64::from(l),
                };
                vh += correct(args.loss, &out, &y).unwrap_or(0);
            }
            e.val_loss = Some(vl / vn as f64);
            e.val_accuracy = counted.then(|| vh as f64 / vn as f64);
        }
        e.seconds = start.elapsed().as_secs_f64();
        let pct = |a: Option<f64>| a.map_or(String::new(), |a| format!(", accuracy {:.2}%", a * 100.0));
        let valtext = e.val_loss.map_or(String::new(), |l| format!("; val loss {l:.4}{}", pct(e.val_accuracy)));
        eprintln!("epoch {epoch}: loss {:.4}{}{valtext} ({:.1} s)", e.loss, pct(e.accuracy), e.seconds);
        epochs.push(e);
    }
    if let Some(path) = &args.save {
        let bytes = trainer.weights().to_safetensors(&graph)?;
        write_atomically(path, &bytes)?;
        eprintln!("saved {}", path.display());
    }
    if args.json {
        crate::print_json_line(&SummaryJson {
            net: graph.name.clone(),
            steps: trainer.steps(),
            epochs,
            saved: args.save.as_ref().map(|p| p.display().to_string()),
        })?;
    }
    Ok(())
}
