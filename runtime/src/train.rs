//! Training: a [`Trainer`] runs the training graph that [`cnnc_compiler::autodiff`] builds
//! from a declared net and a loss, then applies a `torch.optim` optimizer ([`Optimizer`]) and
//! BatchNorm's running-statistics update, exactly as PyTorch's formulas do.
//!
//! A step is `optimizer.zero_grad(); loss = criterion(model(x), y); loss.backward();
//! optimizer.step()`: gradients are recomputed from zero every step, parameters without a
//! gradient (unused by the output) are left alone as torch.optim does, BatchNorm buffers are
//! not parameters. In [`Mode::Train`] BatchNorm normalises with the batch statistics and
//! updates `running_mean`/`running_var` (unbiased variance) with its `momentum` (a
//! cumulative average for `momentum=None`) and `num_batches_tracked`; Dropout multiplies by
//! a Bernoulli mask scaled by `1/(1 − p)` from a seeded generator (or a mask you give).
//!
//! The training graph (and the eval-mode loss of [`Trainer::evaluate`]) runs JIT-compiled
//! by default, with all cores; [`Trainer::use_interpreter`] runs it on the reference
//! interpreter (f64 accumulation, the spec) instead, and the interpreter also locates the
//! first non-finite tensor when a step fails. [`Trainer::compile`] gives the eval model of
//! the trained weights.

use crate::error::{Error, Result};
use crate::interp;
use crate::jit::{Compiled, Options};
use crate::weights::{Owned, ParamData, SplitMix64, Weights, decode_f32, decode_i64, format_error};
use cnnc_compiler::autodiff::{self, GradSpec, Mode, Seed, TrainGraph};
use cnnc_compiler::graph::{Graph, ParamId};
use cnnc_compiler::ops::train::Loss;
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

/// `torch.optim.SGD`'s settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0: none).
    pub momentum: f64,
    /// Dampening of the momentum.
    pub dampening: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
}

/// `torch.optim.Adam`'s and `torch.optim.AdamW`'s settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam {
    /// Learning rate.
    pub lr: f64,
    /// `(β1, β2)`.
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Weight decay: added to the gradient (Adam) or decoupled (AdamW).
    pub weight_decay: f64,
    /// The AMSGrad variant.
    pub amsgrad: bool,
    /// AdamW: `param *= 1 − lr·weight_decay` before the update.
    pub decoupled: bool,
}

/// An optimizer with torch.optim's update rule and state initialisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// `torch.optim.SGD`.
    Sgd(Sgd),
    /// `torch.optim.Adam` / `AdamW`.
    Adam(Adam),
}

impl Optimizer {
    /// `SGD(lr)` with PyTorch's defaults (no momentum, dampening or weight decay).
    pub fn sgd(lr: f64) -> Optimizer {
        Optimizer::Sgd(Sgd { lr, momentum: 0.0, dampening: 0.0, nesterov: false, weight_decay: 0.0 })
    }

    /// `Adam(lr)` with PyTorch's defaults (betas (0.9, 0.999), eps 1e-8, no weight decay).
    pub fn adam(lr: f64) -> Optimizer {
        Optimizer::Adam(Adam {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            decoupled: false,
        })
    }

    /// `AdamW(lr)` with PyTorch's defaults (weight decay 0.01).
    pub fn adamw(lr: f64) -> Optimizer {
        Optimizer::Adam(Adam {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
            amsgrad: false,
            decoupled: true,
        })
    }

    /// The PyTorch class name.
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Sgd(_) => "SGD",
            Optimizer::Adam(a) if a.decoupled => "AdamW",
            Optimizer::Adam(_) => "Adam",
        }
    }

    /// Checks the settings as torch.optim's constructors do.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Train(m));
        match self {
            Optimizer::Sgd(s) => {
                if !nonneg(s.lr) {
                    return bad(format!("SGD: invalid learning rate {}", s.lr));
                }
                if !nonneg(s.momentum) {
                    return bad(format!("SGD: invalid momentum {}", s.momentum));
                }
                if !nonneg(s.weight_decay) {
                    return bad(format!("SGD: invalid weight_decay {}", s.weight_decay));
                }
                if s.nesterov && (s.momentum <= 0.0 || s.dampening != 0.0) {
                    return bad("SGD: Nesterov momentum requires a momentum and zero dampening".into());
                }
            }
            Optimizer::Adam(a) => {
                let name = self.name();
                if !nonneg(a.lr) {
                    return bad(format!("{name}: invalid learning rate {}", a.lr));
                }
                if !nonneg(a.eps) {
                    return bad(format!("{name}: invalid epsilon {}", a.eps));
                }
                if !(0.0..1.0).contains(&a.betas.0) || !(0.0..1.0).contains(&a.betas.1) {
                    return bad(format!(
                        "{name}: invalid betas ({}, {}): each must be in [0, 1)",
                        a.betas.0, a.betas.1
                    ));
                }
                if !nonneg(a.weight_decay) {
                    return bad(format!("{name}: invalid weight_decay {}", a.weight_decay));
                }
            }
        }
        Ok(())
    }
}

/// `v ≥ 0` and not NaN.
fn nonneg(v: f64) -> bool {
    v >= 0.0
}

/// One parameter's optimizer state (torch.optim's `state[p]`).
#[derive(Clone, Debug, Default, PartialEq)]
struct ParamState {
    step: u64,
    momentum_buffer: Option<Vec<f32>>,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    max_exp_avg_sq: Vec<f32>,
}

impl Optimizer {
    /// Updates `param` in place from `grad`, as torch.optim's single-tensor CPU path does
    /// (f32 tensor arithmetic, scalars in f64), element by element with the same operations
    /// in the same order: branch-free loops the compiler vectorises, split over up to
    /// `threads` threads for large parameters (each element's arithmetic is independent, so
    /// the result does not depend on the split).
    fn update(&self, param: &mut [f32], grad: &[f32], st: &mut ParamState, threads: usize) {
        st.step += 1;
        let threads = if param.len() >= PARALLEL_UPDATE { threads.max(1) } else { 1 };
        match self {
            Optimizer::Sgd(s) => {
                // `d = g + wd·p`; with momentum `b = d` on the first step, else
                // `b = m·b + (1 − dampening)·d`, then `d = d + m·b` (Nesterov) or `d = b`;
                // `p = p − lr·d`.
                let c = SgdConsts {
                    wd: s.weight_decay as f32,
                    m: s.momentum as f32,
                    damp: (1.0 - s.dampening) as f32,
                    lr: -(s.lr as f32),
                };
                let first = st.momentum_buffer.is_none();
                let mut none = [];
                let buf: &mut [f32] = if s.momentum != 0.0 {
                    st.momentum_buffer.get_or_insert_with(|| vec![0.0; param.len()])
                } else {
                    &mut none
                };
                let momentum = !buf.is_empty();
                let (wd, nesterov) = (s.weight_decay != 0.0, s.nesterov);
                split_run(threads, [param, buf], grad, &|[p, b], g| match (momentum, wd, nesterov, first) {
                    (false, false, ..) => sgd_loop::<false, false, false, false>(p, g, b, c),
                    (false, true, ..) => sgd_loop::<false, true, false, false>(p, g, b, c),
                    (true, false, false, false) => sgd_loop::<true, false, false, false>(p, g, b, c),
                    (true, false, false, true) => sgd_loop::<true, false, false, true>(p, g, b, c),
                    (true, false, true, false) => sgd_loop::<true, false, true, false>(p, g, b, c),
                    (true, false, true, true) => sgd_loop::<true, false, true, true>(p, g, b, c),
                    (true, true, false, false) => sgd_loop::<true, true, false, false>(p, g, b, c),
                    (true, true, false, true) => sgd_loop::<true, true, false, true>(p, g, b, c),
                    (true, true, true, false) => sgd_loop::<true, true, true, false>(p, g, b, c),
                    (true, true, true, true) => sgd_loop::<true, true, true, true>(p, g, b, c),
                });
            }
            Optimizer::Adam(a) => {
                let n = param.len();
                if st.exp_avg.len() != n {
                    st.exp_avg = vec![0.0; n];
                    st.exp_avg_sq = vec![0.0; n];
                    if a.amsgrad {
                        st.max_exp_avg_sq = vec![0.0; n];
                    }
                }
                let (b1, b2) = a.betas;
                let step = st.step as i32;
                let bc1 = 1.0 - b1.powi(step);
                let bc2 = 1.0 - b2.powi(step);
                let c = AdamConsts {
                    // AdamW: `p *= 1 − lr·wd` before the update (1: none).
                    decay: if a.decoupled && a.weight_decay != 0.0 {
                        (1.0 - a.lr * a.weight_decay) as f32
                    } else {
                        1.0
                    },
                    step_size: (a.lr / bc1) as f32,
                    bc2_sqrt: bc2.sqrt() as f32,
                    w1: (1.0 - b1) as f32,
                    w2: (1.0 - b2) as f32,
                    b2: b2 as f32,
                    eps: a.eps as f32,
                    wd: a.weight_decay as f32,
                };
                let (l2, decoupled, ams) = (!a.decoupled && a.weight_decay != 0.0, c.decay != 1.0, a.amsgrad);
                let st = &mut *st;
                let mx: &mut [f32] = if ams { &mut st.max_exp_avg_sq } else { &mut [] };
                split_run(threads, [param, &mut st.exp_avg, &mut st.exp_avg_sq, mx], grad, &|[p, m, v, mx], g| match (
                    l2, decoupled, ams,
                ) {
                    (false, false, false) => adam_loop::<false, false, false>(p, g, m, v, mx, c),
                    (false, false, true) => adam_loop::<false, false, true>(p, g, m, v, mx, c),
                    (false, true, false) => adam_loop::<false, true, false>(p, g, m, v, mx, c),
                    (false, true, true) => adam_loop::<false, true, true>(p, g, m, v, mx, c),
                    (true, false, false) => adam_loop::<true, false, false>(p, g, m, v, mx, c),
                    (true, false, true) => adam_loop::<true, false, true>(p, g, m, v, mx, c),
                    (true, true, false) => adam_loop::<true, true, false>(p, g, m, v, mx, c),
                    (true, true, true) => adam_loop::<true, true, true>(p, g, m, v, mx, c),
                });
            }
        }
    }
}

/// Parameters from which an update is split over the trainer's threads (smaller ones cost
/// less than starting a thread).
const PARALLEL_UPDATE: usize = 1 << 18;

/// Runs `f` on `threads` equal runs of `slices` (each as long as `grad`, or empty, then
/// passed empty) and `grad`, the first on this thread.
fn split_run<const K: usize>(
    threads: usize,
    slices: [&mut [f32]; K],
    grad: &[f32],
    f: &(impl Fn([&mut [f32]; K], &[f32]) + Sync),
) {
    let n = grad.len();
    if threads <= 1 || n < 2 * 64 {
        return f(slices, grad);
    }
    // Runs of whole cache lines.
    let per = n.div_ceil(threads).next_multiple_of(16);
    let mut rest = slices;
    let mut g = grad;
    std::thread::scope(|scope| {
        let mut mine = None;
        while !g.is_empty() {
            let take = per.min(g.len());
            let (gh, gt) = g.split_at(take);
            g = gt;
            let head: [&mut [f32]; K] = std::array::from_fn(|k| {
                let s = std::mem::take(&mut rest[k]);
                if s.is_empty() {
                    s
                } else {
                    let (h, t) = s.split_at_mut(take);
                    rest[k] = t;
                    h
                }
            });
            if mine.is_none() {
                mine = Some((head, gh));
            } else {
                scope.spawn(move || f(head, gh));
            }
        }
        if let Some((h, gh)) = mine {
            f(h, gh);
        }
    });
}

/// SGD's scalars in f32.
#[derive(Clone, Copy)]
struct SgdConsts {
    wd: f32,
    m: f32,
    damp: f32,
    /// `−lr`.
    lr: f32,
}

/// SGD on a run of elements (`b` the momentum buffer's run, empty without momentum).
#[inline(always)]
fn sgd_loop<const MOMENTUM: bool, const WD: bool, const NESTEROV: bool, const FIRST: bool>(
    p: &mut [f32],
    g: &[f32],
    b: &mut [f32],
    c: SgdConsts,
) {
    if MOMENTUM {
        for ((p, g), b) in p.iter_mut().zip(g).zip(b.iter_mut()) {
            let mut d = *g;
            if WD {
                d += c.wd * *p;
            }
            *b = if FIRST { d } else { *b * c.m + c.damp * d };
            d = if NESTEROV { d + c.m * *b } else { *b };
            *p += c.lr * d;
        }
    } else {
        for (p, g) in p.iter_mut().zip(g) {
            let mut d = *g;
            if WD {
                d += c.wd * *p;
            }
            *p += c.lr * d;
        }
    }
}

/// Adam's scalars in f32.
#[derive(Clone, Copy)]
struct AdamConsts {
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    w1: f32,
    w2: f32,
    b2: f32,
    eps: f32,
    wd: f32,
}

/// Adam on a run of elements (`mx` the AMSGrad maxima's run, empty without AMSGrad).
#[inline(always)]
fn adam_loop<const L2: bool, const DECOUPLED: bool, const AMS: bool>(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    mx: &mut [f32],
    c: AdamConsts,
) {
    let step = |p: &mut f32, g: f32, m: &mut f32, v: &mut f32, mx: Option<&mut f32>| {
        if DECOUPLED {
            *p *= c.decay;
        }
        let mut g = g;
        if L2 {
            g += c.wd * *p;
        }
        *m += c.w1 * (g - *m);
        *v = *v * c.b2 + c.w2 * g * g;
        let v = match mx {
            Some(mx) => {
                *mx = mx.max(*v);
                *mx
            }
            None => *v,
        };
        let denom = v.sqrt() / c.bc2_sqrt + c.eps;
        *p += -c.step_size * (*m / denom);
    };
    if AMS {
        for ((((p, g), m), v), mx) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()).zip(mx.iter_mut()) {
            step(p, *g, m, v, Some(mx));
        }
    } else {
        for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            step(p, *g, m, v, None);
        }
    }
}

/// Whether every value is finite: `v·0` is 0 for a finite `v` and NaN otherwise, summed in
/// 16 independent lanes (a loop the compiler vectorises; 44 MB of gradients in ~3 ms).
fn all_finite(s: &[f32]) -> bool {
    let mut acc = [0f32; 16];
    let mut chunks = s.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += *v * 0.0;
        }
    }
    acc.iter().chain(chunks.remainder()).all(|v| v.is_finite())
}

/// The result of a training step.
#[derive(Clone, Debug)]
pub struct Step {
    /// The loss before the update.
    pub loss: f32,
    /// The net's output (the prediction the loss read), before the update.
    pub output: ArrayD<f32>,
}

/// A loss and the gradients of every learnable parameter, by `state_dict` key.
#[derive(Clone, Debug)]
pub struct Gradients {
    /// The loss.
    pub loss: f32,
    /// The net's output.
    pub output: ArrayD<f32>,
    /// `(key, gradient)` in `state_dict` order.
    pub grads: Vec<(String, ArrayD<f32>)>,
}

/// BatchNorm's running-statistics update after a training-mode forward, as PyTorch's:
/// `num_batches_tracked += 1`, then with `m = momentum` (or `1/num_batches_tracked` for
/// `momentum=None`) `running_mean = (1 − m)·running_mean + m·mean` and `running_var =
/// (1 − m)·running_var + m·var·n/(n − 1)` (the unbiased variance over `n = N·H·W` values),
/// in f64. `stats` pairs an index into [`TrainGraph::bn_stats`] with that layer's `[2, C]`
/// batch statistics output.
pub fn update_running_stats(
    weights: &mut Weights,
    tg: &TrainGraph,
    stats: &[(usize, ArrayD<f32>)],
    batch: usize,
) -> Result<()> {
    for (k, st) in stats {
        let s = tg.bn_stats.get(*k).ok_or_else(|| Error::Train(format!("no BatchNorm #{k} in the training graph")))?;
        let c = st.shape().get(1).copied().unwrap_or(0);
        if st.shape() != [2, s.bn.num_features] {
            return Err(Error::Train(format!("BatchNorm2d `{}`: statistics of shape {:?}", s.node, st.shape())));
        }
        let nbt = weights.get(s.num_batches_tracked).as_i64().and_then(|a| a.iter().next().copied()).unwrap_or(0) + 1;
        weights.set(s.num_batches_tracked, ParamData::I64(ArrayD::from_elem(IxDyn(&[]), nbt)))?;
        let factor = if s.bn.momentum.is_nan() { 1.0 / nbt as f64 } else { s.bn.momentum };
        let n = (batch * s.plane) as f64;
        let (Some(rm), Some(rv)) = (weights.f32(s.running_mean), weights.f32(s.running_var)) else {
            return Err(Error::Train(format!("BatchNorm2d `{}` has no running statistics", s.node)));
        };
        let (mut rm, mut rv) = (rm.clone(), rv.clone());
        for ch in 0..c {
            let (mean, var) = (f64::from(st[[0, ch]]), f64::from(st[[1, ch]]));
            let unbiased = var * n / (n - 1.0);
            rm[[ch]] = (factor * mean + (1.0 - factor) * f64::from(rm[[ch]])) as f32;
            rv[[ch]] = (factor * unbiased + (1.0 - factor) * f64::from(rv[[ch]])) as f32;
        }
        weights.set(s.running_mean, ParamData::F32(rm))?;
        weights.set(s.running_var, ParamData::F32(rv))?;
    }
    Ok(())
}

/// The training graph's inputs in its order: the forward's inputs, the target (or output
/// gradient) at [`TrainGraph::seed_input`], each mask at its [`MaskInput`] index.
///
/// [`MaskInput`]: cnnc_compiler::autodiff::MaskInput
pub fn assemble<'b>(
    tg: &TrainGraph,
    inputs: &'b [ArrayViewD<'_, f32>],
    seed: &'b ArrayViewD<'_, f32>,
    masks: &'b [ArrayViewD<'_, f32>],
) -> Result<Vec<ArrayViewD<'b, f32>>> {
    let n = tg.graph.inputs.len();
    let forward = n - 1 - tg.masks.len();
    if inputs.len() != forward || masks.len() != tg.masks.len() {
        return Err(Error::InputCount { net: tg.graph.name.clone(), expected: forward, got: inputs.len() });
    }
    let mut all: Vec<Option<ArrayViewD<'b, f32>>> = vec![None; n];
    let mut rest = inputs.iter();
    for (i, slot) in all.iter_mut().enumerate() {
        if i != tg.seed_input && !tg.masks.iter().any(|m| m.input == i) {
            *slot = rest.next().map(|a| a.view());
        }
    }
    all[tg.seed_input] = Some(seed.view());
    for (m, v) in tg.masks.iter().zip(masks) {
        all[m.input] = Some(v.view());
    }
    all.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| Error::InputCount {
        net: tg.graph.name.clone(),
        expected: forward,
        got: inputs.len(),
    })
}

/// Trains a declared net (see the module docs).
#[derive(Debug)]
pub struct Trainer {
    forward: Graph,
    loss: Loss,
    output: Option<String>,
    graphs: HashMap<Mode, TrainGraph>,
    eval_loss: Option<TrainGraph>,
    /// The eval graph JIT-compiled, with the weights version it holds.
    eval_compiled: Option<(Compiled, u64)>,
    weights: Weights,
    optimizer: Optimizer,
    state: Vec<ParamState>,
    mode: Mode,
    rng: SplitMix64,
    steps: u64,
    /// With `Some` (the default), training graphs run JIT-compiled with these options (else
    /// on the interpreter).
    jit: Option<Options>,
    /// Compiled training graphs per mode, with the weights version they hold.
    compiled: HashMap<Mode, (Compiled, u64)>,
    /// Bumped whenever the weights change.
    version: u64,
    /// The last JIT run's output arrays, handed back to the next run to write into
    /// ([`Compiled::run_reusing`]): gradients of the same shapes every step need no new
    /// pages.
    spare: Vec<ArrayD<f32>>,
}

fn dropout_mask(rng: &mut SplitMix64, p: f64, shape: &[usize]) -> ArrayD<f32> {
    if p >= 1.0 {
        return ArrayD::zeros(IxDyn(shape));
    }
    let keep = (1.0 / (1.0 - p)) as f32;
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        if u < 1.0 - p { keep } else { 0.0 }
    })
}

impl Trainer {
    /// A trainer for `graph` (as declared, not fused) starting from `weights`, minimising
    /// `loss` of its only output with `optimizer`, in training mode.
    ///
    /// Errors: [`Error::Autodiff`] (a fused graph, a loss that does not fit the output, a net
    /// with no learnable parameter), [`Error::Weights`], [`Error::Train`] for invalid
    /// optimizer settings.
    pub fn new(graph: &Graph, weights: Weights, loss: Loss, optimizer: Optimizer) -> Result<Trainer> {
        Trainer::for_output(graph, weights, loss, optimizer, None)
    }

    /// As [`Trainer::new`], for the named output of a net with several.
    pub fn for_output(
        graph: &Graph,
        weights: Weights,
        loss: Loss,
        optimizer: Optimizer,
        output: Option<&str>,
    ) -> Result<Trainer> {
        optimizer.validate()?;
        weights.check(graph)?;
        let mut t = Trainer {
            forward: graph.clone(),
            loss,
            output: output.map(str::to_string),
            graphs: HashMap::new(),
            eval_loss: None,
            eval_compiled: None,
            weights,
            optimizer,
            state: vec![ParamState::default(); graph.params.len()],
            mode: Mode::Train,
            rng: SplitMix64(0x5eed_d209),
            steps: 0,
            jit: Some(Options { fuse: false, ..Options::default() }),
            compiled: HashMap::new(),
            version: 0,
            spare: vec![],
        };
        t.graph_for(Mode::Train)?;
        Ok(t)
    }

    fn graph_for(&mut self, mode: Mode) -> Result<&TrainGraph> {
        if !self.graphs.contains_key(&mode) {
            let spec = GradSpec {
                seed: Seed::Loss(self.loss.clone()),
                output: self.output.clone(),
                mode,
                params: true,
                wrt: vec![],
            };
            let tg = autodiff::build(&self.forward, &spec)?;
            self.graphs.insert(mode, tg);
        }
        Ok(&self.graphs[&mode])
    }

    /// Runs the training graphs JIT-compiled with `options` (threads, kernels; fusion never
    /// applies to a training graph); the default is `Options::default()`. Each mode's
    /// graph is compiled on its first step; after every optimizer step the compiled code
    /// takes the new weights in place ([`Compiled::set_weights`]).
    pub fn use_jit(&mut self, options: Options) {
        self.jit = Some(Options { fuse: false, ..options });
        self.compiled.clear();
        self.eval_compiled = None;
    }

    /// Runs the training graphs on the reference interpreter (f64 accumulation, the spec;
    /// slower).
    pub fn use_interpreter(&mut self) {
        self.jit = None;
        self.compiled.clear();
        self.eval_compiled = None;
    }

    /// `model.train()`: BatchNorm uses and updates batch statistics, Dropout drops.
    pub fn train(&mut self) {
        self.mode = Mode::Train;
    }

    /// `model.eval()`: steps use the running statistics and no Dropout.
    pub fn eval(&mut self) {
        self.mode = Mode::Eval;
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Reseeds the generator of Dropout masks.
    pub fn seed_dropout(&mut self, seed: u64) {
        self.rng = SplitMix64(seed);
    }

    /// The current weights (parameters and buffers), for the forward graph.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The net being trained.
    pub fn graph(&self) -> &Graph {
        &self.forward
    }

    /// The training graph of the current mode.
    pub fn training_graph(&mut self) -> Result<&TrainGraph> {
        self.graph_for(self.mode)
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// One step on a single-input net: forward, loss, backward, update. `target` holds class
    /// indices `[N]` (as floats) for cross-entropy, else the prediction's shape.
    pub fn step<'a>(&mut self, x: ArrayViewD<'a, f32>, target: ArrayViewD<'a, f32>) -> Result<Step> {
        self.step_with(&[x], target, None)
    }

    /// One step with every forward input and, optionally, the Dropout masks (one per
    /// Dropout layer, in [`TrainGraph::masks`] order, each of the layer's shape, holding 0
    /// or `1/(1 − p)`); without masks they are drawn from the trainer's generator.
    pub fn step_with<'a>(
        &mut self,
        inputs: &[ArrayViewD<'a, f32>],
        target: ArrayViewD<'a, f32>,
        masks: Option<&[ArrayViewD<'a, f32>]>,
    ) -> Result<Step> {
        let (loss, output, grads, stats, batch) = self.run(inputs, target.clone(), masks)?;
        let step = self.steps + 1;
        if !loss.is_finite() {
            return Err(self.non_finite(step, "the loss", inputs, target.clone(), masks));
        }
        let finite = |g: &ArrayD<f32>| match g.as_slice() {
            Some(s) => all_finite(s),
            None => g.iter().all(|v| v.is_finite()),
        };
        if !grads.iter().all(|(_, g)| finite(g)) {
            return Err(self.non_finite(step, "a gradient", inputs, target, masks));
        }
        self.steps = step;
        let threads = match self.jit.as_ref().map_or(1, |o| o.threads) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            t => t,
        };
        for (pid, g) in &grads {
            let gs = g.as_slice().ok_or_else(|| Error::Train("a gradient is not contiguous".into()))?;
            let ps = self
                .weights
                .f32_values_mut(*pid)
                .ok_or_else(|| Error::Train("a gradient of a non-float parameter".into()))?;
            self.optimizer.update(ps, gs, &mut self.state[pid.0], threads);
        }
        self.update_running_stats(&stats, batch)?;
        self.version += 1;
        // The gradient and statistics arrays go back where the next run writes its outputs.
        if let Some(tg) = self.graphs.get(&self.mode) {
            for ((_, i), (_, g)) in tg.param_grads.iter().zip(grads) {
                if let Some(slot) = self.spare.get_mut(*i) {
                    *slot = g;
                }
            }
            for (k, a) in stats {
                if let Some(slot) = tg.bn_stats.get(k).and_then(|s| self.spare.get_mut(s.output)) {
                    *slot = a;
                }
            }
        }
        Ok(Step { loss, output })
    }

    /// The loss, the output and every learnable parameter's gradient, without updating
    /// anything (`loss.backward()` alone; BatchNorm's running statistics are not touched).
    pub fn gradients<'a>(
        &mut self,
        inputs: &[ArrayViewD<'a, f32>],
        target: ArrayViewD<'a, f32>,
        masks: Option<&[ArrayViewD<'a, f32>]>,
    ) -> Result<Gradients> {
        let (loss, output, grads, _, _) = self.run(inputs, target.clone(), masks)?;
        let grads = grads.into_iter().map(|(p, g)| (self.forward.param(p).name.clone(), g)).collect();
        Ok(Gradients { loss, output, grads })
    }

    /// The loss and output in eval mode, with no gradient (`with torch.no_grad()` after
    /// `model.eval()`).
    pub fn evaluate<'a>(
        &mut self,
        inputs: &[ArrayViewD<'a, f32>],
        target: ArrayViewD<'a, f32>,
    ) -> Result<(f32, ArrayD<f32>)> {
        if self.eval_loss.is_none() {
            let spec = GradSpec {
                seed: Seed::Loss(self.loss.clone()),
                output: self.output.clone(),
                mode: Mode::Eval,
                params: false,
                wrt: vec![],
            };
            self.eval_loss = Some(autodiff::build(&self.forward, &spec)?);
        }
        let tg = self.eval_loss.as_ref().ok_or_else(|| Error::Train("no eval graph".into()))?;
        self.check_target(&target)?;
        let all = assemble(tg, inputs, &target, &[])?;
        let outs = match &self.jit {
            None => interp::run(&tg.graph, &self.weights, &all)?,
            Some(options) => {
                let entry = match &mut self.eval_compiled {
                    Some(e) => e,
                    slot @ None => slot.insert((Compiled::new(&tg.graph, &self.weights, options)?, self.version)),
                };
                if entry.1 != self.version {
                    entry.0.set_weights(&self.weights)?;
                    entry.1 = self.version;
                }
                entry.0.run(&all)?
            }
        };
        let loss = tg.loss.map_or(f32::NAN, |i| outs[i][0]);
        Ok((loss, outs[tg.prediction].clone()))
    }

    /// An eval-mode JIT-compiled model of the current weights.
    pub fn compile(&self, options: &Options) -> Result<Compiled> {
        Compiled::new(&self.forward, &self.weights, options)
    }

    fn check_target(&self, target: &ArrayViewD<'_, f32>) -> Result<()> {
        match &self.loss {
            Loss::BceWithLogits { .. } => {
                if let Some((i, v)) = target.iter().enumerate().find(|(_, v)| !(0.0..=1.0).contains(*v)) {
                    return Err(Error::Target(format!(
                        "element {i} is {v}; BCEWithLogitsLoss targets must be in [0, 1]"
                    )));
                }
            }
            Loss::Mse { .. } => {
                if let Some((i, v)) = target.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                    return Err(Error::Target(format!("element {i} is {v}; MSELoss targets must be finite")));
                }
            }
            Loss::CrossEntropy { .. } => {
                let classes = self
                    .output_type()
                    .and_then(|t| t.dims.first().copied())
                    .ok_or_else(|| Error::Train("cross-entropy needs logits [N, C]".into()))?;
                if let Some((i, v)) = target
                    .iter()
                    .enumerate()
                    .find(|(_, v)| v.fract() != 0.0 || **v < 0.0 || f64::from(**v) >= classes as f64)
                {
                    return Err(Error::Target(format!(
                        "sample {i}: class index {v} is not an integer in 0..{classes} (the logits have {classes} classes)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The type of the output the loss reads.
    fn output_type(&self) -> Option<&cnnc_compiler::shape::TensorType> {
        let (_, id) = match &self.output {
            Some(name) => self.forward.outputs.iter().find(|(n, _)| n == name)?,
            None => self.forward.outputs.first()?,
        };
        Some(&self.forward.node(*id).ty)
    }

    #[allow(clippy::type_complexity)]
    fn run<'a>(
        &mut self,
        inputs: &[ArrayViewD<'a, f32>],
        target: ArrayViewD<'a, f32>,
        masks: Option<&[ArrayViewD<'a, f32>]>,
    ) -> Result<(f32, ArrayD<f32>, Vec<(ParamId, ArrayD<f32>)>, Vec<(usize, ArrayD<f32>)>, usize)> {
        self.check_target(&target)?;
        let mode = self.mode;
        self.graph_for(mode)?;
        let batch = interp::check_inputs(&self.forward, inputs)?;
        let tg = &self.graphs[&mode];
        for s in &tg.bn_stats {
            if batch * s.plane <= 1 {
                return Err(Error::Train(format!(
                    "BatchNorm2d `{}` in training mode needs more than 1 value per channel, got input batch {batch} of {} pixel(s)",
                    s.node, s.plane
                )));
            }
        }
        let drawn: Vec<ArrayD<f32>> = match masks {
            Some(m) if m.len() != tg.masks.len() => {
                return Err(Error::Train(format!("{} Dropout mask(s) given, the net has {}", m.len(), tg.masks.len())));
            }
            Some(_) => vec![],
            None => tg
                .masks
                .iter()
                .map(|m| {
                    let ty = &tg.graph.node(tg.graph.inputs[m.input].1).ty;
                    dropout_mask(&mut self.rng, m.p, &ty.concrete(batch))
                })
                .collect(),
        };
        let mask_views: Vec<_> = match masks {
            Some(m) => m.iter().map(|a| a.view()).collect(),
            None => drawn.iter().map(|a| a.view()).collect(),
        };
        let all = assemble(tg, inputs, &target, &mask_views)?;
        let mut outs = match &self.jit {
            None => interp::run(&tg.graph, &self.weights, &all)?,
            Some(options) => {
                let entry = match self.compiled.entry(mode) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert((Compiled::new(&tg.graph, &self.weights, options)?, self.version))
                    }
                };
                if entry.1 != self.version {
                    entry.0.set_weights(&self.weights)?;
                    entry.1 = self.version;
                }
                entry.0.run_reusing(&all, std::mem::take(&mut self.spare))?
            }
        };
        let loss = tg.loss.map_or(f32::NAN, |i| outs[i][0]);
        let output = outs[tg.prediction].clone();
        let grads = tg.param_grads.iter().map(|(p, i)| (*p, std::mem::take(&mut outs[*i]))).collect();
        let stats = tg.bn_stats.iter().enumerate().map(|(k, s)| (k, std::mem::take(&mut outs[s.output]))).collect();
        if self.jit.is_some() {
            self.spare = outs;
        }
        Ok((loss, output, grads, stats, batch))
    }

    fn non_finite<'a>(
        &mut self,
        step: u64,
        what: &str,
        inputs: &[ArrayViewD<'a, f32>],
        target: ArrayViewD<'a, f32>,
        masks: Option<&[ArrayViewD<'a, f32>]>,
    ) -> Error {
        let tensor = (|| -> Result<Option<String>> {
            let tg = &self.graphs[&self.mode];
            let batch = interp::check_inputs(&self.forward, inputs)?;
            let drawn: Vec<ArrayD<f32>> = tg
                .masks
                .iter()
                .map(|m| ArrayD::ones(IxDyn(&tg.graph.node(tg.graph.inputs[m.input].1).ty.concrete(batch))))
                .collect();
            let mask_views: Vec<_> = match masks {
                Some(m) => m.iter().map(|a| a.view()).collect(),
                None => drawn.iter().map(|a| a.view()).collect(),
            };
            let all = assemble(tg, inputs, &target, &mask_views)?;
            interp::first_non_finite(&tg.graph, &self.weights, &all)
        })();
        let tensor = match tensor {
            Ok(Some(t)) => t,
            Ok(None) => "(none found on a re-run)".into(),
            Err(e) => format!("(unknown: {e})"),
        };
        Error::NonFinite { step, what: what.into(), tensor }
    }

    fn update_running_stats(&mut self, stats: &[(usize, ArrayD<f32>)], batch: usize) -> Result<()> {
        let Some(tg) = self.graphs.get(&self.mode) else { return Ok(()) };
        update_running_stats(&mut self.weights, tg, stats, batch)
    }

    /// torch.optim's state as safetensors: per parameter `<key>.step` (I64) and, as the
    /// optimizer has them, `<key>.momentum_buffer`, `<key>.exp_avg`, `<key>.exp_avg_sq`,
    /// `<key>.max_exp_avg_sq`; the metadata names the optimizer and the steps taken.
    pub fn optimizer_state(&self) -> Result<Vec<u8>> {
        let mut tensors: Vec<(String, Owned)> = vec![];
        let f32s = |v: &[f32], shape: &[usize]| Owned {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        for (p, st) in self.forward.params.iter().zip(&self.state) {
            if st.step == 0 {
                continue;
            }
            let shape = &p.spec.shape;
            tensors.push((
                format!("{}.step", p.name),
                Owned { dtype: Dtype::I64, shape: vec![], bytes: (st.step as i64).to_le_bytes().to_vec() },
            ));
            if let Some(b) = &st.momentum_buffer {
                tensors.push((format!("{}.momentum_buffer", p.name), f32s(b, shape)));
            }
            for (suffix, v) in
                [("exp_avg", &st.exp_avg), ("exp_avg_sq", &st.exp_avg_sq), ("max_exp_avg_sq", &st.max_exp_avg_sq)]
            {
                if !v.is_empty() {
                    tensors.push((format!("{}.{suffix}", p.name), f32s(v, shape)));
                }
            }
        }
        let metadata = HashMap::from([
            ("optimizer".to_string(), self.optimizer.name().to_string()),
            ("steps".to_string(), self.steps.to_string()),
        ]);
        safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
            .map_err(|e| Error::Weights(format_error(e)))
    }

    /// Restores [`Trainer::optimizer_state`] (to resume training). The state must come from
    /// the same optimizer kind and fit the net's parameters; nothing changes on an error.
    pub fn load_optimizer_state(&mut self, bytes: &[u8]) -> Result<()> {
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| Error::Weights(format_error(e)))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let kind = meta.get("optimizer").map(String::as_str).unwrap_or("(none)");
        if kind != self.optimizer.name() {
            return Err(Error::OptimizerState(format!(
                "saved by {kind}, but this trainer uses {}",
                self.optimizer.name()
            )));
        }
        let steps: u64 = meta
            .get("steps")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::OptimizerState("the metadata has no step count".into()))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Weights(format_error(e)))?;
        let index: HashMap<&str, usize> =
            self.forward.params.iter().enumerate().map(|(i, p)| (p.name.as_str(), i)).collect();
        let mut state = vec![ParamState::default(); self.forward.params.len()];
        for (key, view) in st.iter() {
            let Some((pname, field)) = key.rsplit_once('.') else {
                return Err(Error::OptimizerState(format!("unexpected key `{key}`")));
            };
            let Some(&i) = index.get(pname) else {
                return Err(Error::OptimizerState(format!("`{key}`: the net has no parameter `{pname}`")));
            };
            let p = &self.forward.params[i];
            let s = &mut state[i];
            if field == "step" {
                let v = decode_i64(key, view.dtype(), view.data())?;
                s.step = v
                    .first()
                    .copied()
                    .filter(|v| *v > 0)
                    .ok_or_else(|| Error::OptimizerState(format!("`{key}` is not a positive count")))?
                    as u64;
                continue;
            }
            if view.shape() != p.spec.shape.as_slice() {
                return Err(Error::OptimizerState(format!(
                    "`{key}`: expected shape {:?}, found {:?}",
                    p.spec.shape,
                    view.shape()
                )));
            }
            let v = decode_f32(key, view.dtype(), view.data())?;
            match field {
                "momentum_buffer" => s.momentum_buffer = Some(v),
                "exp_avg" => s.exp_avg = v,
                "exp_avg_sq" => s.exp_avg_sq = v,
                "max_exp_avg_sq" => s.max_exp_avg_sq = v,
                _ => return Err(Error::OptimizerState(format!("unexpected key `{key}`"))),
            }
        }
        self.state = state;
        self.steps = steps;
        Ok(())
    }

    /// Writes [`Trainer::optimizer_state`] to a file.
    pub fn save_optimizer_state(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.optimizer_state()?)
            .map_err(|source| Error::Weights(crate::WeightsError::Io { path: path.display().to_string(), source }))
    }

    /// Reads a file written by [`Trainer::save_optimizer_state`].
    pub fn load_optimizer_state_file(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|source| Error::Weights(crate::WeightsError::Io { path: path.display().to_string(), source }))?;
        self.load_optimizer_state(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch.optim's SGD and Adam element by element, written plainly (the spec the
    /// vectorised, split loops must reproduce bit for bit).
    fn reference(opt: &Optimizer, p: &mut [f32], g: &[f32], st: &mut ParamState) {
        st.step += 1;
        match opt {
            Optimizer::Sgd(s) => {
                let first = st.momentum_buffer.is_none();
                let n = p.len();
                for i in 0..n {
                    let mut d = g[i];
                    if s.weight_decay != 0.0 {
                        d += s.weight_decay as f32 * p[i];
                    }
                    if s.momentum != 0.0 {
                        let buf = st.momentum_buffer.get_or_insert_with(|| vec![0.0; n]);
                        let b = &mut buf[i];
                        *b = if first { d } else { *b * s.momentum as f32 + (1.0 - s.dampening) as f32 * d };
                        d = if s.nesterov { d + s.momentum as f32 * *b } else { *b };
                    }
                    p[i] += -(s.lr as f32) * d;
                }
            }
            Optimizer::Adam(a) => {
                let n = p.len();
                if st.exp_avg.len() != n {
                    st.exp_avg = vec![0.0; n];
                    st.exp_avg_sq = vec![0.0; n];
                    if a.amsgrad {
                        st.max_exp_avg_sq = vec![0.0; n];
                    }
                }
                if a.decoupled && a.weight_decay != 0.0 {
                    p.iter_mut().for_each(|v| *v *= (1.0 - a.lr * a.weight_decay) as f32);
                }
                let (b1, b2) = a.betas;
                let bc1 = 1.0 - b1.powi(st.step as i32);
                let bc2 = 1.0 - b2.powi(st.step as i32);
                for i in 0..n {
                    let mut g = g[i];
                    if !a.decoupled && a.weight_decay != 0.0 {
                        g += a.weight_decay as f32 * p[i];
                    }
                    let m = &mut st.exp_avg[i];
                    *m += (1.0 - b1) as f32 * (g - *m);
                    let v = &mut st.exp_avg_sq[i];
                    *v = *v * b2 as f32 + (1.0 - b2) as f32 * g * g;
                    let v = if a.amsgrad {
                        let mx = &mut st.max_exp_avg_sq[i];
                        *mx = mx.max(*v);
                        *mx
                    } else {
                        *v
                    };
                    let denom = v.sqrt() / bc2.sqrt() as f32 + a.eps as f32;
                    p[i] += -((a.lr / bc1) as f32) * (st.exp_avg[i] / denom);
                }
            }
        }
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64(seed);
        (0..n).map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0).collect()
    }

    #[test]
    fn every_optimizer_variant_updates_as_the_plain_loops_on_any_thread_count() {
        let sgd = |momentum, dampening, nesterov, weight_decay| {
            Optimizer::Sgd(Sgd { lr: 0.05, momentum, dampening, nesterov, weight_decay })
        };
        let adam = |weight_decay, amsgrad, decoupled| {
            Optimizer::Adam(Adam { lr: 0.01, betas: (0.9, 0.99), eps: 1e-8, weight_decay, amsgrad, decoupled })
        };
        let opts = [
            sgd(0.0, 0.0, false, 0.0),
            sgd(0.0, 0.0, false, 0.01),
            sgd(0.9, 0.0, false, 0.0),
            sgd(0.9, 0.1, false, 0.01),
            sgd(0.9, 0.0, true, 0.0),
            sgd(0.9, 0.0, true, 0.01),
            adam(0.0, false, false),
            adam(0.01, false, false),
            adam(0.0, true, false),
            adam(0.01, true, false),
            adam(0.01, false, true),
            adam(0.01, true, true),
        ];
        // Small (one run) and large (split over threads, with a ragged last run) parameters.
        for n in [37, PARALLEL_UPDATE + 1000] {
            for opt in &opts {
                let init = values(n, 1);
                let (mut want, mut want_st) = (init.clone(), ParamState::default());
                for step in 0..3 {
                    reference(opt, &mut want, &values(n, 10 + step), &mut want_st);
                }
                for threads in [1, 2, 3] {
                    let (mut p, mut st) = (init.clone(), ParamState::default());
                    for step in 0..3 {
                        opt.update(&mut p, &values(n, 10 + step), &mut st, threads);
                    }
                    let same = p.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{opt:?}, {n} values, {threads} thread(s)");
                    assert_eq!(st, want_st, "{opt:?}, {n} values, {threads} thread(s): state");
                }
            }
        }
    }

    #[test]
    fn all_finite_finds_every_non_finite_value() {
        for n in [0, 1, 15, 16, 17, 100] {
            let v = values(n, 3);
            assert!(all_finite(&v), "{n}");
            for i in 0..n {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut w = v.clone();
                    w[i] = bad;
                    assert!(!all_finite(&w), "{n} values, {bad} at {i}");
                }
            }
        }
        assert!(all_finite(&[f32::MAX, f32::MIN, -0.0, f32::MIN_POSITIVE]));
    }
}
