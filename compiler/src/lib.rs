//! # cnnc-compiler
//!
//! The front and middle end of cnnc, with no code generation in it:
//!
//! - [`dsl`]: the network grammar (the same text inside `cnn! { … }` and in `.cnn` files),
//!   parsed with `syn` and evaluated into a graph, with spanned diagnostics;
//! - [`ops`]: the op table — every op's PyTorch signature, shape rule, parameters and MACs,
//!   declared once;
//! - [`graph`]: the petgraph IR with static shapes, its verifier, text form and DOT output;
//! - [`summary`]: per-layer accounting (torchinfo-style table);
//! - [`autodiff`]: reverse-mode differentiation as a graph-to-graph transform (training
//!   graphs: training-mode forward, loss, backward ops);
//! - [`passes`]: inference rewrites (clean-ups, BatchNorm folding, epilogue fusion) and the
//!   fusion report.
//!
//! **Invariant:** this crate knows nothing about Cranelift or tensors' values; the runtime
//! (`cnnc-runtime`) consumes the [`graph::Graph`] it produces.
#![warn(missing_docs)]

pub mod autodiff;
pub mod builder;
pub mod diag;
pub mod dsl;
pub mod graph;
pub mod ops;
pub mod passes;
pub mod shape;
pub mod summary;

pub use builder::GraphBuilder;
pub use diag::Diagnostic;
pub use graph::{Graph, Node, NodeId, ParamId};
pub use ops::Op;
pub use shape::{Batch, TensorType};
pub use summary::Summary;
