use cnnc::cnn;

cnn! {
    net Net(x: [N, 3, 8, 8]) -> (logits, features) {
        conv = Conv2d(3, 8, 3);
        fc = Linear(8, 10);

        fn forward(self, x) {
            self.fc(self.conv(x).mean(dim = [2, 3]))
        }
    }
}

fn main() {}
