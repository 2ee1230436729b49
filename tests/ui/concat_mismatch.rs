use cnnc::cnn;

cnn! {
    net Net(x: [N, 3, 28, 28]) {
        left = Conv2d(3, 8, 3, padding = 1);
        right = Conv2d(3, 8, 3, stride = 2, padding = 1);

        fn forward(self, x) {
            cat([self.left(x), self.right(x)], dim = 1)
        }
    }
}

fn main() {}
