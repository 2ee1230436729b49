//! Reading NumPy data: `.npy` arrays as f32 (float64 converted, C or Fortran order) and `.npz`
//! training sets (`x`, and `y` as class indices or float targets), from bytes or any reader,
//! with typed errors that say what is wrong (the CLI adds the file's name).

use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::{NpzReader, ReadNpyError, ReadNpyExt, ReadNpzError};
use std::io::{Read, Seek};

/// Why an `.npy` array could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// The data is not float32/float64; the descriptor as written (`'<i8'`).
    #[error("holds {} data, but cnnc needs float32 (or float64); convert it with `x.astype(np.float32)`", dtype_name(.0))]
    Dtype(String),
    /// Not a valid `.npy` file.
    #[error("is not a valid .npy file: {0}")]
    Malformed(String),
}

/// Reads an f32 array from `.npy` bytes; float64 data is converted. The result is in standard
/// (C-contiguous) layout.
pub fn read_npy(bytes: &[u8]) -> Result<ArrayD<f32>, NpyError> {
    let array = match ArrayD::<f32>::read_npy(bytes) {
        Ok(a) => a,
        Err(ReadNpyError::WrongDescriptor(descr)) => match ArrayD::<f64>::read_npy(bytes) {
            Ok(a) => a.mapv(|v| v as f32),
            Err(ReadNpyError::WrongDescriptor(_)) => return Err(NpyError::Dtype(descr.to_string())),
            Err(e) => return Err(NpyError::Malformed(e.to_string())),
        },
        Err(e) => return Err(NpyError::Malformed(e.to_string())),
    };
    Ok(if array.is_standard_layout() { array } else { array.as_standard_layout().into_owned() })
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

/// What the targets `y` of a training set are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Targets {
    /// int64 class indices (cross-entropy).
    Classes,
    /// float32 targets; the name of the loss that needs them, for messages.
    Floats(&'static str),
}

/// Why an `.npz` training set could not be read. Each message follows the file's name.
#[derive(Debug, thiserror::Error)]
pub enum NpzError {
    /// Not a valid `.npz` archive.
    #[error(" is not a valid .npz file: {0}")]
    Malformed(String),
    /// `x` or `y` is missing.
    #[error(" has no array `{missing}` (it has: {}); save it with np.savez(path, x=..., y=...)", .present.join(", "))]
    Missing {
        /// The missing array.
        missing: &'static str,
        /// The arrays it has.
        present: Vec<String>,
    },
    /// An array cannot be read.
    #[error(": cannot read array `{name}`: {message}")]
    Array {
        /// `x` or `y`.
        name: &'static str,
        /// Why.
        message: String,
    },
    /// An array has a dtype the loss cannot use.
    #[error(": {0}")]
    Dtype(String),
    /// The arrays do not fit together.
    #[error(": {0}")]
    Shape(String),
}

fn array_error(name: &'static str, e: ReadNpzError) -> NpzError {
    match e {
        ReadNpzError::Npy(ReadNpyError::WrongDescriptor(d)) => {
            NpzError::Dtype(format!("array `{name}` has dtype {d}, which this loss cannot use"))
        }
        other => NpzError::Array { name, message: other.to_string() },
    }
}

/// Reads a training set: `x` (float32 or float64, `[N, …]`) and `y` (as `targets` says), both
/// returned as f32 in standard layout with the same number of samples.
pub fn read_npz<R: Read + Seek>(reader: R, targets: Targets) -> Result<(ArrayD<f32>, ArrayD<f32>), NpzError> {
    let mut npz = NpzReader::new(reader).map_err(|e| NpzError::Malformed(e.to_string()))?;
    let names = npz.names().map_err(|e| NpzError::Malformed(e.to_string()))?;
    for want in ["x", "y"] {
        if !names.iter().any(|n| n == want || n == &format!("{want}.npy")) {
            return Err(NpzError::Missing {
                missing: want,
                present: names.iter().map(|n| n.trim_end_matches(".npy").to_string()).collect(),
            });
        }
    }
    let x: ArrayD<f32> = match npz.by_name::<OwnedRepr<f32>, IxDyn>("x") {
        Ok(a) => a,
        Err(ReadNpzError::Npy(ReadNpyError::WrongDescriptor(_))) => {
            npz.by_name::<OwnedRepr<f64>, IxDyn>("x").map_err(|e| array_error("x", e))?.mapv(|v| v as f32)
        }
        Err(e) => return Err(array_error("x", e)),
    };
    let y: ArrayD<f32> = match targets {
        Targets::Classes => match npz.by_name::<OwnedRepr<i64>, IxDyn>("y") {
            Ok(a) => {
                if let Some(v) = a.iter().find(|v| **v < 0 || **v >= 1 << 24) {
                    return Err(NpzError::Shape(format!("class index {v} in `y` is out of range")));
                }
                a.mapv(|v| v as f32)
            }
            Err(ReadNpzError::Npy(ReadNpyError::WrongDescriptor(d))) => {
                return Err(NpzError::Dtype(format!(
                    "`y` has dtype {d}, but cross_entropy needs int64 class indices (y.astype(np.int64))"
                )));
            }
            Err(e) => return Err(array_error("y", e)),
        },
        Targets::Floats(loss) => match npz.by_name::<OwnedRepr<f32>, IxDyn>("y") {
            Ok(a) => a,
            Err(ReadNpzError::Npy(ReadNpyError::WrongDescriptor(d))) => {
                return Err(NpzError::Dtype(format!(
                    "`y` has dtype {d}, but {loss} needs float32 targets (y.astype(np.float32))"
                )));
            }
            Err(e) => return Err(array_error("y", e)),
        },
    };
    let (x, y) = (x.as_standard_layout().into_owned(), y.as_standard_layout().into_owned());
    let n = x.shape().first().copied().unwrap_or(0);
    if n == 0 {
        return Err(NpzError::Shape("`x` holds no samples".into()));
    }
    if y.shape().first() != Some(&n) {
        return Err(NpzError::Shape(format!("`x` has {n} samples but `y` has shape {:?}", y.shape())));
    }
    Ok((x, y))
}
