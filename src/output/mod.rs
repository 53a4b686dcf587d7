//! The original tool's output layout: run folders, candidate file names, per-round JSON and
//! `config.json`; media files ([`media`]); the journals and records of a run ([`journal`]).
//! Every file is written atomically (temporary file, then rename).

pub mod journal;
pub mod media;

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::search::{Candidate, RoundResult};
use crate::verifiers::TokenUsage;

/// A file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source} (check that the output folder is writable and the disk has space)")]
pub struct OutputError {
    /// The file or folder in question.
    pub path: PathBuf,
    /// The I/O error.
    pub source: std::io::Error,
}

/// The output folder name for a model: the original's short names for its known models, else
/// a sanitised form of the repo name or folder name.
pub fn model_dir_name(model: &str) -> String {
    if let Some(short) = crate::pipelines::registry::short_name(model) {
        return short.to_string();
    }
    let trimmed = model.trim_end_matches(['/', '\\']);
    let last = trimmed.rsplit(['/', '\\']).next().unwrap_or(trimmed);
    let cleaned: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let cleaned = cleaned.trim_matches('.').to_string();
    if cleaned.is_empty() {
        "model".to_string()
    } else {
        cleaned
    }
}

/// The first 8 hex digits of the SHA-256 of the prompt's UTF-8 bytes (the original's hash).
pub fn prompt_hash(prompt: &str) -> String {
    let digest = Sha256::digest(prompt.as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// The original's `prompt_to_filename`: `prompt@<sanitised>_hash@<sha8>`. Every character that is
/// not an ASCII letter or digit becomes `_`, runs of `_` collapse, and when the name would exceed
/// 100 characters the sanitised part is cut to 85 characters (so long names are 106 characters).
pub fn prompt_to_filename(prompt: &str) -> String {
    let mut name = String::with_capacity(prompt.len());
    for c in prompt.trim().chars() {
        let c = if c.is_ascii_alphanumeric() { c } else { '_' };
        if c == '_' && name.ends_with('_') {
            continue;
        }
        name.push(c);
    }
    let hash = prompt_hash(prompt);
    let base = format!("prompt@{name}_hash@{hash}");
    if base.chars().count() > 100 {
        // The name is ASCII only, so byte slicing is character slicing.
        format!("prompt@{}_hash@{hash}", &name[..name.len().min(85)])
    } else {
        base
    }
}

/// The file stem of one candidate: `<prompt name>_i@<round>_s@<seed label>`.
pub fn candidate_stem(prompt_name: &str, round: usize, seed_label: &str) -> String {
    format!("{prompt_name}_i@{round}_s@{seed_label}")
}

/// Creates a new run folder `<output_dir>/<model>/<verifier>/<metric>/<YYYYmmdd_HHMMSS>` (local
/// time); when that folder exists already (two runs in one second), `_2`, `_3`... is appended.
pub fn create_run_dir(
    output_dir: &Path,
    model: &str,
    verifier: &str,
    metric: &str,
    now: chrono::DateTime<chrono::Local>,
) -> Result<PathBuf, OutputError> {
    let parent = output_dir
        .join(model_dir_name(model))
        .join(verifier)
        .join(metric);
    std::fs::create_dir_all(&parent).map_err(|source| OutputError {
        path: parent.clone(),
        source,
    })?;
    let stamp = now.format("%Y%m%d_%H%M%S").to_string();
    for n in 1..10_000 {
        let name = if n == 1 {
            stamp.clone()
        } else {
            format!("{stamp}_{n}")
        };
        let dir = parent.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(OutputError { path: dir, source }),
        }
    }
    Err(OutputError {
        path: parent,
        source: std::io::Error::other("too many runs started in the same second"),
    })
}

/// Where [`named_run_dir`] puts the run named `name` (nothing is made).
pub fn named_run_path(
    output_dir: &Path,
    model: &str,
    verifier: &str,
    metric: &str,
    name: &str,
) -> PathBuf {
    output_dir
        .join(model_dir_name(model))
        .join(verifier)
        .join(metric)
        .join(name)
}

/// The run folder `output_dir/<model>/<verifier>/<metric>/<name>` of a named run (`--run-name`),
/// made if missing; an existing one is returned as is (the shards of a sweep share it).
pub fn named_run_dir(
    output_dir: &Path,
    model: &str,
    verifier: &str,
    metric: &str,
    name: &str,
) -> Result<PathBuf, OutputError> {
    let dir = named_run_path(output_dir, model, verifier, metric, name);
    std::fs::create_dir_all(&dir).map_err(|source| OutputError {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, flushed to disk,
/// then renamed over `path` ([`crate::files::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    crate::files::write_atomic(path, bytes).map_err(|source| OutputError {
        path: path.to_path_buf(),
        source,
    })
}

/// Removes the temporary files that [`write_atomic`] leaves when the process is killed
/// between writing and renaming (`.<name>.tmp<pid>`), in `dir`; returns how many.
pub fn remove_stale_temp_files(dir: &Path) -> Result<usize, OutputError> {
    let err = |source| OutputError {
        path: dir.to_path_buf(),
        source,
    };
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = name.starts_with('.')
            && name
                .rsplit_once(".tmp")
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if stale && entry.path().is_file() {
            std::fs::remove_file(entry.path()).map_err(|source| OutputError {
                path: entry.path(),
                source,
            })?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Serialises `value` as the original does (`json.dump(indent=4)`, ASCII only: non-ASCII as
/// `\uXXXX` escapes), keys in the order the value gives them.
pub fn to_python_json<T: Serialize>(value: &T) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter::default());
    // Serialising our own plain data types (maps, strings, numbers) cannot fail.
    value
        .serialize(&mut ser)
        .expect("serialising plain data to JSON");
    String::from_utf8(out).expect("the formatter writes ASCII")
}

/// Writes `value` as JSON (see [`to_python_json`]) to `path`, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), OutputError> {
    write_atomic(path, to_python_json(value).as_bytes())
}

/// Pretty printer with 4-space indentation that escapes non-ASCII characters like Python's
/// `json.dump` with `ensure_ascii=True`.
struct PythonFormatter {
    inner: serde_json::ser::PrettyFormatter<'static>,
}

impl Default for PythonFormatter {
    fn default() -> Self {
        Self {
            inner: serde_json::ser::PrettyFormatter::with_indent(b"    "),
        }
    }
}

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.begin_array(w)
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_array(w)
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.inner.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_array_value(w)
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.begin_object(w)
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_object(w)
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.inner.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_object_value(w)
    }
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        for c in fragment.chars() {
            if c.is_ascii() {
                w.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

/// Best candidate over all rounds of a prompt so far, for the per-round JSON.
#[derive(Clone, Debug)]
pub struct BestSoFar {
    /// Its round.
    pub round: usize,
    /// Its root seed.
    pub seed: u64,
    /// Its seed label (`s@<seed>`, or `<seed>-n<direction>` for a zero-order neighbour).
    pub label: String,
    /// Its score on the selection metric.
    pub score: f64,
    /// Its PNG's path.
    pub img_path: String,
    /// Whether it is a clean-sample prediction of an unfinished path or particle
    /// ([`RoundResult::provisional`]); a finished image replaces it whatever the scores.
    pub provisional: bool,
}

/// The compute a prompt's search has spent so far, for the per-round JSON's `budget`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spent {
    /// Denoiser evaluations; `None` once a round could not tell.
    pub nfe: Option<u64>,
    /// Verifier calls (gradings).
    pub verifier_calls: u64,
    /// API tokens of the gradings.
    pub tokens: TokenUsage,
}

impl Default for Spent {
    fn default() -> Self {
        Self {
            nfe: Some(0),
            verifier_calls: 0,
            tokens: TokenUsage::default(),
        }
    }
}

/// What a round's files are named after and graded on.
#[derive(Clone, Copy, Debug)]
pub struct RoundContext<'a> {
    /// The prompt, as written in the JSON.
    pub prompt: &'a str,
    /// The run folder as image paths in the JSON name it: as the run was started (relative to
    /// the folder it was started from when `--output-dir` was), also when it is resumed.
    pub shown_dir: &'a Path,
    /// The prompt's file-name part ([`prompt_to_filename`]).
    pub prompt_name: &'a str,
    /// The selection metric.
    pub metric: &'a str,
    /// Seconds from the prompt's search start (or restart, when resumed) to the end of this
    /// round, recorded in `timings.elapsed_s`.
    pub elapsed_s: f64,
}

/// What [`write_round`] wrote, for the run's tallies.
#[derive(Clone, Debug, Default)]
pub struct RoundWritten {
    /// Images generated in this round (carried-over candidates excluded).
    pub new_images: usize,
    /// Gradings that failed in this round (carried-over candidates excluded).
    pub failed_gradings: usize,
    /// The round's JSON file.
    pub json_path: PathBuf,
}

fn grading_score(c: &Candidate, metric: &str) -> Value {
    match &c.grading {
        Ok(g) => match g.get(metric) {
            Some(s) => json!({"explanation": s.explanation, "score": s.score}),
            None => Value::Null,
        },
        Err(_) => Value::Null,
    }
}

/// Writes a finished round into `run_dir`: every candidate's PNG, then the round's JSON in the
/// original's layout (its keys first, then `best_noise`, `best_so_far`, `num_failed`,
/// `all_failed`, `candidates`, `stage` for paths and particles, `budget`, `timings`), named after the round's best image, or
/// `..._i@<round>_failed.json` when no candidate could be graded. Updates `best` (the prompt's
/// best over all rounds) first, so the JSON's `best_so_far` includes this round.
pub fn write_round(
    run_dir: &Path,
    ctx: &RoundContext<'_>,
    r: &RoundResult,
    best: &mut Option<BestSoFar>,
    spent: &mut Spent,
) -> Result<RoundWritten, OutputError> {
    spent.nfe = spent.nfe.zip(r.nfe).map(|(a, b)| a + b);
    spent.verifier_calls += r.verifier_calls;
    spent.tokens += r.tokens;
    let path_string = |file: &str| ctx.shown_dir.join(file).display().to_string();
    let metric = ctx.metric;
    let mut written = RoundWritten::default();
    let mut candidates_json = Vec::with_capacity(r.candidates.len());
    let mut file_names = Vec::with_capacity(r.candidates.len());
    for c in &r.candidates {
        let stem = candidate_stem(ctx.prompt_name, r.round, &c.origin.label());
        let file = format!("{stem}.png");
        // Media saved as they were decoded (`SearchObserver::batch_generated`) are not written
        // again; their bytes are the same.
        let png = run_dir.join(&file);
        if !png.is_file() {
            media::write_media(&png, &c.media)?;
        }
        if !c.carried_over {
            written.new_images += 1;
        }
        let mut cj = Map::new();
        cj.insert("seed".into(), json!(c.origin.root_seed()));
        cj.insert("label".into(), json!(c.origin.label()));
        cj.insert(
            "noise".into(),
            serde_json::to_value(&c.origin).unwrap_or(Value::Null),
        );
        cj.insert("img_path".into(), json!(path_string(&file)));
        if let Some(m) = media::media_json(&c.media) {
            cj.insert("media".into(), m);
        }
        cj.insert("score".into(), grading_score(c, metric));
        match &c.grading {
            Ok(g) => {
                cj.insert(
                    "grading".into(),
                    serde_json::to_value(g).unwrap_or(Value::Null),
                );
            }
            Err(e) => {
                if !c.carried_over {
                    written.failed_gradings += 1;
                }
                cj.insert("error".into(), json!(e.to_string()));
            }
        }
        if c.carried_over {
            cj.insert("carried_over".into(), json!(true));
        }
        candidates_json.push(Value::Object(cj));
        file_names.push(file);
    }

    let mut d = Map::new();
    d.insert("prompt".into(), json!(ctx.prompt));
    d.insert("search_round".into(), json!(r.round));
    d.insert("num_noises".into(), json!(r.candidates.len()));
    let json_name = match r.best {
        Some(i) => {
            let chosen = &r.candidates[i];
            let score = chosen.score(metric).unwrap_or(f64::NAN);
            d.insert("best_noise_seed".into(), json!(chosen.origin.root_seed()));
            d.insert("best_score".into(), grading_score(chosen, metric));
            d.insert("choice_of_metric".into(), json!(metric));
            d.insert("best_img_path".into(), json!(path_string(&file_names[i])));
            let better = |b: &BestSoFar| match (b.provisional, r.provisional) {
                (true, false) => true,
                (false, true) => false,
                _ => score > b.score,
            };
            if best.as_ref().is_none_or(better) {
                *best = Some(BestSoFar {
                    round: r.round,
                    seed: chosen.origin.root_seed(),
                    label: chosen.origin.label(),
                    score,
                    img_path: path_string(&file_names[i]),
                    provisional: r.provisional,
                });
            }
            file_names[i].replace(".png", ".json")
        }
        None => {
            d.insert("best_noise_seed".into(), Value::Null);
            d.insert("best_score".into(), Value::Null);
            d.insert("choice_of_metric".into(), json!(metric));
            d.insert("best_img_path".into(), Value::Null);
            format!("{}_i@{}_failed.json", ctx.prompt_name, r.round)
        }
    };
    if let Some(imp) = r.neighbors_improvement {
        d.insert("neighbors_improvement".into(), json!(imp));
    }
    if let Some(i) = r.best {
        d.insert(
            "best_noise".into(),
            serde_json::to_value(&r.candidates[i].origin).unwrap_or(Value::Null),
        );
    }
    d.insert(
        "best_so_far".into(),
        match best {
            Some(b) if b.provisional => json!({
                "search_round": b.round,
                "seed": b.seed,
                "label": b.label,
                "score": b.score,
                "img_path": b.img_path,
                "provisional": true,
            }),
            Some(b) => json!({
                "search_round": b.round,
                "seed": b.seed,
                "label": b.label,
                "score": b.score,
                "img_path": b.img_path,
            }),
            None => Value::Null,
        },
    );
    let failed = r.candidates.iter().filter(|c| c.grading.is_err()).count();
    d.insert("num_failed".into(), json!(failed));
    d.insert("all_failed".into(), json!(r.best.is_none()));
    d.insert("candidates".into(), Value::Array(candidates_json));
    if let Some(stage) = &r.stage {
        d.insert("stage".into(), stage.clone());
    }
    d.insert(
        "budget".into(),
        json!({
            "nfe": r.nfe,
            "nfe_so_far": spent.nfe,
            "verifier_calls": r.verifier_calls,
            "verifier_calls_so_far": spent.verifier_calls,
            "verifier_input_tokens": r.tokens.input_tokens,
            "verifier_output_tokens": r.tokens.output_tokens,
            "verifier_input_tokens_so_far": spent.tokens.input_tokens,
            "verifier_output_tokens_so_far": spent.tokens.output_tokens,
        }),
    );
    d.insert(
        "timings".into(),
        json!({
            "generation_s": r.generation_s,
            "verification_s": r.verification_s,
            "elapsed_s": ctx.elapsed_s,
        }),
    );
    written.json_path = run_dir.join(&json_name);
    write_json(&written.json_path, &Value::Object(d))?;
    // A resumed run may choose another best than the attempt before it did (its fatal
    // failures graded now): that attempt's JSON of this round goes.
    let stale = file_names
        .iter()
        .map(|f| f.replace(".png", ".json"))
        .chain([format!("{}_i@{}_failed.json", ctx.prompt_name, r.round)])
        .filter(|name| *name != json_name);
    for name in stale {
        let path = run_dir.join(name);
        if path.is_file() {
            std::fs::remove_file(&path).map_err(|source| OutputError { path, source })?;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_prompts_are_cut_to_the_originals_106_characters() {
        let p = "Photo of an athlete cat explaining it\u{2019}s latest scandal at a press conference to journalists.";
        let name = prompt_to_filename(p);
        assert_eq!(
            name,
            "prompt@Photo_of_an_athlete_cat_explaining_it_s_latest_scandal_at_a_press_conference_to_journ_hash@b9094b65"
        );
        assert_eq!(name.len(), 106);
    }

    #[test]
    fn trailing_punctuation_gives_a_double_underscore_like_the_original() {
        assert_eq!(
            prompt_to_filename("Alice in a vibrant, dreamlike digital painting inside the Nemo Nautilus submarine."),
            "prompt@Alice_in_a_vibrant_dreamlike_digital_painting_inside_the_Nemo_Nautilus_submarine__hash@2eeee8f7"
        );
        assert_eq!(
            prompt_to_filename("a tiny astronaut hatching from an egg on the moon"),
            "prompt@a_tiny_astronaut_hatching_from_an_egg_on_the_moon_hash@8a6a79d2"
        );
    }

    #[test]
    fn non_ascii_collapses_and_the_hash_is_of_the_unstripped_prompt() {
        let a = prompt_to_filename("  chat   ");
        let b = prompt_to_filename("chat");
        assert!(a.starts_with("prompt@chat_hash@"));
        assert_ne!(a, b, "the hash covers the original text");
        assert!(prompt_to_filename("日本の猫").starts_with("prompt@__hash@"));
    }

    #[test]
    fn model_folders_use_the_originals_short_names_or_a_sanitised_name() {
        assert_eq!(model_dir_name("black-forest-labs/FLUX.1-dev"), "flux.1-dev");
        assert_eq!(
            model_dir_name("stable-diffusion-v1-5/stable-diffusion-v1-5"),
            "sd-v1.5"
        );
        assert_eq!(
            model_dir_name("stabilityai/stable-diffusion-xl-base-1.0"),
            "sdxl-base"
        );
        assert_eq!(
            model_dir_name("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"),
            "pixart-sigma-1024-ms"
        );
        assert_eq!(model_dir_name("someone/My Model"), "my_model");
        assert_eq!(model_dir_name("/data/models/tiny-sd15/"), "tiny-sd15");
        assert_eq!(model_dir_name("/"), "model");
    }

    #[test]
    fn json_is_indented_by_four_and_ascii_only_like_pythons_json_dump() {
        let v = serde_json::json!({"prompt": "it\u{2019}s \u{1F600}", "n": [1, 2]});
        let s = to_python_json(&v);
        assert_eq!(
            s,
            "{\n    \"prompt\": \"it\\u2019s \\ud83d\\ude00\",\n    \"n\": [\n        1,\n        2\n    ]\n}"
        );
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn atomic_writes_leave_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn temporary_files_left_by_a_killed_run_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            ".a.png.tmp123",
            ".b.json.tmp9",
            "c.png",
            ".hidden",
            "d.tmp1",
            ".e.tmp",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_stale_temp_files(dir.path()).unwrap(), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".e.tmp", ".hidden", "c.png", "d.tmp1"]);
    }

    #[test]
    fn run_folders_are_unique_within_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let now = chrono::Local::now();
        let a = create_run_dir(dir.path(), "x/y", "gemini", "overall_score", now).unwrap();
        let b = create_run_dir(dir.path(), "x/y", "gemini", "overall_score", now).unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(dir.path().join("y").join("gemini").join("overall_score")));
    }
}
