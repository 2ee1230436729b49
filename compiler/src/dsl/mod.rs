//! The DSL (in progress).
