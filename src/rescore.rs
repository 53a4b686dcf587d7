//! `tt-scale rescore <run folder> --verifier <name or config>`: grades the images of a finished
//! (or interrupted) run with another verifier, without generating anything. Each candidate of
//! each round JSON gets `rescore.<verifier>` (that verifier's grading), each round
//! `rescore.<verifier>` (its best candidate under the new metric and whether the search chose
//! the same one), and the command reports how the choice of best would change. Gradings are
//! cached in `<run>/rescore/cache.jsonl` by (image SHA-256, verifier, model, prompt), so a
//! rescore never asks twice, also across invocations and metrics.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::device::DeviceSpec;
use crate::output::media::decode_media;
use crate::output::{self, OutputError};
use crate::verifiers::{
    self, Grading, Verifier, VerifierArgs, VerifierError, VerifierInput, VerifierKind,
};

/// Why a rescore failed.
#[derive(Debug, thiserror::Error)]
pub enum RescoreError {
    /// The folder holds no round JSON.
    #[error("{} has no round files (prompt@..._i@<round>_....json); give a run folder of tt-scale run", .0.display())]
    NoRounds(PathBuf),
    /// `--verifier` names neither a verifier nor a readable config.
    #[error("--verifier {0}")]
    Verifier(String),
    /// The verifier refused access (a rejected key, an unknown model).
    #[error("the verifier cannot grade any image: {0}")]
    Access(String),
    /// The verifier could not be built.
    #[error(transparent)]
    Build(#[from] VerifierError),
    /// A file could not be read or written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// A round file is not what `tt-scale run` writes.
    #[error("{}: {problem}", path.display())]
    RoundFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

impl RescoreError {
    /// The process exit code: 2 for a mistake in the arguments or the files they name (as
    /// `tt-scale run`), 3 when the verifier refuses access, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            RescoreError::NoRounds(_) | RescoreError::Verifier(_) => 2,
            RescoreError::Access(_) => 3,
            RescoreError::Build(
                VerifierError::PromptFile { .. }
                | VerifierError::EmptyPrompt { .. }
                | VerifierError::InvalidArg { .. }
                | VerifierError::BaseUrl { .. },
            ) => 2,
            _ => 1,
        }
    }
}

/// One round's outcome under the new verifier.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundChange {
    /// The prompt.
    pub prompt: String,
    /// The round.
    pub round: usize,
    /// The search's choice (seed label), if it chose one.
    pub chosen: Option<String>,
    /// The best candidate under the new verifier's metric (seed label).
    pub best: Option<String>,
    /// The new metric of the search's choice.
    pub chosen_score: Option<f64>,
    /// The new metric of the new best.
    pub best_score: Option<f64>,
}

/// What a rescore did.
#[derive(Clone, Debug)]
pub struct RescoreSummary {
    /// The verifier's name (the key added to the JSON).
    pub verifier: String,
    /// The metric compared.
    pub metric: String,
    /// Per round file.
    pub rounds: Vec<RoundChange>,
    /// Gradings asked of the verifier (the rest came from the cache).
    pub asked: usize,
    /// Gradings read from the cache.
    pub cached: usize,
    /// Candidates the verifier could not grade.
    pub failed: usize,
}

impl std::fmt::Display for RescoreSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "Rescored with {} ({})", self.verifier, self.metric)?;
        let mut same = 0;
        let mut compared = 0;
        for r in &self.rounds {
            let short: String = r.prompt.chars().take(50).collect();
            let score = |s: Option<f64>| s.map_or("n/a".to_string(), |s| format!("{s:.4}"));
            let verdict = match (&r.chosen, &r.best) {
                (Some(c), Some(b)) => {
                    compared += 1;
                    if c == b {
                        same += 1;
                        "same choice".to_string()
                    } else {
                        format!("would choose {b} ({})", score(r.best_score))
                    }
                }
                _ => "no comparison".to_string(),
            };
            writeln!(
                f,
                "  round {} {:<50} chosen {} ({}): {verdict}",
                r.round,
                crate::run::escape_controls(&short),
                r.chosen.as_deref().unwrap_or("-"),
                score(r.chosen_score)
            )?;
        }
        let mean = |v: Vec<f64>| {
            if v.is_empty() {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let chosen = mean(self.rounds.iter().filter_map(|r| r.chosen_score).collect());
        let best = mean(self.rounds.iter().filter_map(|r| r.best_score).collect());
        writeln!(
            f,
            "  the search's choice is also {}'s best in {same} of {compared} rounds; mean {} of the choices {chosen:.4}, of {}'s bests {best:.4}",
            self.verifier, self.metric, self.verifier
        )?;
        write!(
            f,
            "  gradings: {} asked, {} from the cache, {} failed",
            self.asked, self.cached, self.failed
        )
    }
}

/// The verifier `spec` names: a verifier name (its default model, its first metric unless
/// `metric` is given), or a JSON file holding a `verifier_args` object or a whole config.
pub fn verifier_args(spec: &str, metric: Option<&str>) -> Result<VerifierArgs, RescoreError> {
    let path = Path::new(spec);
    let mut args = if path.is_file() || spec.ends_with(".json") {
        let text = crate::files::read_text_capped(path, crate::config::MAX_CONFIG_BYTES)
            .map_err(|e| RescoreError::Verifier(format!("{spec}: cannot read it ({e})")))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| RescoreError::Verifier(format!("{spec}: not JSON ({e})")))?;
        let verifier = value.get("verifier_args").cloned().unwrap_or(value);
        // Validated as a config's verifier_args; the other sections are fixed stand-ins.
        let wrapper = json!({
            "pretrained_model_name_or_path": "rescore/none",
            "torch_dtype": "fp32",
            "pipeline_call_args": {},
            "verifier_args": verifier,
            "search_args": {"search_method": "random", "search_rounds": 1},
        });
        Config::parse(&wrapper.to_string(), path)
            .map_err(|e| RescoreError::Verifier(e.to_string()))?
            .verifier_args
    } else {
        let kind = VerifierKind::from_name(spec).ok_or_else(|| {
            RescoreError::Verifier(format!(
                "{spec:?} is neither a verifier ({}) nor a JSON file",
                VerifierKind::names()
            ))
        })?;
        if kind.is_ensemble() {
            return Err(RescoreError::Verifier(
                "ensemble needs its members: give a JSON file with verifier_args".into(),
            ));
        }
        VerifierArgs::new(kind, kind.metrics().first().copied().unwrap_or_default())
    };
    if let Some(m) = metric {
        let grades = args.kind.metrics();
        if !grades.contains(&m) {
            return Err(RescoreError::Verifier(format!(
                "--metric {m} is not graded by {}; it grades {}",
                args.name(),
                grades.join(", ")
            )));
        }
        args.choice_of_metric = m.to_string();
    }
    Ok(args)
}

/// A cache line: the grading of one image for one prompt by one verifier and model.
#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    image_sha256: String,
    verifier: String,
    model: String,
    prompt: String,
    grading: Grading,
}

type CacheKey = (String, String, String, String);

/// The rescore cache of a run folder, appended as gradings arrive.
struct Cache {
    path: PathBuf,
    entries: HashMap<CacheKey, Grading>,
}

impl Cache {
    fn open(run: &Path) -> Result<Self, OutputError> {
        let dir = run.join("rescore");
        std::fs::create_dir_all(&dir).map_err(|source| OutputError {
            path: dir.clone(),
            source,
        })?;
        let path = dir.join("cache.jsonl");
        let mut entries = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(&path) {
            // A line cut short by a crash does not parse and is skipped.
            for line in text.lines() {
                if let Ok(e) = serde_json::from_str::<CacheEntry>(line) {
                    entries.insert((e.image_sha256, e.verifier, e.model, e.prompt), e.grading);
                }
            }
        }
        Ok(Self { path, entries })
    }

    fn append(&mut self, key: CacheKey, grading: Grading) -> Result<(), OutputError> {
        let entry = CacheEntry {
            image_sha256: key.0.clone(),
            verifier: key.1.clone(),
            model: key.2.clone(),
            prompt: key.3.clone(),
            grading,
        };
        let err = |source| OutputError {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(&entry).map_err(|e| err(std::io::Error::other(e)))?;
        line.push(b'\n');
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(err)?;
        file.write_all(&line).map_err(err)?;
        file.sync_data().map_err(err)?;
        self.entries.insert(key, entry.grading);
        Ok(())
    }
}

/// The model a verifier's gradings depend on, for the cache key.
fn model_key(args: &VerifierArgs) -> String {
    let mut key = args.model_name.clone().unwrap_or_else(|| "default".into());
    if let Some(a) = &args.aesthetic_model {
        key.push_str(&format!("+{a}"));
    }
    if !args.ensemble.is_empty() {
        let members: Vec<String> = args.ensemble.iter().map(model_key).collect();
        key.push_str(&format!("[{}]", members.join(",")));
    }
    key
}

/// A round file: its path and its JSON object.
type RoundFile = (PathBuf, Map<String, Value>);

/// The round files of `run`: JSON objects with `search_round` and `candidates`, in name order.
fn round_files(run: &Path) -> Result<Vec<RoundFile>, RescoreError> {
    let entries = std::fs::read_dir(run).map_err(|source| OutputError {
        path: run.to_path_buf(),
        source,
    })?;
    let mut names: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("prompt@"))
        })
        .collect();
    names.sort();
    let mut out = Vec::new();
    for path in names {
        let text =
            crate::files::read_text_capped(&path, 64 << 20).map_err(|source| OutputError {
                path: path.clone(),
                source,
            })?;
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m))
                if m.contains_key("candidates") && m.contains_key("search_round") =>
            {
                out.push((path, m))
            }
            _ => tracing::warn!("rescore: {} is not a round file; skipped", path.display()),
        }
    }
    if out.is_empty() {
        return Err(RescoreError::NoRounds(run.to_path_buf()));
    }
    Ok(out)
}

/// The seed label of a candidate object.
fn label(c: &Value) -> Option<String> {
    c.get("label").and_then(Value::as_str).map(str::to_string)
}

/// Rescores the run folder `run` with `verifier` (built from `args`); see the module docs.
pub fn rescore_with(
    run: &Path,
    args: &VerifierArgs,
    verifier: &dyn Verifier,
) -> Result<RescoreSummary, RescoreError> {
    let files = round_files(run)?;
    let mut cache = Cache::open(run)?;
    let model = model_key(args);
    let metric = args.choice_of_metric.clone();
    let name = args.name().to_string();
    let mut summary = RescoreSummary {
        verifier: name.clone(),
        metric: metric.clone(),
        rounds: Vec::new(),
        asked: 0,
        cached: 0,
        failed: 0,
    };
    for (path, mut round) in files {
        let prompt = round
            .get("prompt")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| RescoreError::RoundFile {
                path: path.clone(),
                problem: "has no prompt".into(),
            })?;
        let Some(Value::Array(candidates)) = round.get_mut("candidates") else {
            continue;
        };
        // Load each candidate's image from the run folder (by file name: paths in the JSON
        // are relative to where the run started).
        let mut images = Vec::with_capacity(candidates.len());
        for c in candidates.iter() {
            let file = c
                .get("img_path")
                .and_then(Value::as_str)
                .and_then(|p| Path::new(p).file_name().map(|n| run.join(n)));
            let image = file.as_ref().and_then(|f| match std::fs::read(f) {
                Ok(bytes) => {
                    let sha = Sha256::digest(&bytes)
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>();
                    match decode_media(&bytes) {
                        Ok(media) => Some((sha, media)),
                        Err(e) => {
                            tracing::warn!("rescore: {} cannot be decoded ({e})", f.display());
                            None
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("rescore: {} cannot be read ({e})", f.display());
                    None
                }
            });
            images.push(image);
        }
        // Ask only for what the cache lacks.
        let key = |sha: &str| (sha.to_string(), name.clone(), model.clone(), prompt.clone());
        let missing: Vec<usize> = images
            .iter()
            .enumerate()
            .filter_map(|(i, img)| {
                img.as_ref()
                    .filter(|(sha, _)| !cache.entries.contains_key(&key(sha)))
                    .map(|_| i)
            })
            .collect();
        let inputs: Vec<VerifierInput<'_>> = missing
            .iter()
            .filter_map(|&i| images[i].as_ref())
            .map(|(_, media)| VerifierInput {
                prompt: &prompt,
                media,
            })
            .collect();
        let results = if inputs.is_empty() {
            Vec::new()
        } else {
            verifier.score(&inputs)
        };
        let mut failures: HashMap<usize, String> = HashMap::new();
        for (&i, result) in missing.iter().zip(results) {
            let Some((sha, _)) = &images[i] else { continue };
            summary.asked += 1;
            match result {
                Ok(g) => cache.append(key(sha), g)?,
                Err(f) => {
                    failures.insert(i, f.to_string());
                }
            }
        }
        summary.cached += images
            .iter()
            .enumerate()
            .filter(|(i, img)| img.is_some() && !missing.contains(i))
            .count();
        let mut best: Option<(String, f64)> = None;
        let mut chosen_score = None;
        let chosen = round
            .get("best_img_path")
            .and_then(Value::as_str)
            .and_then(|p| Path::new(p).file_stem())
            .and_then(|s| {
                s.to_string_lossy()
                    .rsplit_once("_s@")
                    .map(|(_, l)| l.to_string())
            });
        let Some(Value::Array(candidates)) = round.get_mut("candidates") else {
            continue;
        };
        for (i, c) in candidates.iter_mut().enumerate() {
            let grading = images[i]
                .as_ref()
                .and_then(|(sha, _)| cache.entries.get(&key(sha)));
            let entry = match (grading, failures.get(&i)) {
                (Some(g), _) => serde_json::to_value(g).unwrap_or(Value::Null),
                (None, Some(message)) => {
                    summary.failed += 1;
                    json!({ "error": message })
                }
                (None, None) => {
                    summary.failed += 1;
                    json!({ "error": "the image is missing or unreadable" })
                }
            };
            let score = grading.and_then(|g| g.get(&metric)).map(|s| s.score);
            if let (Some(s), Some(l)) = (score, label(c)) {
                if best.as_ref().is_none_or(|(_, b)| s > *b) {
                    best = Some((l.clone(), s));
                }
                if chosen.as_deref() == Some(l.as_str()) {
                    chosen_score = Some(s);
                }
            }
            if let Value::Object(obj) = c {
                let slot = obj.entry("rescore").or_insert_with(|| json!({}));
                if let Value::Object(map) = slot {
                    map.insert(name.clone(), entry);
                }
            }
        }
        let round_no = round
            .get("search_round")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let slot = round.entry("rescore").or_insert_with(|| json!({}));
        if let Value::Object(map) = slot {
            map.insert(
                name.clone(),
                json!({
                    "choice_of_metric": metric,
                    "best_label": best.as_ref().map(|b| b.0.clone()),
                    "best_score": best.as_ref().map(|b| b.1),
                    "chosen_label": chosen,
                    "chosen_score": chosen_score,
                    "same_choice": matches!((&chosen, &best), (Some(c), Some((b, _))) if c == b),
                }),
            );
        }
        output::write_json(&path, &Value::Object(round))?;
        summary.rounds.push(RoundChange {
            prompt: prompt.clone(),
            round: round_no,
            chosen,
            best: best.as_ref().map(|b| b.0.clone()),
            chosen_score,
            best_score: best.map(|b| b.1),
        });
    }
    Ok(summary)
}

/// `tt-scale rescore`: builds the verifier of `spec` on `device` (a local verifier's, unless
/// its arguments name one) and rescores `run`.
pub fn rescore(
    run: &Path,
    spec: &str,
    metric: Option<&str>,
    device: Option<DeviceSpec>,
) -> Result<RescoreSummary, RescoreError> {
    if !run.is_dir() {
        return Err(RescoreError::NoRounds(run.to_path_buf()));
    }
    let mut args = verifier_args(spec, metric)?;
    args.device = args.device.or(device);
    let verifier = verifiers::build_for_run(&args, false)?;
    if let Err(f) = verifier.check_access() {
        if f.fatal {
            return Err(RescoreError::Access(f.message));
        }
    }
    rescore_with(run, &args, verifier.as_ref())
}
