use cnnc::cnn;

cnn! {
    net Net(x: [N, C, 28, 28]) = Sequential(Conv2d(1, 6, 5));
}

fn main() {}
