use cnnc::cnn;

cnn! {
    net Net(x: [N, 1, 4, 4]) = Sequential(
        Conv2d(1, 4, 3),
        MaxPool2d(3),
    );
}

fn main() {}
