use cnnc::cnn;

cnn! {
    net Net(x: [N, 1, 28, 28]) = Sequential(
        Conv2d(1, 6, 5, strides = 2),
        MaxPool2d(2, ceil = True),
    );
}

fn main() {}
