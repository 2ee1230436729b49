//! `.npy` files: reading f32 (or f64, converted) arrays in C or Fortran order, and writing
//! f32 arrays, with messages that name the file.

use crate::fail::{Fail, input};
use crate::source::io_text;
use ndarray::ArrayD;
use ndarray_npy::{ReadNpyError, ReadNpyExt, WriteNpyExt};
use std::path::Path;

/// Reads an f32 array from `path`; float64 data is converted to f32. The result is in
/// standard (C-contiguous) layout.
pub fn read(path: &Path) -> Result<ArrayD<f32>, Fail> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| input(format!("cannot read `{shown}`: {}", io_text(&e))))?;
    let array = match ArrayD::<f32>::read_npy(bytes.as_slice()) {
        Ok(a) => a,
        Err(ReadNpyError::WrongDescriptor(descr)) => match ArrayD::<f64>::read_npy(bytes.as_slice()) {
            Ok(a) => a.mapv(|v| v as f32),
            Err(ReadNpyError::WrongDescriptor(_)) => {
                return Err(input(format!(
                    "`{shown}` holds {} data, but cnnc needs float32 (or float64); convert it with `x.astype(np.float32)`",
                    dtype_name(&descr.to_string())
                )));
            }
            Err(e) => return Err(malformed(path, &e)),
        },
        Err(e) => return Err(malformed(path, &e)),
    };
    Ok(if array.is_standard_layout() { array } else { array.as_standard_layout().into_owned() })
}

fn malformed(path: &Path, e: &ReadNpyError) -> Fail {
    input(format!("`{}` is not a valid .npy file: {e}", path.display()))
}

/// `'<i8'` → `int64 ('<i8')`, for the common NumPy descriptors.
fn dtype_name(descr: &str) -> String {
    let code = descr.trim_matches(|c| c == '\'' || c == '"');
    let kind = match code.trim_start_matches(['<', '>', '|', '=']) {
        "i1" => "int8",
        "i2" => "int16",
        "i4" => "int32",
        "i8" => "int64",
        "u1" => "uint8",
        "u2" => "uint16",
        "u4" => "uint32",
        "u8" => "uint64",
        "f2" => "float16",
        "b1" => "bool",
        _ => return format!("dtype {descr}"),
    };
    format!("{kind} ({descr})")
}

/// Writes `array` as a float32 `.npy` file.
pub fn write(path: &Path, array: &ArrayD<f32>) -> Result<(), Fail> {
    let shown = path.display();
    let file = std::fs::File::create(path).map_err(|e| input(format!("cannot create `{shown}`: {}", io_text(&e))))?;
    let mut writer = std::io::BufWriter::new(file);
    array.write_npy(&mut writer).map_err(|e| input(format!("cannot write `{shown}`: {e}")))?;
    std::io::Write::flush(&mut writer).map_err(|e| input(format!("cannot write `{shown}`: {}", io_text(&e))))
}
