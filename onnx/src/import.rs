//! The walk over an ONNX graph: nodes in order, each either folded (constants and shapes),
//! mapped to one op of the op table (through the same constructors and shape rules as the
//! DSL, so the graph is what the `.cnn` text declares), or recorded as unsupported.

use crate::proto::{AttributeProto, GraphProto, ModelProto, NodeProto, type_proto};
use crate::tensor::{self, Const, Data, Sym};
use crate::{ImportError, Imported, Options, ParamValue, Unsupported};
use cnnc_compiler::ops::args::{Arg, ArgValue};
use cnnc_compiler::ops::{self, Activation, Add, Concat, Flatten, Op, Reduce, ReduceKind};
use cnnc_compiler::shape::{Batch, TensorType};
use cnnc_compiler::{GraphBuilder, NodeId};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::rc::Rc;

/// The opsets of the default domain the importer reads.
const OPSETS: std::ops::RangeInclusive<i64> = 6..=25;

/// What a name in the ONNX graph stands for.
#[derive(Clone, Debug)]
enum Value {
    /// A tensor computed at run time (a node of the graph).
    Tensor(NodeId),
    /// A constant folded at import (shared: a weight is copied only into its parameter).
    Const(Rc<Const>),
    /// A `Pad` waiting for the `Conv` it feeds: `(top, bottom, left, right)` and the mode.
    Padded { x: NodeId, pads: [usize; 4], mode: &'static str },
    /// The output of a node that could not be mapped.
    Poison,
}

/// Why one node failed: unsupported (listed with the others) or a malformed model.
enum Fail {
    Unsupported(String),
    Invalid(String),
}

type R<T> = Result<T, Fail>;

fn unsupported<T>(m: impl Into<String>) -> R<T> {
    Err(Fail::Unsupported(m.into()))
}

fn invalid<T>(m: impl Into<String>) -> R<T> {
    Err(Fail::Invalid(m.into()))
}

struct Importer<'m> {
    opset: i64,
    dir: Option<&'m Path>,
    b: GraphBuilder,
    values: HashMap<String, Value>,
    /// DSL declarations (`ident = Layer(…);`) and forward lines.
    decls: Vec<String>,
    lines: Vec<String>,
    /// The DSL variable of each graph node.
    var: HashMap<NodeId, String>,
    params: Vec<ParamValue>,
    notes: Vec<String>,
    idents: HashSet<String>,
    /// Node indices consuming each value name (graph outputs count as a consumer `usize::MAX`).
    consumers: HashMap<String, Vec<usize>>,
    /// Nodes already handled by a neighbour (the `Add` of a `MatMul` + `Add`).
    absorbed: HashSet<usize>,
    /// The batch size each input was declared with, when fixed (read back as the batch).
    declared_batch: HashSet<i64>,
    temp: usize,
    /// Nodes folded to constants at import, by op type.
    folded: std::collections::BTreeMap<String, usize>,
}

pub(crate) fn import(
    model: &ModelProto,
    dir: Option<&Path>,
    opts: &Options,
    default_name: Option<&str>,
) -> Result<Imported, ImportError> {
    let graph = model.graph.as_ref().ok_or_else(|| ImportError::Invalid("the model has no graph".into()))?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .unwrap_or(1);
    let name = net_name(opts.name.as_deref().or(default_name).or(graph.name.as_deref()).unwrap_or("Model"));
    let mut im = Importer {
        opset,
        dir,
        b: GraphBuilder::new(name.clone()),
        values: HashMap::new(),
        decls: vec![],
        lines: vec![],
        var: HashMap::new(),
        params: vec![],
        notes: vec![],
        idents: ["self", "fn", "let", "net", "block", "for", "in", "if", "else", "const", "pub"]
            .into_iter()
            .map(String::from)
            .collect(),
        consumers: HashMap::new(),
        absorbed: HashSet::new(),
        declared_batch: HashSet::new(),
        temp: 0,
        folded: Default::default(),
    };
    if !OPSETS.contains(&opset) {
        return Err(ImportError::Unsupported(vec![Unsupported {
            node: "(model)".into(),
            op: "opset_import".into(),
            opset,
            reason: format!(
                "opset {opset} of the default domain; cnnc reads opsets {}–{}",
                OPSETS.start(),
                OPSETS.end()
            ),
        }]));
    }
    for (i, n) in graph.node.iter().enumerate() {
        for inp in n.input.iter().filter(|s| !s.is_empty()) {
            im.consumers.entry(inp.clone()).or_default().push(i);
        }
    }
    for o in &graph.output {
        im.consumers.entry(o.name.clone().unwrap_or_default()).or_default().push(usize::MAX);
    }
    // Initializers, then bound inputs, are constants.
    for t in &graph.initializer {
        // A bound name overrides the file's values (which are then not read).
        if opts.bind.iter().any(|(n, _)| Some(n) == t.name.as_ref()) {
            continue;
        }
        let c = tensor::decode(t, dir)?;
        im.values.insert(t.name.clone().unwrap_or_default(), Value::Const(Rc::new(c)));
    }
    if !graph.sparse_initializer.is_empty() {
        return Err(ImportError::Unsupported(vec![Unsupported {
            node: "(graph)".into(),
            op: "sparse_initializer".into(),
            opset,
            reason: "sparse initializers are not supported".into(),
        }]));
    }
    for (name, c) in &opts.bind {
        im.values.insert(name.clone(), Value::Const(Rc::new(c.clone())));
    }
    let mut inputs = vec![];
    let mut data_names = vec![];
    for vi in &graph.input {
        let name = vi.name.clone().unwrap_or_default();
        if im.values.contains_key(&name) {
            continue; // an initializer listed as an input (IR < 4), or bound
        }
        // The dims given for it by name, else the unnamed ones in its position.
        let given = opts
            .dims
            .iter()
            .find(|(n, _)| n.as_deref() == Some(name.as_str()))
            .or_else(|| opts.dims.iter().filter(|(n, _)| n.is_none()).nth(data_names.len()));
        data_names.push(name.clone());
        let ty = input_type(vi, given.map(|(_, d)| d.as_slice()), &mut im.declared_batch)?;
        let ident = im.ident(&name, "input");
        let id = im.b.input(&ident, ty.clone());
        im.var.insert(id, ident.clone());
        im.values.insert(name, Value::Tensor(id));
        inputs.push((ident, ty));
    }
    if inputs.is_empty() {
        return Err(ImportError::Invalid("the model has no data input (every input is a constant)".into()));
    }
    let unnamed = opts.dims.iter().filter(|(n, _)| n.is_none()).count();
    let unknown = opts.dims.iter().find_map(|(n, _)| n.as_ref().filter(|n| !data_names.contains(n)));
    if unnamed > data_names.len() || unknown.is_some() {
        return Err(ImportError::Invalid(format!(
            "{}; the model's inputs: {}",
            match unknown {
                Some(n) => format!("the model has no input `{n}`"),
                None => format!("{unnamed} input shapes given for {} input(s)", data_names.len()),
            },
            data_names.join(", ")
        )));
    }
    let mut bad: Vec<Unsupported> = vec![];
    for (i, n) in graph.node.iter().enumerate() {
        if im.absorbed.contains(&i) {
            continue;
        }
        let op = op_name(n);
        let node = node_name(n, i);
        let poisoned = n.input.iter().any(|s| matches!(im.values.get(s), Some(Value::Poison)));
        let known = matches!(n.domain.as_deref(), None | Some("") | Some("ai.onnx"))
            && crate::SUPPORTED_OPS.contains(&op.as_str());
        let result = match (poisoned, known) {
            (_, false) => Err(Fail::Unsupported("no cnnc op for it".into())),
            (true, true) => Ok(vec![Value::Poison]),
            (false, true) => im.node(graph, i, n),
        };
        match result {
            Ok(outs) => {
                for (o, v) in n.output.iter().zip(outs) {
                    if !o.is_empty() {
                        im.values.insert(o.clone(), v);
                    }
                }
            }
            Err(Fail::Unsupported(reason)) => {
                bad.push(Unsupported { node, op, opset, reason });
                for o in &n.output {
                    im.values.insert(o.clone(), Value::Poison);
                }
            }
            Err(Fail::Invalid(m)) => return Err(ImportError::Invalid(format!("node `{node}` ({op}): {m}"))),
        }
    }
    if !im.folded.is_empty() {
        let total: usize = im.folded.values().sum();
        let kinds: Vec<String> = im.folded.iter().map(|(k, v)| format!("{v} {k}")).collect();
        im.notes.insert(0, format!("{total} nodes folded to constants at import ({})", kinds.join(", ")));
    }
    if !bad.is_empty() {
        return Err(ImportError::Unsupported(bad));
    }
    let mut outs = vec![];
    for (k, o) in graph.output.iter().enumerate() {
        let name = o.name.clone().unwrap_or_default();
        let id = match im.values.get(&name) {
            Some(Value::Tensor(id)) => *id,
            Some(Value::Const(_)) => {
                return Err(ImportError::Unsupported(vec![Unsupported {
                    node: name,
                    op: "(graph output)".into(),
                    opset,
                    reason: "the output is a constant".into(),
                }]));
            }
            _ => return Err(ImportError::Invalid(format!("graph output `{name}` is not computed by any node"))),
        };
        if im.b.graph().node(id).op == Op::Input {
            return Err(ImportError::Unsupported(vec![Unsupported {
                node: name,
                op: "(graph output)".into(),
                opset,
                reason: "the output is a graph input".into(),
            }]));
        }
        let oname = if graph.output.len() == 1 { "output".to_string() } else { im.ident(&name, &format!("out{k}")) };
        outs.push((oname, id));
    }
    for (oname, id) in &outs {
        im.b.output(oname, *id);
    }
    let source = im.source(&name, &inputs, &outs, model);
    let graph = im.b.finish();
    graph.verify().map_err(|e| ImportError::Invalid(format!("the imported graph fails verification: {e}")))?;
    Ok(Imported {
        graph,
        values: im.params,
        source,
        notes: im.notes,
        opset,
        producer: format!("{} {}", clean(model.producer_name.as_ref()), clean(model.producer_version.as_ref()))
            .trim()
            .to_string(),
    })
}

/// Free text from the file as one line of printable characters.
fn clean(t: Option<&String>) -> String {
    let t: String = t.map_or("", |v| v.as_str()).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn op_name(n: &NodeProto) -> String {
    match n.domain.as_deref() {
        None | Some("") | Some("ai.onnx") => n.op_type.clone().unwrap_or_default(),
        Some(d) => format!("{d}.{}", n.op_type.clone().unwrap_or_default()),
    }
}

fn node_name(n: &NodeProto, i: usize) -> String {
    match n.name.as_deref() {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => format!("#{i}"),
    }
}

/// `resnet18` → `Resnet18`, `main_graph` → `MainGraph`, anything else made an identifier.
fn net_name(s: &str) -> String {
    let mut out = String::new();
    let mut up = true;
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(if up { c.to_ascii_uppercase() } else { c });
            up = false;
        } else {
            up = true;
        }
    }
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "Net");
    }
    out
}

/// The type of a graph input: the first dimension becomes the symbolic batch.
fn input_type(
    vi: &crate::proto::ValueInfoProto,
    given: Option<&[usize]>,
    declared: &mut HashSet<i64>,
) -> Result<TensorType, ImportError> {
    let name = vi.name.clone().unwrap_or_default();
    let err = |m: String| {
        ImportError::Unsupported(vec![Unsupported {
            node: name.clone(),
            op: "(graph input)".into(),
            opset: 0,
            reason: m,
        }])
    };
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(err("not a tensor".into()));
    };
    if t.elem_type != Some(crate::proto::tensor_proto::DataType::Float as i32) {
        return Err(err(format!("element type {} (cnnc runs float32 inputs)", t.elem_type.unwrap_or(0))));
    }
    let dims: Vec<Option<i64>> = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(crate::proto::tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => Some(v),
                    _ => None,
                })
                .collect()
        })
        .ok_or_else(|| err("its shape is unknown; give it with --input".into()))?;
    if dims.is_empty() {
        return Err(err("a scalar input has no batch dimension".into()));
    }
    if let Some(b) = dims[0] {
        declared.insert(b);
    }
    if let Some(d) = given {
        if d.len() + 1 != dims.len() {
            return Err(ImportError::Invalid(format!(
                "input `{name}` has rank {}, but {} per-sample dimensions were given",
                dims.len(),
                d.len()
            )));
        }
        if cnnc_compiler::shape::checked_numel(d).is_none() {
            return Err(err(format!("the given shape {}", cnnc_compiler::shape::too_many_elements(d))));
        }
        return Ok(TensorType::new(d.to_vec()));
    }
    let mut per = vec![];
    for (i, d) in dims[1..].iter().enumerate() {
        match d {
            Some(v) if *v <= cnnc_compiler::shape::MAX_SIZE as i64 => per.push(*v as usize),
            _ => {
                return Err(err(format!(
                    "dimension {} is symbolic or invalid; give the input's shape with --input",
                    i + 1
                )));
            }
        }
    }
    if cnnc_compiler::shape::checked_numel(&per).is_none() {
        return Err(err(cnnc_compiler::shape::too_many_elements(&per)));
    }
    Ok(TensorType { batch: Batch::Symbolic, dims: per })
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name))
}

fn attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).and_then(|a| a.i).unwrap_or(default)
}

fn attr_f(n: &NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).and_then(|a| a.f).unwrap_or(default)
}

fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

fn attr_s(n: &NodeProto, name: &str) -> Option<String> {
    attr(n, name).and_then(|a| a.s.as_ref()).map(|s| String::from_utf8_lossy(s).into_owned())
}

/// A float as the DSL prints it back exactly (`1e-5`, not `9.99…e-6`).
fn float(x: f32) -> ArgValue {
    ArgValue::Float(format!("{x:?}").parse().unwrap_or(f64::from(x)))
}

fn int(v: usize) -> ArgValue {
    ArgValue::Int(v as i64)
}

fn pair(a: usize, b: usize) -> ArgValue {
    ArgValue::Tuple(vec![int(a), int(b)])
}

fn boolean(v: bool) -> ArgValue {
    ArgValue::Bool(v)
}

fn to_usize(v: i64, what: &str) -> R<usize> {
    usize::try_from(v)
        .ok()
        .filter(|v| *v <= cnnc_compiler::shape::MAX_SIZE)
        .map_or_else(|| invalid(format!("{what} {v} is out of range")), Ok)
}

/// Normalises an axis against a rank (negative counts from the end).
fn axis(a: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    if a < -r || a >= r {
        return invalid(format!("axis {a} is out of range for rank {rank}"));
    }
    Ok(if a < 0 { (a + r) as usize } else { a as usize })
}

impl Importer<'_> {
    /// A fresh DSL identifier from an ONNX name.
    fn ident(&mut self, raw: &str, fallback: &str) -> String {
        let mut s: String = raw.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        let s2 = s.trim_matches('_').to_string();
        s = if s2.is_empty() { fallback.to_string() } else { s2 };
        while s.contains("__") {
            s = s.replace("__", "_");
        }
        if s.starts_with(|c: char| c.is_ascii_digit()) || s == "N" {
            s.insert_str(0, "l_");
        }
        let mut out = s.clone();
        let mut k = 2;
        while self.idents.contains(&out) {
            out = format!("{s}_{k}");
            k += 1;
        }
        self.idents.insert(out.clone());
        out
    }

    fn temp(&mut self) -> String {
        loop {
            self.temp += 1;
            let v = format!("v{}", self.temp);
            if self.idents.insert(v.clone()) {
                return v;
            }
        }
    }

    fn value(&self, name: &str) -> R<&Value> {
        self.values.get(name).map_or_else(|| invalid(format!("input `{name}` is not defined before use")), Ok)
    }

    fn input<'n>(&self, n: &'n NodeProto, i: usize) -> Option<&'n str> {
        n.input.get(i).map(String::as_str).filter(|s| !s.is_empty())
    }

    fn tensor(&self, n: &NodeProto, i: usize) -> R<NodeId> {
        let name = self.input(n, i).map_or_else(|| invalid(format!("input {i} is missing")), Ok)?;
        match self.value(name)? {
            Value::Tensor(id) => Ok(*id),
            Value::Const(_) => {
                unsupported(format!("input {i} (`{name}`) is a constant; cnnc runs this op on computed tensors"))
            }
            Value::Padded { .. } => unsupported("a Pad is supported only directly before a Conv"),
            Value::Poison => unsupported("depends on an unsupported node"),
        }
    }

    fn constant(&self, n: &NodeProto, i: usize) -> R<Option<Rc<Const>>> {
        let Some(name) = self.input(n, i) else { return Ok(None) };
        match self.value(name)? {
            Value::Const(c) => Ok(Some(Rc::clone(c))),
            _ => unsupported(format!("input {i} (`{name}`) must be a constant (an initializer or foldable)")),
        }
    }

    /// As [`Importer::required_const`] for a parameter's values: a constant this node alone
    /// uses leaves the table, so its values can move into the parameter without a copy.
    fn take_const(&mut self, n: &NodeProto, i: usize, what: &str) -> R<Rc<Const>> {
        let c = self.required_const(n, i, what)?;
        let name = self.input(n, i).unwrap_or_default();
        if self.consumers.get(name).is_some_and(|c| c.len() == 1) {
            self.values.remove(name);
        }
        Ok(c)
    }

    fn optional_param(&mut self, n: &NodeProto, i: usize) -> R<Option<Rc<Const>>> {
        if self.input(n, i).is_none() {
            return Ok(None);
        }
        self.take_const(n, i, "operand").map(Some)
    }

    fn required_const(&self, n: &NodeProto, i: usize, what: &str) -> R<Rc<Const>> {
        self.constant(n, i)?.map_or_else(|| invalid(format!("{what} (input {i}) is missing")), Ok)
    }

    fn ty(&self, id: NodeId) -> TensorType {
        self.b.graph().node(id).ty.clone()
    }

    fn sole_consumer(&self, value: &str) -> Option<usize> {
        match self.consumers.get(value).map(Vec::as_slice) {
            Some([one]) if *one != usize::MAX => Some(*one),
            _ => None,
        }
    }

    /// Adds a layer declared as `ident = Kind(args…)`, with its parameters' values.
    fn layer(
        &mut self,
        hint: &str,
        kind: &str,
        args: Vec<(Option<&str>, ArgValue)>,
        inputs: &[NodeId],
        values: Vec<ParamValue>,
    ) -> R<NodeId> {
        let ctor = ops::layer_ctor(kind).map_or_else(|| invalid(format!("no layer {kind}")), Ok)?;
        let span: cnnc_compiler::diag::SrcSpan = proc_macro2::Span::call_site().into();
        let call: Vec<Arg> =
            args.iter().map(|(k, v)| Arg { keyword: k.map(String::from), value: v.clone(), span }).collect();
        let op = ops::construct(ctor, &call, span)
            .map_err(|ds| Fail::Unsupported(ds.iter().map(|d| d.full_message()).collect::<Vec<_>>().join("; ")))?;
        let ident = self.ident(hint, &kind.to_ascii_lowercase());
        let first = self.b.graph().params.len();
        let id = self.add(&ident, op, inputs)?;
        let specs: Vec<_> = self.b.graph().params[first..].iter().map(|p| p.spec.clone()).collect();
        if specs.len() != values.len() {
            return invalid(format!("{kind} has {} parameters, {} were found", specs.len(), values.len()));
        }
        for (spec, v) in specs.iter().zip(&values) {
            let n: usize = spec.shape.iter().product();
            let got = match v {
                ParamValue::F32(v) => v.len(),
                ParamValue::I64(v) => v.len(),
            };
            if n != got {
                return invalid(format!("{kind}'s `{}` has {got} values, {:?} expected", spec.suffix, spec.shape));
            }
        }
        self.params.extend(values);
        let text: Vec<String> = args
            .iter()
            .map(|(k, v)| match k {
                Some(k) => format!("{k} = {v}"),
                None => v.to_string(),
            })
            .collect();
        self.decls.push(format!("{ident} = {kind}({});", text.join(", ")));
        let ins: Vec<String> = inputs.iter().map(|i| self.var[i].clone()).collect();
        self.bind(id, format!("self.{ident}({})", ins.join(", ")));
        Ok(id)
    }

    /// Adds a node through the op's shape rule.
    fn add(&mut self, name: &str, op: Op, inputs: &[NodeId]) -> R<NodeId> {
        self.b.layer(name, op, inputs).map_err(|e| {
            let mut m = e.message;
            for note in e.notes {
                m += &format!(" ({note})");
            }
            Fail::Invalid(m)
        })
    }

    /// A functional op (no parameters): `expr` is its DSL form.
    fn functional(&mut self, op: Op, inputs: &[NodeId], expr: String) -> R<NodeId> {
        let name = format!("{}_{}", op.kind().to_ascii_lowercase(), self.b.graph().node_count());
        let id = self.add(&name, op, inputs)?;
        self.bind(id, expr);
        Ok(id)
    }

    fn bind(&mut self, id: NodeId, expr: String) {
        let v = self.temp();
        self.lines.push(format!("let {v} = {expr};"));
        self.var.insert(id, v);
    }

    fn v(&self, id: NodeId) -> String {
        self.var[&id].clone()
    }

    /// Maps one node; returns its outputs' values.
    fn node(&mut self, graph: &GraphProto, index: usize, n: &NodeProto) -> R<Vec<Value>> {
        let op = op_name(n);
        let all_const =
            !n.input.iter().filter(|s| !s.is_empty()).any(|s| !matches!(self.values.get(s), Some(Value::Const(_))));
        match op.as_str() {
            "Constant" => return Ok(vec![Value::Const(Rc::new(self.constant_node(n)?))]),
            "Identity" | "Dropout" => {
                if op == "Dropout" && n.output.get(1).is_some_and(|m| !m.is_empty() && self.consumers.contains_key(m)) {
                    return unsupported("Dropout's mask output is used");
                }
                let x = self.input(n, 0).map_or_else(|| invalid("input 0 is missing"), Ok)?;
                return Ok(vec![self.value(x)?.clone()]);
            }
            _ => {}
        }
        if all_const {
            let c = self.fold(n, &op)?;
            *self.folded.entry(op).or_default() += 1;
            return Ok(vec![Value::Const(Rc::new(c))]);
        }
        if op == "Shape" {
            *self.folded.entry(op.clone()).or_default() += 1;
            let x = self.tensor(n, 0)?;
            let ty = self.ty(x);
            let mut dims = vec![Sym::Batch];
            dims.extend(ty.dims.iter().map(|d| Sym::Known(*d as i64)));
            let r = dims.len() as i64;
            let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let start = clampi(attr_i(n, "start", 0));
            let end = clampi(attr_i(n, "end", r));
            let dims = if start < end { dims[start..end].to_vec() } else { vec![] };
            return Ok(vec![Value::Const(Rc::new(Const::ints(dims)))]);
        }
        let out = self.compute(graph, index, n, &op)?;
        Ok(vec![out])
    }

    fn constant_node(&self, n: &NodeProto) -> R<Const> {
        if let Some(t) = attr(n, "value").and_then(|a| a.t.as_ref()) {
            return tensor::decode(t, self.dir).map_err(|e| Fail::Invalid(e.to_string()));
        }
        if let Some(a) = attr(n, "value_float").and_then(|a| a.f) {
            return Ok(Const { dims: vec![], data: Data::F32(vec![a]) });
        }
        if let Some(a) = attr(n, "value_floats") {
            return Ok(Const { dims: vec![a.floats.len()], data: Data::F32(a.floats.clone()) });
        }
        if let Some(a) = attr(n, "value_int").and_then(|a| a.i) {
            return Ok(Const { dims: vec![], data: Data::I64(vec![Sym::Known(a)]) });
        }
        if let Some(a) = attr(n, "value_ints") {
            return Ok(Const::ints(a.ints.iter().map(|v| Sym::Known(*v)).collect()));
        }
        unsupported("a Constant without a value, value_float(s) or value_int(s) attribute")
    }

    /// Folds an op whose inputs are all constants.
    fn fold(&self, n: &NodeProto, op: &str) -> R<Const> {
        let c = |i: usize| self.required_const(n, i, "operand").map(|c| Const::clone(&c));
        match op {
            "Cast" => {
                let x = c(0)?;
                let to = attr_i(n, "to", 1);
                use crate::proto::tensor_proto::DataType as T;
                let float = [T::Float as i64, T::Double as i64, T::Float16 as i64, T::Bfloat16 as i64].contains(&to);
                let data = match (&x.data, float) {
                    (Data::F32(v), true) => Data::F32(v.clone()),
                    (Data::F32(v), false) => Data::I64(v.iter().map(|f| Sym::Known(*f as i64)).collect()),
                    (Data::I64(_), true) => Data::F32(x.floats().map_err(Fail::Unsupported)?),
                    (Data::I64(v), false) => Data::I64(v.clone()),
                };
                Ok(Const { dims: x.dims, data })
            }
            "ConstantOfShape" => {
                let dims: Vec<usize> = c(0)?
                    .known_ints()
                    .map_err(Fail::Unsupported)?
                    .into_iter()
                    .map(|d| to_usize(d, "dimension"))
                    .collect::<R<_>>()?;
                let n_el: usize = dims.iter().product();
                if n_el > 1 << 24 {
                    return unsupported(format!("ConstantOfShape of {n_el} elements"));
                }
                let value = match attr(n, "value").and_then(|a| a.t.as_ref()) {
                    Some(t) => tensor::decode(t, None).map_err(|e| Fail::Invalid(e.to_string()))?,
                    None => Const { dims: vec![1], data: Data::F32(vec![0.0]) },
                };
                let data = match value.data {
                    Data::F32(v) => Data::F32(vec![v.first().copied().unwrap_or(0.0); n_el]),
                    Data::I64(v) => Data::I64(vec![v.first().copied().unwrap_or(Sym::Known(0)); n_el]),
                };
                Ok(Const { dims, data })
            }
            "Unsqueeze" | "Squeeze" => {
                let x = c(0)?;
                let axes = if self.opset >= 13 {
                    self.constant(n, 1)?.map(|a| a.known_ints()).transpose().map_err(Fail::Unsupported)?
                } else {
                    attr_ints(n, "axes")
                };
                let mut dims = x.dims.clone();
                if op == "Unsqueeze" {
                    let axes = axes.unwrap_or_default();
                    let rank = dims.len() + axes.len();
                    let mut ax: Vec<usize> = axes.iter().map(|a| axis(*a, rank)).collect::<R<_>>()?;
                    ax.sort();
                    for a in ax {
                        dims.insert(a.min(dims.len()), 1);
                    }
                } else {
                    match axes {
                        None => dims.retain(|d| *d != 1),
                        Some(axes) => {
                            let ax: Vec<usize> = axes.iter().map(|a| axis(*a, dims.len())).collect::<R<_>>()?;
                            dims = dims.iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, d)| *d).collect();
                        }
                    }
                }
                Ok(Const { dims, data: x.data })
            }
            "Concat" => {
                let parts: Vec<Const> = (0..n.input.len()).map(c).collect::<R<_>>()?;
                let rank = parts.first().map_or(1, |p| p.dims.len()).max(1);
                let ax = axis(attr_i(n, "axis", 0), rank)?;
                concat(&parts, ax)
            }
            "Gather" => {
                let data = c(0)?;
                let idx = c(1)?;
                let ax = axis(attr_i(n, "axis", 0), data.dims.len().max(1))?;
                gather(&data, &idx, ax)
            }
            "Slice" => {
                let x = c(0)?;
                let (starts, ends, axes, steps) = if self.opset >= 10 {
                    let get = |i: usize| -> R<Option<Vec<i64>>> {
                        self.constant(n, i)?.map(|c| c.known_ints()).transpose().map_err(Fail::Unsupported)
                    };
                    (get(1)?.unwrap_or_default(), get(2)?.unwrap_or_default(), get(3)?, get(4)?)
                } else {
                    (
                        attr_ints(n, "starts").unwrap_or_default(),
                        attr_ints(n, "ends").unwrap_or_default(),
                        attr_ints(n, "axes"),
                        None,
                    )
                };
                slice(&x, &starts, &ends, axes, steps)
            }
            "Shape" => {
                let x = c(0)?;
                Ok(Const::ints(x.dims.iter().map(|d| Sym::Known(*d as i64)).collect()))
            }
            "Reshape" => {
                let x = c(0)?;
                let shape = c(1)?.known_ints().map_err(Fail::Unsupported)?;
                let total = x.len();
                let mut dims = vec![];
                let mut infer = None;
                for (i, d) in shape.iter().enumerate() {
                    match d {
                        -1 => infer = Some(i),
                        0 => dims.push(*x.dims.get(i).unwrap_or(&1)),
                        d => dims.push(to_usize(*d, "dimension")?),
                    }
                    if *d == -1 {
                        dims.push(1);
                    }
                }
                if let Some(i) = infer {
                    let rest: usize = dims.iter().product();
                    dims[i] = total.checked_div(rest).unwrap_or(0);
                }
                if dims.iter().product::<usize>() != total {
                    return invalid(format!("cannot reshape {:?} to {shape:?}", x.dims));
                }
                Ok(Const { dims, data: x.data })
            }
            "Add" | "Sub" | "Mul" | "Div" => arith(&c(0)?, &c(1)?, op),
            "Transpose" => {
                let x = c(0)?;
                let r = x.dims.len();
                let perm: Vec<usize> = match attr_ints(n, "perm") {
                    Some(p) => p.iter().map(|a| axis(*a, r)).collect::<R<_>>()?,
                    None => (0..r).rev().collect(),
                };
                transpose(&x, &perm)
            }
            _ => unsupported("computes on constants only; cnnc folds only shape arithmetic"),
        }
    }

    /// Maps an op on computed tensors.
    fn compute(&mut self, graph: &GraphProto, index: usize, n: &NodeProto, op: &str) -> R<Value> {
        let hint_of = |n: &NodeProto| n.input.get(1).cloned().unwrap_or_default();
        let out = match op {
            "Relu" | "Sigmoid" | "Tanh" => {
                let x = self.tensor(n, 0)?;
                let (a, f) = match op {
                    "Relu" => (Activation::Relu, "relu"),
                    "Sigmoid" => (Activation::Sigmoid, "sigmoid"),
                    _ => (Activation::Tanh, "tanh"),
                };
                let e = format!("{f}({})", self.v(x));
                self.functional(Op::Activation(a), &[x], e)?
            }
            "LeakyRelu" => {
                let x = self.tensor(n, 0)?;
                let alpha = attr_f(n, "alpha", 0.01);
                if !alpha.is_finite() {
                    return invalid(format!("alpha {alpha}"));
                }
                self.layer(&format!("leaky_relu_{index}"), "LeakyReLU", vec![(None, float(alpha))], &[x], vec![])?
            }
            "Clip" => {
                let x = self.tensor(n, 0)?;
                let (lo, hi) = if self.opset >= 11 {
                    let get = |i: usize| -> R<Option<f32>> {
                        self.constant(n, i)?.map(|c| c.scalar_f32()).transpose().map_err(Fail::Unsupported)
                    };
                    (get(1)?, get(2)?)
                } else {
                    (attr(n, "min").and_then(|a| a.f), attr(n, "max").and_then(|a| a.f))
                };
                let lo = lo.unwrap_or(f32::NEG_INFINITY);
                let hi = hi.unwrap_or(f32::INFINITY);
                if lo.is_nan() || hi.is_nan() || lo > hi {
                    return unsupported(format!("Clip bounds ({lo}, {hi})"));
                }
                if lo == 0.0 && hi == f32::INFINITY {
                    let e = format!("relu({})", self.v(x));
                    self.functional(Op::Activation(Activation::Relu), &[x], e)?
                } else if lo == 0.0 && hi == 6.0 {
                    self.layer(&format!("relu6_{}", index), "ReLU6", vec![], &[x], vec![])?
                } else {
                    // A one-sided clip clamps at ±f32::MAX on that side (±inf inputs differ).
                    let (lo, hi) = (lo.max(f32::MIN), hi.min(f32::MAX));
                    let args = vec![(Some("min_val"), float(lo)), (Some("max_val"), float(hi))];
                    self.layer(&format!("clip_{index}"), "Hardtanh", args, &[x], vec![])?
                }
            }
            "Add" | "Sub" | "Mul" | "Div" => {
                let a = self.input(n, 0).unwrap_or_default().to_string();
                let bname = self.input(n, 1).unwrap_or_default().to_string();
                match (self.value(&a)?.clone(), self.value(&bname)?.clone()) {
                    (Value::Tensor(x), Value::Tensor(y)) if op == "Add" => {
                        let e = format!("{} + {}", self.v(x), self.v(y));
                        self.functional(Op::Add(Add), &[x, y], e)?
                    }
                    (Value::Tensor(x), Value::Const(k)) => self.channel_affine(n, index, op, x, &k, false)?,
                    (Value::Const(k), Value::Tensor(x)) => self.channel_affine(n, index, op, x, &k, true)?,
                    _ => {
                        return unsupported(format!(
                            "{op} of two computed tensors (cnnc adds two tensors of one shape)"
                        ));
                    }
                }
            }
            "Concat" => {
                let xs: Vec<NodeId> = (0..n.input.len()).map(|i| self.tensor(n, i)).collect::<R<_>>()?;
                let rank = self.ty(xs[0]).rank();
                let dim = axis(attr_i(n, "axis", 0), rank)?;
                if dim == 0 {
                    return unsupported("Concat along the batch axis");
                }
                let vs: Vec<String> = xs.iter().map(|x| self.v(*x)).collect();
                let e = format!("cat([{}], dim = {dim})", vs.join(", "));
                self.functional(Op::Concat(Concat { dim }), &xs, e)?
            }
            "Flatten" => {
                let x = self.tensor(n, 0)?;
                let rank = self.ty(x).rank() as i64;
                let a = attr_i(n, "axis", 1);
                if a < -rank || a > rank {
                    return invalid(format!("axis {a} is out of range for rank {rank}"));
                }
                let ax = if a < 0 { a + rank } else { a };
                if ax != 1 {
                    return unsupported(format!("Flatten with axis {ax} (cnnc keeps the batch: axis 1)"));
                }
                self.flatten(x)?
            }
            "Reshape" => {
                let x = self.tensor(n, 0)?;
                let shape = self.required_const(n, 1, "shape")?.syms();
                self.reshape(x, &shape, attr_i(n, "allowzero", 0) != 0)?
            }
            "Squeeze" => {
                let x = self.tensor(n, 0)?;
                let ty = self.ty(x);
                let axes = if self.opset >= 13 {
                    self.constant(n, 1)?.map(|a| a.known_ints()).transpose().map_err(Fail::Unsupported)?
                } else {
                    attr_ints(n, "axes")
                };
                let rank = ty.rank();
                let axes: Vec<usize> = match axes {
                    Some(a) => a.iter().map(|a| axis(*a, rank)).collect::<R<_>>()?,
                    None => (1..rank).filter(|i| ty.dims[i - 1] == 1).collect(),
                };
                let kept: Vec<usize> = (1..rank).filter(|i| !axes.contains(i)).map(|i| ty.dims[i - 1]).collect();
                if axes.contains(&0) || axes.iter().any(|a| ty.dims[a - 1] != 1) || kept.len() != 1 {
                    return unsupported(format!("Squeeze of axes {axes:?} on {ty}: cnnc squeezes only to [N, C]"));
                }
                self.flatten(x)?
            }
            "GlobalAveragePool" => {
                let x = self.tensor(n, 0)?;
                self.need_4d(x, op)?;
                self.layer(&format!("avgpool_{index}"), "AdaptiveAvgPool2d", vec![(None, pair(1, 1))], &[x], vec![])?
            }
            "GlobalMaxPool" => {
                let x = self.tensor(n, 0)?;
                self.need_4d(x, op)?;
                let e = format!("{}.amax(dim = (2, 3), keepdim = True)", self.v(x));
                self.functional(Op::Reduce(Reduce { kind: ReduceKind::Max, dims: vec![2, 3], keepdim: true }), &[x], e)?
            }
            "ReduceMean" | "ReduceMax" => {
                let x = self.tensor(n, 0)?;
                let rank = self.ty(x).rank();
                let axes = if self.opset >= 18 {
                    self.constant(n, 1)?.map(|a| a.known_ints()).transpose().map_err(Fail::Unsupported)?
                } else {
                    attr_ints(n, "axes")
                };
                let axes = match axes {
                    Some(a) if !a.is_empty() => a,
                    _ if attr_i(n, "noop_with_empty_axes", 0) != 0 => return Ok(Value::Tensor(x)),
                    _ => (0..rank as i64).collect(),
                };
                let mut dims: Vec<usize> = axes.iter().map(|a| axis(*a, rank)).collect::<R<_>>()?;
                dims.sort();
                dims.dedup();
                if dims.contains(&0) {
                    return unsupported(format!("{op} over the batch axis"));
                }
                let keepdim = attr_i(n, "keepdims", 1) != 0;
                let (kind, f) = if op == "ReduceMean" { (ReduceKind::Mean, "mean") } else { (ReduceKind::Max, "amax") };
                let ds: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
                let kd = if keepdim { ", keepdim = True" } else { "" };
                let e = format!("{}.{f}(dim = ({},){kd})", self.v(x), ds.join(", "));
                self.functional(Op::Reduce(Reduce { kind, dims, keepdim }), &[x], e)?
            }
            "Softmax" => {
                let x = self.tensor(n, 0)?;
                let rank = self.ty(x).rank();
                let default = if self.opset >= 13 { -1 } else { 1 };
                let ax = axis(attr_i(n, "axis", default), rank)?;
                // Before opset 13, Softmax normalises over all axes from `axis` on (as one
                // flattened axis): the same as one axis only when the ones after it are 1.
                if self.opset < 13 && self.ty(x).dims[ax.max(1)..].iter().any(|d| *d != 1) {
                    return unsupported(format!("Softmax (opset {}) over axes {ax}.. of {}", self.opset, self.ty(x)));
                }
                if ax == 0 {
                    return unsupported("Softmax over the batch axis");
                }
                let e = format!("softmax({}, dim = {ax})", self.v(x));
                self.functional(Op::Softmax(cnnc_compiler::ops::Softmax { dim: ax as i64 }), &[x], e)?
            }
            "Conv" => self.conv(n, index)?,
            "MaxPool" | "AveragePool" => self.pool(n, op, index)?,
            "BatchNormalization" => {
                let x = self.tensor(n, 0)?;
                self.need_4d(x, op)?;
                if attr_i(n, "training_mode", 0) != 0
                    || n.output.iter().skip(1).any(|o| !o.is_empty() && self.consumers.contains_key(o))
                {
                    return unsupported("training-mode BatchNormalization (cnnc imports inference graphs)");
                }
                let c = self.ty(x).dims[0];
                let mut vals = vec![];
                for (i, what) in [(1, "scale"), (2, "B"), (3, "mean"), (4, "var")] {
                    let v = f32_vec(self.take_const(n, i, what)?)?;
                    if v.len() != c {
                        return invalid(format!("`{what}` has {} values for {c} channels", v.len()));
                    }
                    vals.push(ParamValue::F32(v));
                }
                vals.push(ParamValue::I64(vec![0]));
                let eps = attr_f(n, "epsilon", 1e-5);
                if !eps.is_finite() || eps < 0.0 {
                    return invalid(format!("epsilon {eps}"));
                }
                let hint = self.input(n, 1).unwrap_or_default().trim_end_matches(".weight").to_string();
                self.layer(&hint, "BatchNorm2d", vec![(None, int(c)), (Some("eps"), float(eps))], &[x], vals)?
            }
            "Gemm" => {
                let a = self.tensor(n, 0)?;
                let w = self.take_const(n, 1, "B")?;
                if attr_i(n, "transA", 0) != 0 {
                    return unsupported("Gemm with transA=1");
                }
                if w.dims.len() != 2 {
                    return invalid(format!("B has shape {:?}", w.dims));
                }
                let trans_b = attr_i(n, "transB", 0) != 0;
                let (alpha, beta) = (attr_f(n, "alpha", 1.0), attr_f(n, "beta", 1.0));
                let bias = self.optional_param(n, 2)?;
                let hint = hint_of(n);
                self.linear(a, w, trans_b, alpha, bias.map(|b| (b, beta)), &hint, op)?
            }
            "MatMul" => {
                let a = self.tensor(n, 0)?;
                let w = self.required_const(n, 1, "B")?;
                if w.dims.len() != 2 {
                    return unsupported(format!(
                        "MatMul by a constant of shape {:?} (cnnc maps a 2-D one to Linear)",
                        w.dims
                    ));
                }
                // MatMul + Add of a constant row: one Linear with bias.
                let out = n.output.first().cloned().unwrap_or_default();
                let mut bias = None;
                if let Some(j) = self.sole_consumer(&out) {
                    let next = &graph.node[j];
                    if op_name(next) == "Add" && next.input.len() == 2 {
                        let other = if next.input[0] == out { &next.input[1] } else { &next.input[0] };
                        if let Some(Value::Const(c)) = self.values.get(other)
                            && c.len() == w.dims[1]
                            && c.dims.iter().rev().skip(1).all(|d| *d == 1)
                        {
                            bias = Some((c.clone(), 1.0));
                            self.absorbed.insert(j);
                            self.notes.push(format!(
                                "`{}` (MatMul) + `{}` (Add) → one Linear",
                                node_name(n, index),
                                node_name(next, j)
                            ));
                            let next_out = next.output.first().cloned().unwrap_or_default();
                            let hint = hint_of(n);
                            let id = self.linear(a, w, false, 1.0, bias, &hint, op)?;
                            self.values.insert(next_out, Value::Tensor(id));
                            return Ok(Value::Tensor(id));
                        }
                    }
                }
                let hint = hint_of(n);
                self.linear(a, w, false, 1.0, bias, &hint, op)?
            }
            "Pad" => return self.pad(graph, n),
            _ => {
                let known = crate::SUPPORTED_OPS.contains(&op);
                return unsupported(if known {
                    format!("{op} is folded only when its inputs are constants")
                } else {
                    "no cnnc op for it".to_string()
                });
            }
        };
        Ok(Value::Tensor(out))
    }

    /// `x ∘ k` for an elementwise op with a constant that is one value or one per channel of
    /// an NCHW `x` (normalisation, a scale or a shift kept apart from its conv): a 1×1
    /// depthwise Conv2d with weight `a` and bias `b`, `y = a·x + b`. `Div` by `k` becomes a
    /// product with `1/k` (within an ulp of the quotient).
    fn channel_affine(
        &mut self,
        n: &NodeProto,
        index: usize,
        op: &str,
        x: NodeId,
        k: &Const,
        k_first: bool,
    ) -> R<NodeId> {
        let ty = self.ty(x);
        let Some((c, _, _)) = ty.chw() else {
            return unsupported(format!(
                "{op} of {ty} by a constant (cnnc maps per-channel constants on NCHW tensors)"
            ));
        };
        let kv = k.floats().map_err(Fail::Unsupported)?;
        let mut dims = k.dims.clone();
        while dims.len() > 3 && dims[0] == 1 {
            dims.remove(0);
        }
        let per_channel = match kv.len() {
            1 => vec![kv[0]; c],
            l if l == c && dims.len() == 3 && dims[1..] == [1, 1] => kv,
            _ => {
                return unsupported(format!(
                    "{op} by a constant of shape {:?} on {ty} (cnnc maps one value or one per channel)",
                    k.dims
                ));
            }
        };
        let (w, b): (Vec<f32>, Option<Vec<f32>>) = match (op, k_first) {
            ("Mul", _) => (per_channel, None),
            ("Add", _) => (vec![1.0; c], Some(per_channel)),
            ("Sub", false) => (vec![1.0; c], Some(per_channel.iter().map(|v| -v).collect())),
            ("Sub", true) => (vec![-1.0; c], Some(per_channel)),
            ("Div", false) => (per_channel.iter().map(|v| 1.0 / v).collect(), None),
            _ => return unsupported(format!("{op} of a constant by a computed tensor")),
        };
        self.notes.push(format!("`{}` ({op} by a per-channel constant) → a 1×1 depthwise Conv2d", node_name(n, index)));
        self.depthwise_1x1(&format!("{}_{index}", op.to_ascii_lowercase()), x, w, b, [0; 4], "zeros")
    }

    /// A 1×1 depthwise `Conv2d` of per-channel weight `w` and optional bias `b`, padded by
    /// `(top, bottom, left, right)` in `mode`: `y = w·x + b` on the padded plane (how a
    /// per-channel affine op or a lone `Pad` runs).
    fn depthwise_1x1(
        &mut self,
        hint: &str,
        x: NodeId,
        w: Vec<f32>,
        b: Option<Vec<f32>>,
        pads: [usize; 4],
        mode: &str,
    ) -> R<NodeId> {
        let c = w.len();
        let mut args = vec![(None, int(c)), (None, int(c)), (Some("kernel_size"), int(1))];
        if pads != [0; 4] {
            args.push((Some("padding"), ArgValue::Tuple(pads.iter().map(|v| int(*v)).collect())));
        }
        args.extend([(Some("groups"), int(c)), (Some("bias"), boolean(b.is_some()))]);
        if mode != "zeros" {
            args.push((Some("padding_mode"), ArgValue::Str(mode.into())));
        }
        let mut vals = vec![ParamValue::F32(w)];
        vals.extend(b.map(ParamValue::F32));
        self.layer(hint, "Conv2d", args, &[x], vals)
    }

    fn need_4d(&self, x: NodeId, op: &str) -> R<()> {
        if self.ty(x).dims.len() != 3 {
            return unsupported(format!("{op} on {} (cnnc runs it on 4-D NCHW tensors)", self.ty(x)));
        }
        Ok(())
    }

    fn flatten(&mut self, x: NodeId) -> R<NodeId> {
        if self.ty(x).dims.len() == 1 {
            return Ok(x);
        }
        let e = format!("flatten({}, 1)", self.v(x));
        self.functional(Op::Flatten(Flatten { start_dim: 1, end_dim: -1 }), &[x], e)
    }

    fn reshape(&mut self, x: NodeId, shape: &[Sym], allowzero: bool) -> R<NodeId> {
        let ty = self.ty(x);
        let per: usize = ty.numel_per_sample();
        let Some((first, rest)) = shape.split_first() else {
            return unsupported("Reshape to a scalar");
        };
        let batch_first = match first {
            Sym::Batch => true,
            Sym::Known(0) if !allowzero => true,
            Sym::Known(-1) => true,
            Sym::Known(b) => self.declared_batch.contains(b),
        };
        if !batch_first {
            return unsupported(format!("Reshape to {} changes the batch dimension", shape_text(shape)));
        }
        let mut dims = vec![];
        let mut infer = None;
        for (i, s) in rest.iter().enumerate() {
            match s {
                Sym::Known(-1) if infer.is_none() && *first != Sym::Known(-1) => {
                    infer = Some(i);
                    dims.push(1);
                }
                Sym::Known(0) if !allowzero => dims.push(*ty.dims.get(i).unwrap_or(&0)),
                Sym::Known(d) if *d > 0 => dims.push(*d as usize),
                _ => return unsupported(format!("Reshape to {}", shape_text(shape))),
            }
        }
        let known: usize = dims.iter().product();
        if *first == Sym::Known(-1) && known != per {
            return unsupported(format!("Reshape {ty} to {} changes the batch dimension", shape_text(shape)));
        }
        if let Some(i) = infer {
            if known == 0 || !per.is_multiple_of(known) {
                return invalid(format!("cannot reshape {ty} to {}", shape_text(shape)));
            }
            dims[i] = per / known;
        } else if known != per {
            return invalid(format!("cannot reshape {ty} ({per} elements per sample) to {}", shape_text(shape)));
        }
        if dims == ty.dims {
            return Ok(x);
        }
        if dims == [per] {
            return self.flatten(x);
        }
        let d: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
        unsupported(format!("Reshape {ty} to [N, {}] (cnnc reshapes by Flatten only)", d.join(", ")))
    }

    #[allow(clippy::too_many_arguments)]
    fn linear(
        &mut self,
        a: NodeId,
        w: Rc<Const>,
        trans_b: bool,
        alpha: f32,
        bias: Option<(Rc<Const>, f32)>,
        hint: &str,
        op: &str,
    ) -> R<NodeId> {
        let (rows, cols) = (w.dims[0], w.dims[1]);
        // Linear's weight is [out, in]: Gemm's B with transB=1 is that already (moved, not
        // copied, when nothing else uses it); otherwise transposed and/or scaled here.
        let (out_f, in_f) = if trans_b { (rows, cols) } else { (cols, rows) };
        let weight = if trans_b && alpha == 1.0 {
            f32_vec(w)?
        } else {
            let wv = w.floats().map_err(Fail::Unsupported)?;
            let mut weight = vec![0f32; out_f * in_f];
            for (o, row) in weight.chunks_exact_mut(in_f.max(1)).enumerate() {
                for (i, x) in row.iter_mut().enumerate() {
                    *x = alpha * if trans_b { wv[o * in_f + i] } else { wv[i * out_f + o] };
                }
            }
            weight
        };
        let mut vals = vec![ParamValue::F32(weight)];
        if let Some((c, beta)) = &bias {
            let cv = c.floats().map_err(Fail::Unsupported)?;
            let b: Vec<f32> = match cv.len() {
                1 => vec![beta * cv[0]; out_f],
                l if l == out_f && c.dims.iter().rev().skip(1).all(|d| *d == 1) => {
                    cv.iter().map(|v| beta * v).collect()
                }
                _ => return unsupported(format!("{op}'s C of shape {:?} (cnnc adds a bias row of {out_f})", c.dims)),
            };
            vals.push(ParamValue::F32(b));
        }
        let have = *self.ty(a).dims.last().unwrap_or(&0);
        if have != in_f {
            return invalid(format!("the input has {have} features, the weight {in_f}"));
        }
        let hint = hint.trim_end_matches(".weight").to_string();
        let args = vec![(None, int(in_f)), (None, int(out_f)), (Some("bias"), boolean(bias.is_some()))];
        self.layer(&hint, "Linear", args, &[a], vals)
    }

    /// `(top, bottom, left, right)` from ONNX `pads` (`[x1_begin, x2_begin, x1_end, x2_end]`)
    /// or `auto_pad`.
    fn pads(
        &self,
        n: &NodeProto,
        input: (usize, usize),
        k: (usize, usize),
        s: (usize, usize),
        d: (usize, usize),
    ) -> R<[usize; 4]> {
        let auto = attr_s(n, "auto_pad").unwrap_or_else(|| "NOTSET".into());
        match auto.as_str() {
            "NOTSET" => {
                let p = attr_ints(n, "pads").unwrap_or_else(|| vec![0; 4]);
                if p.len() != 4 {
                    return unsupported(format!("pads {p:?} (cnnc runs 2-D windows)"));
                }
                let u: Vec<usize> = p.iter().map(|v| to_usize(*v, "pad")).collect::<R<_>>()?;
                Ok([u[0], u[2], u[1], u[3]])
            }
            "VALID" => Ok([0; 4]),
            "SAME_UPPER" | "SAME_LOWER" => {
                let side = |i: usize, k: usize, s: usize, d: usize| {
                    let out = i.div_ceil(s);
                    let need = ((out - 1) * s + (k - 1) * d + 1).saturating_sub(i);
                    let small = need / 2;
                    if auto == "SAME_UPPER" { (small, need - small) } else { (need - small, small) }
                };
                let (t, b) = side(input.0, k.0, s.0, d.0);
                let (l, r) = side(input.1, k.1, s.1, d.1);
                Ok([t, b, l, r])
            }
            other => invalid(format!("auto_pad {other:?}")),
        }
    }

    fn window_attrs(&self, n: &NodeProto, name: &str, default: usize) -> R<(usize, usize)> {
        match attr_ints(n, name) {
            None => Ok((default, default)),
            Some(v) if v.len() == 2 => Ok((to_usize(v[0], name)?, to_usize(v[1], name)?)),
            Some(v) => unsupported(format!("{name} {v:?} (cnnc runs 2-D windows)")),
        }
    }

    fn conv(&mut self, n: &NodeProto, index: usize) -> R<NodeId> {
        let xname = self.input(n, 0).unwrap_or_default().to_string();
        let (x, pre) = match self.value(&xname)?.clone() {
            Value::Padded { x, pads, mode } => (x, Some((pads, mode))),
            _ => (self.tensor(n, 0)?, None),
        };
        let w = self.take_const(n, 1, "W")?;
        let ty = self.ty(x);
        let Some((cin, h, wd)) = ty.chw() else {
            return unsupported(format!("Conv on {ty} (cnnc runs 2-D convolutions on NCHW)"));
        };
        if w.dims.len() != 4 {
            return unsupported(format!("Conv with a weight of shape {:?} (cnnc runs 2-D convolutions)", w.dims));
        }
        let groups = to_usize(attr_i(n, "group", 1), "group")?;
        let (cout, kh, kw) = (w.dims[0], w.dims[2], w.dims[3]);
        if let Some(ks) = attr_ints(n, "kernel_shape")
            && ks != [kh as i64, kw as i64]
        {
            return invalid(format!("kernel_shape {ks:?} differs from the weight's {kh}×{kw}"));
        }
        let stride = self.window_attrs(n, "strides", 1)?;
        let dil = self.window_attrs(n, "dilations", 1)?;
        let mut pads = self.pads(n, (h, wd), (kh, kw), stride, dil)?;
        let mut mode = "zeros";
        if let Some((p, m)) = pre {
            if m != "zeros" && pads != [0; 4] {
                return unsupported(format!("a {m} Pad before a Conv that pads too"));
            }
            for i in 0..4 {
                pads[i] += p[i];
            }
            mode = m;
            self.notes.push(format!("Pad before `{}` folded into the conv's padding ({m})", node_name(n, index)));
        }
        let padding = if pads[0] == pads[1] && pads[2] == pads[3] {
            pair(pads[0], pads[2])
        } else {
            ArgValue::Tuple(pads.iter().map(|p| int(*p)).collect())
        };
        let w_dims = w.dims.clone();
        let mut vals = vec![ParamValue::F32(f32_vec(w)?)];
        let bias = self.optional_param(n, 2)?;
        let has_bias = bias.is_some();
        if let Some(b) = bias {
            let bv = f32_vec(b)?;
            if bv.len() != cout {
                return invalid(format!("B has {} values for {cout} output channels", bv.len()));
            }
            vals.push(ParamValue::F32(bv));
        }
        let mut args = vec![(None, int(cin)), (None, int(cout)), (Some("kernel_size"), pair(kh, kw))];
        if stride != (1, 1) {
            args.push((Some("stride"), pair(stride.0, stride.1)));
        }
        if pads != [0; 4] {
            args.push((Some("padding"), padding));
        }
        if dil != (1, 1) {
            args.push((Some("dilation"), pair(dil.0, dil.1)));
        }
        if groups != 1 {
            args.push((Some("groups"), int(groups)));
        }
        args.push((Some("bias"), boolean(has_bias)));
        if mode != "zeros" {
            args.push((Some("padding_mode"), ArgValue::Str(mode.into())));
        }
        if w_dims[1] * groups != cin {
            return invalid(format!(
                "the weight {:?} with group={groups} expects {} input channels, the input has {cin}",
                w_dims,
                w_dims[1] * groups
            ));
        }
        let hint = self.input(n, 1).unwrap_or_default().trim_end_matches(".weight").to_string();
        self.layer(&hint, "Conv2d", args, &[x], vals)
    }

    fn pool(&mut self, n: &NodeProto, op: &str, index: usize) -> R<NodeId> {
        let x = self.tensor(n, 0)?;
        if n.output.get(1).is_some_and(|o| !o.is_empty() && self.consumers.contains_key(o)) {
            return unsupported("MaxPool's Indices output");
        }
        let ty = self.ty(x);
        let Some((_, h, w)) = ty.chw() else {
            return unsupported(format!("{op} on {ty} (cnnc pools 4-D NCHW tensors)"));
        };
        let k = match attr_ints(n, "kernel_shape") {
            Some(v) if v.len() == 2 => (to_usize(v[0], "kernel")?, to_usize(v[1], "kernel")?),
            Some(v) => return unsupported(format!("kernel_shape {v:?} (cnnc runs 2-D windows)")),
            None => return invalid("kernel_shape is missing"),
        };
        let stride = self.window_attrs(n, "strides", 1)?;
        let dil = self.window_attrs(n, "dilations", 1)?;
        let pads = self.pads(n, (h, w), k, stride, dil)?;
        let ceil = attr_i(n, "ceil_mode", 0) != 0;
        let include = attr_i(n, "count_include_pad", 0) != 0;
        if (pads[0] != pads[1] || pads[2] != pads[3]) && op == "AveragePool" && include {
            return unsupported(format!(
                "AveragePool with asymmetric pads {pads:?} (top, bottom, left, right) and count_include_pad=1"
            ));
        }
        let mut args = vec![(None, pair(k.0, k.1)), (Some("stride"), pair(stride.0, stride.1))];
        if pads[0] != pads[1] || pads[2] != pads[3] {
            args.push((Some("padding"), ArgValue::Tuple(pads.iter().map(|p| int(*p)).collect())));
        } else if pads != [0; 4] {
            args.push((Some("padding"), pair(pads[0], pads[2])));
        }
        if ceil {
            args.push((Some("ceil_mode"), boolean(true)));
        }
        if op == "MaxPool" {
            if attr_i(n, "storage_order", 0) != 0 {
                return unsupported("MaxPool with storage_order=1");
            }
            if dil != (1, 1) {
                args.push((Some("dilation"), pair(dil.0, dil.1)));
            }
            self.layer(&format!("maxpool_{index}"), "MaxPool2d", args, &[x], vec![])
        } else {
            if dil != (1, 1) {
                return unsupported("AveragePool with dilations");
            }
            args.push((Some("count_include_pad"), boolean(include)));
            self.layer(&format!("avgpool_{index}"), "AvgPool2d", args, &[x], vec![])
        }
    }

    fn pad(&mut self, graph: &GraphProto, n: &NodeProto) -> R<Value> {
        let x = self.tensor(n, 0)?;
        let mode = attr_s(n, "mode").unwrap_or_else(|| "constant".into());
        let (pads, value) = if self.opset >= 11 {
            let p = self.required_const(n, 1, "pads")?.known_ints().map_err(Fail::Unsupported)?;
            let v = self.constant(n, 2)?.map(|c| c.scalar_f32()).transpose().map_err(Fail::Unsupported)?;
            if self.input(n, 3).is_some() {
                return unsupported("Pad with axes");
            }
            (p, v.unwrap_or(0.0))
        } else {
            (attr_ints(n, "pads").unwrap_or_default(), attr_f(n, "value", 0.0))
        };
        let rank = self.ty(x).rank();
        if rank != 4 || pads.len() != 8 {
            return unsupported(format!("Pad of a rank-{rank} tensor (cnnc pads NCHW planes before a Conv)"));
        }
        if pads[0] != 0 || pads[1] != 0 || pads[4] != 0 || pads[5] != 0 {
            return unsupported("Pad of the batch or channel axis");
        }
        let p: Vec<usize> = pads
            .iter()
            .map(|v| usize::try_from(*v))
            .collect::<Result<_, _>>()
            .map_err(|_| Fail::Unsupported("negative pads (cropping)".into()))?;
        let mode = match mode.as_str() {
            "constant" if value == 0.0 => "zeros",
            "constant" => return unsupported(format!("Pad with the constant {value} (cnnc pads with zeros)")),
            "reflect" => "reflect",
            "edge" => "replicate",
            "wrap" => "circular",
            m => return invalid(format!("mode {m:?}")),
        };
        let out = n.output.first().cloned().unwrap_or_default();
        let feeds_conv = self.sole_consumer(&out).is_some_and(|j| {
            let c = &graph.node[j];
            op_name(c) == "Conv" && c.input.first() == Some(&out)
        });
        let sides = [p[2], p[6], p[3], p[7]];
        if feeds_conv {
            return Ok(Value::Padded { x, pads: sides, mode });
        }
        // Elsewhere: a 1×1 depthwise conv with weight 1 and that padding copies the input
        // into the padded plane exactly.
        let c = self.ty(x).dims[0];
        self.notes.push(format!(
            "Pad `{}` runs as a 1×1 depthwise conv of weight 1 with {mode} padding",
            n.name.clone().unwrap_or_default()
        ));
        Ok(Value::Tensor(self.depthwise_1x1("pad", x, vec![1.0; c], None, sides, mode)?))
    }

    /// The `.cnn` text.
    fn source(
        &self,
        name: &str,
        inputs: &[(String, TensorType)],
        outs: &[(String, NodeId)],
        model: &ModelProto,
    ) -> String {
        let mut s = String::new();
        // The producer is free text from the file: one line of printable characters here.
        let producer = clean(model.producer_name.as_ref());
        s += &format!(
            "/// Imported from ONNX ({}opset {}) by `cnnc import`.\n",
            if producer.is_empty() {
                String::new()
            } else {
                format!("{producer} {}, ", clean(model.producer_version.as_ref()))
            },
            self.opset
        );
        let ins: Vec<String> = inputs
            .iter()
            .map(|(n, t)| {
                let dims: Vec<String> = t.dims.iter().map(|d| d.to_string()).collect();
                format!("{n}: [N, {}]", dims.join(", "))
            })
            .collect();
        let ret = if outs.len() > 1 {
            format!(" -> ({})", outs.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>().join(", "))
        } else {
            String::new()
        };
        s += &format!("net {name}({}){ret} {{\n", ins.join(", "));
        for d in &self.decls {
            s += &format!("    {d}\n");
        }
        if !self.decls.is_empty() {
            s += "\n";
        }
        let args: Vec<&str> = inputs.iter().map(|(n, _)| n.as_str()).collect();
        s += &format!("    fn forward(self, {}) {{\n", args.join(", "));
        for l in &self.lines {
            s += &format!("        {l}\n");
        }
        let vs: Vec<String> = outs.iter().map(|(_, id)| self.var[id].clone()).collect();
        if vs.len() == 1 {
            s += &format!("        {}\n", vs[0]);
        } else {
            s += &format!("        ({})\n", vs.join(", "));
        }
        s += "    }\n}\n";
        s
    }
}

/// `[N, 3, -1]`: a shape as written, `N` for the batch size.
fn shape_text(s: &[Sym]) -> String {
    let v: Vec<String> = s
        .iter()
        .map(|d| match d {
            Sym::Known(v) => v.to_string(),
            Sym::Batch => "N".into(),
        })
        .collect();
    format!("[{}]", v.join(", "))
}

/// A constant's values as f32, moved out when nothing else holds it.
fn f32_vec(c: Rc<Const>) -> R<Vec<f32>> {
    match Rc::try_unwrap(c) {
        Ok(Const { data: Data::F32(v), .. }) => Ok(v),
        Ok(c) => c.floats().map_err(Fail::Unsupported),
        Err(c) => c.floats().map_err(Fail::Unsupported),
    }
}

fn transpose(x: &Const, perm: &[usize]) -> R<Const> {
    let r = x.dims.len();
    let mut seen = vec![false; r];
    if perm.len() != r || perm.iter().any(|p| *p >= r || std::mem::replace(&mut seen[*p], true)) {
        return invalid(format!("perm {perm:?} for rank {r}"));
    }
    let dims: Vec<usize> = perm.iter().map(|p| x.dims[*p]).collect();
    // Strides of the input, in the output's axis order.
    let mut in_strides = vec![1usize; r];
    for i in (0..r.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * x.dims[i + 1];
    }
    let strides: Vec<usize> = perm.iter().map(|p| in_strides[*p]).collect();
    let n = x.len();
    let mut src = Vec::with_capacity(n);
    let mut idx = vec![0usize; r];
    for _ in 0..n {
        src.push(idx.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>());
        for a in (0..r).rev() {
            idx[a] += 1;
            if idx[a] < dims[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    let data = match &x.data {
        Data::F32(v) => Data::F32(src.iter().map(|i| v[*i]).collect()),
        Data::I64(v) => Data::I64(src.iter().map(|i| v[*i]).collect()),
    };
    Ok(Const { dims, data })
}

fn concat(parts: &[Const], ax: usize) -> R<Const> {
    let Some(first) = parts.first() else { return invalid("Concat of nothing") };
    let rank = first.dims.len().max(1);
    let dims_of = |c: &Const| if c.dims.is_empty() { vec![1] } else { c.dims.clone() };
    let mut dims = dims_of(first);
    for p in &parts[1..] {
        let d = dims_of(p);
        if d.len() != rank || (0..rank).any(|i| i != ax && d[i] != dims[i]) {
            return invalid(format!("Concat of {:?} and {:?}", dims, d));
        }
        dims[ax] += d[ax];
    }
    let outer: usize = dims[..ax].iter().product();
    let float = parts.iter().any(|p| matches!(p.data, Data::F32(_)));
    let mut fo = vec![];
    let mut io = vec![];
    for o in 0..outer {
        for p in parts {
            let d = dims_of(p);
            let inner: usize = d[ax..].iter().product();
            let r = o * inner..(o + 1) * inner;
            if float {
                fo.extend_from_slice(&p.floats().map_err(Fail::Unsupported)?[r]);
            } else {
                io.extend_from_slice(&p.syms()[r]);
            }
        }
    }
    Ok(Const { dims, data: if float { Data::F32(fo) } else { Data::I64(io) } })
}

fn gather(data: &Const, idx: &Const, ax: usize) -> R<Const> {
    let ddims = if data.dims.is_empty() { vec![1] } else { data.dims.clone() };
    let n_ax = ddims[ax];
    let ids: Vec<usize> = idx
        .known_ints()
        .map_err(Fail::Unsupported)?
        .iter()
        .map(|i| {
            let j = if *i < 0 { i + n_ax as i64 } else { *i };
            usize::try_from(j)
                .ok()
                .filter(|j| *j < n_ax)
                .map_or_else(|| invalid(format!("Gather index {i} out of range")), Ok)
        })
        .collect::<R<_>>()?;
    let outer: usize = ddims[..ax].iter().product();
    let inner: usize = ddims[ax + 1..].iter().product();
    let mut dims = ddims[..ax].to_vec();
    dims.extend_from_slice(&idx.dims);
    dims.extend_from_slice(&ddims[ax + 1..]);
    let pick = |o: usize, j: usize| o * n_ax * inner + j * inner..o * n_ax * inner + (j + 1) * inner;
    let data = match &data.data {
        Data::F32(v) => {
            Data::F32((0..outer).flat_map(|o| ids.iter().flat_map(move |j| v[pick(o, *j)].to_vec())).collect())
        }
        Data::I64(v) => {
            Data::I64((0..outer).flat_map(|o| ids.iter().flat_map(move |j| v[pick(o, *j)].to_vec())).collect())
        }
    };
    Ok(Const { dims, data })
}

fn slice(x: &Const, starts: &[i64], ends: &[i64], axes: Option<Vec<i64>>, steps: Option<Vec<i64>>) -> R<Const> {
    let r = x.dims.len().max(1);
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|a| axis(*a, r)).collect::<R<_>>()?,
        None => (0..starts.len()).collect(),
    };
    if starts.len() != axes.len() || ends.len() != axes.len() {
        return invalid(format!("Slice with {} starts, {} ends and {} axes", starts.len(), ends.len(), axes.len()));
    }
    let mut out = if x.dims.is_empty() { Const { dims: vec![1], data: x.data.clone() } } else { x.clone() };
    for (k, &ax) in axes.iter().enumerate() {
        let step = steps.as_ref().and_then(|s| s.get(k).copied()).unwrap_or(1);
        if step == 0 {
            return invalid("Slice step 0");
        }
        let n = out.dims[ax] as i64;
        let norm = |v: i64, lo: i64, hi: i64| (if v < 0 { v.saturating_add(n) } else { v }).clamp(lo, hi);
        let ids: Vec<Sym> = if step > 0 {
            let (s, e) = (norm(starts[k], 0, n), norm(ends[k], 0, n));
            (s..e).step_by(step as usize).map(Sym::Known).collect()
        } else {
            let (s, e) = (norm(starts[k], -1, n - 1), norm(ends[k], -1, n - 1));
            let mut v = vec![];
            let mut i = s;
            while i > e {
                v.push(Sym::Known(i));
                i += step;
            }
            v
        };
        out = gather(&out, &Const::ints(ids), ax)?;
    }
    Ok(out)
}

fn arith(a: &Const, b: &Const, op: &str) -> R<Const> {
    let (na, nb) = (a.len(), b.len());
    let n = na.max(nb);
    if !(na == nb || na == 1 || nb == 1) {
        return unsupported(format!("{op} of constants of shapes {:?} and {:?}", a.dims, b.dims));
    }
    let dims = if na >= nb { a.dims.clone() } else { b.dims.clone() };
    if let (Data::I64(x), Data::I64(y)) = (&a.data, &b.data) {
        let mut out = vec![];
        for i in 0..n {
            let (p, q) = (x[if na == 1 { 0 } else { i }], y[if nb == 1 { 0 } else { i }]);
            out.push(match (p, q) {
                (Sym::Known(p), Sym::Known(q)) => Sym::Known(match op {
                    "Add" => p.wrapping_add(q),
                    "Sub" => p.wrapping_sub(q),
                    "Mul" => p.wrapping_mul(q),
                    _ if q == 0 => return invalid("integer division by zero"),
                    _ => p.div_euclid(q),
                }),
                (Sym::Batch, Sym::Known(1)) if op == "Mul" || op == "Div" => Sym::Batch,
                (Sym::Known(1), Sym::Batch) if op == "Mul" => Sym::Batch,
                _ => return unsupported(format!("{op} on the batch size")),
            });
        }
        return Ok(Const { dims, data: Data::I64(out) });
    }
    let (x, y) = (a.floats().map_err(Fail::Unsupported)?, b.floats().map_err(Fail::Unsupported)?);
    let out = (0..n)
        .map(|i| {
            let (p, q) = (x[if na == 1 { 0 } else { i }], y[if nb == 1 { 0 } else { i }]);
            match op {
                "Add" => p + q,
                "Sub" => p - q,
                "Mul" => p * q,
                _ => p / q,
            }
        })
        .collect();
    Ok(Const { dims, data: Data::F32(out) })
}
