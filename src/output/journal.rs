//! The files of a run folder's `journal/` folder: the per-prompt grade journal, the resume
//! records of the processes that work in the folder ([`ResumeRecord`], `run.json` or
//! `run.shard-I-of-N.json`) and the prompts' completion records ([`PromptDone`], `done/`).
//!
//! The per-prompt grade journal, `<run folder>/journal/<prompt name>.jsonl`: one JSON line per
//! graded candidate, appended and flushed to disk (fsync) as each grade arrives, so that a run
//! stopped at any point (Ctrl-C, `kill -9`, a preempted node, a full disk) can be resumed
//! without asking the verifier again. With the PNGs, which are saved as they are decoded, it is
//! the [`CandidateStore`] a resumed search reads.
//!
//! A line is `{"round": R, "label": "<seed label>", "grading": {...}}` or, for a candidate whose
//! grading failed after its retries, `{"round": R, "label": "...", "failure": {...}}`, with
//! `"input_tokens"` and `"output_tokens"` when the grading cost API tokens. Fatal
//! failures (a rejected key...) are not recorded: once the cause is fixed, a resumed run asks
//! again. A line cut short by a crash is dropped when the journal is opened again.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{candidate_stem, OutputError};
use crate::media::Media;
use crate::search::{CandidateStore, NoiseOrigin, ObserverError};
use crate::verifiers::{Graded, Grading, ScoreFailure, TokenUsage};

/// The folder of a run folder that holds the journals and the resume record.
pub const JOURNAL_DIR: &str = "journal";

/// One shard of a sweep: prompts `i` with `i % count == index` (the command line's
/// `--shard`, parsed in [`crate::sweep`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// This shard's number, from 0.
    pub index: usize,
    /// How many shards the sweep has.
    pub count: usize,
}

impl Shard {
    /// Whether prompt number `i` (0-based, in the run's prompt list) is this shard's.
    pub fn owns(&self, i: usize) -> bool {
        i % self.count == self.index
    }

    /// This shard's prompts, in the list's order.
    pub fn select(&self, prompts: &[String]) -> Vec<String> {
        prompts
            .iter()
            .enumerate()
            .filter(|(i, _)| self.owns(*i))
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// Worker `worker` of `workers` splitting `outer` (the whole list when `None`) further: prompt
    /// `i` is the worker's when `i % (N·W) == outer.index + N·worker` (`N` = `outer.count`), so the
    /// workers of a shard share out exactly its prompts.
    pub fn within(outer: Option<Shard>, worker: usize, workers: usize) -> Shard {
        let outer = outer.unwrap_or(Shard { index: 0, count: 1 });
        Shard {
            index: outer.index + outer.count * worker,
            count: outer.count * workers,
        }
    }

    /// `INDEX/COUNT`, as `--shard` takes it.
    pub fn spec(&self) -> String {
        format!("{}/{}", self.index, self.count)
    }
}

/// Version of the resume record's layout.
pub const RESUME_FORMAT: u32 = 1;

/// What `journal/run.json` (a shard's: `run.shard-I-of-N.json`) keeps beside `config.json` so
/// that a run can be resumed exactly.
#[derive(Debug, Serialize, Deserialize)]
pub struct ResumeRecord {
    /// [`RESUME_FORMAT`].
    pub format: u32,
    /// The version that made the run; another version may make other images.
    pub tt_scale_version: String,
    /// The folder the run was started from: relative paths of the command line resolve there.
    pub cwd: PathBuf,
    /// The run folder as the round JSON names it (see [`super::RoundContext::shown_dir`]).
    pub run_dir: PathBuf,
    /// SHA-256 (hex) of `config.json` as written, to notice an edit.
    pub config_sha256: String,
    /// `cpu` or `cuda`: the kind of device the media were made on.
    pub device: String,
    /// The run's prompts, in order (all shards' when sharded).
    pub prompts: Vec<String>,
    /// The shard this record's process searches (`None`: every prompt).
    #[serde(default)]
    pub shard: Option<Shard>,
}

/// The file name of a shard's resume record in the journal folder (`run.json` unsharded).
pub fn record_file_name(shard: Option<Shard>) -> String {
    match shard {
        None => "run.json".into(),
        Some(s) => format!("run.shard-{}-of-{}.json", s.index, s.count),
    }
}

/// The resume records (`run*.json`) in a run folder's journal folder, sorted.
pub fn record_files(journal_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(journal_dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n == "run.json" || (n.starts_with("run.shard-") && n.ends_with(".json"))
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The folder of the journal folder that holds the prompts' completion records
/// (`journal/done/<prompt name>.json`, [`PromptDone`]).
pub const DONE_DIR: &str = "done";

/// What `journal/done/<prompt name>.json` records when a prompt's search has finished.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptDone {
    /// The prompt.
    pub prompt: String,
    /// Rounds completed.
    pub rounds: usize,
    /// Images of the prompt (generated or reused).
    pub images: usize,
    /// Denoiser evaluations spent (`None` when the pipeline could not tell).
    pub nfe: Option<u64>,
    /// Verifier calls.
    pub verifier_calls: u64,
    /// The best score under the run's metric, if any candidate was graded.
    pub best_score: Option<f64>,
    /// Rounds whose grading failed.
    pub failed_rounds: usize,
}

impl PromptDone {
    /// Writes the record of the prompt whose file-name part is `prompt_name` into `run_dir`.
    pub fn write(&self, run_dir: &Path, prompt_name: &str) -> Result<(), OutputError> {
        let dir = run_dir.join(JOURNAL_DIR).join(DONE_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| OutputError {
            path: dir.clone(),
            source,
        })?;
        super::write_json(&dir.join(format!("{prompt_name}.json")), self)
    }
}

/// One line of the journal.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    round: usize,
    label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grading: Option<Grading>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure: Option<ScoreFailure>,
    #[serde(default, skip_serializing_if = "is_zero")]
    input_tokens: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    output_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A prompt's journal, open for appending, with what earlier attempts recorded.
#[derive(Debug)]
pub struct Journal {
    run_dir: PathBuf,
    prompt_name: String,
    path: PathBuf,
    file: Mutex<std::fs::File>,
    known: HashMap<(usize, String), (Graded, TokenUsage)>,
    reused_grades: AtomicUsize,
}

impl Journal {
    /// Opens (or creates) the journal of the prompt whose file-name part is `prompt_name` in
    /// `run_dir`, reading the grades it holds. A last line cut short by a crash is removed.
    pub fn open(run_dir: &Path, prompt_name: &str) -> Result<Self, OutputError> {
        let dir = run_dir.join(JOURNAL_DIR);
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OutputError { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(err(&dir))?;
        let path = dir.join(format!("{prompt_name}.jsonl"));
        let mut known = HashMap::new();
        let text = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(err(&path)(e)),
        };
        // Only lines ended by a newline were written whole.
        let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for (n, line) in text[..whole].split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Entry>(line) {
                Ok(Entry {
                    round,
                    label,
                    grading,
                    failure,
                    input_tokens,
                    output_tokens,
                }) => {
                    let value = match (grading, failure) {
                        (Some(g), _) => Ok(g),
                        (None, Some(f)) => Err(f),
                        (None, None) => continue,
                    };
                    let usage = TokenUsage {
                        input_tokens,
                        output_tokens,
                    };
                    known.insert((round, label), (value, usage));
                }
                Err(e) => tracing::warn!(
                    "{} line {}: not a journal entry ({e}); that candidate will be graded again",
                    path.display(),
                    n + 1
                ),
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(err(&path))?;
        if whole < text.len() {
            file.set_len(whole as u64).map_err(err(&path))?;
        }
        Ok(Self {
            run_dir: run_dir.to_path_buf(),
            prompt_name: prompt_name.to_string(),
            path,
            file: Mutex::new(file),
            known,
            reused_grades: AtomicUsize::new(0),
        })
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gradings read back from the journal instead of asked of the verifier.
    pub fn reused_grades(&self) -> usize {
        self.reused_grades.load(Ordering::SeqCst)
    }

    fn append(&self, entry: &Entry) -> Result<(), OutputError> {
        let err = |source| OutputError {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(entry).map_err(|e| err(std::io::Error::other(e)))?;
        line.push(b'\n');
        // A poisoned lock only means another grading thread panicked mid-append; the file is
        // still usable (a cut line is dropped when the journal is read).
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(&line).map_err(err)?;
        file.sync_data().map_err(err)
    }
}

impl CandidateStore for Journal {
    fn media(&self, round: usize, origin: &NoiseOrigin) -> Option<Media> {
        let stem = candidate_stem(&self.prompt_name, round, &origin.label());
        let path = self.run_dir.join(format!("{stem}.png"));
        if !path.is_file() {
            return None;
        }
        match super::media::read_media(&path) {
            Ok(media) => Some(media),
            Err(e) => {
                tracing::warn!("{}: cannot be read ({e}); it is made again", path.display());
                None
            }
        }
    }

    fn grading(&self, round: usize, origin: &NoiseOrigin) -> Option<(Graded, TokenUsage)> {
        let found = self.known.get(&(round, origin.label())).cloned();
        if found.is_some() {
            self.reused_grades.fetch_add(1, Ordering::SeqCst);
        }
        found
    }

    fn record(
        &self,
        round: usize,
        origin: &NoiseOrigin,
        grading: &Graded,
        usage: TokenUsage,
    ) -> Result<(), ObserverError> {
        let (grading, failure) = match grading {
            Ok(g) => (Some(g.clone()), None),
            Err(f) if f.fatal => return Ok(()),
            Err(f) => (None, Some(f.clone())),
        };
        self.append(&Entry {
            round,
            label: origin.label(),
            grading,
            failure,
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verifiers::Score;

    fn grading(score: f64) -> Grading {
        let mut g = Grading::new();
        g.insert(
            "overall_score".into(),
            Score {
                explanation: "fine".into(),
                score,
            },
        );
        g
    }

    fn seed(seed: u64) -> NoiseOrigin {
        NoiseOrigin::Seed { seed }
    }

    #[test]
    fn grades_and_failures_are_read_back_and_fatal_ones_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let failure = ScoreFailure {
            message: "HTTP 503".into(),
            attempts: 3,
            fatal: false,
        };
        {
            let j = Journal::open(dir.path(), "p").unwrap();
            assert!(j.grading(1, &seed(7)).is_none());
            let usage = TokenUsage {
                input_tokens: 1290,
                output_tokens: 150,
            };
            j.record(1, &seed(7), &Ok(grading(6.5)), usage).unwrap();
            j.record(2, &seed(8), &Err(failure.clone()), TokenUsage::default())
                .unwrap();
            let fatal = ScoreFailure {
                message: "HTTP 401".into(),
                attempts: 1,
                fatal: true,
            };
            j.record(2, &seed(9), &Err(fatal), TokenUsage::default())
                .unwrap();
        }
        let j = Journal::open(dir.path(), "p").unwrap();
        // The tokens a grading cost are read back with it.
        let usage = TokenUsage {
            input_tokens: 1290,
            output_tokens: 150,
        };
        assert_eq!(j.grading(1, &seed(7)), Some((Ok(grading(6.5)), usage)));
        assert_eq!(
            j.grading(2, &seed(8)),
            Some((Err(failure), TokenUsage::default()))
        );
        assert_eq!(
            j.grading(2, &seed(9)),
            None,
            "a fatal failure is asked again"
        );
        assert_eq!(j.grading(2, &seed(7)), None, "grades are per round");
        assert_eq!(j.reused_grades(), 2);
    }

    #[test]
    fn a_line_cut_short_by_a_crash_is_dropped_and_appending_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path(), "p").unwrap();
            j.record(1, &seed(1), &Ok(grading(1.0)), TokenUsage::default())
                .unwrap();
        }
        let path = dir.path().join("journal/p.jsonl");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"round\":1,\"label\":\"2\",\"grad");
        std::fs::write(&path, &text).unwrap();
        {
            let j = Journal::open(dir.path(), "p").unwrap();
            assert!(j.grading(1, &seed(2)).is_none());
            j.record(1, &seed(2), &Ok(grading(2.0)), TokenUsage::default())
                .unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        let j = Journal::open(dir.path(), "p").unwrap();
        assert_eq!(
            j.grading(1, &seed(2)),
            Some((Ok(grading(2.0)), TokenUsage::default()))
        );
    }

    #[test]
    fn saved_images_are_found_by_their_file_name_and_unreadable_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), "p").unwrap();
        let image = Media::Image(image::RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30])));
        let write = super::super::media::write_media;
        write(&dir.path().join("p_i@2_s@5.png"), &image).unwrap();
        assert_eq!(j.media(2, &seed(5)), Some(image));
        assert_eq!(j.media(1, &seed(5)), None);
        std::fs::write(dir.path().join("p_i@2_s@6.png"), b"not a png").unwrap();
        assert_eq!(j.media(2, &seed(6)), None);
        // A video is read back as one.
        let video = Media::Video(crate::media::Video {
            frames: vec![image::RgbImage::new(2, 2); 3],
            fps: 8.0,
        });
        write(&dir.path().join("p_i@3_s@5.png"), &video).unwrap();
        assert_eq!(j.media(3, &seed(5)), Some(video));
    }
}
