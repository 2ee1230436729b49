//! `.npy` files: reading f32 (or f64, converted) arrays in C or Fortran order, and writing
//! f32 arrays, with messages that name the file.

use crate::fail::{Fail, input};
use crate::source::io_text;
use ndarray::ArrayD;
use ndarray_npy::WriteNpyExt;
use std::path::Path;

/// Reads an f32 array from `path` (`cnnc::data::read_npy`: float64 converted, standard layout).
pub fn read(path: &Path) -> Result<ArrayD<f32>, Fail> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| input(format!("cannot read `{shown}`: {}", io_text(&e))))?;
    cnnc::data::read_npy(&bytes).map_err(|e| input(format!("`{shown}` {e}")))
}

/// Writes `array` as a float32 `.npy` file.
pub fn write(path: &Path, array: &ArrayD<f32>) -> Result<(), Fail> {
    let shown = path.display();
    let file = std::fs::File::create(path).map_err(|e| input(format!("cannot create `{shown}`: {}", io_text(&e))))?;
    let mut writer = std::io::BufWriter::new(file);
    array.write_npy(&mut writer).map_err(|e| input(format!("cannot write `{shown}`: {e}")))?;
    std::io::Write::flush(&mut writer).map_err(|e| input(format!("cannot write `{shown}`: {}", io_text(&e))))
}
