//! Weights: one tensor per entry of a graph's parameter table, loaded from and saved to a
//! PyTorch `state_dict` in safetensors form (`safetensors.torch.save_file`), or initialised
//! the way PyTorch initialises a freshly constructed module.
//!
//! Loading matches keys **by name** against [`Graph::params`]; every missing, unexpected and
//! mis-shaped key is collected into one [`WeightsError::Mismatch`]. Float parameters accept
//! `F32`, `F64`, `F16` and `BF16` tensors (converted to f32); `num_batches_tracked` accepts
//! `I64`. A file that lacks *every* `num_batches_tracked` key (some exporters drop them) is
//! accepted and the counters are set to 0.
//!
//! Random initialisation ([`Weights::random`]) follows PyTorch's defaults in distribution
//! (not in bit pattern — the generator is a small seeded SplitMix64, so the same seed gives
//! the same weights on every platform):
//!
//! - `Conv2d`/`Linear` weight and bias: `U(−1/√fan_in, 1/√fan_in)` (what
//!   `kaiming_uniform_(a=√5)` reduces to), `fan_in = in_channels/groups·kh·kw` or
//!   `in_features`;
//! - `BatchNorm2d`: weight 1, bias 0, `running_mean` 0, `running_var` 1,
//!   `num_batches_tracked` 0;
//! - fused-epilogue `scale`/`shift`: 1 and 0.

use crate::error::WeightsError;
use cnnc_compiler::graph::{Graph, Param, ParamId};
use cnnc_compiler::ops::{DType, Op, ParamSpec};
use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Where compiled code reads parameter values: [`Weights`], or the fusion passes'
/// copy-on-write store over them ([`crate::fusion_check::WeightsStore`]).
pub trait ParamSource {
    /// The f32 values of parameter `id` in standard order (`None` for a non-f32 parameter or
    /// an id out of range), borrowed where they are stored contiguously.
    fn f32_values(&self, id: ParamId) -> Option<Cow<'_, [f32]>>;
}

impl ParamSource for Weights {
    fn f32_values(&self, id: ParamId) -> Option<Cow<'_, [f32]>> {
        let a = self.f32(id)?;
        Some(match a.as_slice() {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(to_vec(a)),
        })
    }
}

impl ParamSource for crate::fusion_check::WeightsStore<'_> {
    fn f32_values(&self, id: ParamId) -> Option<Cow<'_, [f32]>> {
        self.values(id).map(Cow::Borrowed)
    }
}

/// Weights some of whose f32 values were taken out ([`Weights::take_f32`]): the JIT's view
/// of them while it packs the taken ones in their own memory. A taken parameter reads as
/// missing.
pub(crate) struct Remaining<'a> {
    pub weights: &'a Weights,
    pub taken: HashSet<ParamId>,
}

impl ParamSource for Remaining<'_> {
    fn f32_values(&self, id: ParamId) -> Option<Cow<'_, [f32]>> {
        if self.taken.contains(&id) { None } else { self.weights.f32_values(id) }
    }
}

/// The values of one parameter.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamData {
    /// A float tensor (weights, biases, running statistics).
    F32(ArrayD<f32>),
    /// An integer tensor (`num_batches_tracked`).
    I64(ArrayD<i64>),
}

impl ParamData {
    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            ParamData::F32(a) => a.shape(),
            ParamData::I64(a) => a.shape(),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            ParamData::F32(_) => DType::F32,
            ParamData::I64(_) => DType::I64,
        }
    }

    /// The float tensor, if this is one.
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            ParamData::F32(a) => Some(a),
            ParamData::I64(_) => None,
        }
    }

    /// The integer tensor, if this is one.
    pub fn as_i64(&self) -> Option<&ArrayD<i64>> {
        match self {
            ParamData::I64(a) => Some(a),
            ParamData::F32(_) => None,
        }
    }

    /// A tensor of the spec's shape and dtype filled with `value`.
    pub fn filled(spec: &ParamSpec, value: f32) -> ParamData {
        let dim = IxDyn(&spec.shape);
        match spec.dtype {
            DType::F32 => ParamData::F32(ArrayD::from_elem(dim, value)),
            DType::I64 => ParamData::I64(ArrayD::from_elem(dim, value as i64)),
        }
    }

    /// The same data in standard (C-contiguous) layout.
    fn standard(self) -> ParamData {
        match self {
            ParamData::F32(a) if !a.is_standard_layout() => ParamData::F32(a.as_standard_layout().into_owned()),
            ParamData::I64(a) if !a.is_standard_layout() => ParamData::I64(a.as_standard_layout().into_owned()),
            other => other,
        }
    }
}

/// One tensor per parameter of a graph, indexed by [`ParamId`] (the position in
/// [`Graph::params`]). Every tensor is kept in standard layout, so `as_slice()` on it always
/// succeeds.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    /// Net name (for messages).
    net: String,
    /// The parameter table these weights were made for.
    params: Vec<Param>,
    /// The values, aligned with `params`.
    data: Vec<ParamData>,
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::I64 => "I64",
    }
}

fn is_counter(p: &Param) -> bool {
    p.spec.dtype == DType::I64 && p.spec.suffix == "num_batches_tracked"
}

pub(crate) fn format_error(e: impl std::fmt::Display) -> WeightsError {
    WeightsError::Format { path: None, message: e.to_string() }
}

/// An owned tensor for [`safetensors::serialize`].
pub(crate) struct Owned {
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) bytes: Vec<u8>,
}

impl View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// IEEE half precision to f32 (exact).
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    match exp {
        0 => sign * mant as f32 * f32::powi(2.0, -24),
        0x1f => f32::from_bits(((u32::from(h) & 0x8000) << 16) | 0x7f80_0000 | (mant << 13)),
        _ => f32::from_bits(((u32::from(h) & 0x8000) << 16) | ((exp + 112) << 23) | (mant << 13)),
    }
}

/// Decodes a float tensor's little-endian bytes to f32 (copying, so unaligned data is fine).
pub(crate) fn decode_f32(key: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, WeightsError> {
    Ok(match dtype {
        Dtype::F32 => bytes.as_chunks::<4>().0.iter().map(|c| f32::from_le_bytes(*c)).collect(),
        Dtype::F64 => bytes.as_chunks::<8>().0.iter().map(|c| f64::from_le_bytes(*c) as f32).collect(),
        Dtype::F16 => bytes.as_chunks::<2>().0.iter().map(|c| f16_to_f32(u16::from_le_bytes(*c))).collect(),
        Dtype::BF16 => {
            bytes.as_chunks::<2>().0.iter().map(|c| f32::from_bits(u32::from(u16::from_le_bytes(*c)) << 16)).collect()
        }
        other => {
            return Err(WeightsError::DType {
                key: key.to_string(),
                expected: "F32 (or F64, F16, BF16)".into(),
                found: other.to_string(),
            });
        }
    })
}

/// Decodes an integer tensor's little-endian bytes to i64.
pub(crate) fn decode_i64(key: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<i64>, WeightsError> {
    match dtype {
        Dtype::I64 => Ok(bytes.as_chunks::<8>().0.iter().map(|c| i64::from_le_bytes(*c)).collect()),
        other => Err(WeightsError::DType { key: key.to_string(), expected: "I64".into(), found: other.to_string() }),
    }
}

/// SplitMix64: a tiny, well-mixed, seedable generator.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        let v = lo + (hi - lo) * u;
        if v < hi { v } else { lo }
    }
}

/// A generator for one parameter: seeded from the run's seed and the key (FNV-1a), so a
/// parameter's values do not change when unrelated layers are added to the net.
fn rng_for(seed: u64, key: &str) -> SplitMix64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut r = SplitMix64(seed ^ h);
    r.next_u64();
    r
}

/// How one parameter is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    /// Every element equal to this.
    Const(f32),
    /// `U(−b, b)`.
    Uniform(f32),
}

/// What role a parameter plays, as far as initialisation cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Weight or bias of a Conv2d/Linear, with its fan-in.
    Affine(usize),
    /// A BatchNorm parameter or buffer.
    BatchNorm,
    /// A fused `scale`/`shift`.
    Epilogue,
    /// Anything else.
    Other,
}

/// The module path of a key (`layer1.0.conv1.weight` → `layer1.0.conv1`).
fn prefix(key: &str) -> &str {
    key.rsplit_once('.').map_or("", |(p, _)| p)
}

fn sibling(prefix: &str, suffix: &str) -> String {
    if prefix.is_empty() { suffix.to_string() } else { format!("{prefix}.{suffix}") }
}

/// The role of every parameter: from the op that uses it when one does, otherwise guessed
/// from its spec and its siblings' keys.
fn roles(graph: &Graph) -> Vec<Role> {
    let mut roles = vec![None; graph.params.len()];
    let order = graph.topo_order().unwrap_or_else(|_| graph.node_ids());
    for id in order {
        let node = graph.node(id);
        let specs = node.op.def().params();
        for (spec, pid) in specs.iter().zip(&node.params) {
            let role = match (&node.op, spec.suffix) {
                (_, "scale" | "shift") => Role::Epilogue,
                (Op::Conv2d(c), "weight" | "bias") => {
                    Role::Affine(c.in_channels / c.groups.max(1) * c.kernel.0 * c.kernel.1)
                }
                (Op::Linear(l), "weight" | "bias") => Role::Affine(l.in_features),
                (Op::BatchNorm2d(_), _) => Role::BatchNorm,
                _ => Role::Other,
            };
            if let Some(r) = roles.get_mut(pid.0) {
                *r = Some(role);
            }
        }
    }
    let names: HashSet<&str> = graph.params.iter().map(|p| p.name.as_str()).collect();
    let by_name: HashMap<&str, &Param> = graph.params.iter().map(|p| (p.name.as_str(), p)).collect();
    let fan_in = |p: &Param| -> Option<usize> {
        let s = &p.spec.shape;
        (s.len() == 2 || s.len() == 4).then(|| s[1..].iter().product())
    };
    graph
        .params
        .iter()
        .zip(roles)
        .map(|(p, r)| {
            r.unwrap_or_else(|| {
                let pre = prefix(&p.name);
                let is_bn = names.contains(sibling(pre, "running_mean").as_str());
                match p.spec.suffix {
                    "scale" | "shift" => Role::Epilogue,
                    _ if is_bn => Role::BatchNorm,
                    "weight" => fan_in(p).map_or(Role::Other, Role::Affine),
                    "bias" => by_name
                        .get(sibling(pre, "weight").as_str())
                        .and_then(|w| fan_in(w))
                        .map_or(Role::Other, Role::Affine),
                    _ => Role::Other,
                }
            })
        })
        .collect()
}

fn default_init(spec: &ParamSpec, role: Role) -> Init {
    match (role, spec.suffix) {
        (Role::Affine(fan_in), _) => Init::Uniform(if fan_in > 0 { 1.0 / (fan_in as f32).sqrt() } else { 0.0 }),
        (_, "weight" | "running_var" | "scale") => Init::Const(1.0),
        _ => Init::Const(0.0),
    }
}

impl Weights {
    /// The values, in parameter order, moved out.
    pub fn into_data(self) -> Vec<ParamData> {
        self.data
    }

    fn new_unchecked(graph: &Graph, data: Vec<ParamData>) -> Weights {
        Weights { net: graph.name.clone(), params: graph.params.clone(), data }
    }

    fn mismatch(
        &self,
        missing: Vec<String>,
        unexpected: Vec<String>,
        misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    ) -> WeightsError {
        WeightsError::Mismatch { net: self.net.clone(), missing, unexpected, misshaped }
    }

    /// Reads a PyTorch `state_dict` saved with `safetensors.torch.save_file`, matching keys
    /// by name against the graph's parameters.
    ///
    /// Errors: [`WeightsError::Format`] for bytes that are not safetensors,
    /// [`WeightsError::Mismatch`] listing every missing, unexpected and mis-shaped key,
    /// [`WeightsError::DType`] for a tensor of an unsupported element type.
    pub fn from_safetensors(graph: &Graph, bytes: &[u8]) -> Result<Weights, WeightsError> {
        let st = SafeTensors::deserialize(bytes).map_err(format_error)?;
        let file: HashMap<&str, safetensors::tensor::TensorView<'_>> = st.iter().collect();
        let declared: HashSet<&str> = graph.params.iter().map(|p| p.name.as_str()).collect();
        let mut unexpected: Vec<String> =
            file.keys().filter(|k| !declared.contains(*k)).map(|k| k.to_string()).collect();
        unexpected.sort();
        let no_counters = graph.params.iter().filter(|p| is_counter(p)).all(|p| !file.contains_key(p.name.as_str()));
        let mut missing = vec![];
        let mut misshaped = vec![];
        for p in &graph.params {
            match file.get(p.name.as_str()) {
                None if no_counters && is_counter(p) => {}
                None => missing.push(p.name.clone()),
                Some(v) if v.shape() != p.spec.shape.as_slice() => {
                    misshaped.push((p.name.clone(), p.spec.shape.clone(), v.shape().to_vec()))
                }
                Some(_) => {}
            }
        }
        if !(missing.is_empty() && unexpected.is_empty() && misshaped.is_empty()) {
            return Err(WeightsError::Mismatch { net: graph.name.clone(), missing, unexpected, misshaped });
        }
        let mut data = Vec::with_capacity(graph.params.len());
        for p in &graph.params {
            let dim = IxDyn(&p.spec.shape);
            let Some(v) = file.get(p.name.as_str()) else {
                data.push(ParamData::filled(&p.spec, 0.0));
                continue;
            };
            data.push(match p.spec.dtype {
                DType::F32 => ParamData::F32(
                    ArrayD::from_shape_vec(dim, decode_f32(&p.name, v.dtype(), v.data())?).map_err(format_error)?,
                ),
                DType::I64 => ParamData::I64(
                    ArrayD::from_shape_vec(dim, decode_i64(&p.name, v.dtype(), v.data())?).map_err(format_error)?,
                ),
            });
        }
        Ok(Weights::new_unchecked(graph, data))
    }

    /// Reads a safetensors file (see [`Weights::from_safetensors`]). I/O and format errors
    /// name the file.
    pub fn load(graph: &Graph, path: impl AsRef<Path>) -> Result<Weights, WeightsError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| WeightsError::Io { path: shown.clone(), source })?;
        Weights::from_safetensors(graph, &bytes).map_err(|e| match e {
            WeightsError::Format { path: None, message } => WeightsError::Format { path: Some(shown), message },
            other => other,
        })
    }

    /// Serialises to safetensors with the same keys, shapes and dtypes PyTorch uses
    /// (`F32`, and `I64` for `num_batches_tracked`), loadable with
    /// `safetensors.torch.load_file` and `model.load_state_dict`.
    pub fn to_safetensors(&self, graph: &Graph) -> Result<Vec<u8>, WeightsError> {
        self.check(graph)?;
        let tensors: Vec<(String, Owned)> = self
            .params
            .iter()
            .zip(&self.data)
            .map(|(p, d)| {
                let (dtype, bytes) = match d {
                    ParamData::F32(a) => (Dtype::F32, a.iter().flat_map(|v| v.to_le_bytes()).collect()),
                    ParamData::I64(a) => (Dtype::I64, a.iter().flat_map(|v| v.to_le_bytes()).collect()),
                };
                (p.name.clone(), Owned { dtype, shape: d.shape().to_vec(), bytes })
            })
            .collect();
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata)).map_err(format_error)
    }

    /// Writes [`Weights::to_safetensors`] to a file.
    pub fn save(&self, graph: &Graph, path: impl AsRef<Path>) -> Result<(), WeightsError> {
        let path = path.as_ref();
        let bytes = self.to_safetensors(graph)?;
        std::fs::write(path, bytes).map_err(|source| WeightsError::Io { path: path.display().to_string(), source })
    }

    /// PyTorch's default initialisation (see the module docs), deterministic in `seed`.
    pub fn random(graph: &Graph, seed: u64) -> Weights {
        let data = graph
            .params
            .iter()
            .zip(roles(graph))
            .map(|(p, role)| match default_init(&p.spec, role) {
                Init::Const(v) => ParamData::filled(&p.spec, v),
                Init::Uniform(b) => {
                    let mut rng = rng_for(seed, &p.name);
                    ParamData::F32(ArrayD::from_shape_simple_fn(IxDyn(&p.spec.shape), || rng.uniform(-b, b)))
                }
            })
            .collect();
        Weights::new_unchecked(graph, data)
    }

    /// Gives every BatchNorm a non-trivial affine map, deterministic in `seed`: `weight` in
    /// `[0.5, 1.5)`, `bias` and `running_mean` in `[−0.5, 0.5)`, `running_var` in `[0.5, 2)`.
    /// Fused-epilogue `scale`/`shift` (an unfolded BatchNorm) get `[0.5, 1.5)` and
    /// `[−0.5, 0.5)`. Other parameters are left alone.
    pub fn randomize_batchnorm(&mut self, graph: &Graph, seed: u64) {
        for ((p, role), d) in graph.params.iter().zip(roles(graph)).zip(self.data.iter_mut()) {
            if !matches!(role, Role::BatchNorm | Role::Epilogue) || p.spec.dtype != DType::F32 {
                continue;
            }
            let (lo, hi) = match p.spec.suffix {
                "weight" | "scale" => (0.5, 1.5),
                "running_var" => (0.5, 2.0),
                "bias" | "running_mean" | "shift" => (-0.5, 0.5),
                _ => continue,
            };
            let mut rng = rng_for(seed ^ 0xb7e1_5162_8aed_2a6a, &p.name);
            *d = ParamData::F32(ArrayD::from_shape_simple_fn(IxDyn(&p.spec.shape), || rng.uniform(lo, hi)));
        }
    }

    /// Builds weights from one tensor per parameter, in [`Graph::params`] order; shapes and
    /// dtypes are checked.
    pub fn from_params(graph: &Graph, data: Vec<ParamData>) -> Result<Weights, WeightsError> {
        let mut missing = vec![];
        let mut unexpected = vec![];
        let mut misshaped = vec![];
        for (i, p) in graph.params.iter().enumerate() {
            match data.get(i) {
                None => missing.push(p.name.clone()),
                Some(d) if d.shape() != p.spec.shape.as_slice() => {
                    misshaped.push((p.name.clone(), p.spec.shape.clone(), d.shape().to_vec()))
                }
                Some(d) if d.dtype() != p.spec.dtype => {
                    return Err(WeightsError::DType {
                        key: p.name.clone(),
                        expected: dtype_name(p.spec.dtype).into(),
                        found: dtype_name(d.dtype()).into(),
                    });
                }
                Some(_) => {}
            }
        }
        for i in graph.params.len()..data.len() {
            unexpected.push(format!("#{i} (the net has {} parameters)", graph.params.len()));
        }
        if !(missing.is_empty() && unexpected.is_empty() && misshaped.is_empty()) {
            return Err(WeightsError::Mismatch { net: graph.name.clone(), missing, unexpected, misshaped });
        }
        Ok(Weights::new_unchecked(graph, data.into_iter().map(ParamData::standard).collect()))
    }

    /// Checks that these weights were made for `graph`'s parameter table: same keys in the
    /// same order, same shapes and dtypes.
    pub fn check(&self, graph: &Graph) -> Result<(), WeightsError> {
        let same = self.params.len() == graph.params.len()
            && self
                .params
                .iter()
                .zip(&graph.params)
                .all(|(a, b)| a.name == b.name && a.spec.shape == b.spec.shape && a.spec.dtype == b.spec.dtype);
        if same {
            return Ok(());
        }
        let mine: HashMap<&str, (usize, &Param)> =
            self.params.iter().enumerate().map(|(i, p)| (p.name.as_str(), (i, p))).collect();
        let theirs: HashSet<&str> = graph.params.iter().map(|p| p.name.as_str()).collect();
        let mut missing = vec![];
        let mut misshaped = vec![];
        let mut unexpected: Vec<String> =
            self.params.iter().filter(|p| !theirs.contains(p.name.as_str())).map(|p| p.name.clone()).collect();
        for (j, p) in graph.params.iter().enumerate() {
            match mine.get(p.name.as_str()) {
                None => missing.push(p.name.clone()),
                Some((_, q)) if q.spec.shape != p.spec.shape => {
                    misshaped.push((p.name.clone(), p.spec.shape.clone(), q.spec.shape.clone()))
                }
                Some((_, q)) if q.spec.dtype != p.spec.dtype => {
                    return Err(WeightsError::DType {
                        key: p.name.clone(),
                        expected: dtype_name(p.spec.dtype).into(),
                        found: dtype_name(q.spec.dtype).into(),
                    });
                }
                Some((i, _)) if *i != j => {
                    unexpected.push(format!("{} (parameter #{i} here, #{j} in the net)", p.name));
                }
                Some(_) => {}
            }
        }
        Err(WeightsError::Mismatch { net: graph.name.clone(), missing, unexpected, misshaped })
    }

    /// The float tensor of a parameter; `None` for an integer parameter or an id out of range.
    pub fn f32(&self, id: ParamId) -> Option<&ArrayD<f32>> {
        self.data.get(id.0).and_then(ParamData::as_f32)
    }

    /// Moves a float parameter's values out (standard order; no copy), leaving an empty
    /// array in its place: for [`crate::Compiled::from_owned`], which reads the rest through
    /// [`Remaining`] and drops these weights afterwards. `None` for an integer parameter or
    /// an id out of range.
    pub(crate) fn take_f32(&mut self, id: ParamId) -> Option<Vec<f32>> {
        let slot = self.data.get_mut(id.0)?;
        let ParamData::F32(a) = slot else { return None };
        let len = a.len();
        let a = std::mem::replace(a, ArrayD::zeros(IxDyn(&[0])));
        let a = if a.is_standard_layout() { a } else { a.as_standard_layout().into_owned() };
        let (mut v, offset) = a.into_raw_vec_and_offset();
        if let Some(o) = offset.filter(|&o| o > 0) {
            v.drain(..o);
        }
        v.truncate(len);
        Some(v)
    }

    /// The values of a float parameter in standard order, to change in place (its shape and
    /// dtype stay the declared ones; values are always stored in standard layout); `None`
    /// for an integer parameter or an id out of range.
    pub fn f32_values_mut(&mut self, id: ParamId) -> Option<&mut [f32]> {
        match self.data.get_mut(id.0)? {
            ParamData::F32(a) => a.as_slice_mut(),
            _ => None,
        }
    }

    /// The tensor of a parameter.
    ///
    /// # Panics
    ///
    /// If `id` is not a parameter of the graph these weights were made for.
    pub fn get(&self, id: ParamId) -> &ParamData {
        &self.data[id.0]
    }

    /// Replaces a parameter's values; the shape and dtype must be the declared ones.
    pub fn set(&mut self, id: ParamId, data: ParamData) -> Result<(), WeightsError> {
        let Some(p) = self.params.get(id.0) else {
            let unexpected = vec![format!("#{} (the net has {} parameters)", id.0, self.params.len())];
            return Err(self.mismatch(vec![], unexpected, vec![]));
        };
        if data.shape() != p.spec.shape.as_slice() {
            let misshaped = vec![(p.name.clone(), p.spec.shape.clone(), data.shape().to_vec())];
            return Err(self.mismatch(vec![], vec![], misshaped));
        }
        if data.dtype() != p.spec.dtype {
            return Err(WeightsError::DType {
                key: p.name.clone(),
                expected: dtype_name(p.spec.dtype).into(),
                found: dtype_name(data.dtype()).into(),
            });
        }
        self.data[id.0] = data.standard();
        Ok(())
    }

    /// The tensor stored under a `state_dict` key.
    pub fn by_name<'a>(&'a self, graph: &Graph, key: &str) -> Option<&'a ParamData> {
        let i = graph.params.iter().position(|p| p.name == key)?;
        self.data.get(i)
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the net has no parameters.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// `(key, tensor)` pairs in `state_dict` order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ParamData)> {
        self.params.iter().map(|p| p.name.as_str()).zip(&self.data)
    }
}

/// The elements of `a` in standard (row-major) order: a copy of its memory when it is
/// contiguous, an element-by-element walk otherwise.
pub(crate) fn to_vec(a: &ArrayD<f32>) -> Vec<f32> {
    match a.as_slice() {
        Some(s) => s.to_vec(),
        None => a.iter().copied().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnc_compiler::GraphBuilder;
    use cnnc_compiler::ops::{BatchNorm2d, Linear};
    use cnnc_compiler::shape::TensorType;

    /// `0: Linear(4, 3)`, `1: BatchNorm2d(2)` (unused), `2: Linear(3, 2, bias=False)`.
    fn net() -> Graph {
        let mut b = GraphBuilder::new("tiny");
        let x = b.input("x", TensorType::new(vec![4]));
        let l0 = Op::Linear(Linear { in_features: 4, out_features: 3, bias: true, epilogue: Default::default() });
        let h = b.layer("0", l0, &[x]).unwrap();
        let bn = Op::BatchNorm2d(BatchNorm2d {
            num_features: 2,
            eps: 1e-5,
            momentum: 0.1,
            affine: true,
            track_running_stats: true,
        });
        b.register_params("1", &bn);
        let l2 = Op::Linear(Linear { in_features: 3, out_features: 2, bias: false, epilogue: Default::default() });
        let y = b.layer("2", l2, &[h]).unwrap();
        b.output("y", y);
        b.finish()
    }

    fn tensor(dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> Owned {
        Owned { dtype, shape: shape.to_vec(), bytes }
    }

    fn f32_bytes(n: usize, start: f32) -> Vec<u8> {
        (0..n).flat_map(|i| (start + i as f32).to_le_bytes()).collect()
    }

    fn file(entries: &[(&str, Owned)]) -> Vec<u8> {
        safetensors::serialize(entries.iter().map(|(k, t)| (*k, t)), None).unwrap()
    }

    fn full_file() -> Vec<(&'static str, Owned)> {
        vec![
            ("0.weight", tensor(Dtype::F32, &[3, 4], f32_bytes(12, 0.0))),
            ("0.bias", tensor(Dtype::F32, &[3], f32_bytes(3, 100.0))),
            ("1.weight", tensor(Dtype::F32, &[2], f32_bytes(2, 1.0))),
            ("1.bias", tensor(Dtype::F32, &[2], f32_bytes(2, 0.0))),
            ("1.running_mean", tensor(Dtype::F32, &[2], f32_bytes(2, 0.0))),
            ("1.running_var", tensor(Dtype::F32, &[2], f32_bytes(2, 1.0))),
            ("1.num_batches_tracked", tensor(Dtype::I64, &[], 7i64.to_le_bytes().to_vec())),
            ("2.weight", tensor(Dtype::F32, &[2, 3], f32_bytes(6, -3.0))),
        ]
    }

    #[test]
    fn loads_by_name_and_round_trips() {
        let g = net();
        let w = Weights::from_safetensors(&g, &file(&full_file())).unwrap();
        assert_eq!(w.len(), 8);
        assert_eq!(w.f32(ParamId(0)).unwrap().shape(), &[3, 4]);
        assert_eq!(w.f32(ParamId(0)).unwrap()[[2, 3]], 11.0);
        assert_eq!(w.f32(ParamId(1)).unwrap().as_slice().unwrap(), &[100.0, 101.0, 102.0]);
        assert_eq!(w.get(ParamId(6)).as_i64().unwrap().iter().copied().collect::<Vec<_>>(), vec![7]);
        assert_eq!(w.by_name(&g, "2.weight").unwrap().as_f32().unwrap()[[1, 2]], 2.0);
        assert!(w.by_name(&g, "3.weight").is_none());
        let bytes = w.to_safetensors(&g).unwrap();
        let again = Weights::from_safetensors(&g, &bytes).unwrap();
        assert_eq!(w, again);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("1.num_batches_tracked").unwrap().dtype(), Dtype::I64);
        assert_eq!(st.tensor("1.num_batches_tracked").unwrap().shape(), &[] as &[usize]);
    }

    #[test]
    fn every_problem_is_listed_in_one_error() {
        let g = net();
        let mut entries = full_file();
        entries.retain(|(k, _)| *k != "0.bias" && *k != "1.running_var");
        entries[0] = ("0.weight", tensor(Dtype::F32, &[4, 3], f32_bytes(12, 0.0)));
        entries.push(("2.bias", tensor(Dtype::F32, &[2], f32_bytes(2, 0.0))));
        entries.push(("fc.weight", tensor(Dtype::F32, &[1], f32_bytes(1, 0.0))));
        let err = Weights::from_safetensors(&g, &file(&entries)).unwrap_err();
        let WeightsError::Mismatch { net, missing, unexpected, misshaped } = &err else {
            panic!("expected a mismatch, got {err}");
        };
        assert_eq!(net, "tiny");
        assert_eq!(missing, &["0.bias", "1.running_var"]);
        assert_eq!(unexpected, &["2.bias", "fc.weight"]);
        assert_eq!(misshaped, &[("0.weight".to_string(), vec![3, 4], vec![4, 3])]);
        let text = err.to_string();
        assert!(text.contains("0.weight: expected [3, 4], found [4, 3]"), "{text}");
        assert!(text.contains("missing: 1.running_var"), "{text}");
        assert!(text.contains("unexpected: fc.weight"), "{text}");
    }

    #[test]
    fn counters_may_all_be_absent_but_not_some() {
        let g = net();
        let mut entries = full_file();
        entries.retain(|(k, _)| !k.ends_with("num_batches_tracked"));
        let w = Weights::from_safetensors(&g, &file(&entries)).unwrap();
        assert_eq!(w.get(ParamId(6)), &ParamData::I64(ArrayD::zeros(IxDyn(&[]))));

        // Two BatchNorms, one counter present: the other is reported missing.
        let mut b = GraphBuilder::new("two");
        let bn = Op::BatchNorm2d(BatchNorm2d {
            num_features: 1,
            eps: 1e-5,
            momentum: 0.1,
            affine: false,
            track_running_stats: true,
        });
        b.register_params("a", &bn);
        b.register_params("b", &bn);
        let g = b.finish();
        let one = || tensor(Dtype::F32, &[1], f32_bytes(1, 1.0));
        let entries = vec![
            ("a.running_mean", one()),
            ("a.running_var", one()),
            ("a.num_batches_tracked", tensor(Dtype::I64, &[], 3i64.to_le_bytes().to_vec())),
            ("b.running_mean", one()),
            ("b.running_var", one()),
        ];
        let err = Weights::from_safetensors(&g, &file(&entries)).unwrap_err();
        assert!(matches!(&err, WeightsError::Mismatch { missing, .. } if missing == &["b.num_batches_tracked"]));
    }

    #[test]
    fn other_float_dtypes_are_converted() {
        let g = net();
        let mut entries = full_file();
        let f64s: Vec<u8> = (0..12).flat_map(|i| (f64::from(i) * 0.5).to_le_bytes()).collect();
        entries[0] = ("0.weight", tensor(Dtype::F64, &[3, 4], f64s));
        // 1.0, -2.0, 0.5 in f16 and 1.0, -2.0 in bf16.
        let f16s: Vec<u8> = [0x3c00u16, 0xc000, 0x3800].iter().flat_map(|v| v.to_le_bytes()).collect();
        entries[1] = ("0.bias", tensor(Dtype::F16, &[3], f16s));
        let bf16s: Vec<u8> = [0x3f80u16, 0xc000].iter().flat_map(|v| v.to_le_bytes()).collect();
        entries[2] = ("1.weight", tensor(Dtype::BF16, &[2], bf16s));
        let w = Weights::from_safetensors(&g, &file(&entries)).unwrap();
        assert_eq!(w.f32(ParamId(0)).unwrap()[[2, 3]], 5.5);
        assert_eq!(w.f32(ParamId(1)).unwrap().as_slice().unwrap(), &[1.0, -2.0, 0.5]);
        assert_eq!(w.f32(ParamId(2)).unwrap().as_slice().unwrap(), &[1.0, -2.0]);
    }

    #[test]
    fn f16_special_values() {
        assert_eq!(f16_to_f32(0x0001), f32::powi(2.0, -24));
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn unsupported_dtypes_are_rejected() {
        let g = net();
        let mut entries = full_file();
        entries[0] = ("0.weight", tensor(Dtype::I32, &[3, 4], vec![0; 48]));
        let err = Weights::from_safetensors(&g, &file(&entries)).unwrap_err();
        assert!(matches!(&err, WeightsError::DType { key, found, .. } if key == "0.weight" && found == "I32"), "{err}");
        let mut entries = full_file();
        entries[6] = ("1.num_batches_tracked", tensor(Dtype::F32, &[], vec![0; 4]));
        let err = Weights::from_safetensors(&g, &file(&entries)).unwrap_err();
        assert!(matches!(&err, WeightsError::DType { expected, .. } if expected == "I64"), "{err}");
    }

    #[test]
    fn malformed_bytes_are_a_format_error() {
        let g = net();
        let good = file(&full_file());
        for bad in
            [&b""[..], &b"\x05\0\0\0\0\0\0\0{}"[..], &good[..good.len() - 1], &b"\xff\xff\xff\xff\xff\xff\xff\xff"[..]]
        {
            let err = Weights::from_safetensors(&g, bad).unwrap_err();
            assert!(matches!(err, WeightsError::Format { .. }), "{err}");
        }
        // A header whose offsets point past the data.
        let header = br#"{"0.weight":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0; 10]);
        assert!(matches!(Weights::from_safetensors(&g, &bytes), Err(WeightsError::Format { .. })));
    }

    #[test]
    fn unaligned_data_is_read() {
        let mut b = GraphBuilder::new("odd");
        let l = Op::Linear(Linear { in_features: 1, out_features: 1, bias: true, epilogue: Default::default() });
        b.register_params("l", &l);
        let g = b.finish();
        let bytes = file(&[
            ("l.weight", tensor(Dtype::F32, &[1, 1], 3.0f32.to_le_bytes().to_vec())),
            ("l.bias", tensor(Dtype::F32, &[1], (-4.0f32).to_le_bytes().to_vec())),
        ]);
        // The same bytes starting at an odd address.
        let shifted = [&[0u8][..], &bytes[..]].concat();
        let w = Weights::from_safetensors(&g, &shifted[1..]).unwrap();
        assert_eq!(w.f32(ParamId(0)).unwrap()[[0, 0]], 3.0);
        assert_eq!(w.f32(ParamId(1)).unwrap()[[0]], -4.0);
    }

    #[test]
    fn random_follows_pytorch_defaults() {
        let g = net();
        let w = Weights::random(&g, 42);
        assert_eq!(w, Weights::random(&g, 42));
        assert_ne!(w, Weights::random(&g, 43));
        let bound = 0.5; // 1/sqrt(4)
        for id in [0, 1] {
            let a = w.f32(ParamId(id)).unwrap();
            assert!(a.iter().all(|v| v.abs() <= bound), "{a}");
            assert!(a.iter().any(|v| *v != a[IxDyn(&vec![0; a.ndim()])]));
        }
        let b2 = 1.0 / 3f32.sqrt();
        assert!(w.f32(ParamId(7)).unwrap().iter().all(|v| v.abs() <= b2));
        // The unused BatchNorm is initialised from its spec.
        assert_eq!(w.f32(ParamId(2)).unwrap().as_slice().unwrap(), &[1.0, 1.0]);
        assert_eq!(w.f32(ParamId(3)).unwrap().as_slice().unwrap(), &[0.0, 0.0]);
        assert_eq!(w.f32(ParamId(4)).unwrap().as_slice().unwrap(), &[0.0, 0.0]);
        assert_eq!(w.f32(ParamId(5)).unwrap().as_slice().unwrap(), &[1.0, 1.0]);
        assert_eq!(w.get(ParamId(6)).as_i64().unwrap().sum(), 0);
    }

    #[test]
    fn random_uses_pytorchs_fan_in_for_grouped_convs_and_linears() {
        let out = cnnc_compiler::dsl::compile_str(
            "net C(x: [N, 4, 5, 5]) = Sequential(Conv2d(4, 8, 3, groups = 2), BatchNorm2d(8), Flatten(), Linear(72, 3));",
        );
        let g = out.net("C").expect("compiles").clone();
        let w = Weights::random(&g, 7);
        // kaiming_uniform_(a=√5) and the bias rule both give U(−1/√fan_in, 1/√fan_in), with
        // fan_in = in_channels / groups · kh · kw = 2 · 3 · 3 for the conv.
        for (key, fan_in) in [("0.weight", 18), ("0.bias", 18), ("3.weight", 72), ("3.bias", 72)] {
            let a = w.by_name(&g, key).and_then(ParamData::as_f32).unwrap();
            let bound = 1.0 / (fan_in as f32).sqrt();
            assert!(a.iter().all(|v| v.abs() <= bound), "{key}: outside ±{bound}");
            if key.ends_with("weight") {
                // Uniform over the whole interval: the extremes are reached and the mean
                // square is bound²/3 (to sampling error, 144 and 216 values).
                let max = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(max > 0.9 * bound, "{key}: largest |w| {max}, bound {bound}");
                let ms = a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32;
                let want = bound * bound / 3.0;
                assert!((ms / want - 1.0).abs() < 0.25, "{key}: mean square {ms}, uniform gives {want}");
            }
        }
        for (key, value) in [("1.weight", 1.0), ("1.bias", 0.0), ("1.running_mean", 0.0), ("1.running_var", 1.0)] {
            let a = w.by_name(&g, key).and_then(ParamData::as_f32).unwrap();
            assert!(a.iter().all(|v| *v == value), "{key}");
        }
    }

    #[test]
    fn random_uniform_fills_the_interval() {
        let mut r = SplitMix64(7);
        let v: Vec<f32> = (0..10_000).map(|_| r.uniform(-1.0, 1.0)).collect();
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.05, "{mean}");
        assert!(v.iter().any(|x| *x < -0.99) && v.iter().any(|x| *x > 0.99));
    }

    #[test]
    fn unused_modules_are_initialised_by_spec() {
        let mut b = GraphBuilder::new("unused");
        let l = Op::Linear(Linear { in_features: 16, out_features: 2, bias: true, epilogue: Default::default() });
        b.register_params("fc", &l);
        let g = b.finish();
        let w = Weights::random(&g, 1);
        for id in [0, 1] {
            let a = w.f32(ParamId(id)).unwrap();
            assert!(a.iter().all(|v| v.abs() <= 0.25) && a.iter().any(|v| *v != 0.0), "{a}");
        }
    }

    #[test]
    fn randomize_batchnorm_touches_only_batchnorm() {
        let g = net();
        let mut w = Weights::random(&g, 5);
        let before = w.clone();
        w.randomize_batchnorm(&g, 9);
        assert_eq!(w.get(ParamId(0)), before.get(ParamId(0)));
        assert_eq!(w.get(ParamId(7)), before.get(ParamId(7)));
        assert_eq!(w.get(ParamId(6)), before.get(ParamId(6)));
        let var = w.f32(ParamId(5)).unwrap();
        assert!(var.iter().all(|v| (0.5..2.0).contains(v)) && var.iter().all(|v| *v != 1.0));
        assert!(w.f32(ParamId(2)).unwrap().iter().all(|v| (0.5..1.5).contains(v) && *v != 1.0));
    }

    #[test]
    fn set_and_from_params_check_shapes() {
        let g = net();
        let mut w = Weights::random(&g, 0);
        let err = w.set(ParamId(0), ParamData::F32(ArrayD::zeros(IxDyn(&[4, 3])))).unwrap_err();
        assert!(err.to_string().contains("0.weight: expected [3, 4], found [4, 3]"), "{err}");
        let err = w.set(ParamId(6), ParamData::F32(ArrayD::zeros(IxDyn(&[])))).unwrap_err();
        assert!(matches!(err, WeightsError::DType { .. }));
        assert!(w.set(ParamId(99), ParamData::F32(ArrayD::zeros(IxDyn(&[])))).is_err());
        // A transposed array is stored in standard layout.
        let t = ArrayD::from_shape_vec(IxDyn(&[4, 3]), (0..12).map(|v| v as f32).collect()).unwrap().reversed_axes();
        w.set(ParamId(0), ParamData::F32(t.clone())).unwrap();
        assert!(w.f32(ParamId(0)).unwrap().as_slice().is_some());
        assert_eq!(w.f32(ParamId(0)).unwrap(), &t);

        let data: Vec<ParamData> = w.iter().map(|(_, d)| d.clone()).collect();
        assert_eq!(Weights::from_params(&g, data.clone()).unwrap(), w);
        let err = Weights::from_params(&g, data[..7].to_vec()).unwrap_err();
        assert!(matches!(&err, WeightsError::Mismatch { missing, .. } if missing == &["2.weight"]));
        let mut more = data;
        more.push(ParamData::F32(ArrayD::zeros(IxDyn(&[1]))));
        assert!(matches!(Weights::from_params(&g, more), Err(WeightsError::Mismatch { .. })));
    }

    #[test]
    fn weights_for_another_net_are_rejected() {
        let g = net();
        let mut b = GraphBuilder::new("other");
        let l = Op::Linear(Linear { in_features: 4, out_features: 5, bias: true, epilogue: Default::default() });
        b.register_params("0", &l);
        let other = b.finish();
        let w = Weights::random(&other, 0);
        let err = w.check(&g).unwrap_err();
        let WeightsError::Mismatch { missing, misshaped, .. } = &err else { panic!("{err}") };
        assert_eq!(misshaped.len(), 2);
        assert_eq!(missing.len(), 6);
        assert!(w.to_safetensors(&g).is_err());
    }

    #[test]
    fn load_and_save_name_the_file() {
        let g = net();
        let dir = std::env::temp_dir().join(format!("cnnc-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.safetensors");
        let w = Weights::random(&g, 3);
        w.save(&g, &path).unwrap();
        assert_eq!(Weights::load(&g, &path).unwrap(), w);
        let bad = dir.join("bad.safetensors");
        std::fs::write(&bad, b"nope").unwrap();
        let err = Weights::load(&g, &bad).unwrap_err();
        assert!(err.to_string().contains("bad.safetensors"), "{err}");
        let err = Weights::load(&g, dir.join("absent.safetensors")).unwrap_err();
        assert!(matches!(&err, WeightsError::Io { path, .. } if path.contains("absent.safetensors")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
