//! Grading videos with a verifier that grades images: [`FrameSampled`] sends a video's sampled
//! frames (`video_frames` of them, evenly spaced from the first to the last) to the image
//! verifier in the same batch as the images, and combines the frames' scores metric by metric
//! (`video_combine`: mean, min or max). Images pass through unchanged.

use super::args::FrameCombine;
use super::{
    CallStats, Graded, Grading, ImageInput, ImageVerifier, Score, ScoreFailure, TokenUsage,
    Verifier, VerifierInput,
};
use crate::media::{sample_frames, Media};

/// An image verifier that grades videos on sampled frames.
pub struct FrameSampled {
    inner: Box<dyn ImageVerifier>,
    frames: usize,
    combine: FrameCombine,
}

impl FrameSampled {
    /// `inner`, grading a video on `frames` sampled frames combined by `combine`.
    pub fn new(inner: Box<dyn ImageVerifier>, frames: usize, combine: FrameCombine) -> Self {
        Self {
            inner,
            frames: frames.max(1),
            combine,
        }
    }
}

/// One video's sampled frames' gradings as the video's: every metric all frames have, combined;
/// the first frame's failure when one could not be graded.
pub fn combine_frames(frames: &[usize], gradings: Vec<Graded>, combine: FrameCombine) -> Graded {
    let mut ok = Vec::with_capacity(gradings.len());
    for (g, frame) in gradings.into_iter().zip(frames) {
        match g {
            Ok(g) => ok.push(g),
            Err(f) => {
                return Err(ScoreFailure {
                    message: format!("frame {frame}: {}", f.message),
                    ..f
                })
            }
        }
    }
    let Some(first) = ok.first() else {
        return Err(ScoreFailure {
            message: "the video has no frames to grade".into(),
            attempts: 0,
            fatal: false,
        });
    };
    let mut out = Grading::new();
    for metric in first.keys() {
        let scores: Option<Vec<&Score>> = ok.iter().map(|g| g.get(metric)).collect();
        let Some(scores) = scores else { continue };
        let values = scores.iter().map(|s| s.score);
        let score = match combine {
            FrameCombine::Mean => values.sum::<f64>() / scores.len() as f64,
            FrameCombine::Min => values.fold(f64::INFINITY, f64::min),
            FrameCombine::Max => values.fold(f64::NEG_INFINITY, f64::max),
        };
        let explanation = format!(
            "{} over frames {}: {}",
            combine.name(),
            frames
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            scores
                .iter()
                .map(|s| s.explanation.as_str())
                .collect::<Vec<_>>()
                .join(" | ")
        );
        out.insert(metric.clone(), Score { explanation, score });
    }
    Ok(out)
}

impl Verifier for FrameSampled {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn score(&self, inputs: &[VerifierInput<'_>]) -> Vec<Graded> {
        self.score_with_usage(inputs)
            .into_iter()
            .map(|(g, _)| g)
            .collect()
    }

    fn score_with_usage(&self, inputs: &[VerifierInput<'_>]) -> Vec<(Graded, TokenUsage)> {
        // Every image and every sampled frame in one batch, in input order.
        let mut images = Vec::new();
        let mut spans = Vec::with_capacity(inputs.len());
        for input in inputs {
            let start = images.len();
            let picked = match input.media {
                Media::Image(image) => {
                    images.push(ImageInput {
                        prompt: input.prompt,
                        image,
                    });
                    Vec::new()
                }
                Media::Video(video) => {
                    let picked = sample_frames(video.frames.len(), self.frames);
                    images.extend(picked.iter().map(|&i| ImageInput {
                        prompt: input.prompt,
                        image: &video.frames[i],
                    }));
                    picked
                }
            };
            spans.push((start, images.len(), picked));
        }
        let mut results = self.inner.score_with_usage(&images).into_iter();
        spans
            .into_iter()
            .zip(inputs)
            .map(|((start, end, picked), input)| {
                let mut usage = TokenUsage::default();
                let gradings: Vec<Graded> = (start..end)
                    .map(|_| {
                        let (g, u) = results.next().unwrap_or_else(|| {
                            (
                                Err(ScoreFailure {
                                    message: "the verifier returned no result for this image"
                                        .into(),
                                    attempts: 0,
                                    fatal: false,
                                }),
                                TokenUsage::default(),
                            )
                        });
                        usage += u;
                        g
                    })
                    .collect();
                let graded = match input.media {
                    Media::Image(_) => gradings.into_iter().next().unwrap_or_else(|| {
                        Err(ScoreFailure {
                            message: "the verifier returned no result for this image".into(),
                            attempts: 0,
                            fatal: false,
                        })
                    }),
                    Media::Video(_) => combine_frames(&picked, gradings, self.combine),
                };
                (graded, usage)
            })
            .collect()
    }

    fn call_stats(&self) -> CallStats {
        self.inner.call_stats()
    }

    fn check_access(&self) -> Result<(), ScoreFailure> {
        self.inner.check_access()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::Video;
    use image::{Rgb, RgbImage};
    use std::sync::{Arc, Mutex};

    /// Grades an image by its first pixel's red value; records the images of each call.
    #[derive(Clone, Default)]
    struct Red(Arc<Mutex<Vec<usize>>>);

    impl ImageVerifier for Red {
        fn name(&self) -> &str {
            "red"
        }
        fn score(&self, inputs: &[ImageInput<'_>]) -> Vec<Graded> {
            self.0.lock().unwrap().push(inputs.len());
            inputs
                .iter()
                .map(|i| {
                    let r = i.image.get_pixel(0, 0)[0];
                    if r == 0 {
                        return Err(ScoreFailure {
                            message: "black".into(),
                            attempts: 1,
                            fatal: false,
                        });
                    }
                    let mut g = Grading::new();
                    g.insert(
                        "red".into(),
                        Score {
                            explanation: format!("r{r}"),
                            score: f64::from(r),
                        },
                    );
                    Ok(g)
                })
                .collect()
        }
    }

    fn video(reds: &[u8]) -> Media {
        Media::Video(Video {
            frames: reds
                .iter()
                .map(|&r| RgbImage::from_pixel(1, 1, Rgb([r, 0, 0])))
                .collect(),
            fps: 8.0,
        })
    }

    #[test]
    fn a_video_is_graded_on_its_sampled_frames_in_the_batch_of_the_images() {
        let image = Media::Image(RgbImage::from_pixel(1, 1, Rgb([7, 0, 0])));
        let clip = video(&[10, 20, 30, 40, 50]);
        let inputs = [
            VerifierInput {
                prompt: "p",
                media: &clip,
            },
            VerifierInput {
                prompt: "p",
                media: &image,
            },
        ];
        let red = Red::default();
        let v = FrameSampled::new(Box::new(red.clone()), 3, FrameCombine::Mean);
        let out = v.score(&inputs);
        // Frames 0, 2, 4 (10, 30, 50) and the image, one call of four.
        assert_eq!(*red.0.lock().unwrap(), [4]);
        let g = out[0].as_ref().unwrap();
        assert_eq!(g["red"].score, 30.0);
        assert_eq!(
            g["red"].explanation,
            "mean over frames 0, 2, 4: r10 | r30 | r50"
        );
        assert_eq!(out[1].as_ref().unwrap()["red"].score, 7.0);
        let min = FrameSampled::new(Box::new(Red::default()), 3, FrameCombine::Min);
        assert_eq!(min.score(&inputs)[0].as_ref().unwrap()["red"].score, 10.0);
        let max = FrameSampled::new(Box::new(Red::default()), 2, FrameCombine::Max);
        assert_eq!(max.score(&inputs)[0].as_ref().unwrap()["red"].score, 50.0);
    }

    #[test]
    fn a_frame_that_cannot_be_graded_fails_the_video_naming_the_frame() {
        let clip = video(&[10, 0, 30]);
        let v = FrameSampled::new(Box::new(Red::default()), 3, FrameCombine::Mean);
        let out = v.score(&[VerifierInput {
            prompt: "p",
            media: &clip,
        }]);
        let f = out[0].as_ref().unwrap_err();
        assert_eq!(f.message, "frame 1: black");
        assert_eq!(f.attempts, 1);
    }
}
