use cnnc::cnn;

cnn! {
    // A residual block that doubles the channels and halves the size but forgets the 1×1
    // projection of the skip path.
    block Residual(cin, cout, stride = 1) {
        conv1 = Conv2d(cin, cout, 3, stride = stride, padding = 1);
        conv2 = Conv2d(cout, cout, 3, padding = 1);

        fn forward(self, x) {
            let y = relu(self.conv1(x));
            y = self.conv2(y);
            relu(y + x)
        }
    }

    net Net(x: [N, 64, 56, 56]) = Sequential(Residual(64, 64), Residual(64, 128, stride = 2));
}

fn main() {}
