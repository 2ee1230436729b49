//! Hand-written per-ISA GEMM micro-kernels (AVX-512F, AVX2+FMA) and the Rust drivers that
//! run Conv2d and Linear on them. The generated code calls a driver once per kernel call
//! (`call_indirect` on a constant address, with a constant descriptor) and then applies the
//! fused epilogue itself (see [`super::conv`] and [`super::linear`]).
//!
//! **One micro-kernel shape for both ops.** A register tile is `MR` rows × `NR` columns,
//! lanes running along the columns: `C[i][j] = Σₖ A[k][i] · B[k][j]`, with `A` packed
//! `[K][MR]` (one broadcast per row and `k`) and `B` packed `[K][NR]` (NR/16 or NR/8
//! contiguous vector loads per `k`). AVX-512: 8 × 48 (24 zmm accumulators); AVX2: 6 × 16
//! (12 ymm accumulators).
//!
//! - Conv2d: rows are output channels (weights packed once as `[group][tile][K][MR]`,
//!   `K = (ic, kh, kw)`, the PyTorch order), columns are output pixels of one sample; `B` is
//!   an im2col panel of a block of pixels, built here per call through the remapped row and
//!   column tables of [`super::conv`] (so every padding mode, stride and dilation works),
//!   reused by every channel tile. Rows of `C` are channel planes: the store is contiguous.
//! - Linear: rows are input rows (packed per block of `MR`; a lone row is read in place,
//!   which makes batch 1 a GEMV that streams the weights once), columns are output
//!   features (weights packed once as `[⌈O/NR⌉][K][NR]`).
//!
//! Tiles that overhang the matrix (last channels, last pixels, last features) are computed
//! into a scratch tile and only their valid part copied out; padding in the packed operands
//! is zero.
//!
//! The ISA is chosen when the net is compiled ([`Isa::detect`]), and a descriptor is only
//! ever built for an ISA the CPU has, which is what makes calling the `target_feature`
//! functions sound.

use std::cell::RefCell;

/// Which kernels to compile with: the fastest the CPU supports, a given ISA, or the
/// portable Cranelift code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// AVX-512F if the CPU has it, else AVX2+FMA, else the portable code (also what
    /// [`super::Options::portable`] turns off).
    #[default]
    Auto,
    /// The AVX-512F micro-kernels (an error if the CPU lacks AVX-512F).
    Avx512,
    /// The AVX2+FMA micro-kernels (an error if the CPU lacks AVX2 or FMA).
    Avx2,
    /// The portable Cranelift f32x4 code for every op.
    Portable,
}

/// An instruction set the micro-kernels are written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    Avx512,
    Avx2,
}

impl Isa {
    /// The ISA `k` asks for, if the host has it; `Err` names a forced ISA the host lacks.
    pub fn detect(k: Kernels) -> Result<Option<Isa>, String> {
        let (a512, a2) = host();
        match k {
            Kernels::Portable => Ok(None),
            Kernels::Auto => Ok(if a512 {
                Some(Isa::Avx512)
            } else if a2 {
                Some(Isa::Avx2)
            } else {
                None
            }),
            Kernels::Avx512 if a512 => Ok(Some(Isa::Avx512)),
            Kernels::Avx2 if a2 => Ok(Some(Isa::Avx2)),
            _ => Err(format!("this CPU cannot run the {k:?} micro-kernels")),
        }
    }

    /// Rows of a register tile.
    pub fn mr(self) -> usize {
        match self {
            Isa::Avx512 => AVX512_MR,
            Isa::Avx2 => 6,
        }
    }

    /// Floats per vector.
    pub fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
        }
    }

    /// Columns of a register tile.
    pub fn nr(self) -> usize {
        match self {
            Isa::Avx512 => 16 * AVX512_NV,
            Isa::Avx2 => 16,
        }
    }
}

/// AVX-512 tile: rows, and zmm vectors per row.
const AVX512_MR: usize = 6;
const AVX512_NV: usize = 4;

/// Whether the host has (AVX-512F, AVX2+FMA).
fn host() -> (bool, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        (
            std::arch::is_x86_feature_detected!("avx512f"),
            std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        (false, false)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `C[i][j] = Σₖ A[k·lda + i] · B[k·16·NV + j]` for `i < M`, `j < 16·NV`.
    ///
    /// # Safety
    /// AVX-512F is available; `a` holds `k·lda` floats (`lda ≥ M`), `b` holds `k·16·NV`,
    /// and `c` rows `i < M` of `16·NV` floats at stride `ldc` are writable.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512<const M: usize, const NV: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NV]; M];
            let (mut a, mut b) = (a, b);
            for _ in 0..k {
                let mut bv = [_mm512_setzero_ps(); NV];
                for (j, v) in bv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(b.add(16 * j));
                }
                for (i, r) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*a.add(i));
                    for (x, v) in r.iter_mut().zip(&bv) {
                        *x = _mm512_fmadd_ps(w, *v, *x);
                    }
                }
                a = a.add(lda);
                b = b.add(16 * NV);
            }
            for (i, r) in acc.iter().enumerate() {
                let row = c.add(i * ldc);
                for (j, x) in r.iter().enumerate() {
                    _mm512_storeu_ps(row.add(16 * j), *x);
                }
            }
        }
    }

    /// As [`tile_avx512`] with ymm vectors of 8 (AVX2 + FMA): at `M = 6`, `NV = 2`, 12
    /// accumulators, two loads and one broadcast fill the 16 ymm registers.
    ///
    /// # Safety
    /// AVX2 and FMA are available; bounds as for [`tile_avx512`] with `8·NV` columns.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2<const M: usize, const NV: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
    ) {
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NV]; M];
            let (mut a, mut b) = (a, b);
            for _ in 0..k {
                let mut bv = [_mm256_setzero_ps(); NV];
                for (j, v) in bv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(b.add(8 * j));
                }
                for (i, r) in acc.iter_mut().enumerate() {
                    let w = _mm256_broadcast_ss(&*a.add(i));
                    for (x, v) in r.iter_mut().zip(&bv) {
                        *x = _mm256_fmadd_ps(w, *v, *x);
                    }
                }
                a = a.add(lda);
                b = b.add(8 * NV);
            }
            for (i, r) in acc.iter().enumerate() {
                let row = c.add(i * ldc);
                for (j, x) in r.iter().enumerate() {
                    _mm256_storeu_ps(row.add(8 * j), *x);
                }
            }
        }
    }
}

/// One register tile of `rows` (`isa.mr()` or 1) rows and `nv` vectors (`1 ..=
/// isa.nr() / isa.lanes()`) of columns: see the `x86` kernels for the contract, which the
/// caller upholds.
///
/// # Safety
/// `isa` is available on the host (descriptors are only built for detected ISAs), and the
/// pointers satisfy the kernel's bounds.
#[allow(unused_variables, clippy::too_many_arguments)]
unsafe fn tile(
    isa: Isa,
    rows: usize,
    nv: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use x86::{tile_avx2 as t2, tile_avx512 as t5};
        const M5: usize = AVX512_MR;
        match (isa, rows == 1, nv) {
            (Isa::Avx512, true, 1) => t5::<1, 1>(k, a, lda, b, c, ldc),
            (Isa::Avx512, true, 2) => t5::<1, 2>(k, a, lda, b, c, ldc),
            (Isa::Avx512, true, 3) => t5::<1, 3>(k, a, lda, b, c, ldc),
            (Isa::Avx512, true, _) => t5::<1, 4>(k, a, lda, b, c, ldc),
            (Isa::Avx512, false, 1) => t5::<M5, 1>(k, a, lda, b, c, ldc),
            (Isa::Avx512, false, 2) => t5::<M5, 2>(k, a, lda, b, c, ldc),
            (Isa::Avx512, false, 3) => t5::<M5, 3>(k, a, lda, b, c, ldc),
            (Isa::Avx512, false, _) => t5::<M5, 4>(k, a, lda, b, c, ldc),
            (Isa::Avx2, true, 1) => t2::<1, 1>(k, a, lda, b, c, ldc),
            (Isa::Avx2, true, _) => t2::<1, 2>(k, a, lda, b, c, ldc),
            (Isa::Avx2, false, 1) => t2::<6, 1>(k, a, lda, b, c, ldc),
            (Isa::Avx2, false, _) => t2::<6, 2>(k, a, lda, b, c, ldc),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no micro-kernel ISA is detected off x86-64")
}

/// Runs a full tile straight into `C` when it fits (`valid_r × valid_c` = the whole tile),
/// else into a scratch tile and copies the valid part.
///
/// # Safety
/// As [`tile`]; `c` rows `i < valid_r` of `valid_c` floats at stride `ldc` are writable.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_clipped(
    isa: Isa,
    rows: usize,
    nv: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    valid_r: usize,
    valid_c: usize,
) {
    let nr = nv * isa.lanes();
    if valid_r == rows && valid_c == nr {
        unsafe { tile(isa, rows, nv, k, a, lda, b, c, ldc) };
    } else {
        let mut t = [0f32; 8 * 64];
        unsafe {
            tile(isa, rows, nv, k, a, lda, b, t.as_mut_ptr(), nr);
            for i in 0..valid_r {
                std::ptr::copy_nonoverlapping(t.as_ptr().add(i * nr), c.add(i * ldc), valid_c);
            }
        }
    }
}

thread_local! {
    /// Per-thread packing buffer (an im2col panel or a block of Linear rows).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Bytes of the im2col panel a conv call aims for (stays in L2 while the channel tiles
/// reuse it).
const PANEL_BYTES: usize = 512 << 10;

/// Everything a conv call needs; built at compile time, owned by the constant pool.
#[derive(Debug)]
pub(super) struct ConvDesc {
    pub isa: Isa,
    pub groups: usize,
    pub icg: usize,
    pub ocg: usize,
    pub ih: usize,
    pub iw: usize,
    pub oh: usize,
    pub ow: usize,
    pub kh: usize,
    pub kw: usize,
    /// `[oh][kh]` input row or −1 (see `conv::axis_table`).
    pub rows: Vec<i32>,
    /// `[ow][kw]` input column or −1.
    pub cols: Vec<i32>,
    /// Weights `[group][⌈ocg/MR⌉][K][MR]`, zero-padded.
    pub w: Vec<f32>,
    /// `(stride, dilation, pad)` per axis (rows, columns) when the tables are plain zero
    /// padding, which packs whole runs of pixels at a time.
    affine: Option<[(usize, usize, usize); 2]>,
}

/// `(stride, dilation, pad)` if `table` (`[out][taps]`) is `o·stride + t·dilation − pad`
/// inside `[0, n)` and −1 outside.
fn affine(table: &[i32], taps: usize, n: usize) -> Option<(usize, usize, usize)> {
    let outs = table.len() / taps.max(1);
    let fits = |(s, d, p): (usize, usize, usize)| {
        (0..outs).all(|o| {
            (0..taps).all(|t| {
                let i = (o * s + t * d) as i64 - p as i64;
                table[o * taps + t] == if (0..n as i64).contains(&i) { i as i32 } else { -1 }
            })
        })
    };
    // Recover the candidate from the first entries: pad from the first tap of output 0
    // (search small pads), stride and dilation from differences.
    for p in 0..=taps * 8 {
        for s in 1..=8 {
            for d in 1..=8 {
                let cand = (s, d, p);
                if (taps == 1 && d > 1) || (outs == 1 && s > 1) {
                    continue;
                }
                if fits(cand) {
                    return Some(cand);
                }
            }
        }
    }
    None
}

impl ConvDesc {
    /// Packs PyTorch `[oc][icg][kh][kw]` weights for `isa`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        isa: Isa,
        weight: &[f32],
        groups: usize,
        icg: usize,
        ocg: usize,
        (ih, iw, oh, ow): (usize, usize, usize, usize),
        (kh, kw): (usize, usize),
        rows: Vec<i32>,
        cols: Vec<i32>,
    ) -> ConvDesc {
        let mr = isa.mr();
        let k = icg * kh * kw;
        let tiles = ocg.div_ceil(mr);
        let mut w = vec![0f32; groups * tiles * k * mr];
        for g in 0..groups {
            for o in 0..ocg {
                let (t, j) = (o / mr, o % mr);
                let src = &weight[(g * ocg + o) * k..][..k];
                for (kk, v) in src.iter().enumerate() {
                    w[((g * tiles + t) * k + kk) * mr + j] = *v;
                }
            }
        }
        let affine = affine(&rows, kh, ih).zip(affine(&cols, kw, iw)).map(|(r, c)| [r, c]);
        ConvDesc { isa, groups, icg, ocg, ih, iw, oh, ow, kh, kw, rows, cols, w, affine }
    }

    /// Floats the packed weights hold.
    pub fn bytes(&self) -> usize {
        4 * (self.w.len() + self.rows.len() + self.cols.len())
    }

    fn is_identity(&self) -> bool {
        (self.kh, self.kw) == (1, 1)
            && (self.ih, self.iw) == (self.oh, self.ow)
            && self.rows.iter().enumerate().all(|(i, &r)| r == i as i32)
            && self.cols.iter().enumerate().all(|(i, &c)| c == i as i32)
    }

    /// Packs pixels `p0 .. p0 + n` of group input `x` (`icg` planes) into `panel`, as
    /// `⌈n/NR⌉` sub-panels `[K][NR]`, zero where padding or past `n`.
    fn pack(&self, x: &[f32], p0: usize, n: usize, panel: &mut [f32], identity: bool) {
        let nr = self.isa.nr();
        let k = self.icg * self.kh * self.kw;
        let plane = self.ih * self.iw;
        let mut roff = [0usize; 64];
        let mut coff = [0usize; 64];
        for (s, sub) in panel.chunks_mut(k * nr).take(n.div_ceil(nr)).enumerate() {
            let q0 = p0 + s * nr;
            let valid = (n - s * nr).min(nr);
            // A last, partial sub-panel is only as wide as the vectors it needs.
            let nr = valid.next_multiple_of(self.isa.lanes());
            let sub = &mut sub[..k * nr];
            if identity {
                for (ic, dst) in sub.chunks_mut(nr).enumerate() {
                    dst[..valid].copy_from_slice(&x[ic * plane + q0..][..valid]);
                    dst[valid..].fill(0.0);
                }
                continue;
            }
            if let Some([(sh, dh, pt), (sw, dw, pl)]) = self.affine {
                // Runs of pixels within one output row: `(first j, oh, first ow, length)`.
                let mut runs = [(0usize, 0usize, 0usize, 0usize); 65];
                let (mut nruns, mut j) = (0, 0);
                while j < valid {
                    let (oh, ow0) = ((q0 + j) / self.ow, (q0 + j) % self.ow);
                    let len = (self.ow - ow0).min(valid - j);
                    runs[nruns] = (j, oh, ow0, len);
                    nruns += 1;
                    j += len;
                }
                let mut dst = sub.chunks_mut(nr);
                for ic in 0..self.icg {
                    let xc = &x[ic * plane..][..plane];
                    for a in 0..self.kh {
                        for b in 0..self.kw {
                            let Some(d) = dst.next() else { return };
                            for &(j0, oh, ow0, len) in &runs[..nruns] {
                                let d = &mut d[j0..j0 + len];
                                let r = (oh * sh + a * dh) as isize - pt as isize;
                                if r < 0 || r >= self.ih as isize {
                                    d.fill(0.0);
                                    continue;
                                }
                                let xr = &xc[r as usize * self.iw..][..self.iw];
                                let base = (ow0 * sw + b * dw) as isize - pl as isize;
                                if sw == 1 {
                                    let lo = (-base).clamp(0, len as isize) as usize;
                                    let hi = (self.iw as isize - base).clamp(lo as isize, len as isize) as usize;
                                    d[..lo].fill(0.0);
                                    if hi > lo {
                                        let from = (base + lo as isize) as usize;
                                        d[lo..hi].copy_from_slice(&xr[from..from + hi - lo]);
                                    }
                                    d[hi..].fill(0.0);
                                } else {
                                    for (c, v) in d.iter_mut().enumerate() {
                                        let i = base + (c * sw) as isize;
                                        *v = if i >= 0 && i < self.iw as isize { xr[i as usize] } else { 0.0 };
                                    }
                                }
                            }
                            d[valid..].fill(0.0);
                        }
                    }
                }
                continue;
            }
            for j in 0..valid {
                roff[j] = (q0 + j) / self.ow * self.kh;
                coff[j] = (q0 + j) % self.ow * self.kw;
            }
            let mut dst = sub.chunks_mut(nr);
            for ic in 0..self.icg {
                let xc = &x[ic * plane..][..plane];
                for a in 0..self.kh {
                    for b in 0..self.kw {
                        let Some(d) = dst.next() else { return };
                        for j in 0..valid {
                            let r = self.rows[roff[j] + a];
                            let c = self.cols[coff[j] + b];
                            d[j] = if r >= 0 && c >= 0 { xc[r as usize * self.iw + c as usize] } else { 0.0 };
                        }
                        d[valid..].fill(0.0);
                    }
                }
            }
        }
    }

    /// The convolution without epilogue of `nb` samples.
    fn run(&self, x: &[f32], y: &mut [f32], nb: usize) {
        let (mr, nr) = (self.isa.mr(), self.isa.nr());
        let k = self.icg * self.kh * self.kw;
        let (plane_in, plane) = (self.ih * self.iw, self.oh * self.ow);
        let (in_size, out_size) = (self.groups * self.icg * plane_in, self.groups * self.ocg * plane);
        let tiles = self.ocg.div_ceil(mr);
        let block = ((PANEL_BYTES / (4 * k * nr)).max(1) * nr).min(plane.div_ceil(nr) * nr);
        let identity = self.is_identity();
        SCRATCH.with_borrow_mut(|scratch| {
            // 64-byte aligned, so no vector load of the panel straddles two cache lines.
            if scratch.len() < k * block + 16 {
                scratch.resize(k * block + 16, 0.0);
            }
            let skip = scratch.as_ptr().align_offset(64).min(16);
            let panel = &mut scratch[skip..];
            for n in 0..nb {
                for g in 0..self.groups {
                    let xg = &x[n * in_size + g * self.icg * plane_in..][..self.icg * plane_in];
                    let yg = &mut y[n * out_size + g * self.ocg * plane..][..self.ocg * plane];
                    let wg = &self.w[g * tiles * k * mr..][..tiles * k * mr];
                    let mut p0 = 0;
                    while p0 < plane {
                        let len = block.min(plane - p0);
                        self.pack(xg, p0, len, panel, identity);
                        for t in 0..tiles {
                            let vr = (self.ocg - t * mr).min(mr);
                            let wt = &wg[t * k * mr..][..k * mr];
                            for s in 0..len.div_ceil(nr) {
                                let vc = (len - s * nr).min(nr);
                                let sub = &panel[s * k * nr..][..k * nr];
                                let out = &mut yg[t * mr * plane + p0 + s * nr..];
                                // In bounds: rows `t·mr + i < ocg` of the group's planes,
                                // columns `< plane`.
                                debug_assert!(out.len() >= (vr - 1) * plane + vc);
                                // SAFETY: the ISA was detected; `wt` holds `k·mr`, `sub`
                                // `k·nr`; `out` has `vr` rows of `vc` floats at stride `plane`.
                                unsafe {
                                    tile_clipped(
                                        self.isa,
                                        mr,
                                        vc.div_ceil(self.isa.lanes()),
                                        k,
                                        wt.as_ptr(),
                                        mr,
                                        sub.as_ptr(),
                                        out.as_mut_ptr(),
                                        plane,
                                        vr,
                                        vc,
                                    )
                                };
                            }
                        }
                        p0 += len;
                    }
                }
            }
        });
    }
}

/// Entry point the conv kernel calls: `desc` is a live [`ConvDesc`], `x` and `y` the
/// operand and result of `nb` samples.
///
/// # Safety
/// As promised by the code generator: `desc` points to a descriptor owned by the constant
/// pool, `x` holds `nb` input samples and `y` `nb` output samples, disjoint.
pub(super) unsafe extern "C" fn conv_entry(desc: *const ConvDesc, x: *const f32, y: *mut f32, nb: i64) {
    let d = unsafe { &*desc };
    let nb = nb.max(0) as usize;
    let in_len = nb * d.groups * d.icg * d.ih * d.iw;
    let out_len = nb * d.groups * d.ocg * d.oh * d.ow;
    let (x, y) = unsafe { (std::slice::from_raw_parts(x, in_len), std::slice::from_raw_parts_mut(y, out_len)) };
    d.run(x, y, nb);
}

/// Everything a Linear call needs.
#[derive(Debug)]
pub(super) struct LinearDesc {
    pub isa: Isa,
    pub k: usize,
    pub o: usize,
    /// Weights `[⌈O/NR⌉][K][NR]`, zero-padded, from element `skip` on (64-byte aligned).
    w: Vec<f32>,
    skip: usize,
}

impl LinearDesc {
    /// Packs PyTorch `[O][K]` weights for `isa`.
    pub fn new(isa: Isa, weight: &[f32], k: usize, o: usize) -> LinearDesc {
        let nr = isa.nr();
        let tiles = o.div_ceil(nr);
        let mut w = vec![0f32; tiles * k * nr + 16];
        let skip = w.as_ptr().align_offset(64).min(16);
        for (oi, row) in weight.chunks(k.max(1)).enumerate().take(o) {
            let (t, j) = (oi / nr, oi % nr);
            for (ki, v) in row.iter().enumerate() {
                w[skip + (t * k + ki) * nr + j] = *v;
            }
        }
        LinearDesc { isa, k, o, w, skip }
    }

    /// Floats the packed weights hold.
    pub fn bytes(&self) -> usize {
        4 * self.w.len()
    }

    /// `y = x·Wᵀ` for `m` rows.
    fn run(&self, x: &[f32], y: &mut [f32], m: usize) {
        let (mr, nr, k, o) = (self.isa.mr(), self.isa.nr(), self.k, self.o);
        let tiles = o.div_ceil(nr);
        let full = if m >= 2 { m / mr } else { 0 };
        SCRATCH.with_borrow_mut(|a| {
            if a.len() < k * mr {
                a.resize(k * mr, 0.0);
            }
            for blk in 0..full {
                for (kk, dst) in a.chunks_mut(mr).take(k).enumerate() {
                    for (i, d) in dst.iter_mut().enumerate() {
                        *d = x[(blk * mr + i) * k + kk];
                    }
                }
                for t in 0..tiles {
                    let vc = (o - t * nr).min(nr);
                    let out = &mut y[blk * mr * o + t * nr..];
                    debug_assert!(out.len() >= (mr - 1) * o + vc);
                    // SAFETY: ISA detected; `a` holds `k·mr`, the weight tile `k·nr`; `out`
                    // has `mr` rows of `vc` floats at stride `o`.
                    unsafe {
                        tile_clipped(
                            self.isa,
                            mr,
                            nr / self.isa.lanes(),
                            k,
                            a.as_ptr(),
                            mr,
                            self.w[self.skip + t * k * nr..][..k * nr].as_ptr(),
                            out.as_mut_ptr(),
                            o,
                            mr,
                            vc,
                        )
                    };
                }
            }
        });
        for row in full * mr..m {
            let xr = &x[row * k..][..k];
            for t in 0..tiles {
                let vc = (o - t * nr).min(nr);
                let out = &mut y[row * o + t * nr..][..vc];
                // SAFETY: as above with one row read in place (`lda = 1`).
                unsafe {
                    tile_clipped(
                        self.isa,
                        1,
                        nr / self.isa.lanes(),
                        k,
                        xr.as_ptr(),
                        1,
                        self.w[self.skip + t * k * nr..][..k * nr].as_ptr(),
                        out.as_mut_ptr(),
                        o,
                        1,
                        vc,
                    )
                };
            }
        }
    }
}

/// Entry point the Linear kernel calls: `m` rows of `x` (`[m][K]`) into `y` (`[m][O]`).
///
/// # Safety
/// `desc` is a live [`LinearDesc`]; `x` holds `m·K` floats and `y` `m·O`, disjoint.
pub(super) unsafe extern "C" fn linear_entry(desc: *const LinearDesc, x: *const f32, y: *mut f32, m: i64) {
    let d = unsafe { &*desc };
    let m = m.max(0) as usize;
    let (x, y) = unsafe { (std::slice::from_raw_parts(x, m * d.k), std::slice::from_raw_parts_mut(y, m * d.o)) };
    d.run(x, y, m);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|kk| a[i * k + kk] * b[j * k + kk]).sum();
            }
        }
        c
    }

    #[test]
    fn linear_matches_a_scalar_gemm_on_every_host_isa() {
        for kernels in [Kernels::Avx512, Kernels::Avx2] {
            let Ok(Some(isa)) = Isa::detect(kernels) else { continue };
            for (m, k, o) in [(1, 7, 5), (9, 33, 50), (17, 3, 97), (8, 64, 48)] {
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 37) % 17) as f32 / 8.0 - 1.0).collect();
                let w: Vec<f32> = (0..o * k).map(|i| ((i * 11) % 13) as f32 / 6.0 - 1.0).collect();
                let d = LinearDesc::new(isa, &w, k, o);
                let mut y = vec![0f32; m * o];
                d.run(&x, &mut y, m);
                let want = reference(&x, &w, m, k, o);
                for (g, w) in y.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-4, "{isa:?} {m}x{k}x{o}: {g} vs {w}");
                }
            }
        }
    }
}
