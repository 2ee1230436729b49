//! Every shape rule against PyTorch: `tests/fixtures/shape_rules.json` holds layer
//! constructors, input shapes and the output shape PyTorch computed (or the error it raised),
//! made by `tests/fixtures/make.py`. Each case must give the same output shape, or an error
//! where PyTorch raised one (at construction or at shape inference).

use cnnc_compiler::GraphBuilder;
use cnnc_compiler::dsl::parse_layer;
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
