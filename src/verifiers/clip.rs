//! The paper's CLIP verifiers, local and batched, with no API key: `laion_aesthetic` (the LAION
//! improved aesthetic predictor, an MLP on the L2-normalised CLIP ViT-L/14 image embedding,
//! metric `laion_aesthetic_score`) and `clip_score` (the cosine of the CLIP image and prompt
//! embeddings, metric `clip_score`, and CLIP-S = 2.5 max(cos, 0), metric `clip_s`). One CLIP
//! pass serves every metric: `laion_aesthetic` also records the CLIP scores. `pickscore` is
//! PickScore (`yuvalkirstain/PickScore_v1`, a fine-tuned CLIP-H/14 with the processor and
//! tokenizer of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`): `exp(logit_scale)` times the cosine,
//! metric `pickscore`. `hpsv2` is HPS v2.1 (`xswu/HPSv2`'s `HPS_v2.1_compressed.pt`, an OpenCLIP
//! ViT-H/14 checkpoint, with OpenCLIP's preprocessing): the cosine, metric `hpsv2`.
//!
//! The aesthetic MLP runs in eval mode: its dropouts are off, so a score is a function of the
//! image. (The original tool left dropout on, so its scores were random draws.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;

use super::registry::{Built, VerifierSpec};
use super::{
    Grading, ImageInput, ImageVerifier, Score, ScoreFailure, VerifierArgs, VerifierError,
    VerifierKind,
};
use crate::media::MediaKind;
use crate::loading::{parse_config, ModelSource};
use crate::models::clip::{l2_normalize, ClipConfig, ClipImageProcessor, ClipModel};
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::loading::tokenizers::clip_tokenizer;

/// The metrics of the CLIP verifiers: the LAION aesthetic score (1-10 scale), the raw CLIP
/// cosine of image and prompt, and CLIP-S = 2.5 max(cosine, 0) (Hessel et al.).
pub const CLIP_METRICS: [&str; 3] = ["laion_aesthetic_score", "clip_score", "clip_s"];

/// The builder of every CLIP verifier.
fn build(args: &VerifierArgs, _: &super::BuildContext<'_>) -> Result<Built, VerifierError> {
    Ok(Built::Images(Box::new(ClipVerifier::from_args(args)?)))
}

/// `laion_aesthetic` in the verifier table.
pub const LAION_AESTHETIC: VerifierSpec = VerifierSpec {
    name: "laion_aesthetic",
    metrics: &CLIP_METRICS,
    media: &[MediaKind::Image],
    build,
};

/// `clip_score` in the verifier table.
pub const CLIP_SCORE: VerifierSpec = VerifierSpec {
    name: "clip_score",
    metrics: &["clip_score", "clip_s"],
    media: &[MediaKind::Image],
    build,
};

/// `pickscore` in the verifier table.
pub const PICKSCORE: VerifierSpec = VerifierSpec {
    name: "pickscore",
    metrics: &["pickscore"],
    media: &[MediaKind::Image],
    build,
};

/// `hpsv2` in the verifier table.
pub const HPSV2: VerifierSpec = VerifierSpec {
    name: "hpsv2",
    metrics: &["hpsv2"],
    media: &[MediaKind::Image],
    build,
};

/// The CLIP model used when `verifier_args.model_name` is unset.
pub const DEFAULT_CLIP: &str = "openai/clip-vit-large-patch14";
/// PickScore's model, used by `pickscore` when `verifier_args.model_name` is unset.
pub const DEFAULT_PICKSCORE: &str = "yuvalkirstain/PickScore_v1";
/// Where PickScore's image processor and tokenizer come from by default.
pub const DEFAULT_PICKSCORE_PROCESSOR: &str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K";
/// HPSv2's Hub repo, used by `hpsv2` when `verifier_args.model_name` is unset.
pub const DEFAULT_HPSV2: &str = "xswu/HPSv2";
/// The HPS v2.1 checkpoint in that repo.
pub const HPSV2_FILE: &str = "HPS_v2.1_compressed.pt";
/// The Hub repo of the aesthetic MLP used when `verifier_args.aesthetic_model` is unset.
pub const DEFAULT_AESTHETIC: &str = "trl-lib/ddpo-aesthetic-predictor";
/// The MLP's file in that repo.
pub const AESTHETIC_FILE: &str = "aesthetic-model.pth";

/// The LAION aesthetic MLP (`layers.{0,2,4,6,7}`: five linear layers with dropouts between
/// them and no activation), read from its PyTorch pickle, in eval mode. ImageReward's head has
/// the same form.
pub struct AestheticHead {
    layers: Vec<Linear>,
}

impl AestheticHead {
    /// Reads `layers.{0,2,4,6,7}.{weight,bias}` from the `.pth` file at `path` (a
    /// `torch.save(state_dict)`); the widths come from the file (768-1024-128-64-16-1 for the
    /// released predictor).
    pub fn from_pth(path: &Path, device: &Device) -> Result<Self, String> {
        let pth = candle_core::pickle::PthTensors::new(path, None)
            .map_err(|e| format!("not a PyTorch state dict: {e}"))?;
        Self::from_lookup(
            &|name| pth.get(name).map_err(|e| format!("{name}: {e}")),
            "",
            "the LAION aesthetic MLP",
            device,
        )
    }

    /// Reads `{prefix}layers.{0,2,4,6,7}.{weight,bias}` through `get` (None: no such tensor),
    /// in float32 on `device`; `what` names the model in errors. ImageReward's head is the same
    /// stack under `mlp.`.
    pub fn from_lookup(
        get: &dyn Fn(&str) -> Result<Option<Tensor>, String>,
        prefix: &str,
        what: &str,
        device: &Device,
    ) -> Result<Self, String> {
        let mut layers = Vec::new();
        let mut width: Option<usize> = None;
        for i in [0, 2, 4, 6, 7] {
            let tensor = |part: &str| -> Result<Tensor, String> {
                let name = format!("{prefix}layers.{i}.{part}");
                get(&name)?
                    .ok_or_else(|| format!("has no {name}; is this {what}?"))?
                    .to_dtype(DType::F32)
                    .and_then(|t| t.to_device(device))
                    .map_err(|e| format!("{name}: {e}"))
            };
            let (w, b) = (tensor("weight")?, tensor("bias")?);
            let (out, inp) = w
                .dims2()
                .map_err(|e| format!("{prefix}layers.{i}.weight: {e}"))?;
            if width.is_some_and(|prev| prev != inp) || b.dims() != [out] {
                return Err(format!(
                    "{prefix}layers.{i} has shape {:?} / {:?}, which does not follow the layer before",
                    w.dims(),
                    b.dims()
                ));
            }
            width = Some(out);
            layers.push(Linear::new(w, Some(b)));
        }
        if width != Some(1) {
            return Err("the last layer does not give one score".into());
        }
        Ok(Self { layers })
    }

    /// The width of the embedding it takes.
    pub fn input_width(&self) -> Option<usize> {
        self.layers
            .first()
            .and_then(|l| l.weight().dims2().ok())
            .map(|d| d.1)
    }

    /// Scores (B) of L2-normalised image embeddings (B, D), float32.
    pub fn forward(&self, embeds: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = embeds.to_dtype(DType::F32)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        x.squeeze(1)
    }
}

/// `laion_aesthetic`, `clip_score`, `pickscore`, `hpsv2`: CLIP (and the aesthetic MLP) on the
/// verifier's device.
pub struct ClipVerifier {
    kind: VerifierKind,
    model_name: String,
    model: ClipModel,
    processor: ClipImageProcessor,
    tokenizer: ClipTokenizer,
    head: Option<AestheticHead>,
    device: Device,
    dtype: DType,
    batch: usize,
    /// Normalised text embeddings (1, D) by prompt: a search grades one prompt many times.
    text_cache: Mutex<HashMap<String, Tensor>>,
}

impl std::fmt::Debug for ClipVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipVerifier")
            .field("name", &self.kind.name())
            .field("model", &self.model_name)
            .field("aesthetic", &self.head.is_some())
            .field("device", &self.device)
            .finish()
    }
}

fn local_model(
    key: &'static str,
    expected: &'static str,
    model: &str,
    e: impl std::fmt::Display,
) -> VerifierError {
    VerifierError::LocalModel {
        key,
        expected,
        model: model.to_string(),
        message: e.to_string(),
    }
}

impl ClipVerifier {
    /// Builds the CLIP verifier named in `args`: CLIP from
    /// `model_name` (default [`DEFAULT_CLIP`]), the MLP from `aesthetic_model` (default
    /// [`DEFAULT_AESTHETIC`]) for `laion_aesthetic`, on `device`, `concurrency` images a batch.
    pub fn from_args(args: &VerifierArgs) -> Result<Self, VerifierError> {
        let kind = args.kind;
        let default = match kind {
            VerifierKind::LaionAesthetic | VerifierKind::ClipScore => DEFAULT_CLIP,
            VerifierKind::PickScore => DEFAULT_PICKSCORE,
            VerifierKind::Hpsv2 => DEFAULT_HPSV2,
            other => {
                return Err(VerifierError::InvalidArg {
                    field: "name",
                    message: format!("{} is not a CLIP verifier", other.name()),
                })
            }
        };
        let device = super::open_device(args.device)?;
        let model_name = args.model_name.as_deref().unwrap_or(default);
        // PickScore_v1 uses the LAION CLIP-H processor and tokenizer.
        let processor_name = args.processor_model.as_deref().or((kind == VerifierKind::Hpsv2
            || (kind == VerifierKind::PickScore && args.model_name.is_none()))
        .then_some(DEFAULT_PICKSCORE_PROCESSOR));
        let processor_source = match processor_name {
            Some(p) => Some(ModelSource::resolve(p).map_err(|e| {
                local_model("processor_model", "a CLIP processor and tokenizer", p, e)
            })?),
            None => None,
        };
        let head = if kind == VerifierKind::LaionAesthetic {
            let spec = args.aesthetic_model.as_deref().unwrap_or(DEFAULT_AESTHETIC);
            let path = aesthetic_file(spec).map_err(|e| {
                local_model("aesthetic_model", "the LAION aesthetic MLP (.pth)", spec, e)
            })?;
            Some(AestheticHead::from_pth(&path, &device).map_err(|e| {
                local_model(
                    "aesthetic_model",
                    "the LAION aesthetic MLP (.pth)",
                    &path.display().to_string(),
                    e,
                )
            })?)
        } else {
            None
        };
        if kind == VerifierKind::Hpsv2 {
            let checkpoint = if Path::new(model_name).is_file() {
                PathBuf::from(model_name)
            } else {
                ModelSource::resolve(model_name)
                    .and_then(|s| s.file(HPSV2_FILE))
                    .map_err(|e| {
                        local_model("model_name", "an HPS v2 checkpoint (.pt)", model_name, e)
                    })?
            };
            let tokenizer_source = processor_source.as_ref().ok_or_else(|| {
                local_model(
                    "processor_model",
                    "a CLIP tokenizer",
                    model_name,
                    "none given",
                )
            })?;
            return Self::load_open_clip(
                kind,
                model_name,
                &checkpoint,
                tokenizer_source,
                device,
                args.concurrency.max(1),
            );
        }
        let source = ModelSource::resolve(model_name).map_err(|e| {
            local_model(
                "model_name",
                "a CLIP model in transformers layout",
                model_name,
                e,
            )
        })?;
        Self::load(
            kind,
            model_name,
            &source,
            processor_source.as_ref(),
            head,
            device,
            args.concurrency.max(1),
        )
    }

    /// Loads an OpenCLIP checkpoint (`{"state_dict": ...}` in a PyTorch pickle, as HPSv2's) with
    /// its `open_clip_config.json` beside it (else the ViT-H-14 config), the BPE tokenizer of
    /// `tokenizer` and OpenCLIP's preprocessing (resize the shorter edge, centre crop rounding
    /// half to even, OpenAI mean and std), in float32 on `device`.
    pub fn load_open_clip(
        kind: VerifierKind,
        model_name: &str,
        checkpoint: &Path,
        tokenizer: &ModelSource,
        device: Device,
        batch: usize,
    ) -> Result<Self, VerifierError> {
        use crate::models::open_clip::{to_transformers_names, OpenClipCfg};
        let err = |e: &dyn std::fmt::Display| {
            local_model(
                "model_name",
                "an OpenCLIP / HPS v2 checkpoint",
                model_name,
                e,
            )
        };
        #[derive(serde::Deserialize)]
        struct ConfigFile {
            model_cfg: OpenClipCfg,
        }
        let config_file = checkpoint.with_file_name("open_clip_config.json");
        let cfg = if config_file.is_file() {
            let value = crate::loading::read_json_file(&config_file).map_err(|e| err(&e))?;
            parse_config::<ConfigFile>(&value, "open_clip_config.json")
                .map_err(|e| err(&e))?
                .model_cfg
        } else {
            OpenClipCfg::vit_h_14()
        };
        let pth = candle_core::pickle::PthTensors::new(checkpoint, Some("state_dict"))
            .or_else(|_| candle_core::pickle::PthTensors::new(checkpoint, None))
            .map_err(|e| {
                err(&format!(
                    "{}: not a PyTorch checkpoint ({e})",
                    checkpoint.display()
                ))
            })?;
        let sd = state_dict(&pth, |_| true).map_err(|e| err(&e))?;
        let renamed = to_transformers_names(&sd, &cfg).map_err(|e| err(&e))?;
        let vb = candle_nn::VarBuilder::from_tensors(renamed, DType::F32, &device);
        let config = cfg.to_clip_config();
        let model = ClipModel::new(vb, &config).map_err(|e| err(&e))?;
        let mut processor = ClipImageProcessor::openai(config.vision_config.image_size);
        processor.crop_rounding = crate::models::clip::CropRounding::HalfEven;
        let tokenizer = clip_tokenizer(tokenizer, "").map_err(|e| {
            local_model(
                "processor_model",
                "a CLIP tokenizer (vocab.json, merges.txt)",
                model_name,
                e,
            )
        })?;
        Ok(Self::assemble(
            kind, model_name, model, processor, tokenizer, None, device, batch,
        ))
    }

    /// The verifier of its parts, float32.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        kind: VerifierKind,
        model_name: &str,
        model: ClipModel,
        processor: ClipImageProcessor,
        tokenizer: ClipTokenizer,
        head: Option<AestheticHead>,
        device: Device,
        batch: usize,
    ) -> Self {
        Self {
            kind,
            model_name: model_name.to_string(),
            model,
            processor,
            tokenizer,
            head,
            device,
            dtype: DType::F32,
            batch,
            text_cache: Mutex::new(HashMap::new()),
        }
    }

    /// Loads CLIP from `source` (config.json, model.safetensors, and, unless `processor` names
    /// another source for them, preprocessor_config.json and the BPE tokenizer) in float32 on
    /// `device`.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        kind: VerifierKind,
        model_name: &str,
        source: &ModelSource,
        processor: Option<&ModelSource>,
        head: Option<AestheticHead>,
        device: Device,
        batch: usize,
    ) -> Result<Self, VerifierError> {
        let err = |e: &dyn std::fmt::Display| {
            local_model(
                "model_name",
                "a CLIP model in transformers layout",
                model_name,
                e,
            )
        };
        let config: ClipConfig = parse_config(
            &source.read_json("config.json").map_err(|e| err(&e))?,
            "config.json",
        )
        .map_err(|e| err(&e))?;
        let proc_source = processor.unwrap_or(source);
        let processor: ClipImageProcessor = if proc_source
            .has_file("preprocessor_config.json")
            .map_err(|e| err(&e))?
        {
            parse_config(
                &proc_source
                    .read_json("preprocessor_config.json")
                    .map_err(|e| err(&e))?,
                "preprocessor_config.json",
            )
            .map_err(|e| err(&e))?
        } else {
            ClipImageProcessor::openai(config.vision_config.image_size)
        };
        if processor.resample != 3 {
            return Err(err(&format!(
                "preprocessor_config.json asks for resample {}; only 3 (bicubic) is implemented",
                processor.resample
            )));
        }
        let tokenizer = clip_tokenizer(proc_source, "").map_err(|e| err(&e))?;
        let files = source
            .weights("", crate::loading::Dtype::F32)
            .map_err(|e| err(&e))?;
        let vb = crate::loading::mmap(&files, DType::F32, &device).map_err(|e| err(&e))?;
        let model = ClipModel::new(vb, &config).map_err(|e| err(&e))?;
        if let Some(width) = head.as_ref().and_then(AestheticHead::input_width) {
            if width != config.projection_dim {
                return Err(err(&format!(
                    "the aesthetic MLP takes {width}-wide embeddings but this CLIP's projection_dim is {}; the LAION predictor needs CLIP ViT-L/14",
                    config.projection_dim
                )));
            }
        }
        Ok(Self::assemble(
            kind, model_name, model, processor, tokenizer, head, device, batch,
        ))
    }

    /// The image processor in use.
    pub fn processor(&self) -> &ClipImageProcessor {
        &self.processor
    }

    /// The normalised text embedding (1, D) of `prompt`.
    fn text_embedding(&self, prompt: &str) -> Result<Tensor, String> {
        let cache = self.text_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(prompt) {
            return Ok(t.clone());
        }
        drop(cache);
        let ids = self.tokenizer.encode(prompt).map_err(|e| e.to_string())?;
        let ids = Tensor::new(ids.as_slice(), &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(|e| e.to_string())?;
        let embeds = self
            .model
            .text_embeds(&ids)
            .and_then(|t| l2_normalize(&t.to_dtype(DType::F32)?))
            .map_err(|e| e.to_string())?;
        self.text_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(prompt.to_string(), embeds.clone());
        Ok(embeds)
    }

    /// The normalised image embeddings (B, D) of `images`, in one batch.
    pub fn image_embeddings(&self, images: &[&image::RgbImage]) -> Result<Tensor, String> {
        let pixels = self
            .processor
            .batch(images, &self.device, self.dtype)
            .map_err(|e| format!("cannot prepare the images: {e}"))?;
        self.model
            .vision
            .forward(&pixels)
            .and_then(|t| l2_normalize(&t.to_dtype(DType::F32)?))
            .map_err(|e| e.to_string())
    }

    /// Grades one batch: every metric for every input.
    fn grade_batch(&self, inputs: &[ImageInput<'_>]) -> Result<Vec<Grading>, String> {
        let images: Vec<&image::RgbImage> = inputs.iter().map(|i| i.image).collect();
        let embeds = self.image_embeddings(&images)?;
        let aesthetic: Option<Vec<f32>> = match &self.head {
            Some(head) => Some(
                head.forward(&embeds)
                    .and_then(|t| t.to_vec1())
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let mut out = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            let text = self.text_embedding(input.prompt)?;
            let cos = embeds
                .get(i)
                .and_then(|row| (row * text.squeeze(0)?)?.sum_all()?.to_scalar::<f32>())
                .map_err(|e| e.to_string())? as f64;
            let mut g = Grading::new();
            if self.kind == VerifierKind::Hpsv2 {
                g.insert(
                    "hpsv2".into(),
                    Score {
                        explanation: format!(
                            "HPS v2: cosine of the {} image and prompt features",
                            self.model_name
                        ),
                        score: cos,
                    },
                );
                out.push(g);
                continue;
            }
            if self.kind == VerifierKind::PickScore {
                let scale = f64::from(self.model.logit_scale).exp();
                g.insert(
                    "pickscore".into(),
                    Score {
                        explanation: format!(
                            "PickScore: exp(logit_scale) = {scale:.4} times the cosine {cos:.6} of the {} image and prompt embeddings",
                            self.model_name
                        ),
                        score: scale * cos,
                    },
                );
                out.push(g);
                continue;
            }
            g.insert(
                "clip_score".into(),
                Score {
                    explanation: format!(
                        "cosine of the {} image and prompt embeddings",
                        self.model_name
                    ),
                    score: cos,
                },
            );
            g.insert(
                "clip_s".into(),
                Score {
                    explanation: "CLIP-S = 2.5 max(cosine, 0) (Hessel et al. 2021)".into(),
                    score: 2.5 * cos.max(0.0),
                },
            );
            if let Some(scores) = &aesthetic {
                g.insert(
                    "laion_aesthetic_score".into(),
                    Score {
                        explanation: "LAION aesthetic predictor on the normalised CLIP image \
                                      embedding (eval mode)"
                            .into(),
                        score: f64::from(scores[i]),
                    },
                );
            }
            out.push(g);
        }
        Ok(out)
    }
}

/// The tensors of a PyTorch state dict whose names (without the `module.` prefix that
/// DataParallel checkpoints add) `keep` accepts, floating-point ones in float32.
pub(crate) fn state_dict(
    pth: &candle_core::pickle::PthTensors,
    keep: impl Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>, String> {
    let mut tensors = HashMap::new();
    for name in pth.tensor_infos().keys() {
        let key = name.strip_prefix("module.").unwrap_or(name);
        if !keep(key) {
            continue;
        }
        if let Some(t) = pth.get(name).map_err(|e| format!("{name}: {e}"))? {
            let t = if t.dtype().is_float() {
                t.to_dtype(DType::F32).map_err(|e| format!("{name}: {e}"))?
            } else {
                t
            };
            tensors.insert(key.to_string(), t);
        }
    }
    Ok(tensors)
}

/// The path of the aesthetic MLP named by `spec`: a `.pth` file, a folder holding
/// [`AESTHETIC_FILE`], or a Hub repo holding it.
fn aesthetic_file(spec: &str) -> Result<PathBuf, String> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    ModelSource::resolve(spec)
        .and_then(|source| source.file(AESTHETIC_FILE))
        .map_err(|e| e.to_string())
}

impl ImageVerifier for ClipVerifier {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn score(&self, inputs: &[ImageInput<'_>]) -> Vec<Result<Grading, ScoreFailure>> {
        let mut out = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(self.batch) {
            match self.grade_batch(chunk) {
                Ok(gradings) => out.extend(gradings.into_iter().map(Ok)),
                Err(message) => out.extend(chunk.iter().map(|_| {
                    Err(ScoreFailure {
                        message: format!("{}: {message}", self.kind.name()),
                        attempts: 1,
                        fatal: false,
                    })
                })),
            }
        }
        out
    }
}
