//! The table of model families: one [`Family`] per diffusers pipeline class, each in its own
//! file and registered by one line of `families!` in [`super`]. Everything that depends on the
//! model reads it here: the loader ([`load`], chosen by `model_index.json`'s `_class_name`),
//! the config check of the image size ([`size_factor`]), the run folder's model name
//! ([`short_name`]), the CPU estimate ([`super::estimate`]) and `tt-scale bench`.

use candle_core::Device;

use super::{CallArgs, Pipeline, PipelineError};
use crate::loading::{parse_config, Dtype, ModelSource};
use crate::media::MediaKind;

/// diffusers' defaults of a pipeline class, for the released checkpoints.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Defaults {
    /// Image height and width in pixels of the released checkpoints (the loader reads the
    /// model's own from its configs).
    pub size: usize,
    /// `num_inference_steps`.
    pub steps: usize,
    /// `guidance_scale`.
    pub guidance: f64,
}

/// A Hub repository of a family that the original tool knows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KnownRepo {
    /// The Hub id (`black-forest-labs/FLUX.1-dev`).
    pub id: &'static str,
    /// The original tool's name for its output folder (`flux.1-dev`).
    pub short_name: &'static str,
    /// Its default denoising steps (FLUX.1-schnell: 4).
    pub steps: usize,
}

/// What one evaluation of a family's denoiser costs, for the CPU estimate: the arithmetic of
/// its real-size architecture (text encoders and the VAE left out, so a lower bound).
#[derive(Clone, Copy, Debug)]
pub struct Cost {
    /// Whether guidance is classifier-free (two evaluations a step when the scale is above 1)
    /// rather than distilled into the model.
    pub cfg: bool,
    /// FLOPs of one evaluation at `h` x `w` pixels with `text` text tokens.
    pub flops: fn(h: usize, w: usize, text: usize) -> f64,
}

/// What a loader is given.
pub struct LoadRequest<'a> {
    /// Where the model's files are.
    pub source: ModelSource,
    /// `torch_dtype`.
    pub dtype: Dtype,
    /// The device to run on.
    pub device: &'a Device,
    /// `pipeline_call_args`.
    pub call_args: &'a CallArgs,
    /// `--low-vram`.
    pub low_vram: bool,
}

/// One model family: a diffusers pipeline class and everything the rest of the tool needs to
/// know about it.
pub struct Family {
    /// The pipeline class `model_index.json` names (`_class_name`).
    pub class_name: &'static str,
    /// Its name in messages.
    pub title: &'static str,
    /// Whether it makes images or videos.
    pub output: MediaKind,
    /// diffusers' defaults.
    pub defaults: Defaults,
    /// Height and width are multiples of the VAE's scale factor times this (Flux: 2, for its
    /// 2x2 latent packing).
    pub patch: usize,
    /// `pipeline_call_args` keys the family does not read (warned about when set).
    pub unused_args: &'static [&'static str],
    /// The Hub repositories the original tool knows.
    pub repos: &'static [KnownRepo],
    /// A lower-case part of Hub ids of this family, for the size factor of an id that is
    /// neither a known repo nor a local folder (`flux`).
    pub id_hint: Option<&'static str>,
    /// The CPU estimate's cost model.
    pub cost: Cost,
    /// Loads the pipeline.
    pub load: fn(LoadRequest<'_>) -> Result<Box<dyn Pipeline>, PipelineError>,
}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family")
            .field("class_name", &self.class_name)
            .finish_non_exhaustive()
    }
}

/// The keys of a diffusers `model_index.json` the pipelines read.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct ModelIndex {
    /// The pipeline class (`StableDiffusionPipeline`, `FluxPipeline`, ...).
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// SDXL: zero negative embeddings when no negative prompt is given (default true).
    #[serde(default)]
    pub force_zeros_for_empty_prompt: Option<bool>,
}

/// Every family, in the order they were registered.
pub fn families() -> &'static [&'static Family] {
    super::FAMILIES
}

/// The family of pipeline class `class_name`.
pub fn by_class(class_name: &str) -> Option<&'static Family> {
    families()
        .iter()
        .copied()
        .find(|f| f.class_name == class_name)
}

/// The family and entry of a Hub id the original tool knows.
pub fn known_repo(id: &str) -> Option<(&'static Family, &'static KnownRepo)> {
    families()
        .iter()
        .find_map(|f| f.repos.iter().find(|r| r.id == id).map(|r| (*f, r)))
}

/// The output folder name the original tool uses for a known model id, if any.
pub fn short_name(model: &str) -> Option<&'static str> {
    known_repo(model).map(|(_, r)| r.short_name)
}

/// `_class_name` of a local model folder's `model_index.json`, if it has one.
fn local_class(dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("model_index.json")).ok()?;
    let index: ModelIndex = serde_json::from_str(&text).ok()?;
    index.class_name
}

/// The factor height and width must be multiples of: the VAE's scale factor (read from a local
/// folder's `vae/config.json` when there is one; 8 by default) times the family's patch.
pub fn size_factor(model: &str) -> usize {
    const VAE_FACTOR: usize = 8;
    if let Some((family, _)) = known_repo(model) {
        return VAE_FACTOR * family.patch;
    }
    let dir = std::path::Path::new(model);
    if dir.is_dir() {
        let vae_factor = std::fs::read_to_string(dir.join("vae").join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                v.get("block_out_channels")
                    .and_then(serde_json::Value::as_array)
                    .map(Vec::len)
            })
            .map(|n| 1usize << n.saturating_sub(1))
            .unwrap_or(VAE_FACTOR);
        let patch = local_class(dir)
            .and_then(|c| by_class(&c))
            .map_or(1, |f| f.patch);
        return vae_factor * patch;
    }
    let lower = model.to_ascii_lowercase();
    let patch = families()
        .iter()
        .find(|f| f.id_hint.is_some_and(|h| lower.contains(h)))
        .map_or(1, |f| f.patch);
    VAE_FACTOR * patch
}

/// What to load and how.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions<'a> {
    /// `torch_dtype`.
    pub dtype: Dtype,
    /// The device to run on.
    pub device: &'a Device,
    /// `pipeline_call_args`.
    pub call_args: &'a CallArgs,
    /// `--low-vram`.
    pub low_vram: bool,
    /// The config file the call arguments come from, for the warnings.
    pub config_file: &'a std::path::Path,
}

/// Loads the pipeline that `model`'s `model_index.json` names (`_class_name`), with the
/// options' dtype and call arguments, onto their device; call arguments the family does not
/// read are warned about.
pub fn load(model: &str, options: LoadOptions<'_>) -> Result<Box<dyn Pipeline>, PipelineError> {
    let source = ModelSource::resolve(model)?;
    let index: ModelIndex =
        parse_config(&source.read_json("model_index.json")?, "model_index.json")?;
    let class = index.class_name.unwrap_or_default();
    if class.is_empty() {
        return Err(PipelineError::ModelFile {
            path: format!("{model}/model_index.json"),
            message: "has no `_class_name`; is this a diffusers pipeline folder?".into(),
        });
    }
    let Some(family) = by_class(&class) else {
        let known: Vec<&str> = families().iter().map(|f| f.class_name).collect();
        return Err(PipelineError::Unsupported(format!(
            "{model}: pipeline class {class} is not supported; tt-scale runs {}",
            known.join(", ")
        )));
    };
    for key in family.unused_args {
        if options.call_args.is_set(key) {
            tracing::warn!(
                "{}: pipeline_call_args.{key} does not apply to {} and is ignored",
                options.config_file.display(),
                family.title
            );
        }
    }
    (family.load)(LoadRequest {
        source,
        dtype: options.dtype,
        device: options.device,
        call_args: options.call_args,
        low_vram: options.low_vram,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_repos_give_the_originals_folder_names_and_size_factors() {
        assert_eq!(
            short_name("black-forest-labs/FLUX.1-dev"),
            Some("flux.1-dev")
        );
        assert_eq!(short_name("someone/else"), None);
        assert_eq!(size_factor("black-forest-labs/FLUX.1-schnell"), 16);
        assert_eq!(size_factor("stabilityai/stable-diffusion-xl-base-1.0"), 8);
        // An unknown Hub id: Flux by its name, else the common VAE factor.
        assert_eq!(size_factor("someone/my-flux-finetune"), 16);
        assert_eq!(size_factor("someone/my-unet"), 8);
    }

    #[test]
    fn every_family_is_named_once_and_its_unused_args_are_call_args() {
        let mut classes: Vec<&str> = families().iter().map(|f| f.class_name).collect();
        classes.sort_unstable();
        let n = classes.len();
        classes.dedup();
        assert_eq!(classes.len(), n, "a class registered twice");
        for f in families() {
            for key in f.unused_args {
                assert!(
                    super::super::args::KEYS.contains(key),
                    "{}: {key}",
                    f.class_name
                );
            }
            assert!(f.patch >= 1 && f.defaults.steps >= 1);
        }
    }
}
