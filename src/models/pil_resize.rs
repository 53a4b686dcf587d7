//! Pillow's bicubic resize of 8-bit RGB images, bit for bit (`Image.resize(size, BICUBIC)`:
//! separable passes in 22-bit fixed point, rounded to 8 bits between them), as the image
//! processors of transformers (CLIP, Qwen2.5-VL) resize through Pillow.

use image::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's resampling coefficients for one axis: per output index, the first input index and
/// the fixed-point weights.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let w: Vec<f64> = (0..n)
                .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let scaled = v * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes like Pillow's `Image.resize(size, BICUBIC)` on an 8-bit RGB image: a horizontal
/// pass, then a vertical one, each in 22-bit fixed point with rounding to 8 bits in between.
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    if iw == width && ih == height {
        return img.clone();
    }
    let src = img.as_raw();
    let vert = coefficients(ih, height);
    // Horizontal pass over the rows the vertical pass reads.
    let (y_first, y_last) = if ih != height {
        let first = vert[0].0;
        let last = vert[height - 1].0 + vert[height - 1].1.len();
        (first, last)
    } else {
        (0, ih)
    };
    let rows = y_last - y_first;
    let mut temp = vec![0u8; rows * width * 3];
    let temp_w = if iw != width {
        let horiz = coefficients(iw, width);
        for y in 0..rows {
            let row = &src[(y + y_first) * iw * 3..(y + y_first + 1) * iw * 3];
            for (xx, (xmin, k)) in horiz.iter().enumerate() {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (x, &kv) in k.iter().enumerate() {
                        ss += row[(x + xmin) * 3 + c] as i64 * kv as i64;
                    }
                    temp[(y * width + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        width
    } else {
        temp.copy_from_slice(&src[y_first * iw * 3..y_last * iw * 3]);
        iw
    };
    if ih == height {
        return RgbImage::from_raw(temp_w as u32, height as u32, temp)
            .unwrap_or_else(|| RgbImage::new(temp_w as u32, height as u32));
    }
    let mut out = vec![0u8; height * temp_w * 3];
    for (yy, (ymin, k)) in vert.iter().enumerate() {
        let ymin = ymin - y_first;
        for x in 0..temp_w {
            for c in 0..3 {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for (y, &kv) in k.iter().enumerate() {
                    ss += temp[((y + ymin) * temp_w + x) * 3 + c] as i64 * kv as i64;
                }
                out[(yy * temp_w + x) * 3 + c] = clip8(ss);
            }
        }
    }
    RgbImage::from_raw(temp_w as u32, height as u32, out)
        .unwrap_or_else(|| RgbImage::new(temp_w as u32, height as u32))
}
