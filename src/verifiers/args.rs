//! `verifier_args`: which judge, which metric, and how to call it, read and checked before
//! anything loads. The same object describes an `ensemble` member and an `also_score` verifier.

use std::path::PathBuf;

use super::VerifierKind;
use crate::device::{parse_device, DeviceSpec};
use crate::keys::{KeyError, Section};

/// The keys of `verifier_args`.
pub const KEYS: [&str; 21] = [
    "name",
    "also_score_best_only",
    "processor_model",
    "aesthetic_model",
    "ensemble",
    "also_score",
    "choice_of_metric",
    "max_new_tokens",
    "model_name",
    "prompt_path",
    "base_url",
    "seed",
    "concurrency",
    "max_attempts",
    "max_invalid_replies",
    "timeout_s",
    "device",
    "use_low_gpu_vram",
    "dtype",
    "video_frames",
    "video_combine",
];

/// How the per-frame gradings of a video combine into the video's, metric by metric
/// (`video_combine`), when a verifier that grades images grades a video.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FrameCombine {
    /// `mean`: the average of the frames' scores (the default).
    #[default]
    Mean,
    /// `min`: the worst frame's score.
    Min,
    /// `max`: the best frame's score.
    Max,
}

impl FrameCombine {
    /// The spellings `video_combine` takes.
    pub const CHOICES: [(&'static str, FrameCombine); 3] = [
        ("mean", FrameCombine::Mean),
        ("min", FrameCombine::Min),
        ("max", FrameCombine::Max),
    ];

    /// Its name in configs.
    pub fn name(self) -> &'static str {
        match self {
            FrameCombine::Mean => "mean",
            FrameCombine::Min => "min",
            FrameCombine::Max => "max",
        }
    }
}

/// `verifier_args`: which judge, which metric, and how to call it.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifierArgs {
    /// `name`: the verifier.
    pub kind: VerifierKind,
    /// `choice_of_metric`: the metric selection uses (one the verifier grades).
    pub choice_of_metric: String,
    /// `max_new_tokens`: the reply's token budget (Gemini: `maxOutputTokens`; OpenAI:
    /// `max_completion_tokens`).
    pub max_new_tokens: Option<u32>,
    /// `model_name`: the API model id or the local model; each verifier has its default.
    pub model_name: Option<String>,
    /// `prompt_path`: a file whose text replaces the built-in grading rubric.
    pub prompt_path: Option<PathBuf>,
    /// `base_url`: API base URL (else the verifier's environment variable, else its default).
    pub base_url: Option<String>,
    /// `seed`: sent to APIs that accept a sampling seed.
    pub seed: Option<u64>,
    /// `concurrency`: requests in flight at once (default 4).
    pub concurrency: usize,
    /// `max_attempts`: HTTP attempts per image on 429, 5xx and timeouts (default 5).
    pub max_attempts: u32,
    /// `max_invalid_replies`: times a reply that does not fit the schema is asked again (default 2).
    pub max_invalid_replies: u32,
    /// `timeout_s`: per-request timeout in seconds (default 120).
    pub timeout_s: f64,
    /// `device`: where a local verifier runs; `None`: beside the diffusion model (auto).
    pub device: Option<DeviceSpec>,
    /// `processor_model`: where a CLIP verifier's image processor and tokenizer come from when
    /// not from `model_name` (PickScore's default: `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`);
    /// `image_reward`'s BERT tokenizer (default `google-bert/bert-base-uncased`).
    pub processor_model: Option<String>,
    /// `ensemble`: the members of the `ensemble` verifier (each a full `verifier_args`).
    pub ensemble: Vec<VerifierArgs>,
    /// `also_score`: verifiers that grade every candidate too, recorded, never used to select.
    pub also_score: Vec<VerifierArgs>,
    /// `also_score_best_only`: the `also_score` verifiers grade only each round's best.
    pub also_score_best_only: bool,
    /// `aesthetic_model`: the aesthetic MLP of `laion_aesthetic`, a `.pth` file or a Hub repo
    /// holding `aesthetic-model.pth` (default `trl-lib/ddpo-aesthetic-predictor`).
    pub aesthetic_model: Option<String>,
    /// `video_frames`: how many frames of a video a verifier that grades images grades (evenly
    /// spaced from the first to the last; default 3: the first, middle and last).
    pub video_frames: usize,
    /// `video_combine`: how those frames' scores make the video's (default `mean`).
    pub video_combine: FrameCombine,
}

impl VerifierArgs {
    /// Arguments of verifier `kind` selecting by `choice_of_metric`, with every optional key
    /// at its default.
    pub fn new(kind: VerifierKind, choice_of_metric: &str) -> Self {
        Self {
            kind,
            choice_of_metric: choice_of_metric.to_string(),
            max_new_tokens: None,
            model_name: None,
            prompt_path: None,
            base_url: None,
            seed: None,
            concurrency: 4,
            max_attempts: 5,
            max_invalid_replies: 2,
            timeout_s: 120.0,
            device: None,
            aesthetic_model: None,
            processor_model: None,
            ensemble: Vec::new(),
            also_score: Vec::new(),
            also_score_best_only: false,
            video_frames: 3,
            video_combine: FrameCombine::Mean,
        }
    }

    /// The verifier's name as configs spell it.
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// Reads a `verifier_args` object: the top-level one (`nested` false), or a member of its
    /// `ensemble` / `also_score` lists; with `optional_metric`, `choice_of_metric` may be left
    /// out (it then is the verifier's first metric).
    pub fn read(s: &Section<'_>, nested: bool, optional_metric: bool) -> Result<Self, KeyError> {
        s.check_keys(&KEYS);
        let kinds: Vec<VerifierKind> = VerifierKind::ALL
            .iter()
            .copied()
            .filter(|k| !nested || !k.is_ensemble())
            .collect();
        let allowed_names = format!(
            "allowed: {}",
            kinds
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let name = s.required_string("name", &allowed_names)?;
        let kind = kinds
            .iter()
            .copied()
            .find(|k| k.name() == name)
            .ok_or_else(|| s.invalid("name", format!("is \"{name}\"; {allowed_names}")))?;
        let allowed = kind.metrics();
        let metrics = allowed.join(", ");
        let metric = match (optional_metric, s.string("choice_of_metric")?) {
            (_, Some(m)) => m,
            (true, None) => allowed.first().copied().unwrap_or_default().to_string(),
            (false, None) => {
                s.required_string("choice_of_metric", &format!("allowed: {metrics}"))?
            }
        };
        if !allowed.contains(&metric.as_str()) {
            return Err(s.invalid(
                "choice_of_metric",
                format!("is \"{metric}\"; the {name} verifier grades: {metrics}"),
            ));
        }
        let mut args = VerifierArgs::new(kind, &metric);
        args.max_new_tokens = s
            .uint_in("max_new_tokens", 1, 32_768)?
            .map(|t| u32::try_from(t).unwrap_or(u32::MAX));
        args.model_name = s.string("model_name")?;
        args.aesthetic_model = s.string("aesthetic_model")?;
        args.processor_model = s.string("processor_model")?;
        if args
            .model_name
            .as_ref()
            .is_some_and(|m| m.trim().is_empty())
        {
            return Err(s.invalid(
                "model_name",
                "is empty; leave it out to use the verifier's default model",
            ));
        }
        args.prompt_path = read_prompt_path(s)?;
        args.base_url = s.string("base_url")?;
        if let Some(u) = &args.base_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(s.invalid(
                    "base_url",
                    format!("is \"{u}\"; it must start with http:// or https://"),
                ));
            }
        }
        args.seed = s.uint("seed", 0)?;
        if let Some(c) = s.count_in("concurrency", 1, u64::MAX)? {
            if c > 256 {
                return Err(s.invalid("concurrency", format!("is {c}; at most 256")));
            }
            args.concurrency = c;
        }
        if let Some(a) = s.uint_in("max_attempts", 1, 100)? {
            args.max_attempts = a as u32;
        }
        if let Some(a) = s.uint_in("max_invalid_replies", 0, 20)? {
            args.max_invalid_replies = a as u32;
        }
        if let Some(t) = s.number_in("timeout_s", (0.0, true), 3600.0)? {
            args.timeout_s = t;
        }
        if let Some(d) = s.string("device")? {
            args.device = Some(parse_device(&d).ok_or_else(|| {
                s.invalid("device", format!("is \"{d}\"; allowed: cpu, cuda, cuda:N"))
            })?);
        }
        s.boolean("use_low_gpu_vram")?;
        if let Some(n) = s.count_in("video_frames", 1, 1024)? {
            args.video_frames = n;
        }
        if let Some(c) = s.choice("video_combine", &FrameCombine::CHOICES)? {
            args.video_combine = c;
        }
        if kind.is_ensemble() {
            args.ensemble = read_list(s, "ensemble", true)?;
            if args.ensemble.len() < 2 {
                return Err(s.invalid(
                    "ensemble",
                    "needs at least 2 members, each a verifier_args object ({\"name\": ..., \"choice_of_metric\": ...})",
                ));
            }
        } else if s.has("ensemble") {
            return Err(s.invalid(
                "ensemble",
                format!("is only for verifier_args.name \"ensemble\", not \"{name}\""),
            ));
        }
        if s.has("also_score") {
            if nested {
                return Err(s.invalid("also_score", "belongs in the top-level verifier_args only"));
            }
            args.also_score = read_list(s, "also_score", false)?;
        }
        args.also_score_best_only = s.boolean("also_score_best_only")?.unwrap_or(false);
        Ok(args)
    }
}

/// `prompt_path`, resolved: a relative path is looked for in the current folder, then beside
/// the config.
fn read_prompt_path(s: &Section<'_>) -> Result<Option<PathBuf>, KeyError> {
    let Some(pp) = s.string("prompt_path")?.map(PathBuf::from) else {
        return Ok(None);
    };
    if pp.is_file() {
        return Ok(Some(pp));
    }
    let beside = s.beside_file(&pp.display().to_string());
    if let Some(b) = beside.as_ref().filter(|b| b.is_file()) {
        return Ok(Some(b.clone()));
    }
    let looked = match &beside {
        Some(b) => format!(
            "looked for {} (from the current folder) and {} (beside the config)",
            pp.display(),
            b.display()
        ),
        None => format!("looked for {}", pp.display()),
    };
    Err(s.invalid(
        "prompt_path",
        format!("is not a readable file ({looked}); give the path of a text file holding the grading rubric"),
    ))
}

/// The verifier list `key` (`ensemble` or `also_score`): an array of `verifier_args` objects,
/// each checked at its JSON path (`verifier_args.ensemble[1].name`...).
fn read_list(s: &Section<'_>, key: &str, ensemble: bool) -> Result<Vec<VerifierArgs>, KeyError> {
    s.objects(key, "verifier_args object", "[{\"name\": ...}, ...]")?
        .iter()
        .map(|member| VerifierArgs::read(member, true, !ensemble))
        .collect()
}
