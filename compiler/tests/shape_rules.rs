//! Every shape rule against PyTorch: `tests/fixtures/shape_rules.json` holds layer
//! constructors, input shapes and the output shape PyTorch computed (or the error it raised);
//! `tests/fixtures/forward_shape_rules.json` does the same for the ops written in `forward`
//! (`+`, `torch.cat`, `mean`/`amax`/`max`, functional flatten and activations). Both are
//! made by `tests/fixtures/make.py`. Each case must give the same output shape, or an error
//! where PyTorch raised one (at construction or at shape inference).

use cnnc_compiler::GraphBuilder;
use cnnc_compiler::dsl::{compile_str, parse_layer};
use cnnc_compiler::shape::{Batch, TensorType};
use serde_json::Value;

#[test]
fn shape_rules_match_pytorch() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/shape_rules.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 150, "fixture has {} cases", cases.len());
    let mut failures = vec![];
    for case in &cases {
        let layer = case["layer"].as_str().unwrap();
        let input: Vec<usize> =
            case["input"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let expected: Option<Vec<usize>> =
            case["output"].as_array().map(|a| a.iter().map(|v| v.as_u64().unwrap() as usize).collect());
        let got: Result<Vec<usize>, String> = match parse_layer(layer) {
            Err(diags) => Err(diags.iter().map(|d| d.full_message()).collect::<Vec<_>>().join("; ")),
            Ok(op) => {
                let mut gb = GraphBuilder::new("case");
                let x = gb.input("x", TensorType { batch: Batch::Fixed(input[0]), dims: input[1..].to_vec() });
                gb.layer("0", op, &[x]).map(|id| gb.graph().node(id).ty.concrete(input[0])).map_err(|e| e.message)
            }
        };
        match (&expected, &got) {
            (Some(e), Ok(g)) if e == g => {}
            (None, Err(_)) => {}
            _ => failures.push(format!(
                "{layer} on {input:?}: PyTorch {}, cnnc {got:?}",
                match &expected {
                    Some(e) => format!("{e:?}"),
                    None => format!("error ({})", case["error"].as_str().unwrap_or("")),
                }
            )),
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

fn dims(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()
}

#[test]
fn forward_shape_rules_match_pytorch() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/forward_shape_rules.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 30, "fixture has {} cases", cases.len());
    let mut failures = vec![];
    for case in &cases {
        let expr = case["expr"].as_str().unwrap();
        let inputs: Vec<Vec<usize>> = case["inputs"].as_array().unwrap().iter().map(dims).collect();
        let expected: Option<Vec<usize>> = case["output"].is_array().then(|| dims(&case["output"]));
        // The same expression as the forward of a one-line net with fixed-batch inputs.
        let names = ["x", "y"];
        let decls: Vec<String> = inputs
            .iter()
            .zip(names)
            .map(|(d, n)| format!("{n}: [{}]", d.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")))
            .collect();
        let src = format!(
            "net case({}) {{ fn forward(self, {}) {{ {expr} }} }}",
            decls.join(", "),
            names[..inputs.len()].join(", ")
        );
        let out = compile_str(&src);
        let got: Result<Vec<usize>, String> = match out.net("case") {
            Some(g) => Ok(g.node(g.outputs[0].1).ty.concrete(inputs[0][0])),
            None => Err(out.errors().map(|d| d.full_message()).collect::<Vec<_>>().join("; ")),
        };
        match (&expected, &got) {
            (Some(e), Ok(g)) if e == g => {}
            (None, Err(_)) => {}
            _ => failures.push(format!(
                "{expr} on {inputs:?}: PyTorch {}, cnnc {got:?}",
                match &expected {
                    Some(e) => format!("{e:?}"),
                    None => format!("error ({})", case["error"].as_str().unwrap_or("")),
                }
            )),
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
