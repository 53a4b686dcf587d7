//! Media files: an image is a PNG, a video an animated PNG (APNG, lossless, its frame delay the
//! frame rate; browsers play it, viewers without APNG support show its first frame). Both are
//! `.png`, written atomically and read back whole by a resumed run.

use std::path::Path;

use image::RgbImage;
use serde_json::{json, Value};

use super::{write_atomic, OutputError};
use crate::media::{Media, Video};

/// Encodes an RGB image as PNG.
pub fn encode_png(image: &RgbImage) -> Result<Vec<u8>, std::io::Error> {
    let mut buf = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new(&mut buf);
    image::ImageEncoder::write_image(
        encoder,
        image.as_raw(),
        image.width(),
        image.height(),
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| std::io::Error::other(format!("cannot encode the image: {e}")))?;
    Ok(buf)
}

/// The frame delay of `fps` as APNG's `numerator / denominator` seconds: `1 / fps` exactly for
/// a whole frame rate up to 65535, else the nearest millisecond (at least 1).
fn frame_delay(fps: f64) -> (u16, u16) {
    if fps >= 1.0 && fps <= f64::from(u16::MAX) && fps.fract() == 0.0 {
        (1, fps as u16)
    } else {
        let ms = (1000.0 / fps.max(1e-3))
            .round()
            .clamp(1.0, f64::from(u16::MAX));
        (ms as u16, 1000)
    }
}

/// Encodes a video as an animated PNG: every frame whole (no blending), played once.
pub fn encode_apng(video: &Video) -> Result<Vec<u8>, std::io::Error> {
    let err =
        |e: png::EncodingError| std::io::Error::other(format!("cannot encode the video: {e}"));
    let first = video
        .frames
        .first()
        .ok_or_else(|| std::io::Error::other("a video without frames"))?;
    let (w, h) = first.dimensions();
    if video.frames.iter().any(|f| f.dimensions() != (w, h)) {
        return Err(std::io::Error::other("the video's frames differ in size"));
    }
    let mut buf = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut buf, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
            .set_animated(video.frames.len() as u32, 1)
            .map_err(err)?;
        let (num, den) = frame_delay(video.fps);
        encoder.set_frame_delay(num, den).map_err(err)?;
        let mut writer = encoder.write_header().map_err(err)?;
        for frame in &video.frames {
            writer.write_image_data(frame.as_raw()).map_err(err)?;
        }
        writer.finish().map_err(err)?;
    }
    Ok(buf)
}

/// Writes `media` to `path` (PNG or APNG), atomically.
pub fn write_media(path: &Path, media: &Media) -> Result<(), OutputError> {
    let bytes = match media {
        Media::Image(image) => encode_png(image),
        Media::Video(video) => encode_apng(video),
    }
    .map_err(|source| OutputError {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, &bytes)
}

/// Reads a media file written by [`write_media`] ([`decode_media`]).
pub fn read_media(path: &Path) -> Result<Media, String> {
    decode_media(&std::fs::read(path).map_err(|e| e.to_string())?)
}

/// Decodes a media file's bytes: an animated PNG is a video, any other image an image.
pub fn decode_media(bytes: &[u8]) -> Result<Media, String> {
    use image::AnimationDecoder;
    let png = image::codecs::png::PngDecoder::new(std::io::Cursor::new(bytes));
    let decoder = match png {
        Ok(d) => d,
        // Not a PNG: any format the image crate reads is an image.
        Err(_) => {
            let image = image::load_from_memory(bytes).map_err(|e| e.to_string())?;
            return Ok(Media::Image(image.to_rgb8()));
        }
    };
    if !decoder.is_apng().map_err(|e| e.to_string())? {
        let image = image::DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())?;
        return Ok(Media::Image(image.to_rgb8()));
    }
    let frames = decoder
        .apng()
        .map_err(|e| e.to_string())?
        .into_frames()
        .collect_frames()
        .map_err(|e| e.to_string())?;
    let fps = frames.first().map_or(1.0, |f| {
        let (num, den) = f.delay().numer_denom_ms();
        if num == 0 {
            1.0
        } else {
            1000.0 * f64::from(den) / f64::from(num)
        }
    });
    let frames = frames
        .into_iter()
        .map(|f| image::DynamicImage::ImageRgba8(f.into_buffer()).to_rgb8())
        .collect();
    Ok(Media::Video(Video { frames, fps }))
}

/// What the round JSON says of a candidate's media beyond its file: nothing for an image (the
/// original's layout), the kind, frame count and rate for a video.
pub fn media_json(media: &Media) -> Option<Value> {
    match media {
        Media::Image(_) => None,
        Media::Video(v) => Some(json!({
            "kind": "video",
            "frames": v.frames.len(),
            "fps": v.fps,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn a_video_is_written_as_an_apng_and_read_back_frame_for_frame() {
        let dir = tempfile::tempdir().unwrap();
        for fps in [8.0, 16.0, 29.97] {
            let video = Video {
                frames: (0..4)
                    .map(|i| {
                        RgbImage::from_fn(3, 2, |x, y| Rgb([i * 40, x as u8 * 9, y as u8 * 7]))
                    })
                    .collect(),
                fps,
            };
            let path = dir.path().join("v.png");
            write_media(&path, &Media::Video(video.clone())).unwrap();
            let Media::Video(back) = read_media(&path).unwrap() else {
                panic!("not read back as a video");
            };
            assert_eq!(back.frames, video.frames);
            assert!((back.fps - fps).abs() < 0.05 * fps, "{} vs {fps}", back.fps);
            // Viewers without APNG support show the first frame.
            assert_eq!(image::open(&path).unwrap().to_rgb8(), video.frames[0]);
        }
    }

    #[test]
    fn an_image_is_a_plain_png() {
        let dir = tempfile::tempdir().unwrap();
        let image = RgbImage::from_pixel(2, 2, Rgb([1, 2, 3]));
        let path = dir.path().join("i.png");
        write_media(&path, &Media::Image(image.clone())).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), encode_png(&image).unwrap());
        assert_eq!(read_media(&path).unwrap(), Media::Image(image));
        assert_eq!(media_json(&Media::Image(RgbImage::new(1, 1))), None);
    }

    #[test]
    fn frame_delays_are_exact_for_whole_rates() {
        assert_eq!(frame_delay(16.0), (1, 16));
        assert_eq!(frame_delay(29.97), (33, 1000));
    }
}
