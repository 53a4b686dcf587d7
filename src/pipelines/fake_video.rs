//! A stand-in video model for the tests of the extension points: registered by one line of
//! `families!`, it is chosen from a model folder whose `model_index.json` names
//! `TtScaleFakeVideoPipeline` and makes, from each noise `(1, 3, frames, 4, 4)`, a video of
//! `frames` 4x4 frames whose colours follow the noise, at 8 frames a second.

use image::{Rgb, RgbImage};

use super::registry::{Cost, Defaults, Family, KnownRepo};
use super::{Pipeline, PipelineError};
use crate::media::{Media, MediaKind, Video};
use crate::noise::Noise;

/// Frames a video has.
pub const FRAMES: usize = 5;
/// Frames a second.
pub const FPS: f64 = 8.0;

/// The fake video family.
pub const FAMILY: Family = Family {
    class_name: "TtScaleFakeVideoPipeline",
    title: "the fake video model",
    output: MediaKind::Video,
    defaults: Defaults {
        size: 4,
        steps: 3,
        guidance: 1.0,
    },
    patch: 1,
    unused_args: &["max_sequence_length", "clean_caption"],
    repos: &[] as &[KnownRepo],
    id_hint: None,
    cost: Cost {
        cfg: false,
        flops: |h, w, _| (h * w * FRAMES) as f64,
    },
    load: |r| {
        Ok(Box::new(FakeVideo {
            steps: r.call_args.num_inference_steps.unwrap_or(FAMILY.defaults.steps),
            prompt: None,
        }))
    },
};

/// The loaded fake: every step is one evaluation.
struct FakeVideo {
    steps: usize,
    prompt: Option<String>,
}

impl Pipeline for FakeVideo {
    fn output(&self) -> MediaKind {
        MediaKind::Video
    }

    fn noise_shape(&self) -> Vec<usize> {
        vec![1, 3, FRAMES, 4, 4]
    }

    fn set_prompt(&mut self, prompt: &str) -> Result<(), PipelineError> {
        self.prompt = Some(prompt.to_string());
        Ok(())
    }

    fn generate(&mut self, noises: &[Noise]) -> Result<Vec<Media>, PipelineError> {
        if self.prompt.is_none() {
            return Err(PipelineError::InvalidArgument(
                "set_prompt must be called before generate".into(),
            ));
        }
        let level = |v: f32| (128.0 + 40.0 * v).clamp(0.0, 255.0) as u8;
        Ok(noises
            .iter()
            .map(|n| {
                let per_frame = 16;
                let frames = (0..FRAMES)
                    .map(|f| {
                        RgbImage::from_fn(4, 4, |x, y| {
                            let i = f * per_frame + (y * 4 + x) as usize;
                            let c = |k: usize| level(n.data[k * FRAMES * per_frame + i]);
                            Rgb([c(0), c(1), c(2)])
                        })
                    })
                    .collect();
                Media::Video(Video { frames, fps: FPS })
            })
            .collect())
    }

    fn evaluations_per_image(&self) -> Option<usize> {
        Some(self.steps)
    }
}
