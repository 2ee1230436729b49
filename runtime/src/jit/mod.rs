//! The Cranelift backend: every op of a [`Graph`] becomes a native kernel specialised to its
//! exact shapes, and [`Compiled`] runs them over a planned arena.
//!
//! # Pipeline (files of this module)
//!
//! 1. [`Graph::verify`], [`Weights::check`]; the micro-kernel ISA is picked
//!    (`microkernel/`: AVX-512F, else AVX2+FMA, else none — or as [`Kernels`] forces);
//! 2. `plan.rs`: a slot for every value, Flatten/Dropout aliased away, each image value's
//!    layout chosen (plain NCHW, or blocked NCHW16c where the micro-kernels read and write
//!    it) with reorder steps where producer and consumer disagree, arena offsets by
//!    liveness;
//! 3. `lower.rs` (the dispatcher, the only `match` on the op): one kernel per planned step,
//!    from one of the kernel tiers, each a folder. `blocked/`: with a micro-kernel ISA,
//!    Conv2d and Linear are loop nests over the hand-written register tiles of
//!    `microkernel/` (`blocked/conv.rs`: packing, tap tables, thread split, all generated
//!    per layer; `blocked/winograd.rs`: stride-1 3×3 convolutions as Winograd F(2×2, 3×3)
//!    where a cost model, or [`Options::conv`], picks it — see [`Compiled::conv_choices`]),
//!    pooling (`blocked/pool.rs`), and BatchNorm, concatenation and layout
//!    reorders (`blocked/channels.rs`) on blocked tensors. `portable/`: the pure-Cranelift
//!    f32x4 code for plain tensors (`conv.rs`, `linear.rs`, `pool.rs`, with `epilogue.rs`
//!    fused into Conv2d/Linear). `eltwise.rs`: the layout-agnostic kernels (activations,
//!    adds, copies, reductions, plain BatchNorm and concat). Below the tiers: `cx.rs` (the
//!    lowering context every kernel takes), `tables.rs` (index tables and window
//!    arithmetic), `math.rs` (activations), `codegen.rs` (Cranelift plumbing). Imports
//!    only go downward (`runtime/tests/jit_layers.rs` checks it). Weights are packed into
//!    the layout each kernel reads and, with the index tables and tile descriptors, owned by
//!    the compiled model; their addresses are constants in the code;
//! 4. the module is finalised and the kernels' entry points kept, in execution order.
//!
//! # Running
//!
//! The plan is **per sample and scales with the batch**: a chunk of `nb` samples puts value
//! `v` at `arena + offset(v)·nb`, so each buffer is a contiguous `[nb, …]` tensor and
//! kernels loop over the samples of the chunk themselves (Linear folds them into its GEMM's
//! rows). Each range of samples runs in chunks of at most [`Compiled::chunk`] samples so
//! the arena stays near the cache. Inputs are read in place and each output is written in
//! place by the kernel that produces it (or by the reorder into the plain layout).
//!
//! **Threads.** A model compiled for `t > 1` threads owns a team of `t − 1` persistent
//! workers (`team.rs`). A batch that gives every thread whole samples (a multiple of `t`,
//! or at least `4t`) is cut into one contiguous range per thread, each running the whole
//! net on its own arena, without synchronisation. A smaller batch (a batch of 1) runs on
//! one arena, and every kernel that can split its work (Conv2d, Linear, pooling,
//! BatchNorm: by output rows or column tiles) and has enough of it is run by all threads
//! at once, each doing its part; the others run on the caller's thread. A training graph
//! runs as one chunk of the whole batch (its weight gradients and batch statistics reduce
//! over every sample): there the threads share each big kernel — a sample-wise kernel
//! (`Jit::mark_samplewise`: forward ops, input gradients, activation and pooling
//! backward, reorders) by ranges of samples, each thread calling it with the slot table
//! of its range (`PartTables`); a weight gradient by column tiles, a per-channel
//! reduction by channels. A run that finds
//! the team busy with another run goes single-threaded. Arenas (with their slot tables)
//! live in a pool that grows on the first run needing a bigger chunk or more of them, so a
//! steady-state run allocates only its outputs. In debug builds fresh arena memory is NaN,
//! not zero, so the test suites catch a kernel that reads what no kernel wrote.
//!
//! # Safety
//!
//! Native code is entered in exactly one place, `Code::call`. (Generated code in turn calls
//! the micro-kernels of `microkernel/`, with descriptors and tables the constant pool
//! owns and pointers into the same operand and result buffers; their own `unsafe` is
//! documented there.) Its soundness rests on what the code generator guarantees — every
//! address a kernel computes lies inside the buffers the slot table describes for the `nb`
//! it is given, and a kernel writes only its result slot (a parallel kernel only its part
//! of it) — and on what [`Compiled::run`] checks before calling: input lengths and layout,
//! output and arena sizes, and exclusive use of each arena and of each thread's output
//! range.

mod blocked;
mod codegen;
mod cx;
mod eltwise;
mod eltwise_grad;
mod lower;
mod math;
mod microkernel;
mod plan;
mod portable;
mod tables;
mod team;

use crate::error::{Error, Result};
use crate::interp;
use crate::weights::Weights;
use cnnc_compiler::graph::Graph;
use cranelift_jit::JITModule;
pub use microkernel::Kernels;
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use plan::SlotKind;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How to compile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Threads a run may use; 0 means all cores (`std::thread::available_parallelism`).
    pub threads: usize,
    /// Force the portable pure-Cranelift f32x4 path: no host-specific instruction choices
    /// (separate multiply and add instead of `fma`, even where the CPU has FMA, and no
    /// hand-written micro-kernels: see [`Kernels`]).
    pub portable: bool,
    /// Run the compiler's fusion passes first ([`crate::fusion_check::optimize`]: BatchNorm
    /// folded into convolutions, activations and residual adds fused into their kernels,
    /// Dropout removed). Same inputs, outputs and values up to rounding; on by default.
    /// A training graph takes only the exact epilogue fusions
    /// ([`cnnc_compiler::passes::TRAINING_PIPELINE`]), which keep its parameters, so
    /// [`Compiled::set_weights`] still applies. Off compiles the graph exactly as given.
    pub fuse: bool,
    /// Which algorithm the stride-1 3×3 convolutions use on the micro-kernels (the portable
    /// code always convolves directly).
    pub conv: ConvAlgorithm,
}

impl Default for Options {
    /// All cores, the fastest kernels the CPU has, fused, each convolution's algorithm
    /// chosen per layer.
    fn default() -> Options {
        Options { threads: 0, portable: false, fuse: true, conv: ConvAlgorithm::Auto }
    }
}

/// The algorithm of a stride-1, dilation-1, single-group 3×3 convolution on a blocked
/// operand (every other convolution is computed directly).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConvAlgorithm {
    /// Per layer, by a cost model of its shape: Winograd F(2×2, 3×3) where it has enough
    /// channels on both sides and enough output tiles per sample; on small maps Winograd
    /// over several samples for calls with that many (the layer then keeps both packings
    /// of its weights), the direct convolution below; the direct convolution elsewhere.
    /// [`Compiled::conv_choices`] says what each layer got.
    #[default]
    Auto,
    /// The direct convolution everywhere (each output the sum of its 9·C products).
    Direct,
    /// Winograd F(2×2, 3×3) wherever it applies: 2.25× fewer multiplications, outputs
    /// differing from the direct sums by a few rounding errors of the largest partial sum.
    Winograd,
}

/// The algorithm a convolution on the micro-kernels was compiled with
/// ([`Compiled::conv_choices`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvChoice {
    /// The node.
    pub node: String,
    /// [`ConvAlgorithm::Direct`] or [`ConvAlgorithm::Winograd`].
    pub algorithm: ConvAlgorithm,
    /// Why, in a few words (the shape rule or the cost model's estimate).
    pub reason: String,
}

/// Target bytes of arena per chunk (a chunk holds this many bytes of intermediates, or one
/// sample if a sample needs more).
const CHUNK_BYTES: usize = 2 << 20;
/// Most samples per chunk.
const MAX_CHUNK: usize = 64;
/// Most bytes of arena a chunk may take when a sample's intermediates do not fit in
/// [`CHUNK_BYTES`] anyway.
const ARENA_MAX_BYTES: usize = 1 << 30;

/// The generated code and the module that owns its memory.
struct Code {
    /// `Some` until dropped.
    module: Option<JITModule>,
    /// Kernels in execution order.
    entries: Vec<Entry>,
}

/// One kernel's entry point.
struct Entry {
    code: *const u8,
    /// The node (or step) it computes.
    name: String,
    /// Floating-point operations per sample, for a kernel that can split its work (for a
    /// data-movement kernel, the work that decides whether it is split).
    work: Option<u64>,
    /// Whether it only moves data (its `work` is then not floating-point operations).
    moves: bool,
    /// For a sample-wise kernel of a training graph: operations per sample (threads may
    /// run it on disjoint ranges of samples; see [`Code::run`]).
    samples: Option<u64>,
}

/// The slot tables of a whole-batch chunk cut into one range of samples per thread, for
/// the sample-wise kernels: part `p` computes samples `ranges[p]`, and `tables[p]` holds
/// every batch-major slot's address advanced to the range's first sample (fixed-size
/// slots as they are).
struct PartTables {
    tables: Vec<Vec<usize>>,
    ranges: Vec<(usize, usize)>,
}

// SAFETY: `Code` holds the finalised module only to keep its executable memory alive and to
// free it on drop; no method of the module is called after construction except
// `free_memory` in `drop`, which has exclusive access. The entry points are addresses of
// immutable code. Kernels keep no state of their own (all memory they touch is passed in
// per call), so running them from several threads at once, each with its own buffers, is
// as safe as calling a pure function concurrently; parallel kernels called with the same
// buffers and different parts write disjoint parts of their result.
unsafe impl Send for Code {}
// SAFETY: as above — shared access only ever reads `entries` and executes the code.
unsafe impl Sync for Code {}

impl Drop for Code {
    fn drop(&mut self) {
        if let Some(m) = self.module.take() {
            // SAFETY: `drop` has exclusive access, so no kernel of this module is running,
            // and `entries` (the only copies of the code's addresses) dies with `self`.
            unsafe { m.free_memory() };
        }
    }
}

/// Operations a kernel call must do before it is split between threads (below this the
/// hand-off costs more than it saves).
const PARALLEL_MIN_WORK: u64 = 400_000;

impl Code {
    /// Calls kernel `k` on one chunk, doing part `part` of `parts` of its work.
    ///
    /// `table[s]` must be the address of slot `s`'s buffer for a chunk of `nb ≥ 1` samples:
    /// at least `nb · size(s)` floats, inputs not written by anyone during the call,
    /// outputs and the arena used by this call only (or, for a parallel kernel, by calls
    /// with the same table and the other parts; for a sample-wise kernel, by calls with the
    /// tables of the other, disjoint ranges of samples of the same chunk and the other
    /// parts). `parts > 1` only for a kernel with `work` or `samples`.
    fn call(&self, k: usize, table: &[usize], nb: usize, part: usize, parts: usize) {
        let entry = &self.entries[k];
        debug_assert!(parts == 1 || entry.work.is_some() || entry.samples.is_some());
        // SAFETY: `entry.code` is a finalised function of `self.module` (alive while `self`
        // is) with the Cranelift signature `fn(i64, i64, i64, i64)` in the platform's C
        // calling convention, i.e. `extern "C" fn(*const usize, i64, i64, i64)`. The kernel
        // reads `table[..slots]` (the caller passes the whole table) and, through it, only the
        // buffers of its own operand and result slots, within `nb · size` floats each:
        // every loop bound and offset is a compile-time constant derived from the verified
        // shapes or read from index tables built (and range-checked) at compile time, and
        // padding taps are either skipped by those bounds or redirected to an in-bounds
        // neutral row — never read outside. It writes only its result slot, which the plan
        // keeps disjoint from its operands; a parallel kernel writes only the part of it
        // that `part` owns (`part < parts`, both passed as given here); a sample-wise
        // kernel writes only the samples its table and `nb` describe (its range; the other
        // parts' ranges are disjoint) and only copy `part` of a fixed scratch region, of
        // which the plan made `parts` copies (`plan::plan` with the model's thread count,
        // the most parts a run splits into). `Compiled::run`
        // sizes every buffer for `nb` and gives each thread its own arena and output range,
        // or, when threads share a kernel, waits for every part before the next kernel.
        unsafe {
            let kernel = std::mem::transmute::<*const u8, extern "C" fn(*const usize, i64, i64, i64)>(entry.code);
            kernel(table.as_ptr(), nb as i64, part as i64, parts as i64);
        }
    }

    /// Runs every kernel, in order, on one chunk, splitting the kernels worth it between
    /// the threads of `team` (if any): a kernel with `work` by its own parts, a sample-wise
    /// kernel by the ranges of samples of `split` (given for a whole-batch chunk of a
    /// training graph). With `times`, adds each kernel's wall time to its entry.
    fn run(
        &self,
        table: &[usize],
        nb: usize,
        team: Option<&team::Team>,
        split: Option<&PartTables>,
        min_work: u64,
        mut times: Option<&mut [Duration]>,
    ) {
        for (k, e) in self.entries.iter().enumerate() {
            let start = times.is_some().then(Instant::now);
            match (team, e.work, e.samples, split) {
                (Some(t), Some(w), _, _) if w.saturating_mul(nb as u64) >= min_work => {
                    let parts = t.threads();
                    t.run(parts, &|p| self.call(k, table, nb, p, parts));
                }
                (Some(t), None, Some(w), Some(split))
                    if w.saturating_mul(nb as u64) >= min_work && split.ranges.len() == t.threads() =>
                {
                    let parts = t.threads();
                    t.run(parts, &|p| {
                        let (a, b) = split.ranges[p];
                        if b > a {
                            self.call(k, &split.tables[p], b - a, p, parts);
                        }
                    });
                }
                _ => self.call(k, table, nb, 0, 1),
            }
            if let (Some(t), Some(start)) = (times.as_deref_mut(), start) {
                t[k] += start.elapsed();
            }
        }
    }
}

/// One thread's working memory: its arena and slot table.
#[derive(Debug, Default)]
struct Scratch {
    arena: Vec<f32>,
    table: Vec<usize>,
}

/// One kernel's time in [`Compiled::profile`].
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The node it computes (`<reorder>`, `<output copy>` for the planner's own steps).
    pub name: String,
    /// Floating-point operations of the batch, for the kernels that count them (Conv2d,
    /// Linear, pooling, BatchNorm).
    pub flops: Option<u64>,
    /// Median wall time of one run of the kernel on the whole batch.
    pub median: Duration,
    /// Shortest wall time (least disturbed by other processes).
    pub min: Duration,
}

/// A net compiled to native code: build once, run many times, from many threads.
///
/// ```no_run
/// # use cnnc_runtime::{Compiled, Options, weights::Weights};
/// # fn demo(graph: &cnnc_compiler::Graph, x: ndarray::ArrayViewD<'_, f32>) -> cnnc_runtime::Result<()> {
/// let weights = Weights::random(graph, 0);
/// let net = Compiled::new(graph, &weights, &Options::default())?;
/// let outputs = net.run(&[x])?;
/// # Ok(()) }
/// ```
pub struct Compiled {
    graph: Graph,
    code: Code,
    /// Packed weights and tables the code reads; must live as long as `code` may run.
    consts: codegen::ConstPool,
    /// The memory plan the code was generated for: its slots and arena sizes for every run,
    /// and the lowering [`Compiled::set_weights`] replays.
    plan: plan::Plan,
    /// The micro-kernel ISA and whether `fma` was allowed, as compiled.
    isa: Option<microkernel::Isa>,
    allow_fma: bool,
    /// The convolution algorithm choice, as compiled, and what it chose per layer.
    conv: ConvAlgorithm,
    conv_choices: Vec<ConvChoice>,
    /// Whether the fusion passes rewrote the graph (then the weights were rewritten too).
    fused: bool,
    chunk: usize,
    threads: usize,
    /// The worker threads (none for a single-threaded model); one run uses them at a time.
    team: Option<Mutex<team::Team>>,
    /// Floating-point operations below which a kernel call is not split between threads.
    parallel_min_work: u64,
    pool: Mutex<Vec<Scratch>>,
    compile_time: Duration,
    kernels: usize,
    moves: usize,
    const_bytes: usize,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("net", &self.graph.name)
            .field("kernels", &self.kernels)
            .field("data_movement_kernels", &self.moves)
            .field("arena_floats_per_sample", &self.plan.arena)
            .field("chunk", &self.chunk)
            .field("threads", &self.threads)
            .field("const_bytes", &self.const_bytes)
            .field("compile_time", &self.compile_time)
            .finish()
    }
}

impl Compiled {
    /// Verifies the graph, checks the weights against it, plans its memory and generates a
    /// kernel per op.
    ///
    /// Errors: [`Error::Graph`] for a graph that fails verification, [`Error::Weights`] for
    /// weights made for another parameter table, [`Error::Unsupported`] for a net mixing batch
    /// dimensions, [`Error::Jit`] if Cranelift rejects a kernel.
    pub fn new(graph: &Graph, weights: &Weights, options: &Options) -> Result<Compiled> {
        Compiled::with_kernels(graph, weights, options, Kernels::Auto)
    }

    /// As [`Compiled::new`], choosing the Conv2d/Linear micro-kernels explicitly (mainly to
    /// test each ISA the host has). `options.portable` still wins: it means
    /// [`Kernels::Portable`].
    ///
    /// Errors: as [`Compiled::new`], and [`Error::Unsupported`] for an ISA the CPU lacks.
    pub fn with_kernels(graph: &Graph, weights: &Weights, options: &Options, kernels: Kernels) -> Result<Compiled> {
        let start = Instant::now();
        let training = Compiled::check(graph, weights)?;
        Compiled::borrowing(graph, weights, options, kernels, training, start)
    }

    /// [`Compiled::with_kernels`] after [`Compiled::check`]: the fusion passes a graph takes,
    /// then [`Compiled::build`].
    fn borrowing(
        graph: &Graph,
        weights: &Weights,
        options: &Options,
        kernels: Kernels,
        training: bool,
        start: Instant,
    ) -> Result<Compiled> {
        let fused;
        let epilogues;
        // Inference rewrites never apply to a training graph; it takes the exact epilogue
        // fusions only, which keep its parameter table (`TRAINING_PIPELINE`). The fused
        // graph's parameters stay a copy-on-write view of `weights`: only what a pass rewrote
        // is new memory.
        let (graph, weights): (&Graph, &dyn crate::weights::ParamSource) = if options.fuse && !training {
            fused = crate::fusion_check::optimize_view(graph, weights).map_err(|e| match e {
                crate::fusion_check::FusionError::Run(e) => e,
                e => Error::Fusion { net: graph.name.clone(), message: e.to_string() },
            })?;
            (&fused.0, &fused.1)
        } else if options.fuse {
            let mut g = graph.clone();
            let mut store = crate::fusion_check::WeightsStore::new(weights);
            cnnc_compiler::passes::run_pipeline(
                cnnc_compiler::passes::TRAINING_PIPELINE,
                &mut g,
                &mut store,
                cfg!(debug_assertions),
            )
            .map_err(|e| Error::Fusion { net: graph.name.clone(), message: e.to_string() })?;
            epilogues = g;
            (&epilogues, weights)
        } else {
            (graph, weights)
        };
        Compiled::build(graph, weights, options, kernels, training, Default::default(), start)
    }

    /// As [`Compiled::new`], taking the weights: each Linear layer's weight matrix is then
    /// packed in its own memory instead of a copy where the packed layout has its size (on
    /// the AVX-512 and AVX2 paths: every input feature real — no padding channel of a
    /// flattened map whose channels are not a multiple of 16 — and the output features a
    /// multiple of 16, or 8 with AVX2). For a net whose weights are mostly classifier
    /// layers that halves the memory and the compile time: VGG-11's 478 MB of Linear
    /// weights are not copied into 478 MB of fresh pages. The model keeps the weights it
    /// packs and drops the rest; [`Compiled::set_weights`] still applies to an unfused
    /// model.
    ///
    /// Errors: as [`Compiled::new`]. The weights are gone then too (they were given
    /// away); to keep them through a failed compile, check them first
    /// ([`Weights::check`]) or use [`Compiled::new`].
    pub fn from_owned(graph: &Graph, weights: Weights, options: &Options) -> Result<Compiled> {
        Compiled::from_owned_with_kernels(graph, weights, options, Kernels::Auto)
    }

    /// As [`Compiled::from_owned`], choosing the micro-kernels as [`Compiled::with_kernels`]
    /// does.
    ///
    /// Errors: as [`Compiled::with_kernels`].
    pub fn from_owned_with_kernels(
        graph: &Graph,
        weights: Weights,
        options: &Options,
        kernels: Kernels,
    ) -> Result<Compiled> {
        let start = Instant::now();
        let training = Compiled::check(graph, &weights)?;
        if training {
            // A training graph's weights are repacked every step from the trainer's copy.
            return Compiled::borrowing(graph, &weights, options, kernels, true, start);
        }
        let (graph, mut weights) = if options.fuse {
            let f = crate::fusion_check::optimize_owned(graph, weights).map_err(|e| match e {
                crate::fusion_check::FusionError::Run(e) => e,
                e => Error::Fusion { net: graph.name.clone(), message: e.to_string() },
            })?;
            (f.graph, f.weights)
        } else {
            (graph.clone(), weights)
        };
        let mut donated = std::collections::HashMap::new();
        // Only the micro-kernel path packs a Linear weight in place; the portable one reads
        // it where it is.
        let tiles = !options.portable && matches!(microkernel::Isa::detect(kernels), Ok(Some(_)));
        for id in if tiles { graph.node_ids() } else { vec![] } {
            let node = graph.node(id);
            if let cnnc_compiler::Op::Linear(_) = node.op {
                let pos = node.op.def().params().iter().position(|p| p.suffix == "weight");
                if let Some(&p) = pos.and_then(|i| node.params.get(i))
                    && let Some(v) = weights.take_f32(p)
                {
                    donated.insert(p, v);
                }
            }
        }
        let rest = crate::weights::Remaining { weights: &weights, taken: donated.keys().copied().collect() };
        Compiled::build(&graph, &rest, options, kernels, false, donated, start)
    }

    /// Verifies the graph and checks the weights against it; whether it is a training graph.
    fn check(graph: &Graph, weights: &Weights) -> Result<bool> {
        graph.verify()?;
        weights.check(graph)?;
        let training = graph.node_ids().into_iter().any(|id| matches!(graph.node(id).op, cnnc_compiler::Op::Train(_)));
        if let Some(n) = graph
            .node_ids()
            .into_iter()
            .map(|id| graph.node(id))
            .find(|n| matches!(&n.op, cnnc_compiler::Op::BatchNorm2d(b) if !b.track_running_stats))
        {
            return Err(Error::Unsupported(format!(
                "`{}`: BatchNorm2d(track_running_stats=False) normalises with batch statistics, which the JIT does not compute yet; the interpreter runs it",
                n.name
            )));
        }
        Ok(training)
    }

    /// Plans, lowers and finalises `graph` (already fused as wanted) over `weights`.
    fn build(
        graph: &Graph,
        weights: &dyn crate::weights::ParamSource,
        options: &Options,
        kernels: Kernels,
        training: bool,
        donated: std::collections::HashMap<cnnc_compiler::graph::ParamId, Vec<f32>>,
        start: Instant,
    ) -> Result<Compiled> {
        let kernels = if options.portable { Kernels::Portable } else { kernels };
        let isa = microkernel::Isa::detect(kernels).map_err(Error::Unsupported)?;
        let fused_graph = options.fuse && !training;
        let threads = match options.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            t => t,
        };
        let plan = plan::plan(graph, isa.is_some(), threads)?;
        let mut jit = codegen::Jit::new(!options.portable, isa)?;
        jit.conv = options.conv;
        jit.threads = threads;
        jit.repacked = plan.whole_batch;
        jit.donated = donated;
        lower::lower(&mut jit, graph, weights, &plan)?;
        let codegen::Jit { mut module, funcs, consts, conv_choices, .. } = jit;
        module.finalize_definitions().map_err(|e| Error::Jit { node: graph.name.clone(), message: e.to_string() })?;
        let entries = funcs
            .iter()
            .map(|f| Entry {
                code: module.get_finalized_function(f.id),
                name: f.name.clone(),
                work: f.work,
                moves: f.data_movement,
                samples: f.samples,
            })
            .collect();
        let code = Code { module: Some(module), entries };
        let chunk = if plan.whole_batch { usize::MAX } else { chunk_for(4 * plan.arena) };
        Ok(Compiled {
            graph: graph.clone(),
            kernels: funcs.iter().filter(|f| !f.data_movement).count(),
            moves: funcs.iter().filter(|f| f.data_movement).count(),
            const_bytes: consts.bytes(),
            code,
            consts,
            plan,
            isa,
            allow_fma: !options.portable,
            conv: options.conv,
            conv_choices,
            fused: fused_graph,
            chunk,
            threads,
            team: (threads > 1).then(|| Mutex::new(team::Team::new(threads))),
            parallel_min_work: PARALLEL_MIN_WORK,
            pool: Mutex::new(vec![]),
            compile_time: start.elapsed(),
        })
    }

    /// Runs the net on one batch. Inputs are in the graph's input order, NCHW (or whatever
    /// their declared shapes are), C-contiguous; a symbolic batch may be any size ≥ 1.
    ///
    /// Errors: those of [`interp::check_inputs`], and [`Error::Batch`] for a batch whose
    /// outputs would not fit in memory's address range.
    pub fn run(&self, inputs: &[ArrayViewD<'_, f32>]) -> Result<Vec<ArrayD<f32>>> {
        self.run_reusing(inputs, vec![])
    }

    /// As [`Compiled::run`], writing each output into the storage of the array at its
    /// index in `reuse` (typically the outputs of an earlier run) where that array has the
    /// output's shape, overwriting whatever it holds, instead of fresh memory: a training
    /// step's gradients (44 MB for the seed ResNet) then touch no new pages. Arrays of other
    /// shapes, and missing ones, are replaced by new storage.
    ///
    /// Errors: as [`Compiled::run`].
    pub fn run_reusing(&self, inputs: &[ArrayViewD<'_, f32>], reuse: Vec<ArrayD<f32>>) -> Result<Vec<ArrayD<f32>>> {
        let (n, in_addrs, mut outputs) = self.prepare(inputs, reuse)?;
        let out_addrs: Vec<usize> = outputs.iter_mut().map(|(_, v)| v.as_mut_ptr().expose_provenance()).collect();
        // The team, unless another run has it (then this run is single-threaded).
        let team = self.team.as_ref().and_then(|t| t.try_lock().ok());
        match team.as_deref() {
            None => self.run_range(&in_addrs, &out_addrs, 0, n, None, None)?,
            Some(team) if !self.plan.whole_batch && batch_split(n, team.threads()) => {
                // Whole samples per thread: no synchronisation between kernels.
                let parts = team.threads();
                let per = n.div_ceil(parts);
                let failed = Mutex::new(None);
                team.run(parts, &|p| {
                    let (a, b) = ((p * per).min(n), ((p + 1) * per).min(n));
                    if let Err(e) = self.run_range(&in_addrs, &out_addrs, a, b, None, None) {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                });
                if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
                    return Err(e);
                }
            }
            // Few samples: the threads share each big kernel instead.
            Some(team) => self.run_range(&in_addrs, &out_addrs, 0, n, Some(team), None)?,
        }
        drop(team);
        outputs
            .into_iter()
            .map(|(shape, data)| {
                ArrayD::from_shape_vec(IxDyn(&shape), data)
                    .map_err(|e| Error::Unsupported(format!("output shape {shape:?}: {e}")))
            })
            .collect()
    }

    /// Checks the inputs of a run and allocates its outputs: the batch, the inputs'
    /// addresses, and each output's shape and storage (zeroed when new).
    #[allow(clippy::type_complexity)]
    fn prepare(
        &self,
        inputs: &[ArrayViewD<'_, f32>],
        reuse: Vec<ArrayD<f32>>,
    ) -> Result<(usize, Vec<usize>, Vec<(Vec<usize>, Vec<f32>)>)> {
        let n = interp::check_inputs(&self.graph, inputs)?;
        // Checked again here, whatever `check_inputs` does: the native code relies on it.
        let mut in_addrs = Vec::with_capacity(inputs.len());
        for ((name, id), x) in self.graph.inputs.iter().zip(inputs) {
            let ty = &self.graph.node(*id).ty;
            let data = x.as_slice().ok_or_else(|| Error::NonContiguous {
                name: name.clone(),
                shape: x.shape().to_vec(),
                strides: x.strides().to_vec(),
            })?;
            if x.shape() != ty.concrete(n).as_slice() || data.len() != n * ty.numel_per_sample() {
                return Err(Error::InputShape {
                    name: name.clone(),
                    expected: ty.to_string(),
                    found: x.shape().to_vec(),
                });
            }
            in_addrs.push(data.as_ptr().expose_provenance());
        }
        let mut outputs = Vec::with_capacity(self.graph.outputs.len());
        let mut reuse = reuse.into_iter();
        for (name, id) in &self.graph.outputs {
            let old = reuse.next();
            let ty = &self.graph.node(*id).ty;
            let shape = ty.concrete(n);
            let len = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
            match len {
                Some(len) if (shape[0] == n || self.plan.whole_batch) && len <= isize::MAX as usize / 4 => {
                    let data = match old {
                        // Not cleared: every kernel writes all of its result (arena slots
                        // hold stale values too; the JIT suites run into NaN-filled outputs).
                        Some(a) if a.shape() == shape.as_slice() && a.is_standard_layout() => {
                            match a.into_raw_vec_and_offset() {
                                (v, None | Some(0)) if v.len() == len => v,
                                _ => vec![0f32; len],
                            }
                        }
                        _ => vec![0f32; len],
                    };
                    outputs.push((shape, data))
                }
                _ => {
                    return Err(Error::Batch {
                        name: name.clone(),
                        batch: n,
                        why: "the output would not fit in memory".into(),
                    });
                }
            }
        }
        Ok((n, in_addrs, outputs))
    }

    /// Times each kernel on `runs` runs of this batch (threads sharing kernels as in
    /// [`Compiled::run`] at batch 1, whatever the batch): the median wall time per kernel,
    /// in execution order.
    ///
    /// Errors: as [`Compiled::run`].
    pub fn profile(&self, inputs: &[ArrayViewD<'_, f32>], runs: usize) -> Result<Vec<KernelTime>> {
        let (n, in_addrs, mut outputs) = self.prepare(inputs, vec![])?;
        let out_addrs: Vec<usize> = outputs.iter_mut().map(|(_, v)| v.as_mut_ptr().expose_provenance()).collect();
        let team = self.team.as_ref().and_then(|t| t.try_lock().ok());
        let k = self.code.entries.len();
        let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(runs); k];
        for _ in 0..runs.max(1) {
            let mut t = vec![Duration::ZERO; k];
            self.run_range(&in_addrs, &out_addrs, 0, n, team.as_deref(), Some(&mut t))?;
            for (s, d) in samples.iter_mut().zip(t) {
                s.push(d);
            }
        }
        Ok(self
            .code
            .entries
            .iter()
            .zip(samples)
            .map(|(e, mut s)| {
                s.sort();
                KernelTime {
                    name: e.name.clone(),
                    flops: e.work.filter(|_| !e.moves).map(|w| w * n as u64),
                    median: s[s.len() / 2],
                    min: s[0],
                }
            })
            .collect())
    }

    /// Runs samples `a..b` in chunks, on the calling thread, with a pooled arena; kernels
    /// worth it are split between the threads of `team`, if given.
    fn run_range(
        &self,
        in_addrs: &[usize],
        out_addrs: &[usize],
        a: usize,
        b: usize,
        team: Option<&team::Team>,
        mut times: Option<&mut [Duration]>,
    ) -> Result<()> {
        if a >= b {
            return Ok(());
        }
        let mut scratch = self.pool.lock().map_err(|_| poisoned())?.pop().unwrap_or_default();
        let need = self
            .plan
            .arena
            .checked_mul(self.chunk.min(b - a))
            .and_then(|v| v.checked_add(self.plan.fixed))
            .filter(|v| *v <= isize::MAX as usize / 4)
            .ok_or_else(|| Error::Batch {
                name: self.graph.name.clone(),
                batch: b - a,
                why: "the intermediates would not fit in memory".into(),
            })?;
        if scratch.arena.len() < need {
            // Debug builds (the test suites) fill fresh arena memory with NaN: a kernel
            // that reads a value it did not write (a slot, its padding or a scratch
            // region) then shows up as NaN instead of a lucky zero.
            scratch.arena.resize(need, if cfg!(debug_assertions) { f32::NAN } else { 0.0 });
        }
        scratch.table.resize(self.plan.slots.len(), 0);
        let arena = scratch.arena.as_mut_ptr().expose_provenance();
        let mut start = a;
        while start < b {
            let nb = self.chunk.min(b - start);
            for (t, slot) in scratch.table.iter_mut().zip(&self.plan.slots) {
                *t = match slot.kind {
                    SlotKind::Input(i) => in_addrs[i] + 4 * start * slot.size,
                    SlotKind::Output(j) => out_addrs[j] + 4 * start * slot.size,
                    SlotKind::Arena(o) => arena + 4 * o * nb,
                    SlotKind::Fixed(o) => arena + 4 * (self.plan.arena * nb + o),
                };
            }
            let split = match team {
                Some(t) if self.plan.whole_batch && t.threads() > 1 => {
                    Some(self.part_tables(&scratch.table, nb, t.threads()))
                }
                _ => None,
            };
            self.code.run(&scratch.table, nb, team, split.as_ref(), self.parallel_min_work, times.as_deref_mut());
            start += nb;
        }
        self.pool.lock().map_err(|_| poisoned())?.push(scratch);
        Ok(())
    }

    /// The chunk's slot tables per range of samples (see [`PartTables`]): `parts` ranges of
    /// as equal sizes as whole samples allow.
    fn part_tables(&self, table: &[usize], nb: usize, parts: usize) -> PartTables {
        let ranges: Vec<(usize, usize)> = (0..parts).map(|p| (p * nb / parts, (p + 1) * nb / parts)).collect();
        let tables = ranges
            .iter()
            .map(|&(a, _)| {
                table
                    .iter()
                    .zip(&self.plan.slots)
                    .map(|(t, slot)| if slot.batched { t + 4 * a * slot.size } else { *t })
                    .collect()
            })
            .collect();
        PartTables { tables, ranges }
    }

    /// Sets the floating-point operations a kernel call must do before the threads share it
    /// (batches too small to give every thread whole samples); the default is 400 000,
    /// below which the hand-off costs more than it saves. 0 splits every kernel that can
    /// be split (useful to test the split itself).
    pub fn with_parallel_threshold(mut self, flops: u64) -> Compiled {
        self.parallel_min_work = flops;
        self
    }

    /// Gives the compiled code new values of its parameters and buffers (the same parameter
    /// table: a training step's updated weights), without generating code: every packed
    /// weight is rewritten in place where the code reads it.
    ///
    /// Errors: [`Error::Weights`] for weights of another parameter table,
    /// [`Error::Unsupported`] for a model compiled with the fusion passes (its packed
    /// weights are the rewritten graph's; compile again instead).
    pub fn set_weights(&mut self, weights: &Weights) -> Result<()> {
        if self.fused {
            return Err(Error::Unsupported(format!(
                "net `{}` was compiled with fusion; set_weights needs `Options {{ fuse: false, .. }}`",
                self.graph.name
            )));
        }
        weights.check(&self.graph)?;
        let mut jit = codegen::Jit::new(self.allow_fma, self.isa)?;
        jit.conv = self.conv;
        jit.threads = self.threads;
        jit.repacked = self.plan.whole_batch;
        jit.consts = std::mem::take(&mut self.consts);
        jit.consts.replay();
        let lowered = lower::lower(&mut jit, &self.graph, weights, &self.plan);
        let matched = jit.consts.finish_replay();
        self.consts = std::mem::take(&mut jit.consts);
        lowered?;
        if !matched {
            return Err(Error::Jit {
                node: self.graph.name.clone(),
                message: "new weights did not replay onto the compiled constants".into(),
            });
        }
        Ok(())
    }

    /// The algorithm of each convolution that runs on the micro-kernels (in graph order),
    /// and why the cost model (or [`Options::conv`]) chose it. Convolutions on the
    /// portable code, and a net's first layer on the plane tiles, are direct and not listed.
    pub fn conv_choices(&self) -> &[ConvChoice] {
        &self.conv_choices
    }

    /// Wall time `new` took (verification, planning, packing, code generation).
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// Number of kernels that compute the graph's nodes: one per op that is not an alias,
    /// plus a copy for an output that has no kernel of its own.
    pub fn kernel_count(&self) -> usize {
        self.kernels
    }

    /// Number of further kernels that only move data: reorders between the plain and the
    /// blocked layout, and convolutions' zero-padded copies of their operands (see the
    /// module documentation).
    pub fn data_movement_count(&self) -> usize {
        self.moves
    }

    /// Arena floats per sample (the memory plan's peak of simultaneously live
    /// intermediates).
    pub fn arena_per_sample(&self) -> usize {
        self.plan.arena
    }

    /// Most samples one kernel call processes (the arena holds this many samples).
    pub fn chunk(&self) -> usize {
        self.chunk
    }
}

/// Whether `n` samples on `threads` threads run best as whole samples per thread: when
/// every thread gets a share within one sample of the others' and at least one each.
fn batch_split(n: usize, threads: usize) -> bool {
    n >= threads && (n.is_multiple_of(threads) || n >= 4 * threads)
}

/// One core's peak f32 throughput in GFLOP/s with the micro-kernels' widest vectors,
/// measured (once per process, ~60 ms) with a register-only FMA loop; `None` on a host
/// without AVX2+FMA. The "% of peak" figures of the benchmarks divide by it.
pub fn peak_gflops() -> Option<f64> {
    static PEAK: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    *PEAK.get_or_init(microkernel::measure_peak)
}

/// Samples per chunk for an arena of `bytes` per sample: as many as keep the arena within
/// [`CHUNK_BYTES`] (near the cache) when one sample fits there; when even one does not, the
/// cache is lost anyway and more samples per chunk only help (a Linear streams its weights
/// once per chunk), up to [`MAX_CHUNK`] and [`ARENA_MAX_BYTES`].
fn chunk_for(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    if bytes <= CHUNK_BYTES {
        (CHUNK_BYTES / bytes).clamp(1, MAX_CHUNK)
    } else {
        (ARENA_MAX_BYTES / bytes).clamp(1, MAX_CHUNK)
    }
}

fn poisoned() -> Error {
    Error::Unsupported("the arena pool's lock was poisoned by a panicking run".into())
}
