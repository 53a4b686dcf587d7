//! `tt-scale run --resume`: a run stopped by SIGINT, SIGTERM or `kill -9` at any point and then
//! resumed ends with the folder of the same run done in one go (same file names, same PNG bytes,
//! same JSON apart from timings and the folder's own path), asking the verifier only for the
//! grades that were not journaled; and a folder that cannot be continued exactly is refused.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fake_verifier::{Behaviour, FakeGemini, FakeServer, Reply};
use crate::sd15::{assert_whole, config, copy_tree, files, tt_scale, PROMPT};
use serde_json::Value;

const SEED: &str = "7";

fn random_config() -> String {
    config(
        "gemini",
        serde_json::json!({"search_method": "random", "search_rounds": 3}),
    )
}

fn zero_order_config() -> String {
    config(
        "gemini",
        serde_json::json!({"search_method": "zero-order", "search_rounds": 4, "threshold": 0.95, "num_neighbors": 4}),
    )
}

/// A judge whose every grading takes `delay` and scores by pixels (deterministic per image).
fn judge(delay: Duration) -> (String, FakeServer) {
    FakeGemini::start(Behaviour::always(Reply::Delayed(
        delay,
        Box::new(Reply::PixelScore),
    )))
}

/// `tt-scale run` (or `args` as given) in `dir` against the judge at `base_url`, stderr piped.
fn spawn(dir: &Path, base_url: &str, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tt-scale"))
        .args(args)
        .current_dir(dir)
        .env("GEMINI_API_KEY", "k")
        .env("GEMINI_BASE_URL", base_url)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tt-scale")
}

/// Starts a new run of `cfg` (written to `dir/c.json`): seed [`SEED`], batches of 2, on the CPU.
fn start_run(dir: &Path, cfg: &str, base_url: &str) -> Child {
    std::fs::write(dir.join("c.json"), cfg).unwrap();
    spawn(
        dir,
        base_url,
        &[
            "run",
            "--pipeline-config",
            "c.json",
            "--prompt",
            PROMPT,
            "--seed",
            SEED,
            "--batch-size",
            "2",
            "--output-dir",
            "out",
            "--device",
            "cpu",
        ],
    )
}

fn start_resume(dir: &Path, run: &Path, base_url: &str) -> Child {
    spawn(
        dir,
        base_url,
        &["run", "--resume", &run.display().to_string()],
    )
}

/// Waits for `child`; returns its exit code and stderr.
fn finish(child: Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The run folder under `dir/out`, once it exists.
fn find_run(dir: &Path) -> Option<PathBuf> {
    let parent = dir.join("out/tiny-sd15/gemini/overall_score");
    std::fs::read_dir(parent)
        .ok()?
        .next()?
        .ok()
        .map(|e| e.path())
}

fn pngs(run: &Path) -> usize {
    files(run).iter().filter(|n| n.ends_with(".png")).count()
}

/// Graded candidates journaled in `run`.
fn journaled(run: &Path) -> usize {
    let journal = run.join("journal");
    files(&journal)
        .iter()
        .filter(|n| n.ends_with(".jsonl"))
        .map(|n| {
            std::fs::read_to_string(journal.join(n))
                .unwrap()
                .lines()
                .count()
        })
        .sum()
}

/// Waits until `cond` holds (or panics after a minute).
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The uninterrupted run of `cfg` in a new folder.
fn reference(cfg: &str) -> (tempfile::TempDir, PathBuf) {
    let (base_url, _server) = judge(Duration::ZERO);
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = finish(start_run(dir.path(), cfg, &base_url));
    assert_eq!(code, Some(0), "{stderr}");
    let run = find_run(dir.path()).unwrap();
    (dir, run)
}

/// A JSON file of `run` (`name` relative to it) for comparison: timings removed, and the run
/// folder, which image paths name as the run was started, replaced by `<run>`.
fn comparable_json(run: &Path, name: &str) -> Value {
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("journal/run.json")).unwrap())
            .unwrap();
    let shown = record["run_dir"].as_str().unwrap().to_string();
    let text = std::fs::read_to_string(run.join(name)).unwrap();
    let mut v: Value = serde_json::from_str(&text.replace(&shown, "<run>")).unwrap();
    if let Some(o) = v.as_object_mut() {
        o.remove("timings");
        // Where the run was started from: the only difference between two folders' records.
        o.remove("cwd");
    }
    v
}

/// `a` and `b` hold the same run: the same files, PNGs byte for byte, JSON apart from
/// timings, and the same journaled grades.
fn assert_same_run(a: &Path, b: &Path) {
    assert_eq!(files(a), files(b), "top-level files");
    for name in files(a) {
        if name.ends_with(".png") {
            assert!(
                std::fs::read(a.join(&name)).unwrap() == std::fs::read(b.join(&name)).unwrap(),
                "{name} differs"
            );
        } else if name.ends_with(".json") {
            assert_eq!(
                comparable_json(a, &name),
                comparable_json(b, &name),
                "{name}"
            );
        }
    }
    let (ja, jb) = (a.join("journal"), b.join("journal"));
    assert_eq!(files(&ja), files(&jb), "journal files");
    assert_eq!(
        comparable_json(a, "journal/run.json"),
        comparable_json(b, "journal/run.json")
    );
    for name in files(&ja).iter().filter(|n| n.ends_with(".jsonl")) {
        // Grades arrive in any order; each candidate is graded once.
        let lines = |dir: &Path| {
            let mut l: Vec<Value> = std::fs::read_to_string(dir.join(name))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            l.sort_by_key(|v| v.to_string());
            l
        };
        assert_eq!(lines(&ja), lines(&jb), "{name}");
    }
}

/// Resumes `run` against a fresh judge; checks the run completes asking only for the grades
/// that were not journaled, then that the folder equals `reference`.
fn resume_and_compare(dir: &Path, run: &Path, reference: &Path) {
    let total = journaled(reference);
    // Whatever was killed when, every image and JSON on disk is whole (a `kill -9` may leave a
    // temporary file, which the resumed run removes).
    for name in files(run) {
        if name.ends_with(".json") {
            serde_json::from_str::<Value>(&std::fs::read_to_string(run.join(&name)).unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name.ends_with(".png") {
            image::open(run.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    let already = journaled(run);
    let (base_url, server) = judge(Duration::ZERO);
    let (code, stderr) = finish(start_resume(dir, run, &base_url));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("resuming"), "{stderr}");
    let journal: Vec<String> = files(&run.join("journal"))
        .iter()
        .filter(|n| n.ends_with(".jsonl"))
        .map(|n| std::fs::read_to_string(run.join("journal").join(n)).unwrap())
        .collect();
    assert_eq!(
        server.request_count(),
        total - already,
        "only the grades missing from the journal are asked: {stderr}\n{journal:?}"
    );
    assert_whole(run);
    assert_same_run(reference, run);
}

#[test]
fn sigint_and_sigterm_while_grading_or_denoising_then_resume_give_the_uninterrupted_folder() {
    let cfg = random_config();
    let (_ref_dir, reference) = reference(&cfg);
    // 3 rounds of random search: 2 + 4 + 8 images, each graded once.
    let total = 14;
    assert_eq!(pngs(&reference), total);
    assert_eq!(journaled(&reference), total);

    for (signal, code, while_grading) in [("INT", 130, true), ("TERM", 143, false)] {
        let dir = tempfile::tempdir().unwrap();
        let delay = if while_grading { 800 } else { 0 };
        let (base_url, server) = judge(Duration::from_millis(delay));
        let child = start_run(dir.path(), &cfg, &base_url);
        if while_grading {
            // Round 1 is graded; round 2's first batch is being graded.
            wait_until("the third grading request", || server.request_count() >= 3);
        } else {
            // Round 2's first image is saved: its next batch is being denoised.
            wait_until("an image of round 2", || {
                find_run(dir.path())
                    .is_some_and(|run| files(&run).iter().any(|n| n.contains("_i@2_s@")))
            });
        }
        let sent = Command::new("kill")
            .args(["-s", signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let (exit, stderr) = finish(child);
        assert_eq!(exit, Some(code), "{stderr}");
        let run = find_run(dir.path()).unwrap();
        assert!(
            stderr.contains(&format!("tt-scale run --resume {}", run.display())),
            "the resume command is printed: {stderr}"
        );
        assert!(pngs(&run) < total, "SIG{signal} stopped the run early");
        assert_whole(&run);
        resume_and_compare(dir.path(), &run, &reference);
    }
}

#[test]
fn kill_9_at_random_points_then_resume_gives_the_uninterrupted_folder() {
    let cfg = zero_order_config();
    let (_ref_dir, reference) = reference(&cfg);
    // 4 rounds of zero-order search: the base and 4 neighbours, then 4 neighbours (and a new
    // base when none improved) a round.
    let total = pngs(&reference);
    assert!(total >= 5 + 3 * 4, "{total}");
    let dir = tempfile::tempdir().unwrap();
    let (base_url, _server) = judge(Duration::from_millis(60));
    // A fixed "random" sequence of kill delays (a linear congruential generator).
    let mut state: u64 = 0x2545_f491;
    let mut run: Option<PathBuf> = None;
    let mut kills = 0;
    for _ in 0..5 {
        let before = run.as_deref().map_or(0, pngs);
        let child = match &run {
            None => start_run(dir.path(), &cfg, &base_url),
            Some(run) => start_resume(dir.path(), run, &base_url),
        };
        // Kill once this attempt has saved an image of its own, a little later.
        wait_until("a new image", || {
            find_run(dir.path()).is_some_and(|r| pngs(&r) > before)
        });
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis((state >> 33) % 400));
        let mut child = child;
        let done = child.try_wait().unwrap().is_some();
        if !done {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        run = find_run(dir.path());
        if done || run.as_deref().map_or(0, pngs) == total {
            break;
        }
    }
    assert!(kills >= 2, "the run was killed {kills} time(s)");
    let run = run.unwrap();
    resume_and_compare(dir.path(), &run, &reference);
}

#[test]
fn resume_refuses_a_folder_it_cannot_continue_exactly_and_finishes_a_complete_one_for_free() {
    let cfg = random_config();
    let (ref_dir, reference) = reference(&cfg);
    let (base_url, server) = judge(Duration::ZERO);
    let env = [
        ("GEMINI_API_KEY", "k"),
        ("GEMINI_BASE_URL", base_url.as_str()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let resume = |run: &Path, extra: &[&str]| {
        let run = run.display().to_string();
        let mut args = vec!["run", "--resume", run.as_str()];
        args.extend(extra);
        let o = tt_scale(dir.path(), &args, &env);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let copy = |name: &str| {
        let to = dir.path().join(name);
        copy_tree(&reference, &to);
        to
    };
    let edit = |path: PathBuf, f: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
    };

    // A complete run resumes to itself without a single request.
    let complete = copy("complete");
    let (code, stderr) = resume(&complete, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("resumed: 14 image(s) and 14 grade(s) reused"),
        "{stderr}"
    );
    assert_eq!(server.request_count(), 0);
    assert_same_run(&reference, &complete);

    let edited = copy("edited");
    edit(edited.join("config.json"), &|v| {
        v["pipeline_call_args"]["guidance_scale"] = Value::from(3.0)
    });
    let (code, stderr) = resume(&edited, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("config.json was changed"), "{stderr}");

    let other_version = copy("other-version");
    edit(other_version.join("journal/run.json"), &|v| {
        v["tt_scale_version"] = Value::from("0.0.1")
    });
    let (code, stderr) = resume(&other_version, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("made by tt-scale 0.0.1") && stderr.contains(env!("CARGO_PKG_VERSION")),
        "{stderr}"
    );

    let on_gpu = copy("on-gpu");
    edit(on_gpu.join("journal/run.json"), &|v| {
        v["device"] = Value::from("cuda")
    });
    let (code, stderr) = resume(&on_gpu, &["--device", "cpu"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("made on cuda") && stderr.contains("--device cuda"),
        "{stderr}"
    );

    let old = copy("old");
    std::fs::remove_file(old.join("journal/run.json")).unwrap();
    let (code, stderr) = resume(&old, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("start a new run"), "{stderr}");

    let (code, stderr) = resume(&dir.path().join("nowhere"), &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("not a folder"), "{stderr}");

    // Flags that would change the results cannot be combined with --resume.
    let (code, stderr) = resume(&complete, &["--seed", "3"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--seed"), "{stderr}");
    assert_eq!(server.request_count(), 0);
    drop(ref_dir);
}

#[test]
fn a_run_stopped_by_a_rejected_key_resumes_once_the_key_works() {
    let cfg = random_config();
    let (_ref_dir, reference) = reference(&cfg);
    // The key is rejected from the first request (the probe: one batch is made), or from the
    // fifth (round 2's second batch: round 2 may be written with two fatal failures, and its
    // best may change once they are graded).
    for fail_from in [0, 4] {
        let dir = tempfile::tempdir().unwrap();
        let count = std::sync::atomic::AtomicUsize::new(0);
        let (base_url, _server) = FakeGemini::start(Behaviour::custom(move |_| {
            if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < fail_from {
                Reply::PixelScore
            } else {
                Reply::Status {
                    code: 401,
                    retry_after: None,
                    message: Some("API key not valid. Please pass a valid API key.".into()),
                }
            }
        }));
        let (code, stderr) = finish(start_run(dir.path(), &cfg, &base_url));
        assert_eq!(code, Some(3), "{stderr}");
        assert!(stderr.contains("tt-scale run --resume"), "{stderr}");
        let run = find_run(dir.path()).unwrap();
        assert_eq!(
            journaled(&run),
            fail_from,
            "a fatal failure is not journaled"
        );
        if fail_from == 0 {
            assert_eq!(pngs(&run), 2, "only the first batch was generated");
            // Round 1 was written with every grading failed; once graded, that file goes.
            assert!(files(&run).iter().any(|n| n.ends_with("_i@1_failed.json")));
        }
        resume_and_compare(dir.path(), &run, &reference);
    }
}
