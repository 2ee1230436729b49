//! The micro-kernel ISAs: which the host has ([`Isa::detect`]), which the user forces
//! ([`Kernels`]), and the tile shapes each allows.

/// Which kernels to compile with: the fastest the CPU supports, a given ISA, or the
/// portable Cranelift code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// AVX-512F if the CPU has it, else AVX2+FMA, else the portable code (also what
    /// `Options::portable` turns off).
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
pub(in crate::jit) enum Isa {
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

    /// Most blocks of 16 output channels a conv tile holds.
    pub fn conv_nb(self) -> usize {
        match self {
            Isa::Avx512 => 4,
            Isa::Avx2 => 1,
        }
    }

    /// Most output pixels a conv tile of `nb` blocks holds (the accumulators fill the
    /// register file, leaving room for the weights and one broadcast).
    pub fn conv_mr(self, nb: usize) -> usize {
        match (self, nb) {
            (Isa::Avx512, 4) => 6,
            (Isa::Avx512, 3) => 8,
            (Isa::Avx512, 2) => 12,
            (Isa::Avx512, _) => 14,
            (Isa::Avx2, _) => 6,
        }
    }

    /// Rows of a Linear tile.
    pub fn gemm_mr(self) -> usize {
        6
    }

    /// Most rows of a GEMM tile `valid` columns wide: [`Isa::gemm_mr`] for a whole tile,
    /// more where fewer vectors of columns leave registers for more rows' accumulators.
    pub fn gemm_mr_for(self, valid: usize) -> usize {
        match (self, valid.div_ceil(16)) {
            (Isa::Avx512, 0..=2) => 12,
            (Isa::Avx512, 3) => 8,
            _ => self.gemm_mr(),
        }
    }

    /// Columns of a Linear tile.
    pub fn gemm_nr(self) -> usize {
        match self {
            Isa::Avx512 => 64,
            Isa::Avx2 => 16,
        }
    }
}

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
