use cnnc::cnn;

cnn! {
    net Net(x: [N, 1, 5, 5]) = Sequential(Conv2d(1, 4, kernel_size = 7, padding = 0));
}

fn main() {}
