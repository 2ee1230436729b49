use cnnc::cnn;

cnn! {
    net Net(x: [N, 1, 3, 3]) = Sequential(Conv2d(1, 1, 3, padding = 3, padding_mode = "reflect"));
}

fn main() {}
