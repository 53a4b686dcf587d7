//! What a pipeline makes and a verifier grades: an image, or a video (frames at a frame rate).
//! Candidates carry their media from the pipeline through grading to the files; the file
//! formats are [`crate::output`]'s.

use image::RgbImage;

/// Whether a model makes images or videos.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaKind {
    /// One RGB image.
    Image,
    /// RGB frames at a frame rate.
    Video,
}

impl MediaKind {
    /// `image` or `video`.
    pub fn name(self) -> &'static str {
        match self {
            MediaKind::Image => "image",
            MediaKind::Video => "video",
        }
    }
}

/// A video: its frames, all of one size, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Video {
    /// The frames (at least one).
    pub frames: Vec<RgbImage>,
    /// Frames per second.
    pub fps: f64,
}

/// One candidate's output.
#[derive(Clone, Debug, PartialEq)]
pub enum Media {
    /// An image.
    Image(RgbImage),
    /// A video.
    Video(Video),
}

impl Media {
    /// Image or video.
    pub fn kind(&self) -> MediaKind {
        match self {
            Media::Image(_) => MediaKind::Image,
            Media::Video(_) => MediaKind::Video,
        }
    }

    /// The frames: an image is its only frame.
    pub fn frames(&self) -> &[RgbImage] {
        match self {
            Media::Image(i) => std::slice::from_ref(i),
            Media::Video(v) => &v.frames,
        }
    }

    /// The picture that stands for it (a collage tile, a thumbnail's first frame): the image,
    /// or the video's first frame (an empty video gives a 1x1 black picture).
    pub fn poster(&self) -> std::borrow::Cow<'_, RgbImage> {
        match self.frames().first() {
            Some(f) => std::borrow::Cow::Borrowed(f),
            None => std::borrow::Cow::Owned(RgbImage::new(1, 1)),
        }
    }

    /// Width and height in pixels.
    pub fn dimensions(&self) -> (u32, u32) {
        self.frames().first().map_or((0, 0), RgbImage::dimensions)
    }
}

/// `n` frame indices of a video of `len` frames, evenly spaced from the first to the last
/// (rounded to the nearest frame; `n = 1` is the middle frame); all frames when `n >= len`.
pub fn sample_frames(len: usize, n: usize) -> Vec<usize> {
    if len == 0 || n == 0 {
        return Vec::new();
    }
    if n >= len {
        return (0..len).collect();
    }
    if n == 1 {
        return vec![(len - 1) / 2];
    }
    (0..n)
        .map(|i| ((i * (len - 1)) as f64 / (n - 1) as f64).round() as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_sampled_evenly_from_the_first_to_the_last() {
        assert_eq!(sample_frames(81, 3), [0, 40, 80]);
        assert_eq!(sample_frames(10, 4), [0, 3, 6, 9]);
        assert_eq!(sample_frames(5, 1), [2]);
        assert_eq!(sample_frames(3, 8), [0, 1, 2]);
        assert!(sample_frames(0, 3).is_empty());
    }

    #[test]
    fn an_image_is_its_only_frame() {
        let m = Media::Image(RgbImage::new(3, 2));
        assert_eq!(m.kind(), MediaKind::Image);
        assert_eq!(m.frames().len(), 1);
        assert_eq!(m.dimensions(), (3, 2));
        let v = Media::Video(Video {
            frames: vec![
                RgbImage::new(4, 4),
                RgbImage::from_pixel(4, 4, image::Rgb([9, 9, 9])),
            ],
            fps: 16.0,
        });
        assert_eq!(v.kind().name(), "video");
        assert_eq!(v.poster().get_pixel(0, 0)[0], 0);
        assert!(matches!(v, Media::Video(_)));
    }
}
