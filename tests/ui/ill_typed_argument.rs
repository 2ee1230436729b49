use cnnc::cnn;

cnn! {
    net Net(x: [N, 1, 28, 28]) = Sequential(
        Conv2d(1, 6, 5, padding = "sam"),
        Conv2d(6, 6, 3, bias = 1),
        Conv2d(6, 6, (3, 3, 3)),
        Conv2d(6, 6, 3, padding_mode = "reflection"),
    );
}

fn main() {}
