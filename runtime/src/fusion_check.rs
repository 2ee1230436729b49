//! Fusion with real weights: [`optimize`] runs the compiler's pass pipeline
//! ([`cnnc_compiler::passes::PIPELINE`]) on a graph and its [`Weights`], and
//! [`optimize_checked`] does the same under an automatic numeric check.
//!
//! # The numeric check
//!
//! Opt-in ([`NumericCheck`]): the unfused graph is run once by the reference interpreter
//! on random inputs; then the passes run **one at a time**, and after each pass that
//! rewrote something the current graph is run on the same inputs and compared with the
//! unfused outputs. The error of an output is `max|fused − unfused| / max(floor,
//! max|unfused|)` ([`scaled_error`]; NaN against a number counts as infinite), worst over the
//! outputs. With the default floor of 1 (the JIT tests' convention) the tolerance is
//! relative for outputs of magnitude ≥ 1 and absolute below: an output that is the small
//! difference of large terms (ReLU-gated, or a BatchNorm shift cancelling a conv sum) carries
//! f32 rounding of the large terms, which a pure relative measure would blow up and refuse
//! rewrites that are exact in real arithmetic. `floor: 0.0` gives the pure ∞-norm relative
//! error ([`relative_error`]). When a pass exceeds the tolerance, it is re-applied one rewrite at a
//! time to find the rewrite that crosses it; that fusion is **refused** (the pass is re-run
//! skipping that node), named by pass and node in [`CheckResult::refused`] and in the
//! report, and the pipeline goes on. [`verify_fusion`], the test helper, turns the first
//! refusal into an error instead.
//!
//! This module is not the JIT and does not use it: fused graphs are ordinary graphs that
//! both engines run.

use crate::error::Error;
use crate::interp;
use crate::weights::{ParamData, Weights};
use cnnc_compiler::graph::{Graph, NodeId, ParamId};
use cnnc_compiler::passes::{
    FusionReport, NotFused, PIPELINE, ParamStore, Pass, PassError, PassLog, PassOptions, run_pass,
};
use cnnc_compiler::shape::Batch;
use ndarray::{Array1, ArrayD, IxDyn};
use std::fmt;

/// One parameter's values as a store entry.
#[derive(Clone, Debug, PartialEq)]
enum Entry<'a> {
    /// f32 values in standard order, still those of the weights the store was made from
    /// (copied only if the store is turned back into [`Weights`]).
    Borrowed(&'a [f32]),
    /// f32 values in standard order, rewritten by a pass.
    F32(Vec<f32>),
    /// Anything else, carried through untouched (`num_batches_tracked`).
    Other(ParamData),
}

/// [`Weights`] seen as a [`ParamStore`]: flat f32 buffers aligned with a graph's parameter
/// table, turned back into [`Weights`] for the rewritten graph with [`WeightsStore::to_weights`].
/// Copy-on-write: a parameter no pass rewrites stays a view of the original weights, so the
/// JIT packs the fused graph's weights straight from them ([`crate::weights::ParamSource`]).
#[derive(Clone, Debug, PartialEq)]
pub struct WeightsStore<'a> {
    entries: Vec<Entry<'a>>,
}

impl<'a> WeightsStore<'a> {
    /// The values of `weights`, in parameter order (borrowed).
    pub fn new(weights: &'a Weights) -> WeightsStore<'a> {
        let entries = weights
            .iter()
            .map(|(_, d)| match d {
                ParamData::F32(a) => match a.as_slice() {
                    Some(s) => Entry::Borrowed(s),
                    None => Entry::F32(crate::weights::to_vec(a)),
                },
                other => Entry::Other(other.clone()),
            })
            .collect();
        WeightsStore { entries }
    }

    /// The values of `weights`, moved in (no copy of contiguous tensors).
    pub fn from_owned(weights: Weights) -> WeightsStore<'static> {
        let entries = weights
            .into_data()
            .into_iter()
            .map(|d| match d {
                ParamData::F32(a) if a.is_standard_layout() => {
                    let (v, offset) = a.into_raw_vec_and_offset();
                    match offset {
                        Some(0) | None => Entry::F32(v),
                        Some(o) => Entry::F32(v[o..].to_vec()),
                    }
                }
                ParamData::F32(a) => Entry::F32(crate::weights::to_vec(&a)),
                other => Entry::Other(other),
            })
            .collect();
        WeightsStore { entries }
    }

    /// Weights for `graph`, whose parameter table this store is aligned with.
    ///
    /// Errors: [`crate::WeightsError::Mismatch`] when the store and the table disagree in
    /// length or sizes.
    pub fn to_weights(&self, graph: &Graph) -> Result<Weights, crate::WeightsError> {
        self.clone().into_weights(graph)
    }

    /// The f32 values of parameter `id`, as the passes left them.
    pub fn values(&self, id: ParamId) -> Option<&[f32]> {
        match self.entries.get(id.0)? {
            Entry::Borrowed(v) => Some(v),
            Entry::F32(v) => Some(v),
            Entry::Other(_) => None,
        }
    }

    /// As [`WeightsStore::to_weights`], consuming the store (no copy of the rewritten
    /// values; the untouched ones are copied out of the original weights).
    ///
    /// Errors: as [`WeightsStore::to_weights`].
    pub fn into_weights(self, graph: &Graph) -> Result<Weights, crate::WeightsError> {
        let data = self
            .entries
            .into_iter()
            .enumerate()
            .map(|(i, e)| match e {
                Entry::Other(d) => d,
                e @ (Entry::F32(_) | Entry::Borrowed(_)) => {
                    let v = match e {
                        Entry::Borrowed(s) => s.to_vec(),
                        Entry::F32(v) => v,
                        Entry::Other(_) => unreachable!(),
                    };
                    match graph.params.get(i).filter(|p| p.spec.shape.iter().product::<usize>() == v.len()) {
                        Some(p) => ParamData::F32(
                            ArrayD::from_shape_vec(IxDyn(&p.spec.shape), v).unwrap_or_else(|e| unreachable!("{e}")),
                        ),
                        // A wrong size is reported by `from_params` as a mis-shaped key.
                        None => ParamData::F32(Array1::from(v).into_dyn()),
                    }
                }
            })
            .collect();
        Weights::from_params(graph, data)
    }
}

impl ParamStore for WeightsStore<'_> {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&self, id: ParamId) -> Option<&[f32]> {
        self.values(id)
    }

    fn set(&mut self, id: ParamId, data: Vec<f32>) {
        if let Some(e) = self.entries.get_mut(id.0) {
            *e = Entry::F32(data);
        }
    }

    fn push(&mut self, data: Vec<f32>) -> ParamId {
        self.entries.push(Entry::F32(data));
        ParamId(self.entries.len() - 1)
    }

    fn select(&mut self, order: &[ParamId]) {
        // Moved, not copied, unless the same entry is selected again later.
        let mut old: Vec<Option<Entry>> = std::mem::take(&mut self.entries).into_iter().map(Some).collect();
        self.entries = order
            .iter()
            .enumerate()
            .map(|(k, id)| {
                let again = order[k + 1..].contains(id);
                let e = old.get_mut(id.0).and_then(|slot| if again { slot.clone() } else { slot.take() });
                e.unwrap_or_else(|| Entry::F32(vec![]))
            })
            .collect();
    }
}

/// What can go wrong while optimising.
#[derive(Debug, thiserror::Error)]
pub enum FusionError {
    /// A pass left an invalid graph.
    #[error(transparent)]
    Pass(#[from] PassError),
    /// Running the interpreter, or rebuilding the weights, failed.
    #[error(transparent)]
    Run(#[from] Error),
    /// A fusion changed the outputs beyond the tolerance ([`verify_fusion`] only).
    #[error("{0}")]
    Refused(Refusal),
}

impl From<crate::WeightsError> for FusionError {
    fn from(e: crate::WeightsError) -> Self {
        FusionError::Run(e.into())
    }
}

/// A rewrite the numeric check refused.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// The pass.
    pub pass: &'static str,
    /// The node the pass was applied to (`None` for a whole-graph pass, which is then
    /// refused as a whole).
    pub node: Option<NodeId>,
    /// Its name (the net's name for a whole-graph pass).
    pub name: String,
    /// Its op kind.
    pub kind: &'static str,
    /// The error the rewrite caused ([`scaled_error`]).
    pub error: f64,
    /// The tolerance it exceeded.
    pub tolerance: f64,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pass `{}` at `{}` ({}) changes the outputs by {:.3e}, more than the tolerance {:.0e}",
            self.pass, self.name, self.kind, self.error, self.tolerance
        )
    }
}

/// Settings of the numeric check.
#[derive(Clone, Debug)]
pub struct NumericCheck {
    /// Largest accepted error of any output (see [`scaled_error`]).
    pub tolerance: f64,
    /// Errors are measured against `max(floor, max|unfused output|)`: 1 makes the tolerance
    /// absolute for small outputs, 0 purely relative.
    pub floor: f64,
    /// Batch size of the random inputs (for inputs with a symbolic batch).
    pub batch: usize,
    /// Seed of the random inputs (uniform in `[-1, 1)`).
    pub seed: u64,
    /// The passes, in order.
    pub passes: Vec<Pass>,
}

impl Default for NumericCheck {
    /// Tolerance 1e-5, floor 1, batch 2, seed 0, [`PIPELINE`].
    fn default() -> Self {
        NumericCheck { tolerance: 1e-5, floor: 1.0, batch: 2, seed: 0, passes: PIPELINE.to_vec() }
    }
}

/// What the numeric check measured.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckResult {
    /// The tolerance used.
    pub tolerance: f64,
    /// The floor used (see [`NumericCheck::floor`]).
    pub floor: f64,
    /// Error of the graph after each pass that rewrote something, against the unfused
    /// graph.
    pub per_pass: Vec<(&'static str, f64)>,
    /// Rewrites refused.
    pub refused: Vec<Refusal>,
    /// Error of the final graph.
    pub error: f64,
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Numeric check: final error {:.3e} (tolerance {:.0e}, relative to max({}, max|output|))",
            self.error, self.tolerance, self.floor
        )?;
        for (p, e) in &self.per_pass {
            writeln!(f, "  after {p:<24} {e:.3e}")?;
        }
        for r in &self.refused {
            writeln!(f, "  refused: {r}")?;
        }
        Ok(())
    }
}

/// The optimised net.
#[derive(Clone, Debug)]
pub struct Optimized {
    /// The rewritten graph.
    pub graph: Graph,
    /// Its weights (folded values, new parameters, unused ones dropped).
    pub weights: Weights,
    /// What the passes did.
    pub report: FusionReport,
    /// The numeric check's measurements, when it ran.
    pub check: Option<CheckResult>,
}

/// Runs [`PIPELINE`] on `graph` with `weights` (the IR is verified after every pass in debug
/// builds), with no numeric check.
///
/// Errors: [`FusionError::Pass`] if a pass breaks the IR; [`FusionError::Run`] if `weights`
/// do not fit `graph`.
pub fn optimize(graph: &Graph, weights: &Weights) -> Result<Optimized, FusionError> {
    let (g, store, report) = optimize_view(graph, weights)?;
    let weights = store.into_weights(&g)?;
    Ok(Optimized { graph: g, weights, report, check: None })
}

/// As [`optimize`], taking the weights by value: the parameters no pass rewrites are moved
/// into the result, not copied (a 515 MB VGG-11 costs no second copy).
///
/// Errors: as [`optimize`].
pub fn optimize_owned(graph: &Graph, weights: Weights) -> Result<Optimized, FusionError> {
    weights.check(graph)?;
    let mut store = WeightsStore::from_owned(weights);
    let (g, report) = cnnc_compiler::passes::optimize(graph, &mut store)?;
    let weights = store.into_weights(&g)?;
    Ok(Optimized { graph: g, weights, report, check: None })
}

/// As [`optimize`], leaving the rewritten graph's parameters in a copy-on-write store over
/// `weights` (what [`crate::Compiled::new`] packs from: a parameter no pass touched is never
/// copied).
///
/// Errors: as [`optimize`].
pub fn optimize_view<'a>(
    graph: &Graph,
    weights: &'a Weights,
) -> Result<(Graph, WeightsStore<'a>, FusionReport), FusionError> {
    weights.check(graph)?;
    let mut store = WeightsStore::new(weights);
    let (g, report) = cnnc_compiler::passes::optimize(graph, &mut store)?;
    // The same checks `into_weights` makes, without materialising the weights.
    let misshaped: Vec<(String, Vec<usize>, Vec<usize>)> = g
        .params
        .iter()
        .enumerate()
        .filter(|(i, p)| {
            p.spec.dtype == cnnc_compiler::ops::DType::F32
                && store.values(ParamId(*i)).map(<[f32]>::len) != Some(p.spec.shape.iter().product())
        })
        .map(|(i, p)| (p.name.clone(), p.spec.shape.clone(), vec![store.values(ParamId(i)).map_or(0, <[f32]>::len)]))
        .collect();
    if store.len() != g.params.len() || !misshaped.is_empty() {
        return Err(FusionError::Run(crate::Error::Weights(crate::WeightsError::Mismatch {
            net: g.name.clone(),
            missing: vec![],
            unexpected: if store.len() == g.params.len() {
                vec![]
            } else {
                vec![format!("the passes left {} values for {} parameters", store.len(), g.params.len())]
            },
            misshaped,
        })));
    }
    Ok((g, store, report))
}

/// Runs `check.passes` one by one under the numeric check (see the module docs), refusing
/// the rewrites that change the outputs beyond `check.tolerance`. The IR is verified after
/// every pass.
///
/// Errors: [`FusionError::Pass`] if a pass breaks the IR; [`FusionError::Run`] if the
/// interpreter cannot run the graph or `weights` do not fit it.
pub fn optimize_checked(graph: &Graph, weights: &Weights, check: &NumericCheck) -> Result<Optimized, FusionError> {
    let cx = Checker::new(graph, weights, check)?;
    let mut g = graph.clone();
    let mut store = WeightsStore::new(weights);
    let mut logs: Vec<PassLog> = vec![];
    let mut per_pass = vec![];
    let mut refused: Vec<Refusal> = vec![];
    for pass in &check.passes {
        let mut skip: Vec<NodeId> = vec![];
        loop {
            let (mut g2, mut s2) = (g.clone(), store.clone());
            let options = PassOptions { verify: true, skip: skip.clone(), max_rewrites: None };
            let log = run_pass(pass, &mut g2, &mut s2, &options)?;
            if log.rewrites.is_empty() {
                logs.push(log);
                break;
            }
            let e = cx.error(&g2, &s2);
            if e <= check.tolerance {
                per_pass.push((pass.name, e));
                (g, store) = (g2, s2);
                logs.push(log);
                break;
            }
            let r = cx.culprit(pass, &g, &store, &skip, e)?;
            let whole = r.node.is_none();
            if let Some(n) = r.node {
                skip.push(n);
            }
            refused.push(r);
            if whole {
                break;
            }
        }
    }
    let error = cx.error(&g, &store);
    let weights = store.to_weights(&g)?;
    let mut report = FusionReport::new(graph, &g, &logs);
    for r in &refused {
        report.notes.push(format!("numeric check refused: {r}"));
        let Some(node) = r.node.filter(|n| g.contains(*n)) else {
            continue;
        };
        let reason = format!("numeric check: changes the outputs by {:.3e} > {:.0e}", r.error, r.tolerance);
        match report.not_fused.iter_mut().find(|n| n.node == node) {
            Some(n) => n.reason = format!("{}; {reason}", n.reason),
            None => report.not_fused.push(NotFused {
                node,
                name: r.name.clone(),
                kind: r.kind,
                passes: vec![r.pass],
                reason,
            }),
        }
    }
    let result = CheckResult { tolerance: check.tolerance, floor: check.floor, per_pass, refused, error };
    Ok(Optimized { graph: g, weights, report, check: Some(result) })
}

/// The test helper: [`optimize_checked`], failing with [`FusionError::Refused`] (naming the
/// pass and the node) if any fusion was refused, or if the final graph's error exceeds the
/// tolerance.
pub fn verify_fusion(graph: &Graph, weights: &Weights, check: &NumericCheck) -> Result<Optimized, FusionError> {
    let out = optimize_checked(graph, weights, check)?;
    if let Some(c) = &out.check {
        if let Some(r) = c.refused.first() {
            return Err(FusionError::Refused(r.clone()));
        }
        if c.error > c.tolerance {
            return Err(FusionError::Refused(Refusal {
                pass: "(whole pipeline)",
                node: None,
                name: graph.name.clone(),
                kind: "Graph",
                error: c.error,
                tolerance: c.tolerance,
            }));
        }
    }
    Ok(out)
}

/// ∞-norm relative error of `got` against `want`: `max|got − want| / max|want|`
/// (`max|got − want|` when `want` is all zeros); [`scaled_error`] with floor 0.
pub fn relative_error(got: &ArrayD<f32>, want: &ArrayD<f32>) -> f64 {
    scaled_error(got, want, 0.0)
}

/// `max|got − want| / max(floor, max|want|)` over finite `want`, or the plain
/// `max|got − want|` when that scale is 0. NaN against a number, or a shape mismatch, is
/// infinite; NaN against NaN and equal infinities count as equal.
pub fn scaled_error(got: &ArrayD<f32>, want: &ArrayD<f32>, floor: f64) -> f64 {
    if got.shape() != want.shape() {
        return f64::INFINITY;
    }
    let mut diff = 0f64;
    let mut scale = floor.max(0.0);
    for (g, w) in got.iter().zip(want) {
        let (g, w) = (f64::from(*g), f64::from(*w));
        if g.is_nan() != w.is_nan() {
            return f64::INFINITY;
        }
        if w.is_finite() {
            scale = scale.max(w.abs());
        }
        if !g.is_nan() && g != w {
            diff = diff.max((g - w).abs());
        }
    }
    if diff == 0.0 {
        0.0
    } else if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// The unfused outputs on fixed random inputs, and the comparison against them.
struct Checker {
    inputs: Vec<ArrayD<f32>>,
    reference: Vec<ArrayD<f32>>,
    tolerance: f64,
    floor: f64,
}

impl Checker {
    fn new(graph: &Graph, weights: &Weights, check: &NumericCheck) -> Result<Checker, FusionError> {
        let mut rng = SplitMix64(check.seed);
        let inputs: Vec<ArrayD<f32>> = graph
            .inputs
            .iter()
            .map(|(_, id)| {
                let ty = &graph.node(*id).ty;
                let n = match ty.batch {
                    Batch::Fixed(b) => b,
                    Batch::Symbolic => check.batch.max(1),
                };
                ArrayD::from_shape_simple_fn(IxDyn(&ty.concrete(n)), || rng.uniform())
            })
            .collect();
        let views: Vec<_> = inputs.iter().map(|x| x.view()).collect();
        let reference = interp::run(graph, weights, &views)?;
        Ok(Checker { inputs, reference, tolerance: check.tolerance, floor: check.floor })
    }

    /// The worst output error of `graph` with `store`'s values; infinite when the rewritten
    /// graph cannot be run at all (its weights do not fit it, the interpreter rejects it),
    /// so that the rewrite responsible is refused and named like any other.
    fn error(&self, graph: &Graph, store: &WeightsStore) -> f64 {
        let Ok(weights) = store.to_weights(graph) else {
            return f64::INFINITY;
        };
        let views: Vec<_> = self.inputs.iter().map(|x| x.view()).collect();
        match interp::run(graph, &weights, &views) {
            Ok(got) if got.len() == self.reference.len() => {
                got.iter().zip(&self.reference).map(|(g, w)| scaled_error(g, w, self.floor)).fold(0.0, f64::max)
            }
            _ => f64::INFINITY,
        }
    }

    /// Re-applies `pass` to `graph` one rewrite at a time until the error exceeds the
    /// tolerance, and names that rewrite. If no single step does (a non-deterministic pass),
    /// the pass as a whole is refused.
    fn culprit(
        &self,
        pass: &Pass,
        graph: &Graph,
        store: &WeightsStore,
        skip: &[NodeId],
        whole_error: f64,
    ) -> Result<Refusal, FusionError> {
        let whole = |error| Refusal {
            pass: pass.name,
            node: None,
            name: graph.name.clone(),
            kind: "Graph",
            error,
            tolerance: self.tolerance,
        };
        let (mut g, mut s) = (graph.clone(), store.clone());
        for _ in 0..=graph.node_count() {
            let (mut g2, mut s2) = (g.clone(), s.clone());
            let options = PassOptions { verify: true, skip: skip.to_vec(), max_rewrites: Some(1) };
            let log = run_pass(pass, &mut g2, &mut s2, &options)?;
            let Some((anchor, _)) = log.rewrites.first() else {
                break;
            };
            let e = self.error(&g2, &s2);
            if e > self.tolerance {
                return Ok(match anchor {
                    Some(n) => Refusal {
                        pass: pass.name,
                        node: Some(*n),
                        name: g.node(*n).name.clone(),
                        kind: g.node(*n).op.kind(),
                        error: e,
                        tolerance: self.tolerance,
                    },
                    None => whole(e),
                });
            }
            (g, s) = (g2, s2);
        }
        Ok(whole(whole_error))
    }
}

/// A small deterministic generator for the check's inputs.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}
