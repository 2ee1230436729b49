//! Constant tensors: decoding a `TensorProto` (inline `raw_data` or typed fields, or external
//! data in a file beside the model), and the small integer arithmetic that shape
//! computations fold to (with the batch size kept symbolic).

use crate::ImportError;
use crate::proto::TensorProto;
use crate::proto::tensor_proto::{DataLocation, DataType};
use std::path::{Component, Path};

/// An element of an integer constant: a number, or the symbolic batch size (what
/// `Shape(x)[0]` is when the model's batch dimension is symbolic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sym {
    /// A known value.
    Known(i64),
    /// The batch size, unknown until run time.
    Batch,
}

/// A constant's elements.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// Floating-point elements (f32, and f64/f16 converted).
    F32(Vec<f32>),
    /// Integer or boolean elements.
    I64(Vec<Sym>),
}

/// A constant tensor folded at import.
#[derive(Clone, Debug, PartialEq)]
pub struct Const {
    /// Its shape.
    pub dims: Vec<usize>,
    /// Its elements, row-major.
    pub data: Data,
}

/// The largest tensor the importer reads (elements), against corrupt dims.
const MAX_ELEMENTS: usize = 1 << 32;

impl Const {
    /// A 1-D integer constant.
    pub fn ints(v: Vec<Sym>) -> Const {
        Const { dims: vec![v.len()], data: Data::I64(v) }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len(),
            Data::I64(v) => v.len(),
        }
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as known integers (floats truncated, as `Cast` does), or which is not.
    pub fn known_ints(&self) -> Result<Vec<i64>, String> {
        match &self.data {
            Data::I64(v) => v
                .iter()
                .map(|s| match s {
                    Sym::Known(i) => Ok(*i),
                    Sym::Batch => Err("depends on the batch size".to_string()),
                })
                .collect(),
            Data::F32(v) => Ok(v.iter().map(|x| *x as i64).collect()),
        }
    }

    /// The elements as integers, the batch size kept symbolic.
    pub fn syms(&self) -> Vec<Sym> {
        match &self.data {
            Data::I64(v) => v.clone(),
            Data::F32(v) => v.iter().map(|x| Sym::Known(*x as i64)).collect(),
        }
    }

    /// The elements as floats, if none is symbolic.
    pub fn floats(&self) -> Result<Vec<f32>, String> {
        match &self.data {
            Data::F32(v) => Ok(v.clone()),
            Data::I64(v) => v
                .iter()
                .map(|s| match s {
                    Sym::Known(i) => Ok(*i as f32),
                    Sym::Batch => Err("depends on the batch size".to_string()),
                })
                .collect(),
        }
    }

    /// The one element of a scalar (or 1-element) constant as a float.
    pub fn scalar_f32(&self) -> Result<f32, String> {
        match self.floats()?.as_slice() {
            [x] => Ok(*x),
            v => Err(format!("expected one value, found {}", v.len())),
        }
    }
}

fn element_count(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |a, d| a.checked_mul(*d)).filter(|n| *n <= MAX_ELEMENTS)
}

/// Decodes a tensor. `dir` is the model's folder, where external data lives (`None`: external
/// data is refused, as for a model given as bytes).
pub fn decode(t: &TensorProto, dir: Option<&Path>) -> Result<Const, ImportError> {
    let name = t.name.clone().unwrap_or_default();
    let err = |message: String| ImportError::Tensor { name: name.clone(), message };
    let mut dims = Vec::with_capacity(t.dims.len());
    for d in &t.dims {
        dims.push(usize::try_from(*d).map_err(|_| err(format!("negative dimension {d} in {:?}", t.dims)))?);
    }
    let n = element_count(&dims).ok_or_else(|| err(format!("too many elements: {:?}", t.dims)))?;
    let dtype = DataType::try_from(t.data_type.unwrap_or(0)).unwrap_or(DataType::Undefined);
    let external = t.data_location == Some(DataLocation::External as i32);
    // Inline data is borrowed (a view of the file's bytes); external data is read.
    let external_data;
    let raw: Option<&[u8]> = if external {
        external_data = read_external(t, dir).map_err(err)?;
        Some(&external_data)
    } else {
        t.raw_data.as_deref()
    };
    let width = match dtype {
        DataType::Float | DataType::Int32 | DataType::Uint32 => 4,
        DataType::Double | DataType::Int64 | DataType::Uint64 => 8,
        DataType::Float16 | DataType::Int16 | DataType::Uint16 | DataType::Bfloat16 => 2,
        DataType::Int8 | DataType::Uint8 | DataType::Bool => 1,
        other => return Err(err(format!("element type {} is not supported", other.as_str_name()))),
    };
    if let Some(raw) = raw {
        if raw.len() != n * width {
            return Err(err(format!(
                "{} bytes of data for {n} elements of {} ({} bytes expected)",
                raw.len(),
                dtype.as_str_name(),
                n * width
            )));
        }
        let words = raw.chunks_exact(width);
        let data = match dtype {
            DataType::Float => Data::F32(words.map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()),
            DataType::Double => Data::F32(words.map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect()),
            DataType::Float16 => Data::F32(words.map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect()),
            DataType::Bfloat16 => {
                Data::F32(words.map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)).collect())
            }
            DataType::Int64 => ints(words.map(|b| i64::from_le_bytes(b.try_into().unwrap()))),
            DataType::Uint64 => ints(words.map(|b| u64::from_le_bytes(b.try_into().unwrap()) as i64)),
            DataType::Int32 => ints(words.map(|b| i64::from(i32::from_le_bytes(b.try_into().unwrap())))),
            DataType::Uint32 => ints(words.map(|b| i64::from(u32::from_le_bytes(b.try_into().unwrap())))),
            DataType::Int16 => ints(words.map(|b| i64::from(i16::from_le_bytes([b[0], b[1]])))),
            DataType::Uint16 => ints(words.map(|b| i64::from(u16::from_le_bytes([b[0], b[1]])))),
            DataType::Int8 => ints(words.map(|b| i64::from(b[0] as i8))),
            _ => ints(words.map(|b| i64::from(b[0]))),
        };
        return Ok(Const { dims, data });
    }
    let data = match dtype {
        DataType::Float => Data::F32(t.float_data.clone()),
        DataType::Double => Data::F32(t.double_data.iter().map(|x| *x as f32).collect()),
        // float16 and bfloat16 travel as their bits in int32_data.
        DataType::Float16 => Data::F32(t.int32_data.iter().map(|b| f16_to_f32(*b as u16)).collect()),
        DataType::Bfloat16 => Data::F32(t.int32_data.iter().map(|b| f32::from_bits((*b as u32) << 16)).collect()),
        DataType::Int64 => ints(t.int64_data.iter().copied()),
        DataType::Uint64 | DataType::Uint32 => ints(t.uint64_data.iter().map(|v| *v as i64)),
        _ => ints(t.int32_data.iter().map(|v| i64::from(*v))),
    };
    let c = Const { dims, data };
    if c.len() != n {
        return Err(err(format!("{} values for shape {:?} ({n} elements)", c.len(), t.dims)));
    }
    Ok(c)
}

fn ints(it: impl Iterator<Item = i64>) -> Data {
    Data::I64(it.map(Sym::Known).collect())
}

/// IEEE half → single.
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise.
            let shift = m.leading_zeros() - 21;
            let m = (m << shift) & 0x3ff;
            sign | ((127 - 15 + 1 - shift) << 23) | (m << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Reads a tensor's external data: `location` relative to the model's folder (never absolute,
/// never leaving it), `offset` and `length` in bytes.
fn read_external(t: &TensorProto, dir: Option<&Path>) -> Result<Vec<u8>, String> {
    let dir = dir.ok_or("its data is in an external file, and the model was not read from a folder")?;
    let mut location = None;
    let (mut offset, mut length) = (0u64, None);
    for e in &t.external_data {
        let v = e.value.clone().unwrap_or_default();
        match e.key.as_deref() {
            Some("location") => location = Some(v),
            Some("offset") => offset = v.parse().map_err(|_| format!("external data offset {v:?} is not a number"))?,
            Some("length") => {
                length = Some(v.parse::<u64>().map_err(|_| format!("external data length {v:?} is not a number"))?)
            }
            _ => {}
        }
    }
    let location = location.ok_or("external data without a `location`")?;
    let rel = Path::new(&location);
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(format!("external data location {location:?} must be a relative path inside the model's folder"));
    }
    let path = dir.join(rel);
    // A symbolic link must not lead out of the folder either.
    let (real, base) = (path.canonicalize(), dir.canonicalize());
    match (&real, &base) {
        (Ok(r), Ok(b)) if r.starts_with(b) => {}
        (Err(e), _) => return Err(format!("cannot open external data `{}`: {e}", path.display())),
        _ => return Err(format!("external data `{}` lies outside the model's folder", path.display())),
    }
    use std::io::{Read, Seek, SeekFrom};
    let mut f =
        std::fs::File::open(&path).map_err(|e| format!("cannot open external data `{}`: {e}", path.display()))?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let length = length.unwrap_or(size.saturating_sub(offset));
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(format!(
            "external data `{}` has {size} bytes, but the tensor asks for {length} at offset {offset}",
            path.display()
        ));
    }
    let mut buf = vec![0u8; usize::try_from(length).map_err(|_| "external data too large")?];
    f.seek(SeekFrom::Start(offset)).and_then(|_| f.read_exact(&mut buf)).map_err(|e| e.to_string())?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_convert_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
    }

    #[test]
    fn bad_tensors_are_errors() {
        let t = TensorProto {
            dims: vec![2, 3],
            data_type: Some(DataType::Float as i32),
            raw_data: Some(vec![0u8; 20].into()),
            ..Default::default()
        };
        assert!(decode(&t, None).unwrap_err().to_string().contains("20 bytes of data for 6 elements"));
        let t = TensorProto { dims: vec![-1], data_type: Some(DataType::Float as i32), ..Default::default() };
        assert!(decode(&t, None).is_err());
        let t = TensorProto { dims: vec![1 << 40, 1 << 40], data_type: Some(1), ..Default::default() };
        assert!(decode(&t, None).unwrap_err().to_string().contains("too many elements"));
    }
}
