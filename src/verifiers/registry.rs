//! The table of verifiers: [`VerifierKind`] has one variant per verifier, each described by a
//! [`VerifierSpec`] in its own file and registered by one line of `verifiers!` in [`super`].
//! The config check, the builders, the help text and `rescore` all go through it; no list of
//! names is kept anywhere else.

use super::args::VerifierArgs;
use super::frames::FrameSampled;
use super::{EnvLookup, ImageVerifier, Verifier, VerifierError};
use crate::media::MediaKind;

/// What building a verifier may depend on besides its arguments.
#[derive(Clone, Copy)]
pub struct BuildContext<'a> {
    /// Where API keys and base URLs are read (the process environment, or a test's map).
    pub env: EnvLookup<'a>,
    /// `--low-vram`: a local model is loaded only while it grades.
    pub low_vram: bool,
}

/// A built verifier, as its builder declares what it grades.
pub enum Built {
    /// A judge of images; it grades a video on sampled frames ([`FrameSampled`],
    /// `video_frames`, `video_combine`).
    Images(Box<dyn ImageVerifier>),
    /// A judge of images and videos alike.
    Media(Box<dyn Verifier>),
}

/// One verifier: its name in configs, what it grades, and how it is built.
pub struct VerifierSpec {
    /// `verifier_args.name`.
    pub name: &'static str,
    /// The metrics it grades: the values `choice_of_metric` may take (the first is the
    /// default where the metric may be left out).
    pub metrics: &'static [&'static str],
    /// The media it grades natively (an image judge grades videos on sampled frames).
    pub media: &'static [MediaKind],
    /// Builds it.
    pub build: fn(&VerifierArgs, &BuildContext<'_>) -> Result<Built, VerifierError>,
}

impl super::VerifierKind {
    /// Its name in configs (`verifier_args.name`).
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The metrics it grades.
    pub fn metrics(self) -> &'static [&'static str] {
        self.spec().metrics
    }

    /// The verifier named `name` in configs.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// The names of every verifier, comma-separated (for messages and help).
    pub fn names() -> String {
        Self::ALL
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Builds the verifier `args` describes (an ensemble with its members), without `also_score`;
/// a verifier that grades only images is wrapped to grade videos on sampled frames.
pub fn build_one(
    args: &VerifierArgs,
    ctx: &BuildContext<'_>,
) -> Result<Box<dyn Verifier>, VerifierError> {
    Ok(match (args.kind.spec().build)(args, ctx)? {
        Built::Media(verifier) => verifier,
        Built::Images(verifier) => Box::new(FrameSampled::new(
            verifier,
            args.video_frames,
            args.video_combine,
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::super::VerifierKind;

    #[test]
    fn names_are_unique_and_found_by_name() {
        for k in VerifierKind::ALL {
            assert_eq!(VerifierKind::from_name(k.name()), Some(*k));
            assert!(!k.metrics().is_empty(), "{}", k.name());
        }
        let mut names: Vec<&str> = VerifierKind::ALL.iter().map(|k| k.name()).collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
        assert_eq!(VerifierKind::from_name("claude"), None);
    }

    #[test]
    fn image_judges_declare_images_and_the_ensemble_every_medium() {
        use crate::media::MediaKind;
        for k in VerifierKind::ALL {
            assert!(k.spec().media.contains(&MediaKind::Image), "{}", k.name());
        }
        assert!(VerifierKind::Ensemble
            .spec()
            .media
            .contains(&MediaKind::Video));
    }
}
