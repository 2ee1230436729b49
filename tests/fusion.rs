use cnnc::compiler::dsl::compile_str;
use cnnc::runtime::fusion_check::{NumericCheck, optimize_checked};
use cnnc::runtime::weights::Weights;
use cnnc::runtime::interp;

fn load(file: &str, net: &str, from: &str, to: &str) -> cnnc::Graph {
    let src = std::fs::read_to_string(format!("{}/examples/nets/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let src = src.replace(from, to);
    compile_str(&src).net(net).unwrap().clone()
}

#[test]
fn timing() {
    for (file, net, from, to) in [("resnet18.cnn", "ResNet18", "224", "224"), ("resnet18.cnn", "ResNet18", "224", "64"), ("seed_resnet.cnn", "SeedResNet", "224", "64")] {
        let g = load(file, net, from, to);
        let mut w = Weights::random(&g, 1);
        w.randomize_batchnorm(&g, 2);
        let x = ndarray::ArrayD::<f32>::from_elem(g.node(g.inputs[0].1).ty.concrete(1), 0.5);
        let t = std::time::Instant::now();
        let y = interp::run(&g, &w, &[x.view()]).unwrap();
        println!("{net} {to}: interp {:?}", t.elapsed());
        // bias of last linear vs output
        println!("out {:?}", &y[0].iter().take(5).collect::<Vec<_>>());
        let t = std::time::Instant::now();
        let o = optimize_checked(&g, &w, &NumericCheck { batch: 1, ..Default::default() }).unwrap();
        println!("{net} {to}: check {:?} {}", t.elapsed(), o.check.unwrap());
    }
}
