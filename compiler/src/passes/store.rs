//! [`ParamStore`]: the passes' view of parameter *values*, without tensors.
//!
//! Weight-changing passes (BatchNorm folding, linear-chain folding) need the numbers behind
//! a [`ParamId`], but this crate must not depend on ndarray or on the runtime. A store is
//! therefore a plain list of f32 buffers **aligned with [`Graph::params`]**: entry `i` holds
//! the values of parameter `ParamId(i)` in row-major (standard) order, or nothing when the
//! values are not known or are not f32 (`num_batches_tracked`). The runtime adapts its
//! `Weights` to this trait (`cnnc_runtime::fusion_check::WeightsStore`); [`VecStore`] is the
//! in-crate implementation used by tests and by callers that hold raw buffers.
//!
//! Passes keep the store aligned: a new parameter is added to the graph and pushed to the
//! store together (see [`add_param`]), and compaction reorders both the same way.

use crate::graph::{Graph, ParamId};
use crate::ops::{DType, ParamSpec};

/// Parameter values, aligned with a graph's parameter table.
pub trait ParamStore {
    /// Number of entries (equal to `graph.params.len()` when aligned).
    fn len(&self) -> usize;

    /// Whether the store has no entries.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 values of a parameter in standard order; `None` if unknown or not f32.
    fn get(&self, id: ParamId) -> Option<&[f32]>;

    /// Replaces the values of a parameter (the graph's spec says the shape).
    fn set(&mut self, id: ParamId, data: Vec<f32>);

    /// Appends the values of a new parameter and returns its id (the next index).
    fn push(&mut self, data: Vec<f32>) -> ParamId;

    /// Rebuilds the store so that entry `i` is the former entry `order[i]` (entries not
    /// listed are dropped), after the graph's table was compacted the same way.
    fn select(&mut self, order: &[ParamId]);
}

/// A store backed by one optional buffer per parameter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VecStore(pub Vec<Option<Vec<f32>>>);

impl VecStore {
    /// A store whose every f32 parameter is filled by `value(param index, element index)`;
    /// integer parameters get no entry.
    pub fn filled(graph: &Graph, value: impl Fn(usize, usize) -> f32) -> VecStore {
        VecStore(
            graph
                .params
                .iter()
                .enumerate()
                .map(|(i, p)| match p.spec.dtype {
                    DType::F32 => Some((0..numel(&p.spec)).map(|j| value(i, j)).collect()),
                    DType::I64 => None,
                })
                .collect(),
        )
    }
}

impl ParamStore for VecStore {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn get(&self, id: ParamId) -> Option<&[f32]> {
        self.0.get(id.0)?.as_deref()
    }

    fn set(&mut self, id: ParamId, data: Vec<f32>) {
        if let Some(slot) = self.0.get_mut(id.0) {
            *slot = Some(data);
        }
    }

    fn push(&mut self, data: Vec<f32>) -> ParamId {
        self.0.push(Some(data));
        ParamId(self.0.len() - 1)
    }

    fn select(&mut self, order: &[ParamId]) {
        let mut old: Vec<Option<Vec<f32>>> = std::mem::take(&mut self.0);
        self.0 = order.iter().map(|id| old.get_mut(id.0).and_then(Option::take)).collect();
    }
}

/// Elements of a parameter.
pub(crate) fn numel(spec: &ParamSpec) -> usize {
    spec.shape.iter().product()
}

/// The f32 values of `id`, checked against the graph's declared size.
pub(crate) fn values<'s>(graph: &Graph, store: &'s dyn ParamStore, id: ParamId) -> Result<&'s [f32], String> {
    let p = graph.params.get(id.0).ok_or_else(|| format!("parameter #{} is not in the table", id.0))?;
    match store.get(id) {
        Some(v) if v.len() == numel(&p.spec) => Ok(v),
        Some(v) => Err(format!("the values of `{}` have {} elements, not {}", p.name, v.len(), numel(&p.spec))),
        None => Err(format!("the values of `{}` are not known", p.name)),
    }
}

/// Adds a parameter to the graph and its values to the store, keeping both aligned. The key
/// is `{owner}.{suffix}`, or `{owner}#k.{suffix}` for the smallest `k ≥ 2` that is free when
/// that key is taken (a module applied twice).
pub fn add_param(
    graph: &mut Graph,
    store: &mut dyn ParamStore,
    owner: &str,
    spec: ParamSpec,
    data: Vec<f32>,
) -> ParamId {
    let taken = |name: &str| graph.params.iter().any(|p| p.name == name);
    let mut name = format!("{owner}.{}", spec.suffix);
    let mut k = 2;
    while taken(&name) {
        name = format!("{owner}#{k}.{}", spec.suffix);
        k += 1;
    }
    let id = graph.add_param(name, spec);
    let pushed = store.push(data);
    debug_assert_eq!(id, pushed, "the parameter store is not aligned with the graph");
    id
}
