//! Sweeps split over processes: a shard (`--shard INDEX/COUNT`, or `auto` from a Slurm array
//! task or a Kubernetes Indexed Job) searches the prompts whose index in the run's prompt list
//! is INDEX modulo COUNT. Per-prompt seeds depend only on the master seed and the prompt, so a
//! shard makes exactly the images the unsharded run makes for its prompts, and all shards can
//! write into one run folder: every file they write is per prompt or per shard.
//!
//! Also `tt-scale status`: what a run folder holds, prompt by prompt.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::output::journal::Shard;
use crate::output::journal::{record_files, PromptDone, DONE_DIR};

/// `--shard`: a given shard, or `auto` (from the environment of a Slurm array task or a
/// Kubernetes Indexed Job).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardArg {
    /// `INDEX/COUNT`.
    Fixed(Shard),
    /// `auto`: [`Shard::from_env`].
    Auto,
}

/// Why a shard could not be worked out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// `--shard` is not `INDEX/COUNT` or `auto`.
    #[error("`{0}` is not a shard: give INDEX/COUNT with 0 <= INDEX < COUNT (e.g. 0/4), or auto")]
    Syntax(String),
    /// `--shard auto` outside a Slurm array task or an Indexed Job.
    #[error("--shard auto found no shard in the environment: it reads SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_COUNT (sbatch --array), or JOB_COMPLETION_INDEX with TT_SCALE_SHARD_COUNT (a Kubernetes Indexed Job); give --shard INDEX/COUNT instead")]
    NotFound,
    /// A variable is set but unusable.
    #[error("{var}={value:?}: {problem}")]
    BadVariable {
        /// The environment variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong and what to do.
        problem: String,
    },
}

impl Shard {
    /// Parses `INDEX/COUNT` (0-based index).
    pub fn parse(text: &str) -> Result<Self, ShardError> {
        let bad = || ShardError::Syntax(text.to_string());
        let (i, n) = text.trim().split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }

    /// The shard of this process from its environment (`var` looks a variable up): a Slurm
    /// array task (`SLURM_ARRAY_TASK_ID` less `SLURM_ARRAY_TASK_MIN`, of
    /// `SLURM_ARRAY_TASK_COUNT`), else a Kubernetes Indexed Job's pod (`JOB_COMPLETION_INDEX`
    /// of `TT_SCALE_SHARD_COUNT`, which the manifest sets to the Job's `completions`).
    pub fn from_env(var: &dyn Fn(&str) -> Option<String>) -> Result<Self, ShardError> {
        let number = |name: &'static str| -> Result<Option<usize>, ShardError> {
            match var(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| ShardError::BadVariable {
                        var: name,
                        value: v.clone(),
                        problem: "not a whole number".into(),
                    }),
            }
        };
        let shard = |index: usize, count: usize, var: &'static str, value: String| {
            if count == 0 || index >= count {
                Err(ShardError::BadVariable {
                    var,
                    value,
                    problem: format!("gives shard {index} of {count}, outside 0..{count}"),
                })
            } else {
                Ok(Self { index, count })
            }
        };
        if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
            let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let count = number("SLURM_ARRAY_TASK_COUNT")?.ok_or(ShardError::BadVariable {
                var: "SLURM_ARRAY_TASK_COUNT",
                value: String::new(),
                problem: "unset while SLURM_ARRAY_TASK_ID is set; submit with sbatch --array"
                    .into(),
            })?;
            let index = id.checked_sub(min).ok_or(ShardError::BadVariable {
                var: "SLURM_ARRAY_TASK_ID",
                value: id.to_string(),
                problem: format!("is below SLURM_ARRAY_TASK_MIN={min}"),
            })?;
            return shard(index, count, "SLURM_ARRAY_TASK_ID", id.to_string());
        }
        if let Some(index) = number("JOB_COMPLETION_INDEX")? {
            let count = number("TT_SCALE_SHARD_COUNT")?.ok_or(ShardError::BadVariable {
                var: "TT_SCALE_SHARD_COUNT",
                value: String::new(),
                problem: "unset in an Indexed Job; set it to the Job's completions (deploy/k8s-indexed-job.yaml does)".into(),
            })?;
            return shard(index, count, "JOB_COMPLETION_INDEX", index.to_string());
        }
        Err(ShardError::NotFound)
    }
}

impl ShardArg {
    /// Parses `--shard`: `auto` or `INDEX/COUNT`.
    pub fn parse(text: &str) -> Result<Self, ShardError> {
        if text.trim().eq_ignore_ascii_case("auto") {
            Ok(Self::Auto)
        } else {
            Shard::parse(text).map(Self::Fixed)
        }
    }

    /// The shard, looking `auto` up in the process environment.
    pub fn resolve(self) -> Result<Shard, ShardError> {
        match self {
            Self::Fixed(s) => Ok(s),
            Self::Auto => Shard::from_env(&|name| std::env::var(name).ok()),
        }
    }
}

/// Checks a `--run-name`: one folder name (no separators, not `.` or `..`, not empty, printable).
pub fn check_run_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 200
        && !name
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--run-name {name:?} is not a folder name: give one name (letters, digits, `-`, `_`, `.`), no `/`"
        ))
    }
}

/// Why `tt-scale status` cannot read a folder.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", dir.display())]
pub struct StatusError {
    /// The folder.
    pub dir: PathBuf,
    /// What is wrong and what to do.
    pub problem: String,
}

/// Where one prompt of a run stands.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptState {
    /// Its search finished ([`PromptDone`]).
    Done,
    /// Its search started (a journal exists) and has not finished: running, stopped or crashed.
    Started,
    /// Nothing of it is in the folder yet.
    Pending,
}

/// One prompt in [`RunStatus`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptStatus {
    /// The prompt.
    pub prompt: String,
    /// The shard that owns it (0 when unsharded).
    pub shard: usize,
    /// Where it stands.
    pub state: PromptState,
    /// Its completion record, when done.
    pub done: Option<PromptDone>,
}

/// What a run folder holds, prompt by prompt (`tt-scale status`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunStatus {
    /// The run folder.
    pub run_dir: PathBuf,
    /// Shards of the sweep (1 when unsharded).
    pub shards: usize,
    /// The shards whose process has started in this folder.
    pub shards_started: Vec<usize>,
    /// Every prompt of the run, in order.
    pub prompts: Vec<PromptStatus>,
    /// Denoiser evaluations of the finished prompts (`None` if one could not tell).
    pub nfe: Option<u64>,
    /// Verifier calls of the finished prompts.
    pub verifier_calls: u64,
    /// Rounds of the finished prompts in which no candidate could be graded.
    pub failed_rounds: usize,
}

impl RunStatus {
    /// Prompts in `state`.
    pub fn count(&self, state: PromptState) -> usize {
        self.prompts.iter().filter(|p| p.state == state).count()
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "run: {}", self.run_dir.display())?;
        writeln!(
            f,
            "prompts: {} (done {}, started {}, pending {})",
            self.prompts.len(),
            self.count(PromptState::Done),
            self.count(PromptState::Started),
            self.count(PromptState::Pending)
        )?;
        if self.shards > 1 {
            let started: Vec<String> = self.shards_started.iter().map(usize::to_string).collect();
            writeln!(
                f,
                "shards: {} (started here: {})",
                self.shards,
                if started.is_empty() {
                    "none".to_string()
                } else {
                    started.join(", ")
                }
            )?;
        }
        let nfe = self
            .nfe
            .map_or_else(|| "unknown".to_string(), |n| n.to_string());
        write!(
            f,
            "spent on finished prompts: {nfe} NFEs, {} verifier calls; rounds with no graded candidate: {}",
            self.verifier_calls, self.failed_rounds
        )?;
        for p in self.prompts.iter().filter(|p| p.state != PromptState::Done) {
            let what = if p.state == PromptState::Started {
                "started, not finished"
            } else {
                "pending"
            };
            write!(f, "\n  shard {}: {what}: {:?}", p.shard, p.prompt)?;
        }
        Ok(())
    }
}

/// The part of a resume record `status` reads.
#[derive(Deserialize)]
struct RecordView {
    prompts: Vec<String>,
    #[serde(default)]
    shard: Option<Shard>,
}

/// Reads where the run in `run_dir` stands: its prompts from the resume records (any shard's
/// holds the whole list), each prompt's completion record and journal.
pub fn status(run_dir: &Path) -> Result<RunStatus, StatusError> {
    let fail = |problem: String| StatusError {
        dir: run_dir.to_path_buf(),
        problem,
    };
    let journal = run_dir.join(crate::output::journal::JOURNAL_DIR);
    let records = record_files(&journal);
    if records.is_empty() {
        return Err(fail(
            "no resume record (journal/run*.json): not a tt-scale run folder, or its run has not started; give output/<model>/<verifier>/<metric>/<name>".to_string(),
        ));
    }
    let mut prompts: Option<Vec<String>> = None;
    let mut shards = 1;
    let mut started = Vec::new();
    for path in &records {
        let bytes = crate::files::read_capped(path, 1 << 30)
            .map_err(|e| fail(format!("{}: {e}", path.display())))?;
        let view: RecordView = serde_json::from_slice(&bytes)
            .map_err(|e| fail(format!("{} is not a resume record: {e}", path.display())))?;
        if let Some(s) = view.shard {
            shards = s.count;
            started.push(s.index);
        } else {
            started.push(0);
        }
        prompts.get_or_insert(view.prompts);
    }
    started.sort_unstable();
    started.dedup();
    let prompts = prompts.unwrap_or_default();
    let done_dir = journal.join(DONE_DIR);
    let mut out = RunStatus {
        run_dir: run_dir.to_path_buf(),
        shards,
        shards_started: started,
        prompts: Vec::with_capacity(prompts.len()),
        nfe: Some(0),
        verifier_calls: 0,
        failed_rounds: 0,
    };
    for (i, prompt) in prompts.into_iter().enumerate() {
        let name = crate::output::prompt_to_filename(&prompt);
        let done: Option<PromptDone> =
            crate::files::read_capped(&done_dir.join(format!("{name}.json")), 1 << 20)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
        let state = if done.is_some() {
            PromptState::Done
        } else if journal.join(format!("{name}.jsonl")).is_file() {
            PromptState::Started
        } else {
            PromptState::Pending
        };
        if let Some(d) = &done {
            out.nfe = out.nfe.zip(d.nfe).map(|(a, b)| a + b);
            out.verifier_calls += d.verifier_calls;
            out.failed_rounds += d.failed_rounds;
        }
        out.prompts.push(PromptStatus {
            prompt,
            shard: i % shards.max(1),
            state,
            done,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn shards_parse_and_partition_the_prompts_exactly_once() {
        assert_eq!(Shard::parse("1/3"), Ok(Shard { index: 1, count: 3 }));
        for bad in ["3/3", "1", "a/3", "1/0", "-1/3", ""] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(ShardArg::parse("AUTO"), Ok(ShardArg::Auto));
        let prompts: Vec<String> = (0..7).map(|i| format!("p{i}")).collect();
        let mut seen: Vec<String> = (0..3)
            .flat_map(|index| Shard { index, count: 3 }.select(&prompts))
            .collect();
        assert_eq!(Shard { index: 1, count: 3 }.select(&prompts), ["p1", "p4"]);
        seen.sort();
        assert_eq!(seen, prompts);
    }

    #[test]
    fn workers_share_out_exactly_their_shards_prompts() {
        let prompts: Vec<String> = (0..23).map(|i| format!("p{i}")).collect();
        let outer = Shard { index: 1, count: 3 };
        let mut got: Vec<String> = (0..2)
            .flat_map(|w| Shard::within(Some(outer), w, 2).select(&prompts))
            .collect();
        got.sort();
        let mut want = outer.select(&prompts);
        want.sort();
        assert_eq!(got, want);
        assert_eq!(Shard::within(None, 1, 4), Shard { index: 1, count: 4 });
    }

    #[test]
    fn slurm_and_kubernetes_variables_give_the_same_shards_as_the_flag() {
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        assert_eq!(Shard::from_env(&slurm), Shard::parse("1/3"));
        let k8s = env(&[("JOB_COMPLETION_INDEX", "2"), ("TT_SCALE_SHARD_COUNT", "3")]);
        assert_eq!(Shard::from_env(&k8s), Shard::parse("2/3"));
        assert_eq!(Shard::from_env(&env(&[])), Err(ShardError::NotFound));
        let no_count = env(&[("JOB_COMPLETION_INDEX", "0")]);
        assert!(matches!(
            Shard::from_env(&no_count),
            Err(ShardError::BadVariable {
                var: "TT_SCALE_SHARD_COUNT",
                ..
            })
        ));
        let outside = env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        assert!(Shard::from_env(&outside).is_err());
        let junk = env(&[("SLURM_ARRAY_TASK_ID", "x")]);
        assert!(Shard::from_env(&junk).is_err());
    }

    #[test]
    fn run_names_are_single_folder_names() {
        assert!(check_run_name("sweep-2026_12.a").is_ok());
        for bad in ["", ".", "..", "a/b", "a\\b", "a\nb"] {
            assert!(check_run_name(bad).is_err(), "{bad:?}");
        }
        use crate::output::journal::record_file_name;
        assert_eq!(record_file_name(None), "run.json");
        assert_eq!(
            record_file_name(Some(Shard { index: 0, count: 2 })),
            "run.shard-0-of-2.json"
        );
    }
}

/// One row of `summary.csv` / `summary.json`: one round of one prompt.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SummaryRow {
    /// The prompt.
    pub prompt: String,
    /// The shard that owns it.
    pub shard: usize,
    /// The search round (1-based).
    pub round: usize,
    /// Candidates graded in the round (a carried-over zero-order base included).
    pub candidates: usize,
    /// The selection metric.
    pub metric: String,
    /// The round's best candidate's seed label (`None`: no candidate could be graded).
    pub best_label: Option<String>,
    /// The round's best score under `metric`.
    pub best_score: Option<f64>,
    /// The prompt's best score up to and including this round.
    pub best_so_far: Option<f64>,
    /// Denoiser evaluations of the round (`None`: the pipeline could not tell).
    pub nfe: Option<u64>,
    /// Denoiser evaluations of the prompt up to this round.
    pub nfe_so_far: Option<u64>,
    /// Verifier calls of the prompt up to this round.
    pub verifier_calls_so_far: u64,
    /// Seconds from the prompt's start to the end of this round, when recorded.
    pub elapsed_s: Option<f64>,
    /// The round's best image (file name in the run folder).
    pub best_image: Option<String>,
    /// Every metric the verifiers gave the round's best (ensemble members, `also_score`).
    pub scores: std::collections::BTreeMap<String, f64>,
}

/// The rounds of every finished prompt of `status`'s run, read from the round JSON files in
/// `run_dir`, by prompt (in the run's order) then round.
pub fn summary_rows(run_dir: &Path, status: &RunStatus) -> Result<Vec<SummaryRow>, StatusError> {
    let fail = |problem: String| StatusError {
        dir: run_dir.to_path_buf(),
        problem,
    };
    let names: Vec<String> = std::fs::read_dir(run_dir)
        .map_err(|e| fail(format!("cannot list: {e}")))?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.ends_with(".json"))
        .collect();
    let mut rows = Vec::new();
    for p in status
        .prompts
        .iter()
        .filter(|p| p.state == PromptState::Done)
    {
        let prefix = format!("{}_i@", crate::output::prompt_to_filename(&p.prompt));
        let mut rounds: Vec<(usize, &String)> = names
            .iter()
            .filter_map(|n| {
                let rest = n.strip_prefix(&prefix)?;
                let round = rest.split('_').next()?.parse().ok()?;
                Some((round, n))
            })
            .collect();
        rounds.sort();
        for (round, name) in rounds {
            let path = run_dir.join(name);
            let bytes = crate::files::read_capped(&path, 1 << 30)
                .map_err(|e| fail(format!("{name}: {e}")))?;
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| fail(format!("{name} is not JSON: {e}")))?;
            let budget = &v["budget"];
            let best_image = v["best_img_path"].as_str().and_then(|s| {
                Path::new(s)
                    .file_name()
                    .map(|f| f.to_string_lossy().to_string())
            });
            let best = v["candidates"].as_array().and_then(|cs| {
                cs.iter()
                    .find(|c| best_image.is_some() && c["img_path"] == v["best_img_path"])
            });
            let scores = best
                .and_then(|c| c["grading"].as_object())
                .map(|g| {
                    g.iter()
                        .filter_map(|(k, s)| s["score"].as_f64().map(|x| (k.clone(), x)))
                        .collect()
                })
                .unwrap_or_default();
            rows.push(SummaryRow {
                prompt: p.prompt.clone(),
                shard: p.shard,
                round,
                candidates: v["num_noises"].as_u64().unwrap_or(0) as usize,
                metric: v["choice_of_metric"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                best_label: best.and_then(|c| c["label"].as_str()).map(str::to_string),
                best_score: v["best_score"]["score"].as_f64(),
                best_so_far: v["best_so_far"]["score"].as_f64(),
                nfe: budget["nfe"].as_u64(),
                nfe_so_far: budget["nfe_so_far"].as_u64(),
                verifier_calls_so_far: budget["verifier_calls_so_far"].as_u64().unwrap_or(0),
                elapsed_s: v["timings"]["elapsed_s"].as_f64(),
                best_image,
                scores,
            });
        }
    }
    Ok(rows)
}

/// `rows` as CSV: the fixed columns, then one `score:<metric>` column per metric any row has.
pub fn summary_csv(rows: &[SummaryRow]) -> String {
    let metrics: std::collections::BTreeSet<&String> =
        rows.iter().flat_map(|r| r.scores.keys()).collect();
    let field = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let opt = |v: Option<String>| v.unwrap_or_default();
    let mut out = String::from(
        "prompt,shard,round,candidates,metric,best_label,best_score,best_so_far,nfe,nfe_so_far,verifier_calls_so_far,elapsed_s,best_image",
    );
    for m in &metrics {
        out.push(',');
        out.push_str(&field(&format!("score:{m}")));
    }
    out.push('\n');
    for r in rows {
        let cells = [
            field(&r.prompt),
            r.shard.to_string(),
            r.round.to_string(),
            r.candidates.to_string(),
            field(&r.metric),
            field(&opt(r.best_label.clone())),
            opt(r.best_score.map(|x| x.to_string())),
            opt(r.best_so_far.map(|x| x.to_string())),
            opt(r.nfe.map(|x| x.to_string())),
            opt(r.nfe_so_far.map(|x| x.to_string())),
            r.verifier_calls_so_far.to_string(),
            opt(r.elapsed_s.map(|x| x.to_string())),
            field(&opt(r.best_image.clone())),
        ];
        out.push_str(&cells.join(","));
        for m in &metrics {
            out.push(',');
            if let Some(x) = r.scores.get(*m) {
                out.push_str(&x.to_string());
            }
        }
        out.push('\n');
    }
    out
}

/// Writes `summary.json` (the run's totals from `status` and `rows`) and `summary.csv`
/// ([`summary_csv`]) into `run_dir`.
pub fn write_summaries(
    run_dir: &Path,
    status: &RunStatus,
    rows: &[SummaryRow],
) -> Result<(), crate::output::OutputError> {
    let summary = serde_json::json!({
        "run_dir": run_dir.display().to_string(),
        "prompts": status.prompts.len(),
        "shards": status.shards,
        "nfe": status.nfe,
        "verifier_calls": status.verifier_calls,
        "failed_rounds": status.failed_rounds,
        "rows": rows,
    });
    crate::output::write_json(&run_dir.join("summary.json"), &summary)?;
    crate::output::write_atomic(&run_dir.join("summary.csv"), summary_csv(rows).as_bytes())
}

/// Why `tt-scale merge` refused.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// A folder could not be read.
    #[error(transparent)]
    Status(#[from] StatusError),
    /// The folders hold different runs.
    #[error("{a} and {b} hold different runs (their config.json differ): merge only the shards of one sweep")]
    DifferentRuns {
        /// One folder.
        a: PathBuf,
        /// The other.
        b: PathBuf,
    },
    /// Prompts missing or done twice.
    #[error(
        "the shards do not cover the run exactly once:{}{}",
        list("not done", missing),
        list("done in more than one folder", duplicated)
    )]
    Coverage {
        /// Prompts no folder finished (with their shard).
        missing: Vec<String>,
        /// Prompts finished in several folders.
        duplicated: Vec<String>,
    },
    /// Several folders and nowhere to merge them.
    #[error("merging {0} folders needs --into DIR (a new folder to hold the merged run)")]
    NoTarget(usize),
    /// A file could not be copied or written.
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
}

impl MergeError {
    /// The process exit code: 1 when a file could not be written, 2 otherwise (the folders
    /// given do not make one complete run).
    pub fn exit_code(&self) -> u8 {
        match self {
            MergeError::Output(_) => 1,
            _ => 2,
        }
    }
}

fn list(what: &str, items: &[String]) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!("\n  {what}: {}", items.join("; "))
    }
}

/// What `tt-scale merge` did.
#[derive(Debug)]
pub struct Merged {
    /// The folder holding the whole run and its summaries.
    pub run_dir: PathBuf,
    /// Prompts.
    pub prompts: usize,
    /// Rows written to the summaries.
    pub rows: usize,
}

/// `tt-scale merge`: checks that `folders` (one shared sweep folder, or one folder per shard)
/// finish every prompt of the run exactly once, copies per-shard folders into `into`, and writes
/// `summary.json` and `summary.csv` (one row per prompt and round) into the merged folder.
pub fn merge(folders: &[PathBuf], into: Option<&Path>) -> Result<Merged, MergeError> {
    let statuses = folders
        .iter()
        .map(|f| status(f))
        .collect::<Result<Vec<_>, _>>()?;
    let config = |dir: &Path| std::fs::read(dir.join("config.json")).ok();
    for (i, st) in statuses.iter().enumerate().skip(1) {
        let same_prompts = st.prompts.len() == statuses[0].prompts.len()
            && st
                .prompts
                .iter()
                .zip(&statuses[0].prompts)
                .all(|(a, b)| a.prompt == b.prompt);
        if config(&folders[i]) != config(&folders[0]) || !same_prompts {
            return Err(MergeError::DifferentRuns {
                a: folders[0].clone(),
                b: folders[i].clone(),
            });
        }
    }
    let first = &statuses[0];
    let mut missing = Vec::new();
    let mut duplicated = Vec::new();
    let mut owner: Vec<usize> = Vec::with_capacity(first.prompts.len());
    for (k, p) in first.prompts.iter().enumerate() {
        let done_in: Vec<usize> = statuses
            .iter()
            .enumerate()
            .filter(|(_, st)| st.prompts[k].state == PromptState::Done)
            .map(|(i, _)| i)
            .collect();
        match done_in.as_slice() {
            [] => missing.push(format!("{:?} (shard {})", p.prompt, p.shard)),
            [one] => owner.push(*one),
            _ => duplicated.push(format!("{:?}", p.prompt)),
        }
    }
    if !missing.is_empty() || !duplicated.is_empty() {
        return Err(MergeError::Coverage {
            missing,
            duplicated,
        });
    }
    let run_dir = match (folders.len(), into) {
        (1, None) => folders[0].clone(),
        (n, None) => return Err(MergeError::NoTarget(n)),
        (_, Some(target)) => {
            copy_run(folders, &statuses, &owner, target)?;
            target.to_path_buf()
        }
    };
    let merged = status(&run_dir)?;
    let rows = summary_rows(&run_dir, &merged)?;
    write_summaries(&run_dir, &merged, &rows)?;
    Ok(Merged {
        run_dir,
        prompts: merged.prompts.len(),
        rows: rows.len(),
    })
}

/// Copies (hard-links where the filesystem allows) the run's files into `target`: each prompt's
/// files from the folder that finished it, and every folder's resume records and `config.json`.
fn copy_run(
    folders: &[PathBuf],
    statuses: &[RunStatus],
    owner: &[usize],
    target: &Path,
) -> Result<(), crate::output::OutputError> {
    use crate::output::journal::JOURNAL_DIR;
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| crate::output::OutputError { path, source }
    };
    let place = |from: &Path, to: &Path| -> Result<(), crate::output::OutputError> {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(err(parent))?;
        }
        if to.exists() {
            return Ok(());
        }
        if std::fs::hard_link(from, to).is_err() {
            std::fs::copy(from, to).map_err(err(to))?;
        }
        Ok(())
    };
    std::fs::create_dir_all(target.join(JOURNAL_DIR)).map_err(err(target))?;
    place(&folders[0].join("config.json"), &target.join("config.json"))?;
    for folder in folders {
        for record in record_files(&folder.join(JOURNAL_DIR)) {
            if let Some(name) = record.file_name() {
                place(&record, &target.join(JOURNAL_DIR).join(name))?;
            }
        }
    }
    for (k, p) in statuses[0].prompts.iter().enumerate() {
        let from = &folders[owner[k]];
        let name = crate::output::prompt_to_filename(&p.prompt);
        for entry in std::fs::read_dir(from).map_err(err(from))?.flatten() {
            let file = entry.file_name();
            if file.to_string_lossy().starts_with(&format!("{name}_i@")) {
                place(&entry.path(), &target.join(&file))?;
            }
        }
        for rel in [
            Path::new(JOURNAL_DIR).join(format!("{name}.jsonl")),
            Path::new(JOURNAL_DIR)
                .join(DONE_DIR)
                .join(format!("{name}.json")),
        ] {
            if from.join(&rel).is_file() {
                place(&from.join(&rel), &target.join(&rel))?;
            }
        }
    }
    Ok(())
}
