//! Layer arguments as the DSL passes them: PyTorch-style positional and keyword arguments,
//! bound against an op's declared signature.
//!
//! Binding reports unknown keywords with a suggestion, missing required arguments and
//! ill-typed values, each spanned on the offending argument.

use crate::diag::{Diagnostic, SrcSpan as Span, suggest};
use crate::shape::MAX_SIZE;
use crate::summary::thousands;
use std::fmt;

/// A compile-time argument value.
#[derive(Clone, Debug, PartialEq)]
pub enum ArgValue {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string (`"same"`, `"reflect"`).
    Str(String),
    /// A tuple or list `(a, b)` / `[a, b]`.
    Tuple(Vec<ArgValue>),
    /// Python's `None`.
    None,
}

impl fmt::Display for ArgValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgValue::Int(i) => write!(f, "{i}"),
            ArgValue::Float(x) => write!(f, "{x:?}"),
            ArgValue::Bool(b) => write!(f, "{}", if *b { "True" } else { "False" }),
            ArgValue::Str(s) => write!(f, "{s:?}"),
            ArgValue::Tuple(v) => {
                write!(f, "(")?;
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{x}")?;
                }
                write!(f, ")")
            }
            ArgValue::None => write!(f, "None"),
        }
    }
}

impl ArgValue {
    fn kind(&self) -> &'static str {
        match self {
            ArgValue::Int(_) => "an integer",
            ArgValue::Float(_) => "a float",
            ArgValue::Bool(_) => "a bool",
            ArgValue::Str(_) => "a string",
            ArgValue::Tuple(_) => "a tuple",
            ArgValue::None => "None",
        }
    }
}

/// One argument as written at the call site.
#[derive(Clone, Debug)]
pub struct Arg {
    /// `Some(name)` for `name = value`.
    pub keyword: Option<String>,
    /// The value.
    pub value: ArgValue,
    /// Where it was written.
    pub span: Span,
}

/// A parameter in an op's signature.
#[derive(Clone, Copy, Debug)]
pub struct ParamSig {
    /// PyTorch's keyword name.
    pub name: &'static str,
    /// Whether it must be given.
    pub required: bool,
}

/// Shorthand for a required parameter.
pub const fn req(name: &'static str) -> ParamSig {
    ParamSig { name, required: true }
}

/// Shorthand for an optional parameter.
pub const fn opt(name: &'static str) -> ParamSig {
    ParamSig { name, required: false }
}

/// Arguments bound to a signature; typed getters report errors at the argument's span.
#[derive(Debug)]
pub struct Bound {
    layer: &'static str,
    sig: &'static [ParamSig],
    values: Vec<Option<(ArgValue, Span)>>,
    /// The span of the whole call (for errors about the layer as a whole).
    pub span: Span,
}

impl Bound {
    /// Binds `args` to `sig` the way Python does: positionals first, then keywords.
    pub fn bind(
        layer: &'static str,
        sig: &'static [ParamSig],
        args: &[Arg],
        span: Span,
    ) -> Result<Bound, Vec<Diagnostic>> {
        let mut values: Vec<Option<(ArgValue, Span)>> = vec![None; sig.len()];
        let mut errors = Vec::new();
        let mut pos = 0;
        for a in args {
            match &a.keyword {
                None => {
                    if pos >= sig.len() {
                        errors.push(Diagnostic::error(
                            a.span,
                            format!("{layer} takes at most {} positional arguments, got more", sig.len()),
                        ));
                    } else {
                        values[pos] = Some((a.value.clone(), a.span));
                    }
                    pos += 1;
                }
                Some(k) => match sig.iter().position(|p| p.name == k) {
                    Some(i) => {
                        if values[i].is_some() {
                            errors.push(Diagnostic::error(
                                a.span,
                                format!("{layer} got multiple values for argument `{k}`"),
                            ));
                        } else {
                            values[i] = Some((a.value.clone(), a.span));
                        }
                    }
                    None => {
                        let names: Vec<&str> = sig.iter().map(|p| p.name).collect();
                        let mut d = Diagnostic::error(a.span, format!("{layer} has no argument `{k}`"));
                        if let Some(s) = suggest(k, &names) {
                            d = d.help(format!("did you mean `{s}`?"));
                        } else {
                            d = d.help(format!("{layer} takes: {}", names.join(", ")));
                        }
                        errors.push(d);
                    }
                },
            }
        }
        for (i, p) in sig.iter().enumerate() {
            if p.required && values[i].is_none() {
                errors.push(Diagnostic::error(span, format!("{layer} is missing its argument `{}`", p.name)));
            }
        }
        if errors.is_empty() { Ok(Bound { layer, sig, values, span }) } else { Err(errors) }
    }

    fn get(&self, name: &str) -> Option<&(ArgValue, Span)> {
        let i = self.sig.iter().position(|p| p.name == name).expect("argument name is in the op's signature");
        self.values[i].as_ref()
    }

    /// A non-negative `value` as a size, if it is at most [`MAX_SIZE`].
    fn at_most_max(&self, name: &str, value: i64, span: Span) -> Result<usize, Diagnostic> {
        match usize::try_from(value) {
            Ok(v) if v <= MAX_SIZE => Ok(v),
            _ => Err(Diagnostic::error(
                span,
                format!(
                    "{}: `{name}` = {value} is too large (the limit is {})",
                    self.layer,
                    thousands(MAX_SIZE as u64)
                ),
            )),
        }
    }

    fn type_error(&self, name: &str, want: &str, got: &ArgValue, span: Span) -> Diagnostic {
        Diagnostic::error(span, format!("{}: `{name}` must be {want}, found {} `{got}`", self.layer, got.kind()))
    }

    /// Whether the argument was given.
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// A positive integer (`> 0`), or the default.
    pub fn positive(&self, name: &str, default: usize) -> Result<usize, Diagnostic> {
        match self.get(name) {
            None => Ok(default),
            Some((ArgValue::Int(i), s)) if *i > 0 => self.at_most_max(name, *i, *s),
            Some((ArgValue::Int(i), s)) => {
                Err(Diagnostic::error(*s, format!("{}: `{name}` must be positive, found {i}", self.layer)))
            }
            Some((v, s)) => Err(self.type_error(name, "a positive integer", v, *s)),
        }
    }

    /// A non-negative integer, or the default.
    pub fn non_negative(&self, name: &str, default: usize) -> Result<usize, Diagnostic> {
        match self.get(name) {
            None => Ok(default),
            Some((ArgValue::Int(i), s)) if *i >= 0 => self.at_most_max(name, *i, *s),
            Some((ArgValue::Int(i), s)) => {
                Err(Diagnostic::error(*s, format!("{}: `{name}` must be non-negative, found {i}", self.layer)))
            }
            Some((v, s)) => Err(self.type_error(name, "a non-negative integer", v, *s)),
        }
    }

    /// An integer (any sign), or the default.
    pub fn int(&self, name: &str, default: i64) -> Result<i64, Diagnostic> {
        match self.get(name) {
            None => Ok(default),
            Some((ArgValue::Int(i), _)) => Ok(*i),
            Some((v, s)) => Err(self.type_error(name, "an integer", v, *s)),
        }
    }

    /// A `(top, bottom, left, right)` 4-tuple of non-negative ints (cnnc's padding by sides),
    /// or `None` when the argument is not a 4-tuple.
    pub fn sides(&self, name: &str) -> Option<Result<[usize; 4], Diagnostic>> {
        let (ArgValue::Tuple(t), span) = self.get(name)? else { return None };
        if t.len() != 4 {
            return None;
        }
        let v: Vec<usize> = t
            .iter()
            .filter_map(|v| match v {
                ArgValue::Int(i) if (0..=MAX_SIZE as i64).contains(i) => Some(*i as usize),
                _ => None,
            })
            .collect();
        Some(<[usize; 4]>::try_from(v).map_err(|_| {
            Diagnostic::error(
                *span,
                format!(
                    "{}: `{name}` (top, bottom, left, right) must be four non-negative ints, found {}",
                    self.layer,
                    ArgValue::Tuple(t.clone())
                ),
            )
        }))
    }

    /// An int or an `(h, w)` pair, each element `>= min`.
    pub fn pair(&self, name: &str, default: (usize, usize), min: i64) -> Result<(usize, usize), Diagnostic> {
        let check = |i: i64, s: Span| {
            if i >= min {
                self.at_most_max(name, i, s)
            } else {
                let what = if min > 0 { "positive" } else { "non-negative" };
                Err(Diagnostic::error(s, format!("{}: `{name}` must be {what}, found {i}", self.layer)))
            }
        };
        match self.get(name) {
            None | Some((ArgValue::None, _)) => Ok(default),
            Some((ArgValue::Int(i), s)) => {
                let v = check(*i, *s)?;
                Ok((v, v))
            }
            Some((ArgValue::Tuple(t), s)) => match t.as_slice() {
                [ArgValue::Int(a), ArgValue::Int(b)] => Ok((check(*a, *s)?, check(*b, *s)?)),
                _ => Err(self.type_error(name, "an int or an (h, w) tuple of ints", &ArgValue::Tuple(t.clone()), *s)),
            },
            Some((v, s)) => Err(self.type_error(name, "an int or an (h, w) tuple", v, *s)),
        }
    }

    /// A boolean, or the default.
    pub fn bool(&self, name: &str, default: bool) -> Result<bool, Diagnostic> {
        match self.get(name) {
            None => Ok(default),
            Some((ArgValue::Bool(b), _)) => Ok(*b),
            Some((v, s)) => Err(self.type_error(name, "True or False", v, *s)),
        }
    }

    /// A float (ints are accepted), or the default.
    pub fn float(&self, name: &str, default: f64) -> Result<f64, Diagnostic> {
        match self.get(name) {
            None => Ok(default),
            Some((ArgValue::Float(x), _)) => Ok(*x),
            Some((ArgValue::Int(i), _)) => Ok(*i as f64),
            Some((v, s)) => Err(self.type_error(name, "a number", v, *s)),
        }
    }

    /// The raw value and its span, if given.
    pub fn raw(&self, name: &str) -> Option<(&ArgValue, Span)> {
        self.get(name).map(|(v, s)| (v, *s))
    }

    /// The span of an argument, or of the whole call if it was not given.
    pub fn span_of(&self, name: &str) -> Span {
        self.get(name).map(|(_, s)| *s).unwrap_or(self.span)
    }
}
