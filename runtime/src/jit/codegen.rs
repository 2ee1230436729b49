//! Cranelift plumbing shared by every kernel: the ISA and module setup, the constant pool
//! that owns packed weights and index tables, and [`Fx`], a thin layer over
//! `FunctionBuilder` with the few things kernels are made of — counted loops, f32x4 loads and
//! stores (whole or partial), fused multiply-add, strided gathers, and the elementwise math
//! of [`super::math`].
//!
//! It knows nothing about ops: the kernel tiers (`portable/`, `blocked/`, `eltwise.rs`)
//! decide what to emit.
//!
//! Loops that matter for speed use [`Fx::loop_n`], which carries its pointers as block
//! parameters: see there for why (the e-graph pass sinks pure code into inner loops).
//!
//! Every kernel has the same signature, `fn(table: *const usize, nb: i64, part: i64, parts:
//! i64)`: `table[s]` is the address of buffer slot `s` for the current chunk of `nb` samples
//! (see [`super::plan`]); per-sample sizes, strides and weights' addresses are constants in
//! the code. A kernel defined with [`Jit::parallel_kernel`] does part `part` of `parts` of its
//! work (several threads call it at once with the same table); a **sample-wise** kernel of a
//! training graph ([`Jit::mark_samplewise`]) may be called by several threads at once, each
//! with the table and `nb` of its own range of samples and its `part` (which picks its copy
//! of a fixed scratch region); any other kernel is called once, with `part = 0, parts = 1`,
//! and ignores both.

use crate::error::{Error, Result};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{
    AbiParam, ConstantData, Endianness, InstBuilder, MemFlagsData, Type, UserFuncName, Value, types,
};
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Module, default_libcall_names};

/// `f32x4`, the one vector type the kernels use (the x64 backend lowers vectors up to 128 bits).
pub(super) const V: Type = types::F32X4;
/// Lanes per vector.
pub(super) const LANES: usize = 4;

/// Flags for loads: every buffer a kernel reads (its inputs, packed weights, index tables)
/// is not written while the kernel runs, and every address a kernel computes is in bounds
/// whatever the control flow (padding taps are skipped by loop bounds or redirected to a
/// neutral buffer by a `select`, never guarded by a branch), so loads may be moved and
/// merged freely — which also makes them pure for the e-graph pass, so they are placed next
/// to their use instead of staying where they were written.
fn load_flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap().with_readonly().with_can_move()
}

/// Flags for loads of a buffer the same kernel writes (an accumulator): in bounds, but not
/// read-only, so they stay ordered with the stores.
fn load_flags_mut() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Flags for stores: in bounds by construction, so they do not trap.
fn store_flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Owns the constant data kernels read through baked-in addresses: packed weights, biases,
/// per-channel affine maps, index tables and zero rows. Each allocation is a boxed slice that
/// is never resized, so its address is stable for the life of the pool, which the compiled
/// model keeps as long as its code.
///
/// **Replay.** Lowering the same graph and plan again allocates the same sequence of
/// constants (their sizes depend only on shapes; no kernel bakes a weight's value into
/// its code — kernels read weights through these addresses). A pool in replay mode
/// ([`ConstPool::replay`]) therefore does not allocate: each request is matched with the
/// allocation made at the same point of the first lowering, whose floats are overwritten
/// in place and whose address is returned. That is how a compiled training graph takes
/// new weights after an optimizer step without generating code again
/// (`Compiled::set_weights`).
#[derive(Debug, Default)]
pub(super) struct ConstPool {
    /// Float allocations in order: the storage, where the data starts in it, its length.
    f32s: Vec<(Box<[f32]>, usize, usize)>,
    i32s: Vec<Box<[i32]>>,
    i64s: Vec<Box<[i64]>>,
    bytes_i64: usize,
    /// Micro-kernel descriptors (see [`super::microkernel`]), kept for their address.
    descs: Vec<(Box<dyn std::any::Any + Send + Sync>, i64)>,
    desc_bytes: usize,
    /// In replay mode: the next allocation of each kind to match.
    cursor: Option<[usize; 4]>,
    /// Set when a replayed request did not match the first lowering's.
    mismatch: bool,
}

impl ConstPool {
    /// Starts replaying the allocations (see the type's documentation).
    pub fn replay(&mut self) {
        self.cursor = Some([0; 4]);
        self.mismatch = false;
    }

    /// Ends a replay: whether every request matched, and all were made.
    pub fn finish_replay(&mut self) -> bool {
        let done = self.cursor.take() == Some([self.f32s.len(), self.i32s.len(), self.i64s.len(), self.descs.len()]);
        done && !std::mem::take(&mut self.mismatch)
    }

    /// In replay mode, the index of the next allocation of kind `k`, counted.
    fn next(&mut self, k: usize) -> Option<usize> {
        let cur = self.cursor.as_mut()?;
        let i = cur[k];
        cur[k] += 1;
        Some(i)
    }

    /// Replays a float allocation of `len` floats written by `fill`. The storage is not
    /// zeroed again: the first lowering zeroed it, and a fill writes the same positions
    /// every time (see [`ConstPool::f32s_filled`]), so the floats it leaves alone are still
    /// zero (packing ~100 MB of a ResNet's training-graph constants, zeroing again cost a
    /// fifth of `set_weights`).
    fn replay_f32(&mut self, i: usize, len: usize, fill: impl FnOnce(&mut [f32])) -> i64 {
        match self.f32s.get_mut(i) {
            Some((b, skip, n)) if *n == len => {
                let dst = &mut b[*skip..*skip + len];
                fill(dst);
                dst.as_ptr().expose_provenance() as i64
            }
            _ => {
                self.mismatch = true;
                0
            }
        }
    }

    /// Stores floats and returns their address (never of an empty allocation).
    pub fn f32s(&mut self, mut data: Vec<f32>) -> i64 {
        if data.is_empty() {
            data.push(0.0);
        }
        if let Some(i) = self.next(0) {
            return self.replay_f32(i, data.len(), |d| d.copy_from_slice(&data));
        }
        let len = data.len();
        let b = data.into_boxed_slice();
        let addr = b.as_ptr().expose_provenance() as i64;
        self.f32s.push((b, 0, len));
        addr
    }

    /// Stores 32-bit integers and returns their address.
    pub fn i32s(&mut self, mut data: Vec<i32>) -> i64 {
        if data.is_empty() {
            data.push(0);
        }
        if let Some(i) = self.next(1) {
            return match self.i32s.get(i) {
                Some(b) if **b == data[..] => b.as_ptr().expose_provenance() as i64,
                _ => {
                    self.mismatch = true;
                    0
                }
            };
        }
        let b = data.into_boxed_slice();
        let addr = b.as_ptr().expose_provenance() as i64;
        self.i32s.push(b);
        addr
    }

    /// Stores floats at a 64-byte aligned address (so no vector load of them straddles two
    /// cache lines) and returns it.
    pub fn f32s_aligned(&mut self, data: &[f32]) -> i64 {
        self.f32s_filled(data.len(), |b| b.copy_from_slice(data))
    }

    /// Stores `len` floats, zeroed and then written by `fill`, at a 64-byte aligned
    /// address, and returns it (large packed weights are written in place, once). `fill`
    /// only assigns, never reads, and which floats it assigns depends only on shapes: a
    /// replay calls it on the same storage without zeroing it first.
    pub fn f32s_filled(&mut self, len: usize, fill: impl FnOnce(&mut [f32])) -> i64 {
        if let Some(i) = self.next(0) {
            return self.replay_f32(i, len, fill);
        }
        let mut b = vec![0f32; len + 16].into_boxed_slice();
        let skip = b.as_ptr().align_offset(64).min(16);
        fill(&mut b[skip..skip + len]);
        let addr = b[skip..].as_ptr().expose_provenance() as i64;
        self.f32s.push((b, skip, len));
        addr
    }

    /// Stores `data`, rewritten in place by `fill` (which may read what it overwrites), and
    /// returns its address: a big weight the caller gave away is packed in its own memory
    /// instead of a fresh copy (no second buffer, no page faults on it). The address is
    /// wherever the allocation put it (16-byte aligned from the system allocator, not
    /// necessarily 64). A replay copies `data` into the first lowering's storage and runs
    /// `fill` there.
    pub fn f32s_in_place(&mut self, mut data: Vec<f32>, fill: impl FnOnce(&mut [f32])) -> i64 {
        let len = data.len();
        if let Some(i) = self.next(0) {
            return self.replay_f32(i, len, |d| {
                d.copy_from_slice(&data);
                fill(d)
            });
        }
        if data.is_empty() {
            data.push(0.0);
        }
        fill(&mut data[..len]);
        let b = data.into_boxed_slice();
        let addr = b.as_ptr().expose_provenance() as i64;
        self.f32s.push((b, 0, len));
        addr
    }

    /// Stores 64-bit integers and returns their address.
    pub fn i64s(&mut self, mut data: Vec<i64>) -> i64 {
        if data.is_empty() {
            data.push(0);
        }
        if let Some(i) = self.next(2) {
            return match self.i64s.get(i) {
                Some(b) if **b == data[..] => b.as_ptr().expose_provenance() as i64,
                _ => {
                    self.mismatch = true;
                    0
                }
            };
        }
        let b = data.into_boxed_slice();
        let addr = b.as_ptr().expose_provenance() as i64;
        self.bytes_i64 += 8 * b.len();
        self.i64s.push(b);
        addr
    }

    /// Stores a descriptor of `bytes` bytes and returns its address. (Replayed, the first
    /// lowering's descriptor is kept: it holds addresses of this pool, which replay keeps.)
    pub fn keep<T: std::any::Any + Send + Sync>(&mut self, d: T, bytes: usize) -> i64 {
        if let Some(i) = self.next(3) {
            return match self.descs.get(i) {
                Some((old, addr)) if old.is::<T>() => *addr,
                _ => {
                    self.mismatch = true;
                    0
                }
            };
        }
        let b = Box::new(d);
        let addr = std::ptr::from_ref::<T>(&b).expose_provenance() as i64;
        self.descs.push((b, addr));
        self.desc_bytes += bytes;
        addr
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.desc_bytes
            + self.bytes_i64
            + 4 * (self.f32s.iter().map(|(b, ..)| b.len()).sum::<usize>()
                + self.i32s.iter().map(|b| b.len()).sum::<usize>())
    }
}

/// The JIT under construction: module, reused contexts, and what the host ISA offers.
pub(super) struct Jit {
    /// The module the kernels are defined in.
    pub module: JITModule,
    ctx: cranelift_codegen::Context,
    fctx: FunctionBuilderContext,
    /// Whether `fma` on f32x4 lowers to one `vfmadd` (needs both AVX and FMA), and the
    /// caller asked for it.
    pub fma: bool,
    /// Kernels defined so far, in definition order.
    pub funcs: Vec<KernelInfo>,
    /// Constant data referenced by the code.
    pub consts: ConstPool,
    /// The ISA of the hand-written micro-kernels Conv2d and Linear call, if any.
    pub isa: Option<super::microkernel::Isa>,
    /// Which algorithm stride-1 3×3 convolutions use (see `blocked::winograd`).
    pub conv: super::ConvAlgorithm,
    /// The algorithm each blocked convolution got, and why.
    pub conv_choices: Vec<super::ConvChoice>,
    /// The model's threads: large weights are packed on this many while compiling.
    pub threads: usize,
    /// Whether the weights are packed again after every optimizer step (a training graph,
    /// `Compiled::set_weights`): a layer is not worth two packings of its weights there.
    pub repacked: bool,
    /// Weights the caller gave away (`Compiled::from_owned`), by parameter: a kernel that
    /// takes one may pack it in its own memory (the weight source no longer has it).
    pub donated: std::collections::HashMap<cnnc_compiler::graph::ParamId, Vec<f32>>,
}

fn jit_err(node: &str, e: impl std::fmt::Display) -> Error {
    Error::Jit { node: node.to_string(), message: e.to_string() }
}

/// The host ISA with `opt_level = speed`. The flags come from `cranelift_native::builder()`,
/// which detects AVX and FMA (the `x86-64-v3`-style presets do not set `has_avx`).
fn host_isa() -> Result<OwnedTargetIsa> {
    let mut flags = settings::builder();
    let set = |f: &mut settings::Builder, k: &str, v: &str| f.set(k, v).map_err(|e| jit_err("<isa>", e));
    set(&mut flags, "opt_level", "speed")?;
    set(&mut flags, "use_colocated_libcalls", "false")?;
    set(&mut flags, "is_pic", "false")?;
    set(&mut flags, "enable_verifier", if cfg!(debug_assertions) { "true" } else { "false" })?;
    let isa = cranelift_native::builder().map_err(|e| jit_err("<isa>", e))?;
    isa.finish(settings::Flags::new(flags)).map_err(|e| jit_err("<isa>", e))
}

fn isa_flag(isa: &OwnedTargetIsa, name: &str) -> bool {
    isa.isa_flags().iter().any(|f| f.name == name && f.as_bool() == Some(true))
}

impl Jit {
    /// A fresh module for the host. `allow_fma`: use `fma` when the ISA makes it one
    /// instruction (the portable path passes `false`: separate multiply and add).
    pub fn new(allow_fma: bool, isa: Option<super::microkernel::Isa>) -> Result<Jit> {
        let host = host_isa()?;
        let fma = allow_fma && isa_flag(&host, "has_avx") && isa_flag(&host, "has_fma");
        let module = JITModule::new(JITBuilder::with_isa(host, default_libcall_names()));
        let ctx = module.make_context();
        Ok(Jit {
            module,
            ctx,
            fctx: FunctionBuilderContext::new(),
            fma,
            funcs: vec![],
            consts: ConstPool::default(),
            isa,
            conv: super::ConvAlgorithm::Auto,
            conv_choices: vec![],
            threads: 1,
            repacked: false,
            donated: Default::default(),
        })
    }

    /// Defines one kernel `fn(table, nb, part, parts)` that does all of its work whatever
    /// `part`; `body` emits its code after the entry block.
    pub fn kernel(&mut self, node: &str, body: impl FnOnce(&mut Fx<'_>)) -> Result<FuncId> {
        self.define(node, None, false, body)
    }

    /// As [`Jit::kernel`], for a kernel that only moves data (a layout reorder).
    pub fn data_kernel(&mut self, node: &str, body: impl FnOnce(&mut Fx<'_>)) -> Result<FuncId> {
        self.define(node, None, true, body)
    }

    /// As [`Jit::parallel_kernel`], for a kernel that only moves data (a padded copy).
    pub fn parallel_data_kernel(&mut self, node: &str, work: u64, body: impl FnOnce(&mut Fx<'_>)) -> Result<FuncId> {
        self.define(node, Some(work), true, body)
    }

    /// Defines a kernel whose `body` does only part `fx.part` of `fx.parts` of the work, so
    /// that threads can share it; `work` is the floating-point operations per sample it
    /// splits (the runtime splits only kernels worth the synchronisation).
    pub fn parallel_kernel(&mut self, node: &str, work: u64, body: impl FnOnce(&mut Fx<'_>)) -> Result<FuncId> {
        self.define(node, Some(work), false, body)
    }

    fn define(&mut self, node: &str, work: Option<u64>, moves: bool, body: impl FnOnce(&mut Fx<'_>)) -> Result<FuncId> {
        if self.consts.cursor.is_some() {
            // Replaying the constants only: no code.
            return Ok(FuncId::from_u32(0));
        }
        let ptr = self.module.target_config().pointer_type();
        let mut sig = self.module.make_signature();
        sig.params.push(AbiParam::new(ptr));
        sig.params.extend([AbiParam::new(types::I64); 3]);
        let id = self.module.declare_anonymous_function(&sig).map_err(|e| jit_err(node, e))?;
        self.ctx.func.signature = sig;
        self.ctx.func.name = UserFuncName::user(0, id.as_u32());
        {
            let mut b = FunctionBuilder::new(&mut self.ctx.func, &mut self.fctx);
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let [table, nb, part, parts] = [0, 1, 2, 3].map(|i| b.block_params(entry)[i]);
            let mut fx = Fx { b, table, nb, part, parts, fma: self.fma };
            body(&mut fx);
            fx.b.ins().return_(&[]);
            fx.b.seal_all_blocks();
            fx.b.finalize(self.module.target_config());
        }
        let r = self.module.define_function(id, &mut self.ctx);
        self.module.clear_context(&mut self.ctx);
        r.map_err(|e| jit_err(node, format!("{e:?}")))?;
        self.funcs.push(KernelInfo { id, name: node.to_string(), work, data_movement: moves, samples: None });
        Ok(id)
    }

    /// Marks the kernels defined since the first `from` as **sample-wise**: each sample of
    /// its batch-major operands is computed from that sample alone (reading fixed-size
    /// operands, such as batch statistics, as given), so threads may run it on disjoint
    /// ranges of samples, each called with `table` and `nb` of its own range (see
    /// `Compiled`); `work` is the operations per sample. A kernel that already splits its
    /// own work ([`Jit::parallel_kernel`]) stays as it is. A sample-wise kernel with a
    /// fixed-size scratch region uses copy `part` of it (the plan makes one per thread).
    pub fn mark_samplewise(&mut self, from: usize, work: u64) {
        for f in self.funcs.iter_mut().skip(from).filter(|f| f.work.is_none()) {
            f.samples = Some(work);
        }
    }
}

/// A defined kernel.
#[derive(Clone, Debug)]
pub(super) struct KernelInfo {
    /// Its function.
    pub id: FuncId,
    /// The node it computes.
    pub name: String,
    /// For a kernel that splits its work into parts: floating-point operations per sample.
    pub work: Option<u64>,
    /// Whether it only moves data (a reorder or a padded copy).
    pub data_movement: bool,
    /// For a sample-wise kernel ([`Jit::mark_samplewise`]): operations per sample.
    pub samples: Option<u64>,
}

/// A function being emitted.
pub(super) struct Fx<'a> {
    /// The underlying builder.
    pub b: FunctionBuilder<'a>,
    /// The slot table argument.
    pub table: Value,
    /// The chunk's sample count argument.
    pub nb: Value,
    /// Which part of the work to do (parallel kernels only; see [`Jit::parallel_kernel`]).
    pub part: Value,
    /// Into how many parts the work is split.
    pub parts: Value,
    /// Whether to emit `fma` (else `fmul` + `fadd`).
    pub fma: bool,
}

impl Fx<'_> {
    /// An i64 constant.
    pub fn i(&mut self, v: i64) -> Value {
        self.b.ins().iconst(types::I64, v)
    }

    /// An f32 constant.
    pub fn f(&mut self, v: f32) -> Value {
        self.b.ins().f32const(v)
    }

    /// An f32x4 with every lane `v`, as a constant-pool vector (`vconst`): inside a loop it
    /// is one load (or a memory operand) rather than a scalar materialised and broadcast on
    /// every iteration.
    pub fn vf(&mut self, v: f32) -> Value {
        self.vconst(V, v.to_bits())
    }

    /// An i32x4 with every lane `v`.
    pub fn vi(&mut self, v: i32) -> Value {
        self.vconst(types::I32X4, v as u32)
    }

    fn vconst(&mut self, ty: Type, lane: u32) -> Value {
        let bytes: Vec<u8> = (0..LANES).flat_map(|_| lane.to_le_bytes()).collect();
        let k = self.b.func.dfg.constants.insert(ConstantData::from(bytes));
        self.b.ins().vconst(ty, k)
    }

    /// The address in slot `slot` of the table.
    pub fn slot(&mut self, slot: usize) -> Value {
        self.b.ins().load(types::I64, load_flags(), self.table, (slot * 8) as i32)
    }

    /// `a + b`.
    pub fn add(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().iadd(a, b)
    }

    /// `a + c`.
    pub fn addi(&mut self, a: Value, c: i64) -> Value {
        if c == 0 { a } else { self.b.ins().iadd_imm_s(a, c) }
    }

    /// The larger of two signed integers.
    pub fn smax(&mut self, a: Value, b: Value) -> Value {
        let gt = self.b.ins().icmp(IntCC::SignedGreaterThan, a, b);
        self.b.ins().select(gt, a, b)
    }

    /// The smaller of two signed integers.
    pub fn smin(&mut self, a: Value, b: Value) -> Value {
        let lt = self.b.ins().icmp(IntCC::SignedLessThan, a, b);
        self.b.ins().select(lt, a, b)
    }

    /// `a · c`.
    pub fn muli(&mut self, a: Value, c: i64) -> Value {
        match c {
            0 => self.i(0),
            1 => a,
            c if c > 0 && (c as u64).is_power_of_two() => self.b.ins().ishl_imm_u(a, i64::from(c.trailing_zeros())),
            c => self.b.ins().imul_imm_s(a, c),
        }
    }

    /// `base + 4·idx`: the address of element `idx` of an f32 array (idx an i64 value).
    pub fn elem(&mut self, base: Value, idx: Value) -> Value {
        let off = self.muli(idx, 4);
        self.add(base, off)
    }

    /// `base + 4·idx·scale`.
    pub fn elem_scaled(&mut self, base: Value, idx: Value, scale: i64) -> Value {
        let off = self.muli(idx, 4 * scale);
        self.add(base, off)
    }

    /// A constant `f32` address (baked pointer).
    pub fn addr(&mut self, a: i64) -> Value {
        self.i(a)
    }

    fn split_off(&mut self, addr: Value, byte_off: i64) -> (Value, i32) {
        match i32::try_from(byte_off) {
            Ok(o) => (addr, o),
            Err(_) => (self.addi(addr, byte_off), 0),
        }
    }

    /// Loads one f32 at `addr + 4·elems`.
    pub fn load_f(&mut self, addr: Value, elems: i64) -> Value {
        let (a, o) = self.split_off(addr, 4 * elems);
        self.b.ins().load(types::F32, load_flags(), a, o)
    }

    /// Loads one i32 at `addr + 4·elems`, sign-extended to i64.
    pub fn load_i32(&mut self, addr: Value, elems: i64) -> Value {
        let (a, o) = self.split_off(addr, 4 * elems);
        self.b.ins().sload32(load_flags(), a, o)
    }

    /// Loads one i64 at `addr + 8·elems`.
    pub fn load_i64(&mut self, addr: Value, elems: i64) -> Value {
        let (a, o) = self.split_off(addr, 8 * elems);
        self.b.ins().load(types::I64, load_flags(), a, o)
    }

    /// Loads an f32x4 at `addr + 4·elems` (any alignment).
    pub fn load_v(&mut self, addr: Value, elems: i64) -> Value {
        let (a, o) = self.split_off(addr, 4 * elems);
        self.b.ins().load(V, load_flags(), a, o)
    }

    /// Loads an f32x4 at `addr + 4·elems` of a buffer this kernel also writes (kept in
    /// order with the stores, like [`Fx::load_f_mut`]).
    pub fn load_v_mut(&mut self, addr: Value, elems: i64) -> Value {
        let (a, o) = self.split_off(addr, 4 * elems);
        self.b.ins().load(V, load_flags_mut(), a, o)
    }

    /// The address of a new 16-byte aligned stack slot of `floats` f32 for this kernel
    /// (per-channel constants a vector loop reads as vectors).
    pub fn stack_floats(&mut self, floats: usize) -> Value {
        let data = cranelift_codegen::ir::StackSlotData::new(
            cranelift_codegen::ir::StackSlotKind::ExplicitSlot,
            u32::try_from(4 * floats).unwrap_or(u32::MAX),
            4,
        );
        let slot = self.b.create_sized_stack_slot(data);
        self.b.ins().stack_addr(types::I64, slot, 0)
    }

    /// Loads one f32 at `addr + 4·elems` into every lane.
    pub fn load_splat(&mut self, addr: Value, elems: i64) -> Value {
        let s = self.load_f(addr, elems);
        self.b.ins().splat(V, s)
    }

    /// Loads `n ≤ 4` consecutive floats into the low lanes (the rest are zero).
    pub fn load_partial(&mut self, addr: Value, elems: i64, n: usize) -> Value {
        self.load_partial_or(addr, elems, n, 0.0)
    }

    /// Loads `n ≤ 4` consecutive floats into the low lanes; the rest are `fill`.
    pub fn load_partial_or(&mut self, addr: Value, elems: i64, n: usize, fill: f32) -> Value {
        if n == LANES {
            return self.load_v(addr, elems);
        }
        let mut v = self.vf(fill);
        for j in 0..n {
            let s = self.load_f(addr, elems + j as i64);
            v = self.b.ins().insertlane(v, s, j as u8);
        }
        v
    }

    /// Loads 4 floats `stride` elements apart, starting at `addr + 4·elems`. Reads exactly
    /// the elements it returns, except for stride 2, which also reads the one after the last.
    pub fn load_strided(&mut self, addr: Value, elems: i64, stride: usize) -> Value {
        match stride {
            1 => self.load_v(addr, elems),
            2 => {
                let a = self.load_v(addr, elems);
                let b = self.load_v(addr, elems + 4);
                self.even_lanes(a, b)
            }
            s => {
                let first = self.load_f(addr, elems);
                let mut v = self.b.ins().scalar_to_vector(V, first);
                for j in 1..LANES {
                    let x = self.load_f(addr, elems + (j * s) as i64);
                    v = self.b.ins().insertlane(v, x, j as u8);
                }
                v
            }
        }
    }

    /// Lanes 0, 2 of `a` and 0, 2 of `b` (`shufps`).
    fn even_lanes(&mut self, a: Value, b: Value) -> Value {
        self.lanes_of(a, b, [0, 2, 4, 6])
    }

    /// The f32x4 whose lane `i` is lane `lanes[i]` of `a ++ b` (0–3 from `a`, 4–7 from
    /// `b`): e.g. `[0, 2, 4, 6]` the even lanes, `[0, 4, 1, 5]` the low halves interleaved.
    pub fn lanes_of(&mut self, a: Value, b: Value, lanes: [u8; 4]) -> Value {
        let mask: Vec<u8> = lanes.iter().flat_map(|l| (0..4).map(move |k| l * 4 + k)).collect();
        let imm = self.b.func.dfg.immediates.push(ConstantData::from(mask));
        let ab = self.bitcast(types::I8X16, a);
        let bb = self.bitcast(types::I8X16, b);
        let s = self.b.ins().shuffle(ab, bb, imm);
        self.bitcast(V, s)
    }

    /// The 4×4 transpose of four vectors: lane `j` of result `i` is lane `i` of `v[j]`.
    pub fn transpose4(&mut self, v: [Value; 4]) -> [Value; 4] {
        let t0 = self.lanes_of(v[0], v[1], [0, 4, 1, 5]);
        let t1 = self.lanes_of(v[2], v[3], [0, 4, 1, 5]);
        let t2 = self.lanes_of(v[0], v[1], [2, 6, 3, 7]);
        let t3 = self.lanes_of(v[2], v[3], [2, 6, 3, 7]);
        [
            self.lanes_of(t0, t1, [0, 1, 4, 5]),
            self.lanes_of(t0, t1, [2, 3, 6, 7]),
            self.lanes_of(t2, t3, [0, 1, 4, 5]),
            self.lanes_of(t2, t3, [2, 3, 6, 7]),
        ]
    }

    /// Reinterprets a vector's bits.
    pub fn bitcast(&mut self, ty: Type, v: Value) -> Value {
        self.b.ins().bitcast(ty, MemFlagsData::new().with_endianness(Endianness::Little), v)
    }

    /// Calls the Rust function at `f` (an `extern "C" fn(i64, …)` with `args.len()` integer
    /// or pointer arguments, in the platform's C convention) with `args`.
    pub fn call(&mut self, f: usize, args: &[Value]) {
        let mut sig = cranelift_codegen::ir::Signature::new(self.b.func.signature.call_conv);
        sig.params.extend(args.iter().map(|_| AbiParam::new(types::I64)));
        let sig = self.b.import_signature(sig);
        let callee = self.i(f as i64);
        self.b.ins().call_indirect(sig, callee, args);
    }

    /// Calls the Rust function at `f` (an `extern "C" fn(f64, …) -> f64` with `args.len()`
    /// f64 arguments) and returns its result: the scalar math (`exp`, `ln`) of the training
    /// kernels' f64 reductions.
    pub fn call_f64(&mut self, f: usize, args: &[Value]) -> Value {
        let mut sig = cranelift_codegen::ir::Signature::new(self.b.func.signature.call_conv);
        sig.params.extend(args.iter().map(|_| AbiParam::new(types::F64)));
        sig.returns.push(AbiParam::new(types::F64));
        let sig = self.b.import_signature(sig);
        let callee = self.i(f as i64);
        let call = self.b.ins().call_indirect(sig, callee, args);
        self.b.inst_results(call)[0]
    }

    /// An f64 constant.
    pub fn d(&mut self, v: f64) -> Value {
        self.b.ins().f64const(v)
    }

    /// Loads the f32 at `addr + 4·idx` (idx an i64 value) widened to f64.
    pub fn load_d(&mut self, addr: Value, idx: Value) -> Value {
        let a = self.elem(addr, idx);
        let v = self.load_f(a, 0);
        self.b.ins().fpromote(types::F64, v)
    }

    /// Loads the i32 at `addr + 4·idx` (idx an i64 value), sign-extended.
    pub fn load_i32_at(&mut self, addr: Value, idx: Value) -> Value {
        let a = self.elem(addr, idx);
        self.load_i32(a, 0)
    }

    /// Loads element `idx` (an i64 value) of a constant i64 table.
    pub fn load_i64_at(&mut self, addr: Value, idx: Value) -> Value {
        let a = self.elem_scaled(addr, idx, 2);
        self.b.ins().load(types::I64, load_flags(), a, 0)
    }

    /// Loads element `idx` of a constant f64 table.
    pub fn load_f64_const(&mut self, addr: Value, idx: Value) -> Value {
        let a = self.elem_scaled(addr, idx, 2);
        self.b.ins().load(types::F64, load_flags(), a, 0)
    }

    /// A mutable f64 accumulator starting at 0 (a sum in registers across a loop).
    pub fn acc_f64(&mut self) -> cranelift_frontend::Variable {
        let z = self.d(0.0);
        self.var(types::F64, z)
    }

    /// `acc += x` on a variable.
    pub fn accumulate(&mut self, acc: cranelift_frontend::Variable, x: Value) {
        let cur = self.b.use_var(acc);
        let s = self.b.ins().fadd(cur, x);
        self.b.def_var(acc, s);
    }

    /// Loads the f32 at `addr + 4·idx` (idx an i64 value).
    pub fn load_f_at(&mut self, addr: Value, idx: Value) -> Value {
        let a = self.elem(addr, idx);
        self.load_f(a, 0)
    }

    /// Loads the f32 at `addr + 4·idx` of a buffer this kernel also writes (a scratch).
    pub fn load_f_mut(&mut self, addr: Value, idx: Value) -> Value {
        let a = self.elem(addr, idx);
        self.b.ins().load(types::F32, load_flags_mut(), a, 0)
    }

    /// Stores the f64 `v` rounded to f32 at `addr + 4·idx`.
    pub fn store_d(&mut self, v: Value, addr: Value, idx: Value) {
        let r = self.b.ins().fdemote(types::F32, v);
        let a = self.elem(addr, idx);
        self.store_f(r, a, 0);
    }

    /// The f64 element `idx` of an f64 array at `addr`.
    pub fn load_f64(&mut self, addr: Value, idx: Value) -> Value {
        let a = self.elem_scaled(addr, idx, 2);
        self.b.ins().load(types::F64, load_flags_mut(), a, 0)
    }

    /// Stores the f64 `v` as element `idx` of an f64 array at `addr`.
    pub fn store_f64(&mut self, v: Value, addr: Value, idx: Value) {
        let a = self.elem_scaled(addr, idx, 2);
        self.b.ins().store(store_flags(), v, a, 0);
    }

    /// `Σ vᵢ·kᵢ + k0` on i64 values.
    pub fn lin(&mut self, terms: &[(Value, i64)], k0: i64) -> Value {
        let mut acc = self.i(k0);
        for (v, k) in terms {
            let t = self.muli(*v, *k);
            acc = self.add(acc, t);
        }
        acc
    }

    /// An i64 value converted to f64.
    pub fn int_to_f64(&mut self, v: Value) -> Value {
        self.b.ins().fcvt_from_sint(types::F64, v)
    }

    /// Stores an f32 at `addr + 4·elems`.
    pub fn store_f(&mut self, v: Value, addr: Value, elems: i64) {
        let (a, o) = self.split_off(addr, 4 * elems);
        self.b.ins().store(store_flags(), v, a, o);
    }

    /// Stores an i64 at `addr + 8·elems`.
    pub fn store_i64(&mut self, v: Value, addr: Value, elems: i64) {
        let (a, o) = self.split_off(addr, 8 * elems);
        self.b.ins().store(store_flags(), v, a, o);
    }

    /// Stores an f32x4 at `addr + 4·elems`.
    pub fn store_v(&mut self, v: Value, addr: Value, elems: i64) {
        let (a, o) = self.split_off(addr, 4 * elems);
        self.b.ins().store(store_flags(), v, a, o);
    }

    /// Stores the low `n ≤ 4` lanes to consecutive floats.
    pub fn store_partial(&mut self, v: Value, addr: Value, elems: i64, n: usize) {
        if n == LANES {
            return self.store_v(v, addr, elems);
        }
        for j in 0..n {
            let s = self.b.ins().extractlane(v, j as u8);
            self.store_f(s, addr, elems + j as i64);
        }
    }

    /// `a·b + c` on vectors (or scalars): one `fma` when the ISA has it, else mul + add.
    pub fn fma(&mut self, a: Value, b: Value, c: Value) -> Value {
        if self.fma {
            self.b.ins().fma(a, b, c)
        } else {
            let p = self.b.ins().fmul(a, b);
            self.b.ins().fadd(p, c)
        }
    }

    /// `for i in (start..end).step_by(step)` with runtime bounds; `i` is passed to `body`.
    /// Carries nothing but `i` (see [`Fx::loop_n`] for loops whose speed matters).
    pub fn for_range(&mut self, start: Value, end: Value, step: i64, body: impl FnOnce(&mut Self, Value)) {
        let var = self.b.declare_var(types::I64);
        self.b.def_var(var, start);
        let head = self.b.create_block();
        let block = self.b.create_block();
        let exit = self.b.create_block();
        self.b.ins().jump(head, &[]);
        self.b.switch_to_block(head);
        let i = self.b.use_var(var);
        let go = self.b.ins().icmp(IntCC::SignedLessThan, i, end);
        self.b.ins().brif(go, block, &[], exit, &[]);
        self.b.switch_to_block(block);
        body(self, i);
        let next = self.b.ins().iadd_imm_s(i, step);
        self.b.def_var(var, next);
        self.b.ins().jump(head, &[]);
        self.b.switch_to_block(exit);
    }

    /// `for i in (start..start + count·step).step_by(step)` with constant bounds; a single
    /// iteration is emitted without a loop, none emits nothing.
    pub fn for_const(&mut self, start: i64, count: usize, step: i64, body: impl FnOnce(&mut Self, Value)) {
        match count {
            0 => {}
            1 => {
                let i = self.i(start);
                body(self, i);
            }
            _ => {
                let s = self.i(start);
                let e = self.i(start + count as i64 * step);
                self.for_range(s, e, step, body);
            }
        }
    }

    /// A counted loop that carries values: `vals[i]` starts as given and advances by
    /// `steps[i]` per iteration (pointers in bytes, counters in units; 0 for an invariant,
    /// which may also be a float or a vector);
    /// `body` receives the current values. Runs `count` times (a constant, or a runtime
    /// value that may be ≤ 0).
    ///
    /// **Every non-constant value a loop body uses from outside must be carried.** The
    /// e-graph pass places each pure computation at its first use and, in practice
    /// (Cranelift 0.135), does not hoist it back out of the loops in between, so an address
    /// computed before a loop nest but used in its innermost loop would be recomputed on
    /// every iteration. Loop-carried values are block parameters, which that pass cannot move;
    /// an invariant is passed back as `v + 0` so the constant-phi pass keeps the parameter.
    pub fn loop_n<const N: usize>(
        &mut self,
        count: Count,
        vals: [Value; N],
        steps: [i64; N],
        body: impl FnOnce(&mut Self, [Value; N]),
    ) {
        if let Count::Const(n) = count {
            match n {
                0 => return,
                1 => return body(self, vals),
                _ => {}
            }
        }
        let vars = vals.map(|v| {
            let ty = self.b.func.dfg.value_type(v);
            self.var(ty, v)
        });
        let n = match count {
            Count::Const(n) => self.i(c(n)),
            Count::Dyn(v) => v,
        };
        let counter = self.var(types::I64, n);
        let head = self.b.create_block();
        let exit = self.b.create_block();
        if let Count::Dyn(v) = count {
            let go = self.b.ins().icmp_imm_s(IntCC::SignedGreaterThan, v, 0);
            self.b.ins().brif(go, head, &[], exit, &[]);
        } else {
            self.b.ins().jump(head, &[]);
        }
        self.b.switch_to_block(head);
        let cur = vars.map(|v| self.b.use_var(v));
        body(self, cur);
        for ((v, p), s) in vars.iter().zip(cur).zip(steps) {
            let next = if self.b.func.dfg.value_type(p).is_int() {
                self.b.ins().iadd_imm_s(p, s)
            } else {
                // A float or vector invariant (`s` is 0): `p | p`, which the e-graph pass
                // folds back to `p` after the parameter is kept.
                debug_assert_eq!(s, 0, "only integers advance");
                self.b.ins().bor(p, p)
            };
            self.b.def_var(*v, next);
        }
        let k = self.b.use_var(counter);
        let k = self.b.ins().iadd_imm_s(k, -1);
        self.b.def_var(counter, k);
        self.b.ins().brif(k, head, &[], exit, &[]);
        self.b.switch_to_block(exit);
    }

    /// The f32 sum of the `len` floats at `p`: four lanes of partial sums, then across
    /// them, then the remainder.
    pub fn sum_run(&mut self, p: Value, len: usize) -> Value {
        let z = self.vf(0.0);
        let acc = self.var(V, z);
        self.loop_n(Count::Const(len / LANES), [p], [c(4 * LANES)], |fx, [q]| {
            let v = fx.load_v(q, 0);
            let a = fx.b.use_var(acc);
            let a = fx.b.ins().fadd(a, v);
            fx.b.def_var(acc, a);
        });
        let a = self.b.use_var(acc);
        let mut s = self.b.ins().extractlane(a, 0);
        for l in 1..LANES as u8 {
            let x = self.b.ins().extractlane(a, l);
            s = self.b.ins().fadd(s, x);
        }
        for i in len / LANES * LANES..len {
            let x = self.load_f(p, c(i));
            s = self.b.ins().fadd(s, x);
        }
        s
    }

    /// `dst[i] += src[i]` for the `len` floats of each, by vectors.
    pub fn add_run(&mut self, src: Value, dst: Value, len: usize) {
        let full = len / LANES;
        self.loop_n(Count::Const(full), [src, dst], [c(4 * LANES), c(4 * LANES)], |fx, [s, d]| {
            let a = fx.load_v(s, 0);
            let b = fx.load_v(d, 0);
            let v = fx.b.ins().fadd(b, a);
            fx.store_v(v, d, 0);
        });
        for i in full * LANES..len {
            let a = self.load_f(src, c(i));
            let b = self.load_f(dst, c(i));
            let v = self.b.ins().fadd(b, a);
            self.store_f(v, dst, c(i));
        }
    }

    /// Loops over the chunk's samples: `body(n)`.
    pub fn for_samples(&mut self, body: impl FnOnce(&mut Self, Value)) {
        let zero = self.i(0);
        let nb = self.nb;
        self.for_range(zero, nb, 1, body);
    }

    /// A mutable variable of type `ty` initialised to `init`.
    pub fn var(&mut self, ty: Type, init: Value) -> cranelift_frontend::Variable {
        let v = self.b.declare_var(ty);
        self.b.def_var(v, init);
        v
    }

    /// `if c { a } else { b }` on integers or pointers.
    pub fn select(&mut self, c: Value, a: Value, b: Value) -> Value {
        self.b.ins().select(c, a, b)
    }
}

/// A loop's trip count.
#[derive(Clone, Copy, Debug)]
pub(super) enum Count {
    /// Known at compile time.
    Const(usize),
    /// Computed at run time (may be ≤ 0: no iteration).
    Dyn(Value),
}

/// Converts a size to an `i64` constant operand (sizes come from checked shapes, far below
/// `i64::MAX`).
pub(super) fn c(v: usize) -> i64 {
    v as i64
}

/// The signed comparison `a >= 0`.
pub(super) fn non_negative(fx: &mut Fx<'_>, a: Value) -> Value {
    fx.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, a, 0)
}

/// `[part·n/parts, (part + 1)·n/parts)` of `n` units.
pub(in crate::jit) fn part_range(fx: &mut Fx<'_>, n: Value) -> (Value, Value) {
    let (part, parts) = (fx.part, fx.parts);
    let a = fx.b.ins().imul(n, part);
    let lo = fx.b.ins().udiv(a, parts);
    let p1 = fx.b.ins().iadd_imm_s(part, 1);
    let b = fx.b.ins().imul(n, p1);
    let hi = fx.b.ins().udiv(b, parts);
    (lo, hi)
}
