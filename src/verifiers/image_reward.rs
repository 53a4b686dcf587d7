//! `image_reward`: ImageReward v1.0 (Xu et al. 2023, `THUDM/ImageReward`), the human-preference
//! reward the paper's ensemble uses, local and batched. BLIP's ViT-L/16 encodes the image, BLIP's
//! BERT encodes the prompt while attending to the image tokens, and a five-layer linear MLP on
//! the first token gives the reward, normalised as the published model does:
//! `(r - 0.16717362830052426) / 1.0333394966054072` (metric `image_reward`; about 0 for an
//! average image, higher is better).
//!
//! Files: `ImageReward.pt` (a PyTorch pickle of the state dict) and `med_config.json` from
//! `verifier_args.model_name` (a Hub repo or folder, default `THUDM/ImageReward`, or the `.pt`
//! file with `med_config.json` beside it); bert-base-uncased's `tokenizer.json` from
//! `verifier_args.processor_model` (default `google-bert/bert-base-uncased`). A
//! `blip_vision_config.json` beside the checkpoint sets other ViT sizes (the tiny test model's).
//! Preprocessing is ImageReward's torchvision transform: resize the shorter edge to 224 with
//! Pillow's bicubic, centre-crop (offsets rounded half to even), OpenAI CLIP mean and std.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::clip::AestheticHead;
use super::{Grading, Score, ScoreFailure, ImageVerifier, VerifierError, ImageInput};
use super::registry::{Built, VerifierSpec};
use super::VerifierArgs;
use crate::media::MediaKind;
use crate::loading::{parse_config, read_json_file, ModelSource};
use crate::models::blip::{
    BlipTokenizer, BlipVisionConfig, BlipVisionTransformer, MedBertModel, MedConfig,
    IMAGE_REWARD_MAX_LENGTH,
};
use crate::models::clip::{ClipImageProcessor, CropRounding};

/// `image_reward` in the verifier table: ImageReward v1.0.
pub const SPEC: VerifierSpec = VerifierSpec {
    name: "image_reward",
    metrics: &["image_reward"],
    media: &[MediaKind::Image],
    build: |args, _| Ok(Built::Images(Box::new(ImageRewardVerifier::from_args(args)?))),
};

/// ImageReward's Hub repo, used when `verifier_args.model_name` is unset.
pub const DEFAULT_IMAGE_REWARD: &str = "THUDM/ImageReward";
/// The checkpoint in that repo.
pub const IMAGE_REWARD_FILE: &str = "ImageReward.pt";
/// The text encoder's config in that repo.
pub const MED_CONFIG_FILE: &str = "med_config.json";
/// The optional ViT config beside the checkpoint (a tt-scale file; ViT-L/16 when absent).
pub const VISION_CONFIG_FILE: &str = "blip_vision_config.json";
/// Where the tokenizer comes from when `verifier_args.processor_model` is unset.
pub const DEFAULT_BERT_TOKENIZER: &str = "google-bert/bert-base-uncased";
/// The mean of the raw reward, subtracted by the published model.
pub const REWARD_MEAN: f64 = 0.167_173_628_300_524_26;
/// The standard deviation of the raw reward, divided by the published model.
pub const REWARD_STD: f64 = 1.033_339_496_605_407_2;

/// ImageReward on the verifier's device, float32.
pub struct ImageRewardVerifier {
    model_name: String,
    vision: BlipVisionTransformer,
    text: MedBertModel,
    head: AestheticHead,
    tokenizer: BlipTokenizer,
    processor: ClipImageProcessor,
    device: Device,
    batch: usize,
}

impl std::fmt::Debug for ImageRewardVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageRewardVerifier")
            .field("model", &self.model_name)
            .field("device", &self.device)
            .finish()
    }
}

fn model_error(model: &str, e: impl std::fmt::Display) -> VerifierError {
    VerifierError::LocalModel {
        key: "model_name",
        expected: "ImageReward (ImageReward.pt and med_config.json)",
        model: model.to_string(),
        message: e.to_string(),
    }
}

impl ImageRewardVerifier {
    /// Builds the verifier of `args`: the model from `model_name` (default
    /// [`DEFAULT_IMAGE_REWARD`]), the tokenizer from `processor_model` (default
    /// [`DEFAULT_BERT_TOKENIZER`]), on `device`, `concurrency` images a batch.
    pub fn from_args(args: &VerifierArgs) -> Result<Self, VerifierError> {
        let device = super::open_device(args.device)?;
        let model_name = args.model_name.as_deref().unwrap_or(DEFAULT_IMAGE_REWARD);
        let (checkpoint, med_config) = if Path::new(model_name).is_file() {
            let checkpoint = PathBuf::from(model_name);
            let med = checkpoint.with_file_name(MED_CONFIG_FILE);
            (checkpoint, med)
        } else {
            let source =
                ModelSource::resolve(model_name).map_err(|e| model_error(model_name, e))?;
            let checkpoint = source
                .file(IMAGE_REWARD_FILE)
                .map_err(|e| model_error(model_name, e))?;
            let med = source
                .file(MED_CONFIG_FILE)
                .map_err(|e| model_error(model_name, e))?;
            (checkpoint, med)
        };
        let tokenizer_name = args
            .processor_model
            .as_deref()
            .unwrap_or(DEFAULT_BERT_TOKENIZER);
        let tokenizer_err = |e: &dyn std::fmt::Display| VerifierError::LocalModel {
            key: "processor_model",
            expected: "bert-base-uncased's tokenizer (tokenizer.json)",
            model: tokenizer_name.to_string(),
            message: e.to_string(),
        };
        let tokenizer_file = if Path::new(tokenizer_name).is_file() {
            PathBuf::from(tokenizer_name)
        } else {
            ModelSource::resolve(tokenizer_name)
                .and_then(|s| s.file("tokenizer.json"))
                .map_err(|e| tokenizer_err(&e))?
        };
        let tokenizer =
            BlipTokenizer::from_tokenizer_json(&tokenizer_file, IMAGE_REWARD_MAX_LENGTH)
                .map_err(|e| tokenizer_err(&e))?;
        Self::load(
            model_name,
            &checkpoint,
            &med_config,
            tokenizer,
            device,
            args.concurrency.max(1),
        )
    }

    /// Loads the checkpoint at `checkpoint` with the text encoder's `med_config` (and
    /// [`VISION_CONFIG_FILE`] beside the checkpoint when present) in float32 on `device`.
    pub fn load(
        model_name: &str,
        checkpoint: &Path,
        med_config: &Path,
        tokenizer: BlipTokenizer,
        device: Device,
        batch: usize,
    ) -> Result<Self, VerifierError> {
        let err = |e: &dyn std::fmt::Display| model_error(model_name, e);
        let med: MedConfig = parse_config(
            &read_json_file(med_config).map_err(|e| err(&e))?,
            MED_CONFIG_FILE,
        )
        .map_err(|e| err(&e))?;
        let vision_file = checkpoint.with_file_name(VISION_CONFIG_FILE);
        let vision_config: BlipVisionConfig = if vision_file.is_file() {
            parse_config(
                &read_json_file(&vision_file).map_err(|e| err(&e))?,
                VISION_CONFIG_FILE,
            )
            .map_err(|e| err(&e))?
        } else {
            BlipVisionConfig::default()
        };
        let pth = candle_core::pickle::PthTensors::new(checkpoint, None).map_err(|e| {
            err(&format!(
                "{}: not a PyTorch state dict ({e})",
                checkpoint.display()
            ))
        })?;
        let tensors = super::clip::state_dict(&pth, |key| {
            key.starts_with("blip.visual_encoder.")
                || key.starts_with("blip.text_encoder.")
                || key.starts_with("mlp.")
        })
        .map_err(|e| err(&e))?;
        let head = AestheticHead::from_lookup(
            &|name| Ok(tensors.get(name).cloned()),
            "mlp.",
            "ImageReward's checkpoint",
            &device,
        )
        .map_err(|e| err(&e))?;
        if head.input_width() != Some(med.hidden_size) {
            return Err(err(&format!(
                "the reward head takes {:?}-wide features but med_config.json's hidden_size is {}",
                head.input_width(),
                med.hidden_size
            )));
        }
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &device);
        let vision = BlipVisionTransformer::new(vb.pp("blip").pp("visual_encoder"), &vision_config)
            .map_err(|e| err(&e))?;
        let text = MedBertModel::new(
            vb.pp("blip").pp("text_encoder"),
            &med,
            vision_config.hidden_size,
        )
        .map_err(|e| err(&e))?;
        if text.max_positions() < IMAGE_REWARD_MAX_LENGTH {
            return Err(err(&format!(
                "med_config.json's max_position_embeddings {} is under the {IMAGE_REWARD_MAX_LENGTH} tokens ImageReward encodes",
                text.max_positions()
            )));
        }
        let mut processor = ClipImageProcessor::openai(vision_config.image_size);
        processor.crop_rounding = CropRounding::HalfEven;
        Ok(Self {
            model_name: model_name.to_string(),
            vision,
            text,
            head,
            tokenizer,
            processor,
            device,
            batch,
        })
    }

    /// The image processor in use (ImageReward's torchvision transform).
    pub fn processor(&self) -> &ClipImageProcessor {
        &self.processor
    }

    /// The tokenizer in use.
    pub fn tokenizer(&self) -> &BlipTokenizer {
        &self.tokenizer
    }

    /// The normalised rewards of `images` for `prompt`, one batch.
    pub fn rewards(&self, prompt: &str, images: &[&image::RgbImage]) -> Result<Vec<f64>, String> {
        let (ids, mask) = self.tokenizer.encode(prompt).map_err(|e| e.to_string())?;
        let b = images.len();
        let run = || -> candle_core::Result<Vec<f32>> {
            let pixels = self.processor.batch(images, &self.device, DType::F32)?;
            let image_tokens = self.vision.forward(&pixels)?;
            let t = ids.len();
            let ids = Tensor::new(ids.as_slice(), &self.device)?
                .reshape((1, t))?
                .repeat((b, 1))?;
            let mask = Tensor::new(mask.as_slice(), &self.device)?
                .reshape((1, t))?
                .repeat((b, 1))?;
            let hidden = self.text.forward(&ids, &mask, &image_tokens)?;
            let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
            self.head.forward(&first)?.to_vec1()
        };
        let raw = run().map_err(|e| e.to_string())?;
        Ok(raw
            .into_iter()
            .map(|r| (f64::from(r) - REWARD_MEAN) / REWARD_STD)
            .collect())
    }

    /// Grades one batch of one or more prompts (a batch per distinct prompt).
    fn grade_batch(&self, inputs: &[ImageInput<'_>]) -> Result<Vec<Grading>, String> {
        let mut out: Vec<Option<Grading>> = vec![None; inputs.len()];
        let mut prompts: Vec<&str> = inputs.iter().map(|i| i.prompt).collect();
        prompts.sort_unstable();
        prompts.dedup();
        for prompt in prompts {
            let rows: Vec<usize> = (0..inputs.len())
                .filter(|&i| inputs[i].prompt == prompt)
                .collect();
            let images: Vec<&image::RgbImage> = rows.iter().map(|&i| inputs[i].image).collect();
            let rewards = self.rewards(prompt, &images)?;
            for (&row, reward) in rows.iter().zip(rewards) {
                let mut g = Grading::new();
                g.insert(
                    "image_reward".into(),
                    Score {
                        explanation: format!(
                            "ImageReward ({}): BLIP reward, normalised (r - {REWARD_MEAN}) / {REWARD_STD}",
                            self.model_name
                        ),
                        score: reward,
                    },
                );
                out[row] = Some(g);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

impl ImageVerifier for ImageRewardVerifier {
    fn name(&self) -> &str {
        "image_reward"
    }

    fn score(&self, inputs: &[ImageInput<'_>]) -> Vec<Result<Grading, ScoreFailure>> {
        let mut out = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(self.batch) {
            match self.grade_batch(chunk) {
                Ok(gradings) => out.extend(gradings.into_iter().map(Ok)),
                Err(message) => out.extend(chunk.iter().map(|_| {
                    Err(ScoreFailure {
                        message: format!("image_reward: {message}"),
                        attempts: 1,
                        fatal: false,
                    })
                })),
            }
        }
        out
    }
}
