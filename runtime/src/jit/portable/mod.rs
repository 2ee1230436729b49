//! The portable tier: pure-Cranelift f32x4 kernels on plain NCHW tensors, for hosts without
//! a micro-kernel ISA or when `Options::portable` asks for them — Conv2d and Linear with
//! their fused epilogues, and pooling — and the backward ops of the training graphs
//! (`conv_grad.rs`, `linear_grad.rs`, `pool_grad.rs`), which run on plain tensors in every
//! tier.

pub(in crate::jit) mod conv;
pub(in crate::jit) mod conv_grad;
pub(in crate::jit) mod epilogue;
pub(in crate::jit) mod linear;
pub(in crate::jit) mod linear_grad;
pub(in crate::jit) mod pool;
pub(in crate::jit) mod pool_grad;
