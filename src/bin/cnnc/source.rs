//! Loading a `.cnn` file: reading it, optionally rewriting its input declarations
//! (`--input 1,3,224,224`), compiling it, printing its diagnostics rustc-style on stderr, and
//! picking one net (`--net NAME`, else the last net of the file).

use crate::fail::{Fail, input, usage};
use clap::Args;
use cnnc::compiler::diag::Diagnostic;
use cnnc::compiler::dsl::{self, ast};
use cnnc::compiler::graph::Graph;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The file and the net in it, shared by every command that works on one net.
#[derive(Args, Debug, Clone)]
pub struct NetFile {
    /// The `.cnn` file (the same grammar as inside `cnn! { … }`), or an `.onnx` model.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Which net of the file to use [default: the only net, or the last one].
    #[arg(long, value_name = "NAME")]
    pub net: Option<String>,
}

/// A `.cnn` file as read from disk.
pub struct Source {
    /// The path as the user gave it (shown in messages).
    pub shown: String,
    /// The text that was compiled (after any `--input` rewrite).
    pub text: String,
}

impl Source {
    /// Reads `path` as UTF-8 text.
    pub fn read(path: &Path) -> Result<Source, Fail> {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| input(format!("cannot read `{shown}`: {}", io_text(&e))))?;
        Ok(Source { shown, text })
    }
}

/// An I/O error's text without Rust's `(os error N)` suffix.
pub fn io_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// What compiling a file produced, after its diagnostics were printed.
pub struct Compiled {
    /// Nets that checked clean, in source order.
    pub nets: Vec<Graph>,
    /// Number of errors printed.
    pub errors: usize,
    /// Number of warnings printed.
    pub warnings: usize,
}

/// Compiles `src`, printing every diagnostic (errors and warnings, in source order) to stderr.
pub fn compile(src: &Source) -> Compiled {
    let out = dsl::compile_str(&src.text);
    let mut diags: Vec<&Diagnostic> = out.diagnostics.iter().collect();
    diags.sort_by_key(|d| {
        let lc = d.span.start.start();
        (lc.line, lc.column)
    });
    for d in &diags {
        eprintln!("{}", d.render(&src.shown, &src.text));
    }
    let errors = out.errors().count();
    Compiled { nets: out.nets, errors, warnings: diags.len() - errors }
}

/// rustc's closing line: `aborting due to 2 previous errors; 1 warning emitted`.
pub fn aborting(errors: usize, warnings: usize) -> String {
    let mut s = match errors {
        1 => "aborting due to 1 previous error".to_string(),
        n => format!("aborting due to {n} previous errors"),
    };
    if warnings > 0 {
        s += &format!("; {}", warnings_emitted(warnings));
    }
    s
}

/// `1 warning emitted` / `3 warnings emitted`.
pub fn warnings_emitted(n: usize) -> String {
    if n == 1 { "1 warning emitted".into() } else { format!("{n} warnings emitted") }
}

/// Names of the nets declared in `text` (parsed only, not checked), in source order.
fn declared_nets(text: &str) -> Vec<String> {
    parse(text)
        .map(|f| {
            f.items
                .iter()
                .filter_map(|i| match i {
                    ast::Item::Net(n) => Some(n.name.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn parse(text: &str) -> Option<ast::File> {
    let tokens = proc_macro2::TokenStream::from_str(text).ok()?;
    ast::parse_file(tokens).ok()
}

/// Loads one net: reads the file, applies `--input` overrides, compiles it (printing
/// diagnostics) and picks the net. Any error in the file fails the whole load, as in a
/// compiler.
pub fn load_net(sel: &NetFile, shapes: &[String]) -> Result<(Source, Graph), Fail> {
    if crate::import::is_onnx(&sel.file) {
        return crate::import::load(&sel.file, shapes);
    }
    let mut src = Source::read(&sel.file)?;
    let declared = declared_nets(&src.text);
    if let Some(name) = &sel.net
        && !declared.is_empty()
        && !declared.contains(name)
    {
        return Err(usage(format!("`{}` has no net named `{name}`; it declares: {}", src.shown, declared.join(", "))));
    }
    if !shapes.is_empty() {
        src.text = override_inputs(&src, sel.net.as_deref(), shapes)?;
    }
    let compiled = compile(&src);
    if compiled.errors > 0 {
        return Err(Fail::reported(aborting(compiled.errors, compiled.warnings)));
    }
    let graph = match &sel.net {
        Some(name) => compiled.nets.into_iter().find(|g| &g.name == name),
        None => compiled.nets.into_iter().last(),
    };
    let graph = graph.ok_or_else(|| match &sel.net {
        Some(name) => usage(format!("`{}` has no net named `{name}`", src.shown)),
        None => input(format!("`{}` declares no net (only blocks and constants)", src.shown)),
    })?;
    Ok((src, graph))
}

/// One parsed `--input` value: an optional input name and the dims as DSL text.
#[derive(Debug, PartialEq, Eq)]
pub struct ShapeArg {
    /// `x` in `x=1,3,32,32`.
    pub name: Option<String>,
    /// `["1", "3", "32", "32"]`; the first may be a symbol such as `N`.
    pub dims: Vec<String>,
}

/// Parses `1,3,224,224`, `N,3,224,224`, `x=1,3,32,32` or `[1, 3, 32, 32]`.
pub fn parse_shape(arg: &str) -> Result<ShapeArg, Fail> {
    let (name, dims) = match arg.split_once('=') {
        Some((n, d)) => (Some(n.trim().to_string()), d),
        None => (None, arg),
    };
    let dims = dims.trim().trim_start_matches('[').trim_end_matches(']');
    let parts: Vec<String> =
        dims.split(|c: char| c == ',' || c.is_whitespace()).filter(|s| !s.is_empty()).map(String::from).collect();
    let bad = || {
        usage(format!(
            "invalid input shape `{arg}`: expected dimensions such as `1,3,224,224` (the first may be `N`), \
             optionally named (`x=1,3,224,224`)"
        ))
    };
    if parts.is_empty() {
        return Err(bad());
    }
    for (i, p) in parts.iter().enumerate() {
        let symbol = i == 0 && p.chars().all(|c| c.is_ascii_alphabetic() || c == '_');
        if !symbol && !p.parse::<usize>().is_ok_and(|v| v > 0) {
            return Err(bad());
        }
    }
    if let Some(n) = &name
        && (n.is_empty() || !n.chars().all(|c| c.is_alphanumeric() || c == '_'))
    {
        return Err(bad());
    }
    Ok(ShapeArg { name, dims: parts })
}

/// Byte offset of a proc-macro2 line/column (line 1-based, column in chars) in `text`.
fn offset(text: &str, line: usize, column: usize) -> Option<usize> {
    let mut start = 0;
    for _ in 1..line {
        start += text[start..].find('\n')? + 1;
    }
    let rest = &text[start..];
    match rest.char_indices().nth(column) {
        Some((i, _)) => Some(start + i),
        None if rest.chars().count() == column => Some(text.len()),
        None => None,
    }
}

/// The source with the chosen net's input declarations replaced by the `--input` shapes.
fn override_inputs(src: &Source, net: Option<&str>, shapes: &[String]) -> Result<String, Fail> {
    let shapes: Vec<ShapeArg> = shapes.iter().map(|s| parse_shape(s)).collect::<Result<_, _>>()?;
    // A file that does not parse is compiled as is: its own diagnostics say what is wrong.
    let Some(file) = parse(&src.text) else { return Ok(src.text.clone()) };
    let nets: Vec<&ast::NetItem> = file
        .items
        .iter()
        .filter_map(|i| match i {
            ast::Item::Net(n) => Some(n),
            _ => None,
        })
        .collect();
    let target = match net {
        Some(name) => nets.iter().find(|n| n.name == name),
        None => nets.last(),
    };
    let Some(target) = target else { return Ok(src.text.clone()) };
    let names: Vec<String> = target.inputs.iter().map(|i| i.name.to_string()).collect();
    if shapes.len() > names.len() {
        return Err(usage(format!(
            "{} --input shapes given, but net `{}` has {} input(s): {}",
            shapes.len(),
            target.name,
            names.len(),
            names.join(", ")
        )));
    }
    let mut edits = vec![];
    let mut notes = vec![];
    for (pos, shape) in shapes.iter().enumerate() {
        let index = match &shape.name {
            Some(n) => names.iter().position(|m| m == n).ok_or_else(|| {
                usage(format!("net `{}` has no input `{n}`; its inputs: {}", target.name, names.join(", ")))
            })?,
            None => pos,
        };
        let decl = &target.inputs[index];
        let (a, b) = (decl.span.start(), decl.span.end());
        let (Some(a), Some(b)) = (offset(&src.text, a.line, a.column), offset(&src.text, b.line, b.column)) else {
            return Ok(src.text.clone());
        };
        if !src.text[a..b].starts_with('[') || !src.text[a..b].ends_with(']') {
            return Ok(src.text.clone());
        }
        let dims = format!("[{}]", shape.dims.join(", "));
        notes.push(format!("{}: {dims}", decl.name));
        edits.push((a, b, dims));
    }
    eprintln!("note: net `{}` compiled with --input {}", target.name, notes.join(", "));
    edits.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut text = src.text.clone();
    for (a, b, new) in edits {
        text.replace_range(a..b, &new);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse() {
        let s = parse_shape("1,3,224,224").unwrap();
        assert_eq!(s.name, None);
        assert_eq!(s.dims, ["1", "3", "224", "224"]);
        assert_eq!(parse_shape("x=[N, 3, 32, 32]").unwrap().dims, ["N", "3", "32", "32"]);
        assert!(parse_shape("1,2,x").is_err());
        assert!(parse_shape("1,0,3").is_err());
        assert!(parse_shape("1,a,3").is_err());
        assert!(parse_shape("").is_err());
    }

    #[test]
    fn inputs_are_rewritten_in_place() {
        let src = Source {
            shown: "t.cnn".into(),
            text: "/// é\nnet A(x: [N, 1, 8, 8]) = Sequential(ReLU);\nnet B(a: [N, 2, 4], b: [N, 3]) = Sequential(ReLU);\n"
                .into(),
        };
        let t = override_inputs(&src, None, &["b=1,5".into()]).unwrap();
        assert!(t.contains("net B(a: [N, 2, 4], b: [1, 5])"), "{t}");
        let t = override_inputs(&src, Some("A"), &["N,1,16,16".into()]).unwrap();
        assert!(t.contains("net A(x: [N, 1, 16, 16])"), "{t}");
        assert!(override_inputs(&src, Some("A"), &["1".into(), "2".into()]).is_err());
    }
}
