use cnnc::cnn;

cnn! {
    // Two independent mistakes are both reported; the layers after each still check against
    // the shape the faulty layer would have produced, so there is no cascade.
    net Net(x: [N, 3, 32, 32]) = Sequential(
        Conv2d(1, 16, 3, padding = 1), ReLU, MaxPool2d(2),
        Conv2d(16, 32, 3, padding = 1), ReLU, MaxPool2d(2),
        Flatten, Linear(32 * 7 * 7, 64), ReLU, Linear(64, 10),
    );
}

fn main() {}
