// The AlexNet class of the study notes exactly as written: `conv4` is applied twice where a
// 384→256 conv belongs, and `dense1` is skipped, so `dense2` receives 384×5×5 = 9600 features.
use cnnc::cnn;

cnn! {
    net Net(X: [N, 1, 224, 224]) {
        conv1 = Conv2d(1, 96, kernel_size = 11, stride = 4, padding = 1);
        conv2 = Conv2d(96, 256, kernel_size = 5, padding = 2);
        conv3 = Conv2d(256, 384, kernel_size = 3, padding = 1);
        conv4 = Conv2d(384, 384, kernel_size = 3, padding = 1);
        drop_out = Dropout(p = 0.5);
        flatten = Flatten();
        relu = ReLU();
        max_pool = MaxPool2d(kernel_size = 3, stride = 2);
        dense1 = Linear(6400, 4096);
        dense2 = Linear(4096, 4096);
        dense3 = Linear(4096, 10);

        fn forward(self, X) {
            X = self.conv1(X);
            X = self.relu(X);
            X = self.max_pool(X);
            X = self.conv2(X);
            X = self.relu(X);
            X = self.max_pool(X);
            X = self.conv3(X);
            X = self.relu(X);
            X = self.conv4(X);
            X = self.relu(X);
            X = self.conv4(X);
            X = self.relu(X);
            X = self.max_pool(X);
            X = self.flatten(X);
            X = self.relu(X);
            X = self.drop_out(X);
            X = self.dense2(X);
            X = self.relu(X);
            X = self.drop_out(X);
            X = self.dense3(X);
            X
        }
    }
}

fn main() {}
