//! The blocked tier: kernels on the channel-blocked layout NCHW16c that the micro-kernels
//! read and write — Conv2d and Linear as loop nests over the register tiles (`conv.rs`; stride-1 3×3 ones also as Winograd F(2×2, 3×3), `winograd.rs`),
//! pooling (`pool.rs`), and BatchNorm, concatenation and the layout reorders
//! (`channels.rs`); and, on the plain tensors of training graphs, Conv2d and Linear
//! backward as GEMMs over the same tiles (`gemm_grad.rs`).

pub(in crate::jit) mod channels;
pub(in crate::jit) mod common;
pub(in crate::jit) mod conv;
pub(in crate::jit) mod gemm_grad;
pub(in crate::jit) mod pool;
pub(in crate::jit) mod winograd;
