use cnnc::cnn;

cnn! {
    net Net(x: [N, 1, 28, 28]) = Sequential(Conv2d(1, 6, 5), MaxPool2D(2), Flaten, Linear(6 * 12 * 12, 10));
}

fn main() {}
