//! The seed networks of the study notes, declared with `cnn!`. Shared by the examples and
//! the tests (`#[path = "../examples/zoo/mod.rs"] mod zoo;`). Each declaration is the same text
//! as the matching `examples/nets/*.cnn` file, and a test checks that both give the same IR.
#![allow(dead_code)]

use cnnc::cnn;

cnn! {
    /// LeNet-5 as in d2l (sigmoid activations, average pooling), for 28×28 digits.
    pub net LeNet(x: [N, 1, 28, 28]) = Sequential(
        Conv2d(1, 6, kernel_size = 5, padding = 2), Sigmoid,
        AvgPool2d(kernel_size = 2, stride = 2),
        Conv2d(6, 16, kernel_size = 5), Sigmoid,
        AvgPool2d(kernel_size = 2, stride = 2),
        Flatten,
        Linear(16 * 5 * 5, 120), Sigmoid,
        Linear(120, 84), Sigmoid,
        Linear(84, 10),
    );
}

cnn! {
    /// The CIFAR-10 model of the study notes: a module whose one child is a Sequential.
    pub net Cifar10(x: [N, 3, 32, 32]) {
        model1 = Sequential(
            Conv2d(3, 32, 5, padding = 2),
            MaxPool2d(2),
            Conv2d(32, 32, 5, padding = 2),
            MaxPool2d(2),
            Conv2d(32, 64, 5, padding = 2),
            MaxPool2d(2),
            Flatten(),
            Linear(1024, 64),
            Linear(64, 10),
        );

        fn forward(self, x) {
            self.model1(x)
        }
    }
}

cnn! {
    /// d2l's AlexNet for 1-channel 224×224 input and 10 classes.
    // floor() drops the last input rows in conv1 and the 3×3/2 pools, as in PyTorch;
    // the macro warns about it, and this declaration keeps it deliberately.
    #[allow(deprecated)]
    pub net AlexNet(x: [N, 1, 224, 224]) = Sequential(
        Conv2d(1, 96, kernel_size = 11, stride = 4, padding = 1), ReLU(),
        MaxPool2d(kernel_size = 3, stride = 2),
        Conv2d(96, 256, kernel_size = 5, padding = 2), ReLU(),
        MaxPool2d(kernel_size = 3, stride = 2),
        Conv2d(256, 384, kernel_size = 3, padding = 1), ReLU(),
        Conv2d(384, 384, kernel_size = 3, padding = 1), ReLU(),
        Conv2d(384, 256, kernel_size = 3, padding = 1), ReLU(),
        MaxPool2d(kernel_size = 3, stride = 2),
        Flatten(),
        Linear(6400, 4096), ReLU(), Dropout(p = 0.5),
        Linear(4096, 4096), ReLU(), Dropout(p = 0.5),
        Linear(4096, 10),
    );
}

cnn! {
    /// VGG-11 built the d2l way: `vgg_block`s from `conv_arch`, then the classifier.
    const conv_arch = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512));

    /// `num_convs` 3×3 convolutions with ReLU, then a 2×2 max-pool.
    block vgg_block(num_convs, in_channels, out_channels) {
        for _ in 0..num_convs {
            Conv2d(in_channels, out_channels, kernel_size = 3, padding = 1);
            ReLU();
            in_channels = out_channels;
        }
        MaxPool2d(kernel_size = 2, stride = 2);
    }

    /// The d2l `vgg(conv_arch)` function.
    block vgg(conv_arch) {
        let in_channels = 1;
        for (num_convs, out_channels) in conv_arch {
            vgg_block(num_convs, in_channels, out_channels);
            in_channels = out_channels;
        }
        Flatten();
        Linear(in_channels * 7 * 7, 4096); ReLU(); Dropout(p = 0.5);
        Linear(4096, 4096); ReLU(); Dropout(p = 0.5);
        Linear(4096, 10);
    }

    pub net Vgg11(x: [N, 1, 224, 224]) = vgg(conv_arch);
}

cnn! {
    /// torchvision's ResNet-18, with its module names (`layer1.0.conv1`, `layer2.0.downsample.0`).
    block BasicBlock(inplanes, planes, stride = 1) {
        conv1 = Conv2d(inplanes, planes, kernel_size = 3, stride = stride, padding = 1, bias = False);
        bn1 = BatchNorm2d(planes);
        relu = ReLU(inplace = True);
        conv2 = Conv2d(planes, planes, kernel_size = 3, stride = 1, padding = 1, bias = False);
        bn2 = BatchNorm2d(planes);
        let project = stride != 1 || inplanes != planes;
        if project {
            downsample = Sequential(
                Conv2d(inplanes, planes, kernel_size = 1, stride = stride, bias = False),
                BatchNorm2d(planes),
            );
        }

        fn forward(self, x) {
            let identity = x;
            let out = self.conv1(x);
            out = self.bn1(out);
            out = self.relu(out);
            out = self.conv2(out);
            out = self.bn2(out);
            if project {
                identity = self.downsample(x);
            }
            out += identity;
            self.relu(out)
        }
    }

    /// `blocks` BasicBlocks; the first may change width and stride.
    block make_layer(inplanes, planes, blocks, stride = 1) {
        BasicBlock(inplanes, planes, stride);
        for _ in 1..blocks {
            BasicBlock(planes, planes);
        }
    }

    pub net ResNet18(x: [N, 3, 224, 224]) {
        conv1 = Conv2d(3, 64, kernel_size = 7, stride = 2, padding = 3, bias = False);
        bn1 = BatchNorm2d(64);
        relu = ReLU(inplace = True);
        maxpool = MaxPool2d(kernel_size = 3, stride = 2, padding = 1);
        layer1 = make_layer(64, 64, 2);
        layer2 = make_layer(64, 128, 2, stride = 2);
        layer3 = make_layer(128, 256, 2, stride = 2);
        layer4 = make_layer(256, 512, 2, stride = 2);
        avgpool = AdaptiveAvgPool2d((1, 1));
        fc = Linear(512, 1000);

        fn forward(self, x) {
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))));
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))));
            x = flatten(self.avgpool(x), 1);
            self.fc(x)
        }
    }
}

cnn! {
    /// The d2l ResNet of the study notes, with a `Linear(512, 1)` head for binary classification
    /// (BCEWithLogitsLoss).
    block Residual(input_channels, num_channels, use_1x1conv = False, strides = 1) {
        conv1 = Conv2d(input_channels, num_channels, kernel_size = 3, padding = 1, stride = strides);
        conv2 = Conv2d(num_channels, num_channels, kernel_size = 3, padding = 1);
        if use_1x1conv {
            conv3 = Conv2d(input_channels, num_channels, kernel_size = 1, stride = strides);
        }
        bn1 = BatchNorm2d(num_channels);
        bn2 = BatchNorm2d(num_channels);

        fn forward(self, X) {
            let Y = relu(self.bn1(self.conv1(X)));
            Y = self.bn2(self.conv2(Y));
            if use_1x1conv {
                X = self.conv3(X);
            }
            Y += X;
            relu(Y)
        }
    }

    /// d2l's `resnet_block`: a list of Residuals, the first one halving the size unless it is
    /// the first block.
    block resnet_block(input_channels, num_channels, num_residuals, first_block = False) {
        for i in 0..num_residuals {
            if i == 0 && !first_block {
                Residual(input_channels, num_channels, use_1x1conv = True, strides = 2);
            } else {
                Residual(num_channels, num_channels);
            }
        }
    }

    pub net SeedResNet(x: [N, 1, 224, 224]) = Sequential(
        Sequential(
            Conv2d(1, 64, kernel_size = 7, stride = 2, padding = 3),
            BatchNorm2d(64), ReLU(),
            MaxPool2d(kernel_size = 3, stride = 2, padding = 1),
        ),
        resnet_block(64, 64, 2, first_block = True),
        resnet_block(64, 128, 2),
        resnet_block(128, 256, 2),
        resnet_block(256, 512, 2),
        AdaptiveAvgPool2d((1, 1)),
        Flatten(),
        Linear(512, 1),
    );
}

cnn! {
    /// `NoneLinearModel` from the study notes: a conv backbone, two global reductions of the same
    /// features added together, a classifier, and two outputs.
    pub net NoneLinearModel(x: [N, 3, 32, 32]) -> (output, features) {
        backbone = Sequential(
            Conv2d(3, 64, 3),
            ReLU(),
            Conv2d(64, 128, 3),
            ReLU(),
        );
        classifier = Linear(128, 10);

        fn forward(self, x) {
            let features = self.backbone(x);
            let branch1 = features.mean(dim = [2, 3]);
            let branch2 = features.max(dim = 2)[0].max(dim = 2)[0];
            let combined = branch1 + branch2;
            let output = self.classifier(combined);
            (output, features)
        }
    }
}

cnn! {
    /// The single 1×2 edge-detector convolution of the study notes (`K = [[1, -1]]`), on 6×8 input.
    pub net Conv1x2(x: [N, 1, 6, 8]) = Sequential(
        Conv2d(1, 1, kernel_size = (1, 2), bias = False),
    );
}

cnn! {
    /// The AlexNet class of the study notes in PyTorch's module style, with its two bugs fixed:
    /// the fifth convolution (`conv5 = Conv2d(384, 256, …)`) instead of applying `conv4` twice,
    /// and `dense1` used before `dense2`. Written as-is, it fails to compile
    /// (see `tests/ui/seed_alexnet.rs`).
    #[allow(deprecated)]
    pub net SeedAlexNet(x: [N, 1, 224, 224]) {
        conv1 = Conv2d(1, 96, kernel_size = 11, stride = 4, padding = 1);
        conv2 = Conv2d(96, 256, kernel_size = 5, padding = 2);
        conv3 = Conv2d(256, 384, kernel_size = 3, padding = 1);
        conv4 = Conv2d(384, 384, kernel_size = 3, padding = 1);
        conv5 = Conv2d(384, 256, kernel_size = 3, padding = 1);
        drop_out = Dropout(p = 0.5);
        flatten = Flatten();
        relu = ReLU();
        max_pool = MaxPool2d(kernel_size = 3, stride = 2);
        dense1 = Linear(6400, 4096);
        dense2 = Linear(4096, 4096);
        dense3 = Linear(4096, 10);

        fn forward(self, X) {
            X = self.max_pool(self.relu(self.conv1(X)));
            X = self.max_pool(self.relu(self.conv2(X)));
            X = self.relu(self.conv3(X));
            X = self.relu(self.conv4(X));
            X = self.relu(self.conv5(X));
            X = self.flatten(self.max_pool(X));
            X = self.drop_out(self.relu(self.dense1(X)));
            X = self.drop_out(self.relu(self.dense2(X)));
            self.dense3(X)
        }
    }
}
