//! The network DSL: PyTorch vocabulary in Rust token syntax, shared by the `cnn!` macro
//! (compile time) and `.cnn` files (run time, e.g. the CLI).
//!
//! [`ast`] parses items with `syn`; [`eval`] evaluates declarations (blocks, loops, constants)
//! and traces `forward` into a shape-checked [`Graph`]. Both entry points,
//! [`compile_tokens`] and [`compile_str`], run exactly the same code, so a net accepted by
//! the macro gives the same IR when parsed from text. See `docs/dsl.md` for the language.

pub mod ast;
pub mod eval;

use crate::diag::{Diagnostic, Level};
use crate::graph::Graph;
use crate::ops::Op;
use proc_macro2::TokenStream;
use std::str::FromStr;

/// The outcome of compiling DSL source: the nets that checked clean, and every diagnostic.
#[derive(Debug)]
pub struct Output {
    /// Graphs of the nets without errors, in source order.
    pub nets: Vec<Graph>,
    /// All errors and warnings, in the order found.
    pub diagnostics: Vec<Diagnostic>,
}

impl Output {
    /// Whether any diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(|d| d.level == Level::Error)
    }

    /// Errors only.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.level == Level::Error)
    }

    /// Warnings only.
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.level == Level::Warning)
    }

    /// The net called `name`, if it checked clean.
    pub fn net(&self, name: &str) -> Option<&Graph> {
        self.nets.iter().find(|g| g.name == name)
    }
}

fn from_syn(e: syn::Error) -> Vec<Diagnostic> {
    e.into_iter().map(|e| Diagnostic::error(e.span(), e.to_string())).collect()
}

/// Compiles a token stream (the body of `cnn! { … }`).
pub fn compile_tokens(tokens: TokenStream) -> Output {
    let file = match ast::parse_file(tokens) {
        Ok(f) => f,
        Err(e) => return Output { nets: vec![], diagnostics: from_syn(e) },
    };
    let (results, diagnostics) = eval::evaluate(&file);
    Output { nets: results.into_iter().filter_map(|r| r.graph).collect(), diagnostics }
}

/// Compiles DSL text (a `.cnn` file). Spans carry line/column for [`Diagnostic::render`].
pub fn compile_str(source: &str) -> Output {
    match TokenStream::from_str(source) {
        Ok(ts) => compile_tokens(ts),
        Err(e) => {
            Output { nets: vec![], diagnostics: vec![Diagnostic::error(e.span(), format!("cannot tokenize: {e}"))] }
        }
    }
}

/// Parses one layer constructor, e.g. `Conv2d(3, 8, 3, stride=2, padding="same")`.
pub fn parse_layer(text: &str) -> Result<Op, Vec<Diagnostic>> {
    let src = format!("net layer(x: [N, 1]) = Sequential({text});");
    let ts =
        TokenStream::from_str(&src).map_err(|e| vec![Diagnostic::error(e.span(), format!("cannot tokenize: {e}"))])?;
    let file = ast::parse_file(ts).map_err(from_syn)?;
    let Some(ast::Item::Net(net)) = file.items.first() else {
        return Err(vec![]);
    };
    let ast::Body::Expr(syn::Expr::Call(call)) = &net.body else {
        return Err(vec![]);
    };
    let Some(expr) = call.args.first() else {
        return Err(vec![Diagnostic::error(proc_macro2::Span::call_site(), "empty layer text")]);
    };
    eval::construct_layer(expr)
}
