//! The DSL evaluator: runs the declarations of a net at compile time (blocks expanded,
//! loops unrolled, constants folded) into a tree of modules, registers their parameters under
//! PyTorch `state_dict` keys, then traces the forward dataflow into a [`Graph`], checking
//! every shape on the way.
//!
//! Errors are collected, never thrown: a failing layer reports once, at its span, and its
//! output continues either as the shape it would have had (so an independent later mistake is
//! still reported) or as a poison value that silences everything downstream (so one mistake
//! does not cascade).

use super::ast::{BlockItem, Body, DimDecl, File, Forward, Item, NetItem};
use crate::builder::GraphBuilder;
use crate::diag::{Diagnostic, Src, SrcSpan as Span, suggest};
use crate::graph::{Graph, NodeId, ParamId};
use crate::ops::args::{Arg, ArgValue};
use crate::ops::{self, Activation, Concat, Flatten, Op, Reduce, ReduceKind};
use crate::shape::{Batch, MAX_SIZE, TensorType, checked_numel, too_many_elements};
use crate::summary::thousands;
use std::collections::HashMap;
use std::rc::Rc;
use syn::{BinOp, Expr, Lit, Pat, Stmt, UnOp};

/// A tensor in the forward trace, with the factors of its last dim if it came out of a
/// Flatten (for `384×5×5 = 9600` in messages).
#[derive(Clone, Debug)]
struct TVal {
    id: NodeId,
    flat: Option<Rc<(Vec<usize>, String)>>,
}

#[derive(Clone, Debug)]
enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    None,
    Tuple(Vec<Value>),
    Range(i64, i64),
    Module(Rc<Module>),
    Tensor(TVal),
    /// The result of an expression that already reported an error.
    Poison,
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a bool",
            Value::Str(_) => "a string",
            Value::None => "None",
            Value::Tuple(_) => "a tuple",
            Value::Range(..) => "a range",
            Value::Module(_) => "a layer",
            Value::Tensor(_) => "a tensor",
            Value::Poison => "an erroneous value",
        }
    }

    fn to_arg(&self) -> Option<ArgValue> {
        Some(match self {
            Value::Int(i) => ArgValue::Int(*i),
            Value::Float(f) => ArgValue::Float(*f),
            Value::Bool(b) => ArgValue::Bool(*b),
            Value::Str(s) => ArgValue::Str(s.clone()),
            Value::None => ArgValue::None,
            Value::Tuple(v) => ArgValue::Tuple(v.iter().map(|x| x.to_arg()).collect::<Option<Vec<_>>>()?),
            _ => return None,
        })
    }
}

enum ModKind {
    /// A layer whose construction failed (already reported): applying it yields poison, so
    /// nothing downstream reports follow-on errors.
    Poisoned,
    Leaf(Op),
    Seq(Vec<(Option<String>, Rc<Module>)>),
    Custom {
        children: Vec<(String, Rc<Module>)>,
        forward: Forward,
        env: Env,
    },
}

struct Module {
    kind: ModKind,
    span: Span,
    /// `Conv2d(…)`, `Sequential`, or the block name.
    label: String,
}

fn poisoned(span: Span) -> Rc<Module> {
    Rc::new(Module { kind: ModKind::Poisoned, span, label: "<error>".into() })
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label)
    }
}

type Env = HashMap<String, Value>;

/// One net's outcome: its graph (when it checked clean), and its diagnostics.
pub struct NetResult {
    /// The net's name.
    pub name: String,
    /// The graph, if the net has no errors.
    pub graph: Option<Graph>,
}

struct Registered {
    path: String,
    params: Vec<ParamId>,
}

/// A `dim` argument as written (`-5`, `(2, -9)`), for messages.
fn dim_text(v: &Value) -> String {
    match v {
        Value::Int(i) => i.to_string(),
        Value::Tuple(vs) => format!("({})", vs.iter().map(dim_text).collect::<Vec<_>>().join(", ")),
        other => other.type_name().to_string(),
    }
}

/// The expansion budget of one file: loop iterations, block expansions and layer
/// applications together. The largest seed net (ResNet-18) uses a few hundred.
const MAX_STEPS: usize = 100_000;

const FUNCTIONAL: &[&str] = &[
    "relu", "sigmoid", "tanh", "relu6", "softmax", "flatten", "cat", "concat", "mean", "amax", "max", "dropout",
    "range", "len",
];

/// Evaluates a parsed file. Returns each net's result and all diagnostics (errors and
/// warnings) in source order.
pub fn evaluate(file: &File) -> (Vec<NetResult>, Vec<Diagnostic>) {
    let mut ev = Evaluator::default();
    let mut results = vec![];
    let mut names: HashMap<String, Span> = HashMap::new();
    for item in &file.items {
        let (name, span) = match item {
            Item::Net(n) => (n.name.to_string(), n.name.src()),
            Item::Block(b) => (b.name.to_string(), b.name.src()),
            Item::Const(c) => (c.name.to_string(), c.name.src()),
        };
        if names.insert(name.clone(), span).is_some() {
            ev.diags.push(Diagnostic::error(span, format!("`{name}` is defined twice")));
        }
        if let Item::Block(b) = item {
            ev.blocks.insert(name, Rc::new(b.clone()));
        }
    }
    for item in &file.items {
        match item {
            Item::Const(c) => {
                let env = ev.consts.clone();
                let v = ev.eval(&c.value, &mut env.clone(), &mut None);
                ev.consts.insert(c.name.to_string(), v);
            }
            Item::Net(n) => results.push(ev.net(n)),
            Item::Block(_) => {}
        }
    }
    (results, ev.diags)
}

#[derive(Default)]
struct Evaluator {
    consts: Env,
    blocks: HashMap<String, Rc<BlockItem>>,
    diags: Vec<Diagnostic>,
    depth: usize,
    gb: Option<GraphBuilder>,
    registry: HashMap<*const Module, Registered>,
    fn_counter: usize,
    /// Expansion work done so far (see [`Evaluator::spend`]).
    steps: usize,
}

/// Where declaration statements put the layers they create.
struct Sink {
    sequential: bool,
    items: Vec<(Option<String>, Rc<Module>)>,
}

/// State of a forward trace through one custom module.
struct Fwd {
    scope: String,
    children: Vec<(String, Rc<Module>)>,
    result: Option<Value>,
}

fn ident_of(e: &Expr) -> Option<String> {
    match e {
        Expr::Path(p) if p.qself.is_none() => {
            let segs: Vec<String> = p.path.segments.iter().map(|s| s.ident.to_string()).collect();
            match segs.as_slice() {
                [one] => Some(one.clone()),
                [ns, one] if ns == "nn" || ns == "F" || ns == "torch" => Some(one.clone()),
                _ => None,
            }
        }
        _ => None,
    }
}

fn is_self(e: &Expr) -> bool {
    matches!(e, Expr::Path(p) if p.path.is_ident("self"))
}

fn is_namespace(e: &Expr) -> bool {
    matches!(e, Expr::Path(p) if p.path.is_ident("nn") || p.path.is_ident("F") || p.path.is_ident("torch"))
}

impl Evaluator {
    fn error(&mut self, span: impl Into<Span>, msg: impl Into<String>) -> Value {
        self.diags.push(Diagnostic::error(span, msg));
        Value::Poison
    }

    /// Charges `steps` (loop iterations, block expansions, layer applications) to the
    /// expansion budget; past [`MAX_STEPS`], reports once and returns false, so a source
    /// that would unroll without end (nested loops, blocks that double at each level) fails
    /// in bounded time.
    fn spend(&mut self, steps: usize, span: Span) -> bool {
        if self.steps > MAX_STEPS {
            return false;
        }
        self.steps += steps;
        if self.steps > MAX_STEPS {
            self.error(
                span,
                format!(
                    "the file expands to more than {} loop iterations, blocks and layer calls",
                    thousands(MAX_STEPS as u64)
                ),
            );
            return false;
        }
        true
    }

    // ---------------------------------------------------------------- nets

    fn net(&mut self, n: &NetItem) -> NetResult {
        let name = n.name.to_string();
        let errors_before = self.diags.iter().filter(|d| d.is_error()).count();
        let mut env = self.consts.clone();
        let root = match &n.body {
            Body::Expr(e) => match self.eval(e, &mut env, &mut None) {
                Value::Module(m) => Some(m),
                Value::Poison => None,
                other => {
                    self.error(
                        e.src(),
                        format!("a net's body must be a layer or Sequential, found {}", other.type_name()),
                    );
                    None
                }
            },
            Body::Stmts { stmts, forward, span } => {
                self.module_body(&name, stmts, forward.as_ref(), env, (*span).into())
            }
        };
        let mut gb = GraphBuilder::new(name.clone());
        let mut inputs = vec![];
        for inp in &n.inputs {
            let errors_before_input = self.diags.len();
            let mut dims = vec![];
            let mut batch = Batch::Symbolic;
            for (i, d) in inp.dims.iter().enumerate() {
                match (i, d) {
                    (0, DimDecl::Symbol(_)) => batch = Batch::Symbolic,
                    (0, DimDecl::Fixed(b, s)) => {
                        if *b == 0 {
                            self.error(*s, "the batch size must be positive");
                        }
                        batch = Batch::Fixed(*b);
                    }
                    (_, DimDecl::Symbol(s)) => {
                        self.error(
                            s.src(),
                            format!("only the batch (first) dimension can be symbolic; `{s}` is in position {i}"),
                        );
                    }
                    (_, DimDecl::Fixed(v, s)) => {
                        if *v == 0 {
                            self.error(*s, "dimensions must be positive");
                        } else if *v > MAX_SIZE {
                            self.error(
                                *s,
                                format!("dimension {v} is too large (the limit is {})", thousands(MAX_SIZE as u64)),
                            );
                        }
                        dims.push(*v)
                    }
                }
            }
            if inp.dims.is_empty() {
                self.error(inp.span, "an input needs at least a batch dimension, e.g. [N, 3, 32, 32]");
            } else if self.diags.len() == errors_before_input && checked_numel(&dims).is_none() {
                self.error(inp.span, format!("input `{}` {}", inp.name, too_many_elements(&dims)));
            }
            let id = gb.input(&inp.name.to_string(), TensorType { batch, dims });
            if self.diags.len() > errors_before_input {
                inputs.push(Value::Poison);
            } else {
                inputs.push(Value::Tensor(TVal { id, flat: None }));
            }
        }
        let Some(root) = root else {
            return NetResult { name, graph: None };
        };
        self.gb = Some(gb);
        self.registry.clear();
        self.register(&root, String::new());
        let out = self.apply(&root, inputs, n.name.src(), "");
        let gb = self.gb.take().expect("graph builder is set during a net");
        let errors_after = self.diags.iter().filter(|d| d.is_error()).count();
        let mut outs: Vec<TVal> = vec![];
        let mut poisoned = false;
        match out {
            Value::Tensor(t) => outs.push(t),
            Value::Tuple(vs) => {
                for v in vs {
                    match v {
                        Value::Tensor(t) => outs.push(t),
                        Value::Poison => poisoned = true,
                        other => {
                            self.error(
                                n.name.src(),
                                format!("`{name}` returns {} where a tensor is expected", other.type_name()),
                            );
                            poisoned = true;
                        }
                    }
                }
            }
            Value::Poison => poisoned = true,
            other => {
                self.error(n.name.src(), format!("`{name}`'s forward returns {}, not a tensor", other.type_name()));
                poisoned = true;
            }
        }
        if poisoned || errors_after > errors_before {
            return NetResult { name, graph: None };
        }
        let names: Vec<String> = match &n.outputs {
            Some(list) => {
                if list.len() != outs.len() {
                    self.error(
                        n.name.src(),
                        format!("`{name}` declares {} output(s) but its forward returns {}", list.len(), outs.len()),
                    );
                    return NetResult { name, graph: None };
                }
                list.iter().map(|i| i.to_string()).collect()
            }
            None if outs.len() == 1 => vec!["output".to_string()],
            None => (0..outs.len()).map(|i| format!("output{i}")).collect(),
        };
        let mut gb = gb;
        for (nm, t) in names.iter().zip(&outs) {
            gb.output(nm, t.id);
        }
        let graph = gb.finish();
        if let Err(e) = graph.verify() {
            self.error(n.name.src(), format!("internal error: the graph of `{name}` fails verification: {e}"));
            return NetResult { name, graph: None };
        }
        NetResult { name, graph: Some(graph) }
    }

    /// Evaluates a `{ … }` body into a Custom module (with forward) or a Sequential.
    fn module_body(
        &mut self,
        label: &str,
        stmts: &[Stmt],
        forward: Option<&Forward>,
        mut env: Env,
        span: Span,
    ) -> Option<Rc<Module>> {
        let mut sink = Sink { sequential: forward.is_none(), items: vec![] };
        self.exec_decls(stmts, &mut env, &mut sink);
        let kind = match forward {
            Some(f) => ModKind::Custom {
                children: sink.items.into_iter().map(|(n, m)| (n.unwrap_or_default(), m)).collect(),
                forward: f.clone(),
                env,
            },
            None => ModKind::Seq(sink.items),
        };
        Some(Rc::new(Module { kind, span, label: label.to_string() }))
    }

    // ---------------------------------------------------------------- registration

    fn register(&mut self, m: &Rc<Module>, path: String) {
        let key = Rc::as_ptr(m);
        if self.registry.contains_key(&key) {
            return;
        }
        let child_path = |p: &str, n: &str| if p.is_empty() { n.to_string() } else { format!("{p}.{n}") };
        let params = match &m.kind {
            ModKind::Leaf(op) => self.gb.as_mut().expect("builder set").register_params(&path, op),
            _ => vec![],
        };
        self.registry.insert(key, Registered { path: path.clone(), params });
        match &m.kind {
            ModKind::Leaf(_) | ModKind::Poisoned => {}
            ModKind::Seq(items) => {
                for (i, (name, child)) in items.iter().enumerate() {
                    let n = name.clone().unwrap_or_else(|| i.to_string());
                    self.register(child, child_path(&path, &n));
                }
            }
            ModKind::Custom { children, .. } => {
                for (name, child) in children {
                    self.register(child, child_path(&path, name));
                }
            }
        }
    }

    // ---------------------------------------------------------------- forward tracing

    fn describe_tensor(&self, t: &TVal) -> String {
        let node = self.gb.as_ref().expect("builder set").graph().node(t.id);
        match node.op {
            Op::Input => format!("input `{}`", node.name),
            _ => format!("`{}` ({})", node.name, node.op.kind()),
        }
    }

    /// Adds one op node applied to `inputs`, reporting shape errors at `span`.
    fn add_op(&mut self, name: &str, op: Op, params: Vec<ParamId>, inputs: &[Value], span: Span) -> Value {
        self.add_op_as(name, op, params, inputs, span, false)
    }

    /// Like [`Self::add_op`]; `params_owner` marks a declared layer, whose path prefixes errors.
    fn add_op_as(
        &mut self,
        name: &str,
        op: Op,
        params: Vec<ParamId>,
        inputs: &[Value],
        span: Span,
        params_owner: bool,
    ) -> Value {
        let mut ts = vec![];
        for v in inputs {
            match v {
                Value::Tensor(t) => ts.push(t.clone()),
                Value::Poison => return Value::Poison,
                other => {
                    return self
                        .error(span, format!("{} expects a tensor, found {}", op.def().describe(), other.type_name()));
                }
            }
        }
        let producers: Vec<String> = ts
            .iter()
            .map(|t| t.flat.as_ref().map(|f| f.1.clone()).unwrap_or_else(|| self.describe_tensor(t)))
            .collect();
        let ids: Vec<NodeId> = ts.iter().map(|t| t.id).collect();
        let gb = self.gb.as_mut().expect("builder set");
        let types: Vec<TensorType> = ids.iter().map(|i| gb.graph().node(*i).ty.clone()).collect();
        let operands: Vec<ops::Operand<'_>> = types
            .iter()
            .zip(&producers)
            .zip(&ts)
            .map(|((ty, p), t)| ops::Operand { ty, producer: p, factors: t.flat.as_ref().map(|f| f.0.as_slice()) })
            .collect();
        let arity_ok = match op.def().arity() {
            ops::Arity::Exactly(n) => ids.len() == n,
            ops::Arity::AtLeast(n) => ids.len() >= n,
        };
        if !arity_ok {
            let want = match op.def().arity() {
                ops::Arity::Exactly(n) => n.to_string(),
                ops::Arity::AtLeast(n) => format!("at least {n}"),
            };
            return self
                .error(span, format!("{} takes {want} tensor input(s), got {}", op.def().describe(), ids.len()));
        }
        let result = op.def().infer(&operands).and_then(|inf| match checked_numel(&inf.ty.dims) {
            Some(_) => Ok(inf),
            None => {
                Err(ops::OpError::new(format!("{}: output {}", op.def().describe(), too_many_elements(&inf.ty.dims))))
            }
        });
        let carries_flat = matches!(op, Op::Activation(_) | Op::Dropout(_));
        let flat = if carries_flat { ts.first().and_then(|t| t.flat.clone()) } else { None };
        match result {
            Ok(inf) => {
                for w in inf.warnings {
                    self.diags.push(Diagnostic::warning(span, format!("{}: {w}", op.def().describe())));
                }
                let flat = match &op {
                    Op::Flatten(f) => {
                        let ty = &types[0];
                        f.range(ty.rank()).ok().and_then(|(s, e)| {
                            (e + 1 == ty.dims.len() && e > s)
                                .then(|| Rc::new((ty.dims[s..=e].to_vec(), format!("`{name}` (Flatten)"))))
                        })
                    }
                    _ => flat,
                };
                let gb = self.gb.as_mut().expect("builder set");
                let id = gb.push(name, op, inf.ty, params, &ids);
                Value::Tensor(TVal { id, flat })
            }
            Err(e) => {
                let message = if params_owner { format!("layer `{name}`: {}", e.message) } else { e.message };
                let mut d = Diagnostic::error(span, message);
                for n in e.notes {
                    d = d.note(n);
                }
                self.diags.push(d);
                match e.recovered.filter(|ty| checked_numel(&ty.dims).is_some()) {
                    Some(ty) => {
                        let gb = self.gb.as_mut().expect("builder set");
                        let id = gb.push(name, op, ty, params, &ids);
                        Value::Tensor(TVal { id, flat: None })
                    }
                    None => Value::Poison,
                }
            }
        }
    }

    fn apply(&mut self, m: &Rc<Module>, inputs: Vec<Value>, span: Span, _caller: &str) -> Value {
        if inputs.iter().any(|v| matches!(v, Value::Poison)) || !self.spend(1, span) {
            return Value::Poison;
        }
        let (path, params) = match self.registry.get(&Rc::as_ptr(m)) {
            Some(r) => (r.path.clone(), r.params.clone()),
            // Only layers declared before forward are registered (they own the parameters).
            None => {
                let decl = match m.kind {
                    ModKind::Leaf(_) => format!("`layer = {};`", m.label),
                    _ => "`layer = …;`".to_string(),
                };
                return self.error(
                    span,
                    format!(
                        "`{}` is created inside forward; declare it before `fn forward` ({decl}) and apply it \
                         as `self.layer(x)`",
                        m.label
                    ),
                );
            }
        };
        match &m.kind {
            ModKind::Poisoned => Value::Poison,
            ModKind::Leaf(op) => self.add_op_as(&path, op.clone(), params, &inputs, span, !path.is_empty()),
            ModKind::Seq(items) => {
                if inputs.len() != 1 {
                    return self.error(span, format!("a Sequential takes one input, got {}", inputs.len()));
                }
                let mut x = inputs.into_iter().next().expect("one input");
                for (_, child) in items {
                    x = self.apply(child, vec![x], child.span, &path);
                    if matches!(x, Value::Poison) {
                        return Value::Poison;
                    }
                }
                x
            }
            ModKind::Custom { children, forward, env } => {
                if self.depth > 64 {
                    return self.error(span, "forward calls nest too deeply (recursive block?)");
                }
                if forward.params.len() != inputs.len() {
                    return self.error(
                        span,
                        format!(
                            "`{}`'s forward takes {} input(s), got {}",
                            m.label,
                            forward.params.len(),
                            inputs.len()
                        ),
                    );
                }
                let mut env = env.clone();
                for (p, v) in forward.params.iter().zip(inputs) {
                    env.insert(p.to_string(), v);
                }
                let mut fwd = Some(Fwd { scope: path, children: children.clone(), result: None });
                self.depth += 1;
                let last = self.exec_block(&forward.block.stmts, &mut env, &mut fwd);
                self.depth -= 1;
                let fwd = fwd.expect("forward state");
                match fwd.result.or(last) {
                    Some(v) => v,
                    None => self.error(
                        forward.span,
                        format!("`{}`'s forward returns nothing; end it with the output, e.g. `x`", m.label),
                    ),
                }
            }
        }
    }

    // ---------------------------------------------------------------- statements

    /// Executes declaration statements (outside forward).
    fn exec_decls(&mut self, stmts: &[Stmt], env: &mut Env, sink: &mut Sink) {
        for s in stmts {
            match s {
                Stmt::Local(l) => {
                    let v = match &l.init {
                        Some(init) => self.eval(&init.expr, env, &mut None),
                        None => Value::None,
                    };
                    self.bind_pat(&l.pat, v, env);
                }
                Stmt::Expr(e, _) => self.exec_decl_expr(e, env, sink),
                Stmt::Item(i) => {
                    self.error(i.src(), "items are not allowed here; declare blocks at the top level with `block`");
                }
                Stmt::Macro(m) => {
                    self.error(m.src(), "macros are not supported in a net body");
                }
            }
        }
    }

    fn exec_decl_expr(&mut self, e: &Expr, env: &mut Env, sink: &mut Sink) {
        match e {
            Expr::Assign(a) => {
                let name = match &*a.left {
                    Expr::Field(f) if is_self(&f.base) => match &f.member {
                        syn::Member::Named(n) => Some(n.to_string()),
                        _ => None,
                    },
                    other => ident_of(other),
                };
                let Some(name) = name else {
                    self.error(a.left.src(), "expected a name on the left of `=`");
                    return;
                };
                let v = self.eval(&a.right, env, &mut None);
                if let Value::Module(m) = &v {
                    if let Some(prev) = sink.items.iter().find(|(n, _)| n.as_deref() == Some(&name)) {
                        let _ = prev;
                        self.error(a.left.src(), format!("layer `{name}` is declared twice"));
                        return;
                    }
                    sink.items.push((Some(name.clone()), m.clone()));
                }
                env.insert(name, v);
            }
            Expr::ForLoop(f) => {
                let iter = self.eval(&f.expr, env, &mut None);
                let Some(items) = self.iterate(iter, f.expr.src()) else { return };
                for item in items {
                    self.bind_pat(&f.pat, item, env);
                    self.exec_decls(&f.body.stmts, env, sink);
                }
            }
            Expr::If(i) => match self.eval(&i.cond, env, &mut None) {
                Value::Bool(true) => self.exec_decls(&i.then_branch.stmts, env, sink),
                Value::Bool(false) => {
                    if let Some((_, els)) = &i.else_branch {
                        match &**els {
                            Expr::Block(b) => self.exec_decls(&b.block.stmts, env, sink),
                            other => self.exec_decl_expr(other, env, sink),
                        }
                    }
                }
                Value::Poison => {}
                other => {
                    self.error(i.cond.src(), format!("a condition must be a bool, found {}", other.type_name()));
                }
            },
            Expr::Block(b) => self.exec_decls(&b.block.stmts, env, sink),
            Expr::Binary(b) if matches!(b.op, BinOp::AddAssign(_) | BinOp::SubAssign(_) | BinOp::MulAssign(_)) => {
                self.compound_assign(b, env, &mut None);
            }
            other => {
                let v = self.eval(other, env, &mut None);
                self.sink_value(v, other.src(), sink);
            }
        }
    }

    fn sink_value(&mut self, v: Value, span: Span, sink: &mut Sink) {
        match v {
            Value::Module(m) if sink.sequential => sink.items.push((None, m)),
            Value::Module(m) => {
                self.error(
                    span,
                    format!(
                        "unnamed layer `{}` in a module with a forward; name it (`name = {}`) and use it in forward",
                        m.label, m.label
                    ),
                );
            }
            Value::Tuple(vs) if sink.sequential && vs.iter().all(|v| matches!(v, Value::Module(_) | Value::Poison)) => {
                for v in vs {
                    self.sink_value(v, span, sink);
                }
            }
            Value::Poison if sink.sequential => sink.items.push((None, poisoned(span))),
            Value::Poison => {}
            other => {
                self.error(span, format!("this statement evaluates to {} and has no effect", other.type_name()));
            }
        }
    }

    /// Executes statements inside forward (or a block expression); returns the value of a
    /// trailing expression, if any.
    fn exec_block(&mut self, stmts: &[Stmt], env: &mut Env, fwd: &mut Option<Fwd>) -> Option<Value> {
        let mut last = None;
        for (i, s) in stmts.iter().enumerate() {
            if fwd.as_ref().is_some_and(|f| f.result.is_some()) {
                break;
            }
            last = None;
            match s {
                Stmt::Local(l) => {
                    let v = match &l.init {
                        Some(init) => self.eval(&init.expr, env, fwd),
                        None => Value::None,
                    };
                    self.bind_pat(&l.pat, v, env);
                }
                Stmt::Expr(e, semi) => {
                    let v = self.exec_expr_stmt(e, env, fwd);
                    if semi.is_none() && i + 1 == stmts.len() {
                        last = v;
                    }
                }
                Stmt::Item(it) => {
                    self.error(it.src(), "items are not allowed inside forward");
                }
                Stmt::Macro(m) => {
                    self.error(m.src(), "macros are not supported inside forward");
                }
            }
        }
        last
    }

    fn exec_expr_stmt(&mut self, e: &Expr, env: &mut Env, fwd: &mut Option<Fwd>) -> Option<Value> {
        match e {
            Expr::Assign(a) => {
                let Some(name) = ident_of(&a.left) else {
                    self.error(a.left.src(), "expected a variable name on the left of `=`");
                    return None;
                };
                let v = self.eval(&a.right, env, fwd);
                if let Value::Module(_) = v {
                    self.error(a.src(), "declare layers before `fn forward`, not inside it");
                    return None;
                }
                env.insert(name, v);
                None
            }
            Expr::Binary(b) if matches!(b.op, BinOp::AddAssign(_) | BinOp::SubAssign(_) | BinOp::MulAssign(_)) => {
                self.compound_assign(b, env, fwd);
                None
            }
            Expr::Return(r) => {
                let v = match &r.expr {
                    Some(x) => self.eval(x, env, fwd),
                    None => Value::None,
                };
                match fwd {
                    Some(f) => f.result = Some(v),
                    None => {
                        self.error(r.src(), "`return` outside forward");
                    }
                }
                None
            }
            Expr::If(i) => match self.eval(&i.cond, env, fwd) {
                Value::Bool(true) => self.exec_block(&i.then_branch.stmts, env, fwd),
                Value::Bool(false) => match &i.else_branch {
                    Some((_, els)) => match &**els {
                        Expr::Block(b) => self.exec_block(&b.block.stmts, env, fwd),
                        other => self.exec_expr_stmt(other, env, fwd),
                    },
                    None => None,
                },
                Value::Poison => None,
                other => {
                    self.error(i.cond.src(), format!("a condition must be a bool, found {}", other.type_name()));
                    None
                }
            },
            Expr::ForLoop(f) => {
                let iter = self.eval(&f.expr, env, fwd);
                let items = self.iterate(iter, f.expr.src())?;
                for item in items {
                    self.bind_pat(&f.pat, item, env);
                    self.exec_block(&f.body.stmts, env, fwd);
                }
                None
            }
            other => Some(self.eval(other, env, fwd)),
        }
    }

    fn compound_assign(&mut self, b: &syn::ExprBinary, env: &mut Env, fwd: &mut Option<Fwd>) {
        let Some(name) = ident_of(&b.left) else {
            self.error(b.left.src(), "expected a variable name");
            return;
        };
        let lhs = match env.get(&name) {
            Some(v) => v.clone(),
            None => {
                self.error(b.left.src(), format!("`{name}` is not defined"));
                return;
            }
        };
        let rhs = self.eval(&b.right, env, fwd);
        let op = match b.op {
            BinOp::AddAssign(_) => "+",
            BinOp::SubAssign(_) => "-",
            _ => "*",
        };
        let v = self.binary(op, lhs, rhs, b.src(), fwd);
        env.insert(name, v);
    }

    fn iterate(&mut self, v: Value, span: Span) -> Option<Vec<Value>> {
        match v {
            Value::Range(a, b) => {
                let len = (i128::from(b) - i128::from(a)).max(0);
                if len > 4096 {
                    self.error(span, format!("loop of {len} iterations is too long to unroll"));
                    return None;
                }
                if !self.spend(len as usize, span) {
                    return None;
                }
                Some((a..b.max(a)).map(Value::Int).collect())
            }
            Value::Tuple(vs) if !self.spend(vs.len(), span) => None,
            Value::Tuple(vs) => Some(vs),
            Value::Poison => None,
            other => {
                self.error(span, format!("cannot loop over {}", other.type_name()));
                None
            }
        }
    }

    fn bind_pat(&mut self, pat: &Pat, v: Value, env: &mut Env) {
        match pat {
            Pat::Ident(i) => {
                env.insert(i.ident.to_string(), v);
            }
            Pat::Wild(_) => {}
            Pat::Type(t) => self.bind_pat(&t.pat, v, env),
            Pat::Tuple(t) => match v {
                Value::Tuple(vs) if vs.len() == t.elems.len() => {
                    for (p, x) in t.elems.iter().zip(vs) {
                        self.bind_pat(p, x, env);
                    }
                }
                Value::Poison => {
                    for p in &t.elems {
                        self.bind_pat(p, Value::Poison, env);
                    }
                }
                other => {
                    self.error(pat.src(), format!("cannot unpack {} into {} names", other.type_name(), t.elems.len()));
                }
            },
            other => {
                self.error(other.src(), "unsupported pattern; use a name or a tuple of names");
            }
        }
    }

    // ---------------------------------------------------------------- expressions

    fn lookup(&mut self, name: &str, env: &Env, span: Span, fwd: &Option<Fwd>) -> Value {
        if let Some(v) = env.get(name) {
            return v.clone();
        }
        if let Some(f) = fwd
            && let Some((_, m)) = f.children.iter().find(|(n, _)| n == name)
        {
            return Value::Module(m.clone());
        }
        match name {
            "True" => return Value::Bool(true),
            "False" => return Value::Bool(false),
            "None" => return Value::None,
            _ => {}
        }
        if ops::layer_ctor(name).is_some() || self.blocks.contains_key(name) || name == "Sequential" {
            return self.call_named(name, &[], span, &mut env.clone(), &mut None);
        }
        let mut cands: Vec<&str> = env.keys().map(|s| s.as_str()).collect();
        cands.extend(ops::LAYERS.iter().map(|c| c.name));
        cands.extend(self.blocks.keys().map(|s| s.as_str()));
        cands.push("Sequential");
        let mut d = Diagnostic::error(span, format!("unknown name `{name}`"));
        if let Some(s) = suggest(name, &cands) {
            d = d.help(format!("did you mean `{s}`?"));
        }
        self.diags.push(d);
        Value::Poison
    }

    fn eval(&mut self, e: &Expr, env: &mut Env, fwd: &mut Option<Fwd>) -> Value {
        match e {
            Expr::Lit(l) => self.lit(&l.lit),
            Expr::Paren(p) => self.eval(&p.expr, env, fwd),
            Expr::Group(g) => self.eval(&g.expr, env, fwd),
            Expr::Path(_) => match ident_of(e) {
                Some(n) => self.lookup(&n, env, e.src(), fwd),
                None => self.error(e.src(), "unknown path"),
            },
            Expr::Tuple(t) => Value::Tuple(t.elems.iter().map(|x| self.eval(x, env, fwd)).collect()),
            Expr::Array(a) => Value::Tuple(a.elems.iter().map(|x| self.eval(x, env, fwd)).collect()),
            Expr::Unary(u) => {
                let v = self.eval(&u.expr, env, fwd);
                match (&u.op, v) {
                    (UnOp::Neg(_), Value::Int(i)) => match i.checked_neg() {
                        Some(v) => Value::Int(v),
                        None => self.error(u.src(), format!("integer overflow: -({i}) does not fit in 64 bits")),
                    },
                    (UnOp::Neg(_), Value::Float(f)) => Value::Float(-f),
                    (UnOp::Not(_), Value::Bool(b)) => Value::Bool(!b),
                    (_, Value::Poison) => Value::Poison,
                    (_, other) => self.error(u.src(), format!("unsupported unary operator on {}", other.type_name())),
                }
            }
            Expr::Binary(b) => {
                let op = match b.op {
                    BinOp::Add(_) => "+",
                    BinOp::Sub(_) => "-",
                    BinOp::Mul(_) => "*",
                    BinOp::Div(_) => "/",
                    BinOp::Rem(_) => "%",
                    BinOp::Eq(_) => "==",
                    BinOp::Ne(_) => "!=",
                    BinOp::Lt(_) => "<",
                    BinOp::Le(_) => "<=",
                    BinOp::Gt(_) => ">",
                    BinOp::Ge(_) => ">=",
                    BinOp::And(_) => "&&",
                    BinOp::Or(_) => "||",
                    _ => return self.error(b.src(), "unsupported operator"),
                };
                let l = self.eval(&b.left, env, fwd);
                if op == "&&" && matches!(l, Value::Bool(false)) {
                    return Value::Bool(false);
                }
                if op == "||" && matches!(l, Value::Bool(true)) {
                    return Value::Bool(true);
                }
                let r = self.eval(&b.right, env, fwd);
                self.binary(op, l, r, b.src(), fwd)
            }
            Expr::Range(r) => {
                let start = match &r.start {
                    Some(s) => self.eval(s, env, fwd),
                    None => Value::Int(0),
                };
                let end = match &r.end {
                    Some(s) => self.eval(s, env, fwd),
                    None => return self.error(r.src(), "a range needs an end"),
                };
                match (start, end) {
                    (Value::Int(a), Value::Int(b)) => match r.limits {
                        syn::RangeLimits::HalfOpen(_) => Value::Range(a, b),
                        syn::RangeLimits::Closed(_) => match b.checked_add(1) {
                            Some(end) => Value::Range(a, end),
                            None => self.error(r.src(), format!("the range {a}..={b} is too long to unroll")),
                        },
                    },
                    _ => self.error(r.src(), "range bounds must be integers"),
                }
            }
            Expr::Index(i) => {
                let base = self.eval(&i.expr, env, fwd);
                let idx = self.eval(&i.index, env, fwd);
                match (base, idx) {
                    (Value::Tuple(vs), Value::Int(k)) => {
                        let n = vs.len() as i64;
                        let k2 = if k < 0 { k + n } else { k };
                        if k2 < 0 || k2 >= n {
                            self.error(i.index.src(), format!("index {k} out of range for a tuple of {n}"))
                        } else {
                            vs[k2 as usize].clone()
                        }
                    }
                    (Value::Poison, _) | (_, Value::Poison) => Value::Poison,
                    (b, _) => self.error(i.src(), format!("cannot index {}", b.type_name())),
                }
            }
            Expr::If(i) => match self.eval(&i.cond, env, fwd) {
                Value::Bool(c) => {
                    let r = if c {
                        self.exec_block(&i.then_branch.stmts, env, fwd)
                    } else {
                        i.else_branch.as_ref().map(|(_, els)| self.eval(els, env, fwd))
                    };
                    r.unwrap_or(Value::None)
                }
                Value::Poison => Value::Poison,
                other => self.error(i.cond.src(), format!("a condition must be a bool, found {}", other.type_name())),
            },
            Expr::Block(b) => self.exec_block(&b.block.stmts, env, fwd).unwrap_or(Value::None),
            Expr::Field(f) => {
                let member = match &f.member {
                    syn::Member::Named(n) => n.to_string(),
                    syn::Member::Unnamed(i) => i.index.to_string(),
                };
                if is_self(&f.base) {
                    if let Some(fw) = fwd
                        && let Some((_, m)) = fw.children.iter().find(|(n, _)| *n == member)
                    {
                        return Value::Module(m.clone());
                    }
                    if let Some(v) = env.get(&member) {
                        return v.clone();
                    }
                    return self.error(f.src(), format!("`self.{member}` is not a declared layer"));
                }
                if is_namespace(&f.base) {
                    return self.lookup(&member, env, f.src(), fwd);
                }
                match self.eval(&f.base, env, fwd) {
                    Value::Tuple(vs) => match member.parse::<usize>() {
                        Ok(k) if k < vs.len() => vs[k].clone(),
                        _ => self.error(f.src(), format!("no field `{member}`")),
                    },
                    Value::Poison => Value::Poison,
                    other => self.error(f.src(), format!("{} has no field `{member}`", other.type_name())),
                }
            }
            Expr::Call(c) => {
                let args: Vec<&Expr> = c.args.iter().collect();
                match ident_of(&c.func) {
                    Some(name) => self.call(&name, &args, c.src(), c.func.src(), env, fwd),
                    None => match &*c.func {
                        Expr::Field(f) if is_self(&f.base) || is_namespace(&f.base) => {
                            let name = match &f.member {
                                syn::Member::Named(n) => n.to_string(),
                                _ => return self.error(f.src(), "expected a layer name"),
                            };
                            self.call(&name, &args, c.src(), f.src(), env, fwd)
                        }
                        other => match self.eval(other, env, fwd) {
                            Value::Module(m) => {
                                let ins: Vec<Value> = args.iter().map(|a| self.eval(a, env, fwd)).collect();
                                self.apply_checked(&m, ins, c.src(), fwd)
                            }
                            Value::Poison => Value::Poison,
                            v => self.error(other.src(), format!("{} is not callable", v.type_name())),
                        },
                    },
                }
            }
            Expr::MethodCall(mc) => {
                let args: Vec<&Expr> = mc.args.iter().collect();
                let method = mc.method.to_string();
                if is_self(&mc.receiver) || is_namespace(&mc.receiver) {
                    return self.call(&method, &args, mc.src(), mc.method.src(), env, fwd);
                }
                let recv = self.eval(&mc.receiver, env, fwd);
                match recv {
                    Value::Tensor(_) => self.tensor_fn(&method, Some(recv), &args, mc.src(), mc.method.src(), env, fwd),
                    Value::Module(m) if method == "forward" => {
                        let ins: Vec<Value> = args.iter().map(|a| self.eval(a, env, fwd)).collect();
                        self.apply_checked(&m, ins, mc.src(), fwd)
                    }
                    Value::Poison => Value::Poison,
                    other => self.error(mc.method.src(), format!("{} has no method `{method}`", other.type_name())),
                }
            }
            Expr::Assign(a) => self.error(a.src(), "assignment is a statement here; end it with `;`"),
            Expr::Closure(c) => self.error(c.src(), "closures are not supported; declare a `block`"),
            other => self.error(other.src(), "unsupported expression in a net"),
        }
    }

    fn lit(&mut self, l: &Lit) -> Value {
        match l {
            Lit::Int(i) => match i.base10_parse::<i64>() {
                Ok(v) => Value::Int(v),
                Err(e) => self.error(i.src(), e.to_string()),
            },
            Lit::Float(f) => match f.base10_parse::<f64>() {
                Ok(v) => Value::Float(v),
                Err(e) => self.error(f.src(), e.to_string()),
            },
            Lit::Bool(b) => Value::Bool(b.value),
            Lit::Str(s) => Value::Str(s.value()),
            Lit::Char(c) => self.error(c.src(), format!("strings use double quotes here: \"{}\"", c.value())),
            other => self.error(other.src(), "unsupported literal"),
        }
    }

    fn binary(&mut self, op: &str, l: Value, r: Value, span: Span, fwd: &mut Option<Fwd>) -> Value {
        use Value::*;
        match (op, l, r) {
            (_, Poison, _) | (_, _, Poison) => Poison,
            ("+", Tensor(a), Tensor(b)) => {
                let name = self.fn_name(fwd, "add");
                self.add_op(&name, Op::Add(ops::Add), vec![], &[Tensor(a), Tensor(b)], span)
            }
            ("/", Int(_), Int(0)) | ("%", Int(_), Int(0)) => self.error(span, "division by zero"),
            (op @ ("+" | "-" | "*" | "/" | "%"), Int(a), Int(b)) => {
                let v = match op {
                    "+" => a.checked_add(b),
                    "-" => a.checked_sub(b),
                    "*" => a.checked_mul(b),
                    "/" => a.checked_div_euclid(b),
                    _ => a.checked_rem_euclid(b),
                };
                match v {
                    Some(v) => Int(v),
                    Option::None => self.error(span, format!("integer overflow: {a} {op} {b} does not fit in 64 bits")),
                }
            }
            ("+", Float(a), Float(b)) => Float(a + b),
            ("-", Float(a), Float(b)) => Float(a - b),
            ("*", Float(a), Float(b)) => Float(a * b),
            ("/", Float(a), Float(b)) => Float(a / b),
            ("==", Int(a), Int(b)) => Bool(a == b),
            ("!=", Int(a), Int(b)) => Bool(a != b),
            ("<", Int(a), Int(b)) => Bool(a < b),
            ("<=", Int(a), Int(b)) => Bool(a <= b),
            (">", Int(a), Int(b)) => Bool(a > b),
            (">=", Int(a), Int(b)) => Bool(a >= b),
            ("==", Bool(a), Bool(b)) => Bool(a == b),
            ("!=", Bool(a), Bool(b)) => Bool(a != b),
            ("==", Str(a), Str(b)) => Bool(a == b),
            ("&&", Bool(a), Bool(b)) => Bool(a && b),
            ("||", Bool(a), Bool(b)) => Bool(a || b),
            ("+", Tuple(mut a), Tuple(b)) => {
                a.extend(b);
                Tuple(a)
            }
            (op, l, r) => self.error(span, format!("cannot apply `{op}` to {} and {}", l.type_name(), r.type_name())),
        }
    }

    /// The rank (batch included) of a tensor value.
    fn rank_of(&self, v: &Value) -> Option<usize> {
        match v {
            Value::Tensor(t) => self.gb.as_ref().map(|gb| gb.graph().node(t.id).ty.rank()),
            _ => None,
        }
    }

    fn fn_name(&mut self, fwd: &Option<Fwd>, what: &str) -> String {
        self.fn_counter += 1;
        match fwd {
            Some(f) if !f.scope.is_empty() => format!("{}.{what}()", f.scope),
            _ => format!("{what}()"),
        }
    }

    fn apply_checked(&mut self, m: &Rc<Module>, inputs: Vec<Value>, span: Span, fwd: &Option<Fwd>) -> Value {
        if fwd.is_none() {
            return self.error(span, format!("`{}` is applied to a value outside forward", m.label));
        }
        for v in &inputs {
            match v {
                Value::Tensor(_) | Value::Poison => {}
                other => {
                    return self.error(span, format!("a layer is applied to tensors, found {}", other.type_name()));
                }
            }
        }
        self.apply(m, inputs, span, "")
    }

    /// Splits call arguments into positional and `key = value` pairs.
    fn split_args<'e>(&self, args: &[&'e Expr]) -> Vec<(Option<String>, &'e Expr)> {
        args.iter()
            .map(|a| match a {
                Expr::Assign(asg) => match ident_of(&asg.left) {
                    Some(k) => (Some(k), &*asg.right),
                    None => (None, *a),
                },
                other => (None, *other),
            })
            .collect()
    }

    /// The span of each whole argument (`strides = 2`, not just `2`).
    fn arg_spans(args: &[&Expr]) -> Vec<Span> {
        args.iter().map(|a| a.src()).collect()
    }

    fn call(
        &mut self,
        name: &str,
        args: &[&Expr],
        span: Span,
        name_span: Span,
        env: &mut Env,
        fwd: &mut Option<Fwd>,
    ) -> Value {
        // A variable or a declared child holding a layer: apply it.
        let held = env.get(name).cloned().or_else(|| {
            fwd.as_ref().and_then(|f| f.children.iter().find(|(n, _)| n == name).map(|(_, m)| Value::Module(m.clone())))
        });
        if let Some(v) = held {
            return match v {
                Value::Module(m) => {
                    let ins: Vec<Value> = args.iter().map(|a| self.eval(a, env, fwd)).collect();
                    self.apply_checked(&m, ins, span, fwd)
                }
                Value::Poison => Value::Poison,
                other => self.error(name_span, format!("`{name}` is {}, not a layer", other.type_name())),
            };
        }
        if FUNCTIONAL.contains(&name) && ops::layer_ctor(name).is_none() {
            return self.tensor_fn(name, None, args, span, name_span, env, fwd);
        }
        self.call_named(name, args, span, env, fwd)
    }

    /// Constructs a layer, a Sequential or a block instance.
    fn call_named(&mut self, name: &str, args: &[&Expr], span: Span, env: &mut Env, fwd: &mut Option<Fwd>) -> Value {
        let split = self.split_args(args);
        if name == "Sequential" {
            let mut items = vec![];
            for (k, e) in split {
                let v = self.eval(e, env, fwd);
                let mut push = |ev: &mut Self, v: Value, s: Span| match v {
                    Value::Module(m) => {
                        items.push((k.clone(), m));
                        true
                    }
                    Value::Poison => {
                        items.push((k.clone(), poisoned(s)));
                        true
                    }
                    other => {
                        ev.error(s, format!("Sequential takes layers, found {}", other.type_name()));
                        false
                    }
                };
                match v {
                    Value::Tuple(vs) if k.is_none() => {
                        for x in vs {
                            push(self, x, e.src());
                        }
                    }
                    v => {
                        push(self, v, e.src());
                    }
                }
            }
            return Value::Module(Rc::new(Module { kind: ModKind::Seq(items), span, label: "Sequential".into() }));
        }
        if let Some(ctor) = ops::layer_ctor(name) {
            let mut cargs = vec![];
            let mut bad = false;
            for ((k, e), full) in split.into_iter().zip(Self::arg_spans(args)) {
                let v = self.eval(e, env, fwd);
                match v.to_arg() {
                    Some(a) => cargs.push(Arg { keyword: k, value: a, span: full }),
                    None => {
                        if !matches!(v, Value::Poison) {
                            let what = if matches!(v, Value::Tensor(_)) {
                                format!("{name} is a layer: declare it (`{}`), then apply it to the tensor", ctor.name)
                            } else {
                                format!(
                                    "{name}: argument must be a number, bool, string or tuple, found {}",
                                    v.type_name()
                                )
                            };
                            self.error(e.src(), what);
                        }
                        bad = true;
                    }
                }
            }
            if bad {
                return Value::Poison;
            }
            return match ops::construct(ctor, &cargs, span) {
                Ok(op) => {
                    let label = op.def().describe();
                    Value::Module(Rc::new(Module { kind: ModKind::Leaf(op), span, label }))
                }
                Err(errs) => {
                    self.diags.extend(errs);
                    Value::Poison
                }
            };
        }
        if let Some(block) = self.blocks.get(name).cloned() {
            return self.instantiate(&block, split, span, env, fwd);
        }
        let mut cands: Vec<&str> = ops::LAYERS.iter().map(|c| c.name).collect();
        cands.extend(self.blocks.keys().map(|s| s.as_str()));
        cands.push("Sequential");
        cands.extend(FUNCTIONAL.iter().copied());
        cands.extend(env.keys().map(|s| s.as_str()));
        let mut d = Diagnostic::error(span, format!("unknown layer `{name}`"));
        if let Some(s) = suggest(name, &cands) {
            d = d.help(format!("did you mean `{s}`?"));
        } else {
            let all: Vec<&str> = ops::LAYERS.iter().map(|c| c.name).collect();
            d = d.help(format!("layers: {}, Sequential, or a `block` declared in this file", all.join(", ")));
        }
        self.diags.push(d);
        Value::Poison
    }

    fn instantiate(
        &mut self,
        block: &Rc<BlockItem>,
        args: Vec<(Option<String>, &Expr)>,
        span: Span,
        env: &mut Env,
        fwd: &mut Option<Fwd>,
    ) -> Value {
        if self.depth > 64 {
            return self.error(span, format!("block `{}` expands too deeply (recursive?)", block.name));
        }
        if !self.spend(1, span) {
            return Value::Poison;
        }
        let bname = block.name.to_string();
        let mut benv = self.consts.clone();
        let mut given: Vec<Option<Value>> = vec![None; block.params.len()];
        let mut pos = 0;
        let mut ok = true;
        for (k, e) in args {
            let v = self.eval(e, env, fwd);
            let slot = match &k {
                None => {
                    pos += 1;
                    if pos > block.params.len() {
                        self.error(e.src(), format!("`{bname}` takes {} arguments", block.params.len()));
                        ok = false;
                        continue;
                    }
                    pos - 1
                }
                Some(k) => match block.params.iter().position(|(p, _)| p == k) {
                    Some(i) => i,
                    None => {
                        let names: Vec<String> = block.params.iter().map(|(p, _)| p.to_string()).collect();
                        let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
                        let mut d = Diagnostic::error(e.src(), format!("`{bname}` has no argument `{k}`"));
                        if let Some(s) = suggest(k, &refs) {
                            d = d.help(format!("did you mean `{s}`?"));
                        }
                        self.diags.push(d);
                        ok = false;
                        continue;
                    }
                },
            };
            given[slot] = Some(v);
        }
        for ((p, default), g) in block.params.iter().zip(given) {
            let v = match (g, default) {
                (Some(v), _) => v,
                (None, Some(d)) => {
                    let mut denv = self.consts.clone();
                    self.eval(d, &mut denv, &mut None)
                }
                (None, None) => {
                    self.error(span, format!("`{bname}` is missing its argument `{p}`"));
                    ok = false;
                    Value::Poison
                }
            };
            benv.insert(p.to_string(), v);
        }
        if !ok {
            return Value::Poison;
        }
        self.depth += 1;
        let v = match &block.body {
            Body::Expr(e) => {
                let v = self.eval(e, &mut benv, &mut None);
                match v {
                    Value::Module(_) | Value::Poison => v,
                    other => self.error(e.src(), format!("a block must produce a layer, found {}", other.type_name())),
                }
            }
            Body::Stmts { stmts, forward, .. } => match self.module_body(&bname, stmts, forward.as_ref(), benv, span) {
                Some(m) => Value::Module(m),
                None => Value::Poison,
            },
        };
        self.depth -= 1;
        v
    }

    /// Functional tensor ops: `relu(x)`, `x.mean(dim=[2, 3])`, `torch.cat([a, b], dim=1)`, …
    #[allow(clippy::too_many_arguments)]
    fn tensor_fn(
        &mut self,
        name: &str,
        recv: Option<Value>,
        args: &[&Expr],
        span: Span,
        name_span: Span,
        env: &mut Env,
        fwd: &mut Option<Fwd>,
    ) -> Value {
        let split = self.split_args(args);
        let mut pos: Vec<Value> = recv.into_iter().collect();
        let mut kw: HashMap<String, (Value, Span)> = HashMap::new();
        for (k, e) in split {
            let v = self.eval(e, env, fwd);
            match k {
                Some(k) => {
                    kw.insert(k, (v, e.src()));
                }
                None => pos.push(v),
            }
        }
        if pos.iter().chain(kw.values().map(|(v, _)| v)).any(|v| matches!(v, Value::Poison)) {
            return Value::Poison;
        }
        match name {
            "range" => {
                let ints: Option<Vec<i64>> =
                    pos.iter().map(|v| if let Value::Int(i) = v { Some(*i) } else { None }).collect();
                return match ints.as_deref() {
                    Some([n]) => Value::Range(0, *n),
                    Some([a, b]) => Value::Range(*a, *b),
                    _ => self.error(span, "range takes one or two integers"),
                };
            }
            "len" => {
                return match pos.as_slice() {
                    [Value::Tuple(v)] => Value::Int(v.len() as i64),
                    _ => self.error(span, "len takes a tuple"),
                };
            }
            _ => {}
        }
        if fwd.is_none() {
            return self.error(name_span, format!("`{name}` applies to tensors and can only be used inside forward"));
        }
        // The rank of the first tensor argument (of the first tensor in cat's list), for
        // PyTorch's negative dims: -1 is the last dim.
        let rank = match pos.first() {
            Some(Value::Tuple(xs)) => xs.first().and_then(|x| self.rank_of(x)),
            Some(x) => self.rank_of(x),
            None => None,
        };
        let normalize = |d: i64| -> i64 {
            match rank {
                Some(r) if d < 0 => d + r as i64,
                _ => d,
            }
        };
        let dims_of = |ev: &mut Self, v: &Value, s: Span| -> Option<Vec<usize>> {
            let one = |x: &Value| match x {
                Value::Int(i) => usize::try_from(normalize(*i)).ok(),
                _ => None,
            };
            match v {
                Value::Int(_) => one(v).map(|d| vec![d]).or_else(|| {
                    ev.error(s, format!("dim {} is out of range for a rank-{} tensor", dim_text(v), rank.unwrap_or(0)));
                    None
                }),
                Value::Tuple(vs) => vs.iter().map(one).collect::<Option<Vec<_>>>().or_else(|| {
                    ev.error(
                        s,
                        format!("dims must be integers within the rank ({}), found {}", rank.unwrap_or(0), dim_text(v)),
                    );
                    None
                }),
                other => {
                    ev.error(s, format!("`dim` must be an int or a list of ints, found {}", other.type_name()));
                    None
                }
            }
        };
        let act = match name {
            "relu" | "relu_" => Some(Activation::Relu),
            "sigmoid" => Some(Activation::Sigmoid),
            "tanh" => Some(Activation::Tanh),
            "relu6" => Some(Activation::relu6()),
            _ => None,
        };
        let fname = self.fn_name(fwd, name);
        if let Some(a) = act {
            if pos.len() != 1 {
                return self.error(span, format!("`{name}` takes one tensor"));
            }
            return self.add_op(&fname, Op::Activation(a), vec![], &pos, span);
        }
        match name {
            "dropout" => pos.into_iter().next().unwrap_or(Value::Poison),
            "softmax" => {
                let dim = match (pos.get(1), kw.get("dim")) {
                    (Some(Value::Int(i)), _) | (_, Some((Value::Int(i), _))) => *i,
                    _ => return self.error(span, "softmax takes a tensor and `dim`: softmax(x, dim = 1)"),
                };
                let x = pos.into_iter().next().unwrap_or(Value::Poison);
                self.add_op(&fname, Op::Softmax(crate::ops::Softmax { dim }), vec![], &[x], span)
            }
            "flatten" => {
                let start = match (pos.get(1), kw.get("start_dim")) {
                    (Some(Value::Int(i)), _) | (_, Some((Value::Int(i), _))) => *i,
                    _ => 1,
                };
                let end = match (pos.get(2), kw.get("end_dim")) {
                    (Some(Value::Int(i)), _) | (_, Some((Value::Int(i), _))) => *i,
                    _ => -1,
                };
                let x = pos.into_iter().next().unwrap_or(Value::Poison);
                self.add_op(&fname, Op::Flatten(Flatten { start_dim: start, end_dim: end }), vec![], &[x], span)
            }
            "cat" | "concat" => {
                let raw = match (pos.get(1), kw.get("dim")) {
                    (Some(Value::Int(i)), _) | (_, Some((Value::Int(i), _))) => *i,
                    _ => 0,
                };
                let dim = normalize(raw);
                let xs = match pos.into_iter().next() {
                    Some(Value::Tuple(xs)) => xs,
                    _ => return self.error(span, "cat takes a list of tensors: cat([a, b], dim=1)"),
                };
                if dim < 1 {
                    return self.error(
                        span,
                        format!("cat: dim {raw} is the batch or out of range (dim 0 is the batch; -1 the last dim)"),
                    );
                }
                self.add_op(&fname, Op::Concat(Concat { dim: dim as usize }), vec![], &xs, span)
            }
            "mean" | "amax" | "max" => {
                let dim_v =
                    kw.get("dim").map(|(v, s)| (v.clone(), *s)).or_else(|| pos.get(1).map(|v| (v.clone(), span)));
                let Some((dim_v, dspan)) = dim_v else {
                    return self
                        .error(span, format!("`{name}` needs `dim=` (reducing over the batch is not supported)"));
                };
                let Some(mut dims) = dims_of(self, &dim_v, dspan) else { return Value::Poison };
                dims.sort();
                dims.dedup();
                let keepdim = matches!(kw.get("keepdim"), Some((Value::Bool(true), _)));
                let kind = if name == "mean" { ReduceKind::Mean } else { ReduceKind::Max };
                if name == "max" && dims.len() != 1 {
                    return self.error(
                        dspan,
                        "`max(dim=d)` takes one dim (returns values and indices); use `amax(dim=[..])` for several",
                    );
                }
                let x = pos.into_iter().next().unwrap_or(Value::Poison);
                let v = self.add_op(&fname, Op::Reduce(Reduce { kind, dims, keepdim }), vec![], &[x], span);
                if name == "max" { Value::Tuple(vec![v, Value::None]) } else { v }
            }
            _ => {
                let mut cands: Vec<&str> = FUNCTIONAL.to_vec();
                cands.extend(ops::LAYERS.iter().map(|c| c.name));
                let mut d = Diagnostic::error(name_span, format!("unknown function `{name}`"));
                if let Some(s) = suggest(name, &cands) {
                    d = d.help(format!("did you mean `{s}`?"));
                }
                self.diags.push(d);
                Value::Poison
            }
        }
    }
}

/// Evaluates a single layer constructor expression (no variables) into its op.
pub fn construct_layer(e: &Expr) -> Result<Op, Vec<Diagnostic>> {
    let mut ev = Evaluator::default();
    let v = ev.eval(e, &mut Env::new(), &mut None);
    match v {
        Value::Module(m) => match &m.kind {
            ModKind::Leaf(op) if ev.diags.iter().all(|d| !d.is_error()) => Ok(op.clone()),
            _ => Err(if ev.diags.is_empty() {
                vec![Diagnostic::error(e.src(), "expected a single layer")]
            } else {
                ev.diags
            }),
        },
        _ => Err(if ev.diags.is_empty() {
            vec![Diagnostic::error(e.src(), "expected a layer constructor")]
        } else {
            ev.diags
        }),
    }
}
