//! The local Qwen2.5-VL verifier: grades images on this machine with a Qwen2.5-VL model (the
//! 7B Instruct by default, or any `model_name` of this architecture, Hub repo or folder), with
//! decoding constrained to the grading JSON ([`super::constrained`]) so every reply parses.
//!
//! A pool is scored in batches of `verifier_args.concurrency` images; the system-prompt prefix
//! (identical for every image) is run through the model once and its KV cache shared by all
//! rows. Each reply is sampled at temperature 1 (as the original's outlines multinomial
//! sampler) from its own generator seeded with `verifier_args.seed` (default 1994), so a reply
//! depends only on its image, prompt and seed, not on its batch.

use std::sync::Mutex;

use candle_core::{DType, Device, IndexOp, Tensor};
use rand::{Rng, SeedableRng};

use super::constrained::{Allowed, GradingGrammar, GrammarState, Vocabulary};
use super::{
    load_rubric, parse_grading, CallStats, Grading, ScoreFailure, ImageVerifier, VerifierError,
    ImageInput,
};
use super::registry::{Built, VerifierSpec};
use super::METRICS;
use super::VerifierArgs;
use crate::media::MediaKind;
use crate::models::qwen2_5_vl::processor::{chat_parts, rope_positions};
use crate::models::qwen2_5_vl::{KvCache, Qwen25Vl, QwenError};
use crate::ops::KeyMask;

/// `qwen` in the verifier table: a local Qwen2.5-VL, its decoding constrained to the grading
/// schema; under `--low-vram` the model is loaded only while it grades.
pub const SPEC: VerifierSpec = VerifierSpec {
    name: "qwen",
    metrics: &METRICS,
    media: &[MediaKind::Image],
    build: |args, ctx| {
        let options = QwenOptions {
            low_vram: ctx.low_vram,
            ..QwenOptions::default()
        };
        Ok(Built::Images(Box::new(QwenVerifier::new(args, options)?)))
    },
};

/// Model used when `verifier_args.model_name` is unset.
pub const DEFAULT_MODEL: &str = "Qwen/Qwen2.5-VL-7B-Instruct";
/// Reply budget when `verifier_args.max_new_tokens` is unset.
pub const DEFAULT_MAX_NEW_TOKENS: u32 = 800;
/// Sampling seed when `verifier_args.seed` is unset (the original's).
pub const DEFAULT_SEED: u64 = 1994;

/// Settings of the local verifier that do not come from `verifier_args`.
#[derive(Clone, Debug)]
pub struct QwenOptions {
    /// Load the model only while scoring and free it afterwards (`--low-vram`).
    pub low_vram: bool,
    /// Run the common system-prompt prefix once and share its KV cache across the batch.
    pub share_prefix: bool,
    /// Compute dtype; `None`: bf16 on CUDA, f32 on CPU.
    pub dtype: Option<DType>,
    /// Constrained decoding: feed a run of tokens that the grammar forces (the fixed JSON text
    /// between the model's choices) as one forward pass, when every unfinished row of the batch
    /// is in such a run, instead of one decode step per token.
    pub fast_forward: bool,
}

impl Default for QwenOptions {
    fn default() -> Self {
        Self {
            low_vram: false,
            share_prefix: true,
            dtype: None,
            fast_forward: true,
        }
    }
}

/// How to decode a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoding {
    /// Constrained to the grading JSON (what [`Verifier::score`] uses).
    Constrained,
    /// Unconstrained, stopping at the end-of-turn token or after this many tokens.
    Free {
        /// Token budget.
        max_new_tokens: usize,
    },
}

/// One generated reply.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// The reply text (special tokens removed).
    pub text: String,
    /// Tokens generated, the end-of-turn token included.
    pub tokens: usize,
    /// Forward passes of the batch after the prefill (fewer than the tokens where forced runs
    /// went through as one pass each, see [`QwenOptions::fast_forward`]).
    pub decode_steps: usize,
}

struct Loaded {
    model: Qwen25Vl,
    /// The shared prefix's ids and its KV cache (one row).
    prefix: Option<(Vec<u32>, KvCache)>,
}

struct State {
    loaded: Option<Loaded>,
    stats: CallStats,
}

/// Grades images with a local Qwen2.5-VL.
pub struct QwenVerifier {
    model_name: String,
    device: Device,
    dtype: DType,
    rubric: String,
    seed: u64,
    batch: usize,
    options: QwenOptions,
    vocab: Vocabulary,
    grammar: GradingGrammar,
    end_tokens: Vec<u32>,
    state: Mutex<State>,
}

impl std::fmt::Debug for QwenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenVerifier")
            .field("model_name", &self.model_name)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .finish()
    }
}

fn model_error(model: &str, e: impl std::fmt::Display) -> VerifierError {
    VerifierError::LocalModel {
        key: "model_name",
        expected: "a Qwen2.5-VL model",
        model: model.to_string(),
        message: e.to_string(),
    }
}

impl QwenVerifier {
    /// Builds the verifier from `verifier_args` with default [`QwenOptions`].
    pub fn from_args(args: &VerifierArgs) -> Result<Self, VerifierError> {
        Self::new(args, QwenOptions::default())
    }

    /// Builds the verifier: reads the rubric, checks the budget against the grading grammar
    /// (an error when `max_new_tokens` cannot hold the JSON), and loads the model now unless
    /// `options.low_vram`.
    pub fn new(args: &VerifierArgs, options: QwenOptions) -> Result<Self, VerifierError> {
        let rubric = load_rubric(args)?;
        let model_name = args
            .model_name
            .clone()
            .unwrap_or_else(|| DEFAULT_MODEL.to_string());
        let device = super::open_device(args.device)?;
        let dtype = options.dtype.unwrap_or(if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        });
        let max_new = args.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS) as usize;
        let model =
            Qwen25Vl::load(&model_name, dtype, &device).map_err(|e| model_error(&model_name, e))?;
        let vocab = Vocabulary::from_tokenizer(&model.tokenizer);
        let tok = &model.tokenizer;
        let tokenize = |t: &str| -> Result<Vec<u32>, String> {
            tok.encode(t, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| e.to_string())
        };
        let end = tok
            .token_to_id("<|im_end|>")
            .ok_or_else(|| model_error(&model_name, "the tokenizer has no <|im_end|> token"))?;
        let mut end_tokens = vec![end];
        end_tokens.extend(tok.token_to_id("<|endoftext|>"));
        let grammar =
            GradingGrammar::new(&vocab, &tokenize, end, max_new).map_err(|e| match e {
                super::constrained::GrammarError::BudgetTooSmall { .. } => {
                    VerifierError::InvalidArg {
                        field: "max_new_tokens",
                        message: e.to_string(),
                    }
                }
                other => model_error(&model_name, other),
            })?;
        let loaded = (!options.low_vram).then_some(Loaded {
            model,
            prefix: None,
        });
        Ok(Self {
            model_name,
            device,
            dtype,
            rubric,
            seed: args.seed.unwrap_or(DEFAULT_SEED),
            batch: args.concurrency.max(1),
            options,
            vocab,
            grammar,
            end_tokens,
            state: Mutex::new(State {
                loaded,
                stats: CallStats::default(),
            }),
        })
    }

    /// The model id or folder in use.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// The grading grammar (its budget and explanation cap).
    pub fn grammar(&self) -> &GradingGrammar {
        &self.grammar
    }

    /// Generates one reply per input (in input order) with `decoding`, in batches of
    /// `verifier_args.concurrency`. A reply cut short by the budget is a [`ScoreFailure`].
    pub fn generate(
        &self,
        inputs: &[ImageInput<'_>],
        decoding: Decoding,
    ) -> Vec<Result<Reply, ScoreFailure>> {
        let fail = |message: String| ScoreFailure {
            message,
            attempts: 1,
            fatal: false,
        };
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if state.loaded.is_none() {
            match Qwen25Vl::load(&self.model_name, self.dtype, &self.device) {
                Ok(model) => {
                    state.loaded = Some(Loaded {
                        model,
                        prefix: None,
                    })
                }
                Err(e) => {
                    let m = format!("cannot load the Qwen model {}: {e}", self.model_name);
                    return inputs.iter().map(|_| Err(fail(m.clone()))).collect();
                }
            }
        }
        let mut out = Vec::with_capacity(inputs.len());
        if let Some(loaded) = state.loaded.as_mut() {
            for chunk in inputs.chunks(self.batch) {
                match self.generate_batch(loaded, chunk, decoding) {
                    Ok(replies) => out.extend(replies.into_iter().map(|r| r.map_err(fail))),
                    Err(e) => {
                        let m = format!("the Qwen model failed: {e}");
                        out.extend(chunk.iter().map(|_| Err(fail(m.clone()))));
                    }
                }
            }
        }
        if self.options.low_vram {
            state.loaded = None;
        }
        state.stats.requests += inputs.len() as u64;
        out
    }

    fn generate_batch(
        &self,
        loaded: &mut Loaded,
        items: &[ImageInput<'_>],
        decoding: Decoding,
    ) -> Result<Vec<Result<Reply, String>>, QwenError> {
        let model = &loaded.model;
        let dev = model.text.device().clone();
        let merge = model.config.vision.spatial_merge_size;
        let b = items.len();
        // Per row: image features, the text after the image, positions, rope offset.
        let (prefix_text, _) = chat_parts(&self.rubric, "");
        let prefix_ids = model.tokenize(&prefix_text)?;
        let p = prefix_ids.len();
        let mut rows = Vec::with_capacity(b);
        for it in items {
            let img = model.processor.preprocess(it.image)?;
            let feats = model.image_features(&img)?;
            let (_, suffix) = chat_parts(&self.rubric, it.prompt);
            let suffix_ids = model.tokenize(&suffix)?;
            let n_img = img.num_tokens(merge);
            let (pos, delta) = rope_positions(p, img.grid_thw, merge, suffix_ids.len());
            rows.push((feats, suffix_ids, n_img, pos, delta));
        }
        let share = self.options.share_prefix;
        if share
            && loaded
                .prefix
                .as_ref()
                .is_none_or(|(ids, _)| *ids != prefix_ids)
        {
            let ids = Tensor::new(prefix_ids.as_slice(), &dev)?.unsqueeze(0)?;
            let emb = model.text.embed(&ids)?;
            let pos: Vec<[i64; 3]> = (0..p as i64).map(|i| [i, i, i]).collect();
            let mask = KeyMask {
                causal: true,
                ..KeyMask::default()
            };
            let mut cache = KvCache::new(model.text.num_layers());
            model.text.forward_hidden(&emb, &[pos], &mask, &mut cache)?;
            loaded.prefix = Some((prefix_ids.clone(), cache));
        }
        let model = &loaded.model;
        // The part each row runs itself: (prefix unless shared) + image + suffix.
        let own_start = if share { p } else { 0 };
        let lens: Vec<usize> = rows
            .iter()
            .map(|r| (p - own_start) + r.2 + r.1.len())
            .collect();
        let lmax = lens.iter().copied().max().unwrap_or(0);
        let hidden = model.config.text.hidden_size;
        let mut embeds = Vec::with_capacity(b);
        let mut positions = Vec::with_capacity(b);
        let mut pads = Vec::with_capacity(b); // left padding of each row
        for (r, &len) in rows.iter().zip(&lens) {
            let pad = lmax - len;
            let mut parts = Vec::new();
            if pad > 0 {
                parts.push(Tensor::zeros((pad, hidden), model.text.dtype(), &dev)?);
            }
            if !share {
                let ids = Tensor::new(prefix_ids.as_slice(), &dev)?.unsqueeze(0)?;
                parts.push(model.text.embed(&ids)?.squeeze(0)?);
            }
            parts.push(r.0.to_dtype(model.text.dtype())?);
            let ids = Tensor::new(r.1.as_slice(), &dev)?.unsqueeze(0)?;
            parts.push(model.text.embed(&ids)?.squeeze(0)?);
            embeds.push(Tensor::cat(&parts, 0)?);
            let mut pos = vec![[0i64; 3]; pad];
            pos.extend_from_slice(&r.3[own_start..]);
            positions.push(pos);
            pads.push(pad);
        }
        let embeds = Tensor::stack(&embeds, 0)?;
        let mut cache = match (&loaded.prefix, share) {
            (Some((_, c)), true) => c.repeat_rows(b)?,
            _ => KvCache::new(model.text.num_layers()),
        };
        // Every row sees the cached prefix, none sees a padded key, each its own keys causally;
        // the decode steps keep the same holes.
        let cached = cache.len();
        let mask = KeyMask {
            lens: None,
            holes: Some(
                pads.iter()
                    .map(|&pad| (cached as u32, (cached + pad) as u32))
                    .collect(),
            ),
            causal: true,
        };
        let h = model
            .text
            .forward_hidden(&embeds, &positions, &mask, &mut cache)?;
        let mut logits = model.text.logits(&h.i((.., lmax - 1, ..))?.contiguous()?)?;
        // Decode.
        let mut next_pos: Vec<i64> = rows.iter().map(|r| r.3.len() as i64 + r.4).collect();
        let mut rngs: Vec<rand::rngs::StdRng> = (0..b)
            .map(|_| rand::rngs::StdRng::seed_from_u64(self.seed))
            .collect();
        let mut states: Vec<GrammarState> = (0..b).map(|_| self.grammar.start()).collect();
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut done = vec![false; b];
        let budget = match decoding {
            Decoding::Constrained => self.grammar.max_new_tokens(),
            Decoding::Free { max_new_tokens } => max_new_tokens,
        };
        // Takes token `t` as row `i`'s next: appends it and advances the row's grammar (or, free,
        // stops at an end token).
        let accept = |i: usize,
                      t: u32,
                      tokens: &mut Vec<Vec<u32>>,
                      states: &mut Vec<GrammarState>,
                      done: &mut Vec<bool>| {
            tokens[i].push(t);
            match decoding {
                Decoding::Constrained => {
                    if self
                        .grammar
                        .advance(&self.vocab, &mut states[i], t)
                        .is_err()
                        || self.grammar.is_done(&states[i])
                    {
                        done[i] = true;
                    }
                }
                Decoding::Free { .. } => {
                    if self.end_tokens.contains(&t) {
                        done[i] = true;
                    }
                }
            }
        };
        let fast_forward = self.options.fast_forward && decoding == Decoding::Constrained;
        let mut generated = 0;
        let mut steps = 0;
        while generated < budget {
            // The next token of every row, from the logits.
            let host: Vec<Vec<f32>> = logits.to_vec2()?;
            let mut chunk: Vec<Vec<u32>> = vec![Vec::new(); b];
            for i in 0..b {
                if done[i] {
                    chunk[i].push(self.end_tokens[0]);
                    continue;
                }
                let t = match decoding {
                    Decoding::Constrained => match self.grammar.allowed(&states[i]) {
                        Allowed::Forced(t) => t,
                        Allowed::OneOf(v) => sample(&host[i], &v, &mut rngs[i]),
                        Allowed::Done => self.end_tokens[0],
                    },
                    Decoding::Free { .. } => {
                        let all: Vec<u32> = (0..host[i].len() as u32).collect();
                        sample(&host[i], &all, &mut rngs[i])
                    }
                };
                accept(i, t, &mut tokens, &mut states, &mut done);
                chunk[i].push(t);
            }
            generated += 1;
            // Then, while the grammar forces the next token of every unfinished row (fixed JSON
            // text), those tokens too: no logits needed, one forward pass for the whole run.
            while fast_forward && generated < budget && !done.iter().all(|d| *d) {
                let forced: Option<Vec<Option<u32>>> = (0..b)
                    .map(|i| match (done[i], self.grammar.allowed(&states[i])) {
                        (true, _) => Some(None),
                        (false, Allowed::Forced(t)) => Some(Some(t)),
                        _ => None,
                    })
                    .collect();
                let Some(forced) = forced else { break };
                for (i, t) in forced.into_iter().enumerate() {
                    match t {
                        Some(t) => {
                            accept(i, t, &mut tokens, &mut states, &mut done);
                            chunk[i].push(t);
                        }
                        None => chunk[i].push(self.end_tokens[0]),
                    }
                }
                generated += 1;
            }
            if done.iter().all(|d| *d) || generated >= budget {
                break;
            }
            let k = chunk[0].len();
            let ids: Vec<u32> = chunk.concat();
            let ids = Tensor::from_vec(ids, (b, k), &dev)?;
            let emb = model.text.embed(&ids)?;
            let pos: Vec<Vec<[i64; 3]>> = next_pos
                .iter()
                .map(|&q| (q..q + k as i64).map(|p| [p, p, p]).collect())
                .collect();
            next_pos.iter_mut().for_each(|q| *q += k as i64);
            let h = model.text.forward_hidden(&emb, &pos, &mask, &mut cache)?;
            logits = model.text.logits(&h.i((.., k - 1, ..))?.contiguous()?)?;
            steps += 1;
        }
        Ok(tokens
            .into_iter()
            .zip(states)
            .map(|(toks, st)| {
                let finished = match decoding {
                    Decoding::Constrained => self.grammar.is_done(&st),
                    Decoding::Free { .. } => {
                        toks.last().is_some_and(|t| self.end_tokens.contains(t))
                    }
                };
                let text = self.text_of(&model.tokenizer, &toks);
                if finished {
                    Ok(Reply {
                        text,
                        tokens: toks.len(),
                        decode_steps: steps,
                    })
                } else {
                    Err(format!(
                        "the reply was cut short at max_new_tokens = {budget} tokens: {}",
                        super::preview(&text)
                    ))
                }
            })
            .collect())
    }

    fn text_of(&self, tok: &tokenizers::Tokenizer, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .filter(|id| !self.end_tokens.contains(id))
            .flat_map(|&id| self.vocab.bytes(id).unwrap_or_default().to_vec())
            .collect();
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(_) => tok.decode(ids, true).unwrap_or_default(),
        }
    }
}

/// Draws one of `allowed` from softmax(`logits`) restricted to it (temperature 1).
fn sample(logits: &[f32], allowed: &[u32], rng: &mut rand::rngs::StdRng) -> u32 {
    let max = allowed
        .iter()
        .map(|&t| logits.get(t as usize).copied().unwrap_or(f32::NEG_INFINITY))
        .fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = allowed
        .iter()
        .map(|&t| {
            let l = logits.get(t as usize).copied().unwrap_or(f32::NEG_INFINITY);
            f64::from(l - max).exp()
        })
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (&t, w) in allowed.iter().zip(&weights) {
        if u < *w {
            return t;
        }
        u -= w;
    }
    allowed.last().copied().unwrap_or(0)
}

impl ImageVerifier for QwenVerifier {
    fn name(&self) -> &str {
        "qwen"
    }

    fn score(&self, inputs: &[ImageInput<'_>]) -> Vec<Result<Grading, ScoreFailure>> {
        let replies = self.generate(inputs, Decoding::Constrained);
        let out: Vec<Result<Grading, ScoreFailure>> = replies
            .into_iter()
            .map(|r| {
                r.and_then(|reply| {
                    parse_grading(&reply.text).map_err(|e| ScoreFailure {
                        message: format!("the Qwen reply is not a valid grading: {e}"),
                        attempts: 1,
                        fatal: false,
                    })
                })
            })
            .collect();
        let failed = out.iter().filter(|r| r.is_err()).count() as u64;
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        state.stats.failed_requests += failed;
        out
    }

    fn call_stats(&self) -> CallStats {
        match self.state.lock() {
            Ok(s) => s.stats,
            Err(p) => p.into_inner().stats,
        }
    }
}
