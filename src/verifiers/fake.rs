//! A stand-in judge for the tests of the extension points: registered by one line of
//! `verifiers!` as `fake`, it grades an image by its mean brightness (metric `brightness`,
//! 0 to 10), so a video is graded on its sampled frames like every image judge's.

use super::registry::{Built, VerifierSpec};
use super::{Grading, ImageInput, ImageVerifier, Score, ScoreFailure};
use crate::media::MediaKind;

/// The fake judge.
pub const SPEC: VerifierSpec = VerifierSpec {
    name: "fake",
    metrics: &["brightness"],
    media: &[MediaKind::Image],
    build: |_, _| Ok(Built::Images(Box::new(Brightness))),
};

/// Grades by mean brightness.
struct Brightness;

impl ImageVerifier for Brightness {
    fn name(&self) -> &str {
        "fake"
    }

    fn score(&self, inputs: &[ImageInput<'_>]) -> Vec<Result<Grading, ScoreFailure>> {
        inputs
            .iter()
            .map(|i| {
                let px = i.image.as_raw();
                let mean = px.iter().map(|&v| f64::from(v)).sum::<f64>() / px.len().max(1) as f64;
                let mut g = Grading::new();
                g.insert(
                    "brightness".into(),
                    Score {
                        explanation: format!("mean brightness {mean:.2} of 255"),
                        score: mean / 25.5,
                    },
                );
                Ok(g)
            })
            .collect()
    }
}
