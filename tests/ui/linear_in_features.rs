use cnnc::cnn;

cnn! {
    // LeNet with the classic slip: 16×4×4 instead of 16×5×5 features.
    net LeNet(x: [N, 1, 28, 28]) = Sequential(
        Conv2d(1, 6, 5, padding = 2), Sigmoid, AvgPool2d(2, stride = 2),
        Conv2d(6, 16, 5), Sigmoid, AvgPool2d(2, stride = 2),
        Flatten, Linear(16 * 4 * 4, 120), Sigmoid, Linear(120, 84), Sigmoid, Linear(84, 10),
    );
}

fn main() {}
