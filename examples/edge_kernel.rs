//! Seed 004's training loop in cnnc: learn the 1×2 edge kernel `K = [[1, −1]]` by gradient
//! descent on the sum of squared errors, exactly as the study notes do in PyTorch:
//!
//! ```python
//! conv2d = nn.Conv2d(1, 1, kernel_size=(1, 2), bias=False)
//! for i in range(20):
//!     l = (conv2d(X) - Y) ** 2
//!     conv2d.zero_grad(); l.sum().backward()
//!     conv2d.weight[:] -= 0.03 * conv2d.weight.grad
//! ```
//!
//! The initial weight is the one PyTorch drew with `torch.manual_seed(0)` (from the fixture
//! `tests/fixtures/train/edge_kernel.json`), so the printed losses are PyTorch's.
//!
//! ```text
//! cargo run --release --example edge_kernel
//! ```

use cnnc::compiler::ParamId;
use cnnc::compiler::ops::train::{Loss, Reduction};
use cnnc::prelude::*;
use cnnc::runtime::train::{Optimizer, Trainer};
use cnnc::runtime::weights::ParamData;
use ndarray::{Array4, ArrayD, IxDyn};
use std::error::Error;

cnn! {
    /// The 1×2 convolution of seed 004.
    pub net Edge(x: [N, 1, 6, 8]) = Sequential(
        Conv2d(1, 1, kernel_size = (1, 2), bias = False),
    );
}

/// PyTorch's initial weight for `torch.manual_seed(0); nn.Conv2d(1, 1, (1, 2), bias=False)`.
const INITIAL: [f32; 2] = [-0.005_293_981, 0.379_322_9];

fn main() -> Result<(), Box<dyn Error>> {
    // X = ones(6, 8); X[:, 2:6] = 0; Y = corr2d(X, [[1, -1]]).
    let x = Array4::from_shape_fn((1, 1, 6, 8), |(_, _, _, j)| if (2..6).contains(&j) { 0f32 } else { 1.0 });
    let y = Array4::from_shape_fn((1, 1, 6, 7), |(_, _, i, j)| x[[0, 0, i, j]] - x[[0, 0, i, j + 1]]);

    let graph = Edge::graph();
    let mut weights = Weights::random(&graph, 0);
    weights.set(ParamId(0), ParamData::F32(ArrayD::from_shape_vec(IxDyn(&[1, 1, 1, 2]), INITIAL.to_vec())?))?;
    let loss = Loss::Mse { reduction: Reduction::Sum };
    let mut trainer = Trainer::new(&graph, weights, loss, Optimizer::sgd(0.03))?;
    for i in 0..20 {
        let step = trainer.step(x.view().into_dyn(), y.view().into_dyn())?;
        if (i + 1) % 2 == 0 {
            println!("batch {}, loss {:.3}", i + 1, step.loss);
        }
    }
    let w = trainer.weights().f32(ParamId(0)).ok_or("no weight")?;
    println!("learned kernel: [{:.4}, {:.4}] (the true kernel is [1, -1])", w[[0, 0, 0, 0]], w[[0, 0, 0, 1]]);
    Ok(())
}
