use cnnc::cnn;

cnn! {
    net Net(x: [N, 6, 16, 16]) = Sequential(Conv2d(6, 8, 3, groups = 4));
}

fn main() {}
