//! Diagnostics: errors and warnings spanned on the DSL source, shared by the `cnn!` macro
//! (which turns them into rustc errors) and the run-time parser (which renders them
//! rustc-style with file, line, column and a caret).

use proc_macro2::Span;
use quote::ToTokens;
use std::fmt;

/// A source range: the first and last token of the offending syntax. rustc underlines the
/// whole range even where proc-macro spans cannot be joined (stable Rust).
#[derive(Clone, Copy, Debug)]
pub struct SrcSpan {
    /// First token.
    pub start: Span,
    /// Last token.
    pub end: Span,
}

impl From<Span> for SrcSpan {
    fn from(s: Span) -> Self {
        SrcSpan { start: s, end: s }
    }
}

impl SrcSpan {
    /// The range covered by a syntax node's tokens.
    pub fn of<T: ToTokens + ?Sized>(node: &T) -> Self {
        let mut first = None;
        let mut last = None;
        fn walk(ts: proc_macro2::TokenStream, first: &mut Option<Span>, last: &mut Option<Span>) {
            for tt in ts {
                if first.is_none() {
                    *first = Some(tt.span());
                }
                *last = Some(match &tt {
                    proc_macro2::TokenTree::Group(g) => g.span_close(),
                    other => other.span(),
                });
            }
        }
        walk(node.to_token_stream(), &mut first, &mut last);
        let start = first.unwrap_or_else(Span::call_site);
        SrcSpan { start, end: last.unwrap_or(start) }
    }

    /// One span covering the range where the platform can join spans, else the start.
    pub fn joined(&self) -> Span {
        self.start.join(self.end).unwrap_or(self.start)
    }
}

/// `.src()` on any syntax node: its [`SrcSpan`].
pub trait Src {
    /// The node's source range.
    fn src(&self) -> SrcSpan;
}

impl<T: ToTokens> Src for T {
    fn src(&self) -> SrcSpan {
        SrcSpan::of(self)
    }
}

/// How serious a diagnostic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// The net is rejected.
    Error,
    /// The net is accepted, but something deserves attention (e.g. floor() dropped rows).
    Warning,
}

/// One message about the source, with the span it belongs to.
#[derive(Clone, Debug)]
pub struct Diagnostic {
    /// Error or warning.
    pub level: Level,
    /// Where.
    pub span: SrcSpan,
    /// The main message, stating expected and actual values.
    pub message: String,
    /// `= note:` lines (the arithmetic, context).
    pub notes: Vec<String>,
    /// `= help:` lines (suggestions).
    pub helps: Vec<String>,
}

impl Diagnostic {
    /// A new error.
    pub fn error(span: impl Into<SrcSpan>, message: impl Into<String>) -> Self {
        Diagnostic { level: Level::Error, span: span.into(), message: message.into(), notes: vec![], helps: vec![] }
    }

    /// A new warning.
    pub fn warning(span: impl Into<SrcSpan>, message: impl Into<String>) -> Self {
        Diagnostic { level: Level::Warning, span: span.into(), message: message.into(), notes: vec![], helps: vec![] }
    }

    /// Adds a note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    /// Adds a help line.
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.helps.push(help.into());
        self
    }

    /// Whether this is an error.
    pub fn is_error(&self) -> bool {
        self.level == Level::Error
    }

    /// The message with its notes and helps folded in, as one text (what rustc shows for a
    /// proc-macro error, which cannot carry separate notes on stable).
    pub fn full_message(&self) -> String {
        let mut s = self.message.clone();
        for n in &self.notes {
            s.push_str("\n  = note: ");
            s.push_str(n);
        }
        for h in &self.helps {
            s.push_str("\n  = help: ");
            s.push_str(h);
        }
        s
    }

    /// Renders rustc-style against `source` (the text the span's line/column refer to).
    pub fn render(&self, file: &str, source: &str) -> String {
        let start = self.span.start.start();
        let end = self.span.end.end();
        let level = match self.level {
            Level::Error => "error",
            Level::Warning => "warning",
        };
        let mut out = format!("{level}: {}\n", self.message);
        let line_no = start.line.max(1);
        let gutter = line_no.to_string().len();
        out.push_str(&format!("{:gutter$}--> {file}:{}:{}\n", "", line_no, start.column + 1));
        if let Some(line) = source.lines().nth(line_no - 1) {
            let width = if end.line == start.line && end.column > start.column {
                end.column - start.column
            } else {
                line.chars().count().saturating_sub(start.column).max(1)
            };
            out.push_str(&format!("{:gutter$} |\n", ""));
            out.push_str(&format!("{line_no} | {line}\n"));
            out.push_str(&format!("{:gutter$} | {}{}\n", "", " ".repeat(start.column), "^".repeat(width)));
        }
        for n in &self.notes {
            out.push_str(&format!("{:gutter$} = note: {n}\n", ""));
        }
        for h in &self.helps {
            out.push_str(&format!("{:gutter$} = help: {h}\n", ""));
        }
        out
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full_message())
    }
}

/// Levenshtein distance (case-insensitive), for `did you mean` suggestions.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate to `word`, if it is close enough to be a plausible typo.
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let lower = word.to_lowercase();
    if lower.len() >= 3
        && let Some(c) = candidates.iter().find(|c| c.to_lowercase().starts_with(&lower))
    {
        return Some(c);
    }
    let best = candidates.iter().map(|c| (distance(word, c), *c)).min_by_key(|(d, _)| *d)?;
    let limit = (word.chars().count() / 3).max(2);
    (best.0 <= limit).then_some(best.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(suggest("MaxPool2D", &["MaxPool2d", "AvgPool2d"]), Some("MaxPool2d"));
        assert_eq!(suggest("Maxpool", &["MaxPool2d", "AvgPool2d"]), Some("MaxPool2d"));
        assert_eq!(suggest("strides", &["stride", "padding"]), Some("stride"));
        assert_eq!(suggest("zzz", &["stride", "padding"]), None);
        assert_eq!(suggest("ceil", &["stride", "ceil_mode"]), Some("ceil_mode"));
    }
}
