//! # cnnc-runtime
//!
//! Runs a [`cnnc_compiler::Graph`] on the CPU:
//!
//! - [`weights`]: PyTorch `state_dict`s as safetensors (load, check against the net, save),
//!   and PyTorch's default random initialisation;
//! - [`interp`]: the reference interpreter — plain ndarray code, the spec of every op;
//! - [`fusion_check`]: the compiler's fusion passes run with real weights, optionally under
//!   an automatic numeric check against the interpreter;
//! - [`train`]: the [`train::Trainer`] — training graphs run on the interpreter, torch.optim's
//!   optimizers, BatchNorm running statistics, Dropout masks;
//! - [`gradcam`]: Grad-CAM heat maps of any layer, with the normalisation, resizing and
//!   overlay helpers;
//! - [`jit`]: the Cranelift backend — shape-specialised native kernels, a memory plan, and the
//!   [`Compiled`] model.
//!
//! **Invariant:** this crate knows nothing about the DSL's syntax; it sees only the graph IR.
#![warn(missing_docs)]

pub mod error;
pub mod fusion_check;
pub mod gradcam;
pub mod interp;
pub mod jit;
pub mod train;
pub mod weights;

pub use error::{Error, Result, WeightsError};
pub use jit::{Compiled, ConvAlgorithm, ConvChoice, KernelTime, Kernels, Options};
