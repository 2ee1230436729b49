// A net that compiles with a warning (floor() drops input columns) but is then misused, so
// the warning text is visible in this compile-fail snapshot.
use cnnc::cnn;

cnn! {
    net Net(x: [N, 1, 224, 224]) = Sequential(Conv2d(1, 96, kernel_size = 11, stride = 4, padding = 1));
}

fn main() {
    let _: () = Net::PARAMS;
}
