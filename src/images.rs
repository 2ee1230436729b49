//! Pictures in and out: PNG and JPEG files to normalised `[N, C, H, W]` batches as
//! torchvision's `ToTensor` → `Resize(antialias=False)` → `Normalize` make them, and RGB
//! images (Grad-CAM overlays) back to PNG.
//!
//! Grayscale is PIL's `convert("L")` (ITU-R 601 luma, its integer rounding); resizing is
//! bilinear with half-pixel centres ([`cnnc_runtime::gradcam::upsample`]).

use cnnc_runtime::gradcam::upsample;
use ndarray::{Array3, Array4, ArrayView3, Axis, s};
use std::path::Path;

/// Why a picture could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be opened or decoded.
    #[error("cannot read image `{path}`: {message}")]
    Read {
        /// File.
        path: String,
        /// Decoder message.
        message: String,
    },
    /// The net's input has a channel count pictures do not have.
    #[error("the net takes {channels} input channels, but images have 1 (grayscale) or 3 (RGB)")]
    Channels {
        /// The net's channels.
        channels: usize,
    },
    /// `mean`/`std` of the wrong length, or a zero std.
    #[error("{0}")]
    Normalize(String),
    /// Writing failed.
    #[error("cannot write image `{path}`: {message}")]
    Write {
        /// File.
        path: String,
        /// Encoder message.
        message: String,
    },
}

/// An RGB picture as `[3, H, W]` in [0, 1] (`ToTensor`), or grayscale `[1, H, W]`.
pub fn load(path: &Path, channels: usize) -> Result<Array3<f32>, ImageError> {
    let read = |message: String| ImageError::Read { path: path.display().to_string(), message };
    let img = image::ImageReader::open(path)
        .map_err(|e| read(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| read(e.to_string()))?
        .decode()
        .map_err(|e| read(e.to_string()))?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    match channels {
        3 => Ok(Array3::from_shape_fn((3, h, w), |(c, y, x)| f32::from(img.get_pixel(x as u32, y as u32)[c]) / 255.0)),
        1 => Ok(Array3::from_shape_fn((1, h, w), |(_, y, x)| {
            let p = img.get_pixel(x as u32, y as u32);
            // PIL's L = R·299/1000 + G·587/1000 + B·114/1000, in 16-bit fixed point.
            let l = (u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16;
            l as f32 / 255.0
        })),
        c => Err(ImageError::Channels { channels: c }),
    }
}

/// Bilinear resizing of every channel of `[C, H, W]` (`Resize(antialias=False)`).
pub fn resize(img: ArrayView3<'_, f32>, size: (usize, usize)) -> Array3<f32> {
    let c = img.shape()[0];
    let mut out = Array3::zeros((c, size.0, size.1));
    for ch in 0..c {
        out.index_axis_mut(Axis(0), ch).assign(&upsample(img.index_axis(Axis(0), ch), size));
    }
    out
}

fn check_stats(c: usize, mean: &[f32], std: &[f32]) -> Result<(), ImageError> {
    if mean.len() != c || std.len() != c {
        return Err(ImageError::Normalize(format!(
            "--mean and --std need {c} value(s) each (one per channel), got {} and {}",
            mean.len(),
            std.len()
        )));
    }
    if std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
        return Err(ImageError::Normalize("every std must be a non-zero number".into()));
    }
    Ok(())
}

/// `Normalize(mean, std)`: `(x − mean[c]) / std[c]`.
pub fn normalize(img: ArrayView3<'_, f32>, mean: &[f32], std: &[f32]) -> Result<Array3<f32>, ImageError> {
    check_stats(img.shape()[0], mean, std)?;
    Ok(Array3::from_shape_fn(img.dim(), |(c, y, x)| (img[[c, y, x]] - mean[c]) / std[c]))
}

/// The inverse of [`normalize`]: `x·std[c] + mean[c]`, clamped to [0, 1], as an RGB
/// `[H, W, 3]` image (a grayscale channel repeated).
pub fn denormalize(img: ArrayView3<'_, f32>, mean: &[f32], std: &[f32]) -> Result<Array3<f32>, ImageError> {
    let c = img.shape()[0];
    check_stats(c, mean, std)?;
    let (h, w) = (img.shape()[1], img.shape()[2]);
    Ok(Array3::from_shape_fn((h, w, 3), |(y, x, k)| {
        let ch = if c == 1 { 0 } else { k.min(c - 1) };
        (img[[ch, y, x]] * std[ch] + mean[ch]).clamp(0.0, 1.0)
    }))
}

/// Loads, resizes and normalises every picture into one `[N, C, H, W]` batch.
pub fn batch(
    paths: &[impl AsRef<Path>],
    channels: usize,
    size: (usize, usize),
    mean: &[f32],
    std: &[f32],
) -> Result<Array4<f32>, ImageError> {
    let mut out = Array4::zeros((paths.len(), channels, size.0, size.1));
    for (i, p) in paths.iter().enumerate() {
        let img = load(p.as_ref(), channels)?;
        let img = normalize(resize(img.view(), size).view(), mean, std)?;
        out.slice_mut(s![i, .., .., ..]).assign(&img);
    }
    Ok(out)
}

/// Writes an 8-bit RGB `[H, W, 3]` image as PNG.
pub fn save_png(path: &Path, rgb: &Array3<u8>) -> Result<(), ImageError> {
    let (h, w, _) = rgb.dim();
    let data: Vec<u8> = rgb.iter().copied().collect();
    let write = |message: String| ImageError::Write { path: path.display().to_string(), message };
    let buf = image::RgbImage::from_raw(w as u32, h as u32, data).ok_or_else(|| write("wrong buffer size".into()))?;
    buf.save_with_format(path, image::ImageFormat::Png).map_err(|e| write(e.to_string()))
}

/// Images side by side (each `[H, W, 3]`, equal heights), for a grid of overlays.
pub fn row(images: &[Array3<u8>]) -> Array3<u8> {
    let views: Vec<_> = images.iter().map(|a| a.view()).collect();
    ndarray::concatenate(Axis(1), &views).unwrap_or_else(|_| Array3::zeros((0, 0, 3)))
}
