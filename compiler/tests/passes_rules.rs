use cnnc_compiler::dsl::compile_str;
use cnnc_compiler::passes::{self, VecStore};

fn net(src: &str) -> cnnc_compiler::Graph {
    let out = compile_str(src);
    assert!(!out.has_errors(), "{:?}", out.errors().map(|d| d.full_message()).collect::<Vec<_>>());
    out.nets.into_iter().next().unwrap()
}

#[test]
fn show() {
    let g = net(r#"
block BasicBlock(inplanes, planes, stride = 1) {
    conv1 = Conv2d(inplanes, planes, kernel_size = 3, stride = stride, padding = 1, bias = False);
    bn1 = BatchNorm2d(planes);
    relu = ReLU(inplace = True);
    conv2 = Conv2d(planes, planes, kernel_size = 3, stride = 1, padding = 1, bias = False);
    bn2 = BatchNorm2d(planes);
    let project = stride != 1 || inplanes != planes;
    if project {
        downsample = Sequential(
            Conv2d(inplanes, planes, kernel_size = 1, stride = stride, bias = False),
            BatchNorm2d(planes),
        );
    }
    fn forward(self, x) {
        let identity = x;
        let out = self.conv1(x);
        out = self.bn1(out);
        out = self.relu(out);
        out = self.conv2(out);
        out = self.bn2(out);
        if project {
            identity = self.downsample(x);
        }
        out += identity;
        self.relu(out)
    }
}
net B(x: [N, 2, 6, 6]) = Sequential(BasicBlock(2, 2), BasicBlock(2, 4, 2), Dropout(0.5), Flatten(), Linear(36, 5), Linear(5, 3));
"#);
    println!("{g}");
    let mut store = VecStore::filled(&g, |i, j| 0.5 + ((i * 7 + j * 3) % 10) as f32 / 10.0);
    let (h, report) = passes::optimize(&g, &mut store).unwrap();
    println!("{h}");
    println!("{report}");
    println!("{:?}", h.state_dict_keys());
}
