use cnnc::cnn;

cnn! {
    net Net(x: [N, 3, 8, 8]) -> (logits, features) {
        conv = Conv2d(3, 8, 3);
        fc = Linear(8, 10);

        fn forward(self, x) {
            let f = self.conv(x);
            let pooled = f.mean(dim = [2, 3]);
            self.fcc(pooled)
        }
    }
}

fn main() {}
