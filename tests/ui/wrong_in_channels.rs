use cnnc::cnn;

cnn! {
    net Net(x: [N, 1, 28, 28]) = Sequential(
        Conv2d(1, 8, 5, padding = 2), ReLU,
        Conv2d(6, 16, 5), ReLU,
    );
}

fn main() {}
