//! Sweeps in shards: three shards of a 6-prompt file, run as separate processes at the same time
//! into one `--run-name` folder (one selected by Slurm's variables, one by a Kubernetes Indexed
//! Job's, one by the flag and stopped by SIGINT then resumed), hold exactly the files of the
//! unsharded run; `tt-scale status` reads the folder; and the mistakes a sweep invites are
//! refused with what to do.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fake_verifier::{Behaviour, FakeGemini, Reply};
use crate::sd15::{assert_whole, config, files, read_json};

const PROMPTS: [&str; 6] = [
    "a red apple",
    "a blue bird on a branch",
    "a lighthouse at night",
    "two cats on a sofa",
    "a bowl of ramen",
    "a mountain lake at dawn",
];

fn cfg() -> String {
    config(
        "gemini",
        serde_json::json!({"search_method": "random", "search_rounds": 2}),
    )
}

/// `tt-scale` with `args` in `dir` against the judge at `base_url`, with `env` added.
fn spawn(dir: &Path, base_url: &str, args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tt-scale"));
    cmd.args(args)
        .current_dir(dir)
        .env("GEMINI_API_KEY", "k")
        .env("GEMINI_BASE_URL", base_url)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start tt-scale")
}

fn finish(child: Child) -> (Option<i32>, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The run arguments every process of the sweep shares, then `extra`.
fn run_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "run",
        "--pipeline-config",
        "c.json",
        "--prompts-file",
        "prompts.txt",
        "--seed",
        "11",
        "--batch-size",
        "2",
        "--output-dir",
        "out",
        "--device",
        "cpu",
        "--run-name",
        "sweep",
    ];
    args.extend_from_slice(extra);
    args
}

fn setup(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("c.json"), cfg()).unwrap();
    std::fs::write(dir.join("prompts.txt"), PROMPTS.join("\n")).unwrap();
    dir.join("out/tiny-sd15/gemini/overall_score/sweep")
}

fn status(dir: &Path, run: &Path, base_url: &str) -> Value {
    let (code, stdout, stderr) = finish(spawn(
        dir,
        base_url,
        &["status", &run.display().to_string(), "--json"],
        &[],
    ));
    assert_eq!(code, Some(0), "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn done_prompts(status: &Value) -> Vec<String> {
    status["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["state"] == "done")
        .map(|p| p["prompt"].as_str().unwrap().to_string())
        .collect()
}

/// A JSON file for comparison: timings removed.
fn comparable(path: &Path) -> Value {
    let mut v = read_json(path);
    if let Some(o) = v.as_object_mut() {
        o.remove("timings");
    }
    v
}

#[test]
fn three_shards_at_once_make_the_unsharded_runs_files_and_status_reads_them() {
    let (base_url, server) = FakeGemini::start(Behaviour::always(Reply::Delayed(
        Duration::from_millis(150),
        Box::new(Reply::PixelScore),
    )));
    // The unsharded run.
    let whole_dir = tempfile::tempdir().unwrap();
    let whole = setup(whole_dir.path());
    let (code, stdout, stderr) = finish(spawn(
        whole_dir.path(),
        &base_url,
        &run_args(&["--json"]),
        &[],
    ));
    assert_eq!(code, Some(0), "{stderr}");
    let asked_whole = server.request_count();
    // --json: the run summary for scripts on stdout.
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["master_seed"], 11);
    assert_eq!(summary["images"], 36);
    assert_eq!(summary["nfe"], 216);
    assert_eq!(summary["prompts"].as_array().unwrap().len(), 6);
    assert_eq!(summary["verifier_requests"], serde_json::json!(asked_whole));
    // Tokens as the API reported them (the fake Gemini: 1290 in, 150 out a reply).
    assert_eq!(summary["verifier_input_tokens"], 1290 * asked_whole as u64);
    assert_eq!(summary["verifier_output_tokens"], 150 * asked_whole as u64);
    assert!(stderr.contains("verifier tokens: "), "{stderr}");

    // Three shards at once: Slurm's variables, a Kubernetes Indexed Job's, and the flag.
    let dir = tempfile::tempdir().unwrap();
    let run = setup(dir.path());
    let slurm = spawn(
        dir.path(),
        &base_url,
        &run_args(&["--shard", "auto"]),
        &[
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ],
    );
    let k8s = spawn(
        dir.path(),
        &base_url,
        &run_args(&["--shard", "auto"]),
        &[("JOB_COMPLETION_INDEX", "2"), ("TT_SCALE_SHARD_COUNT", "3")],
    );
    let mut first = spawn(dir.path(), &base_url, &run_args(&["--shard", "0/3"]), &[]);
    // Shard 0 is stopped once its first image is on disk, then resumed.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(run.is_dir()
        && files(&run)
            .iter()
            .any(|n| n.contains("a_red_apple") && n.ends_with(".png")))
    {
        if Instant::now() > deadline || first.try_wait().unwrap().is_some() {
            let _ = first.kill();
            let (_, _, stderr) = finish(first);
            panic!("shard 0 made no image: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sent = Command::new("kill")
        .args(["-INT", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status_code = first.wait().unwrap().code();
    eprintln!("shard 0 exit after SIGINT: {status_code:?}");
    for (name, child) in [("slurm", slurm), ("k8s", k8s)] {
        let (code, _, stderr) = finish(child);
        assert_eq!(code, Some(0), "{name}: {stderr}");
    }
    let st = status(dir.path(), &run, &base_url);
    assert_eq!(st["shards"], 3);
    let done = done_prompts(&st);
    if status_code == Some(130) {
        // The Slurm task searched prompts 1 and 4, the Indexed Job's pod 2 and 5.
        for i in [1, 2, 4, 5] {
            assert!(done.contains(&PROMPTS[i].to_string()), "{done:?}");
        }
        assert!(!done.contains(&PROMPTS[0].to_string()));
        // Resuming without --shard is ambiguous; the shard's own command again (a requeued
        // array task, a restarted pod) continues it.
        let run_s = run.display().to_string();
        let (code, _, stderr) = finish(spawn(
            dir.path(),
            &base_url,
            &["run", "--resume", &run_s],
            &[],
        ));
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            stderr.contains("sharded") && stderr.contains("--shard"),
            "{stderr}"
        );
        let (code, _, stderr) = finish(spawn(
            dir.path(),
            &base_url,
            &run_args(&["--shard", "0/3"]),
            &[],
        ));
        assert_eq!(code, Some(0), "{stderr}");
        assert!(
            stderr.contains("already started") && stderr.contains("resuming"),
            "{stderr}"
        );
    } else {
        // The stop came after the shard had finished: it is complete as it is.
        assert_eq!(status_code, Some(0));
    }
    assert_whole(&run);

    // The folder holds the unsharded run's files: names, PNG bytes, JSON apart from timings.
    assert_eq!(files(&whole), files(&run));
    for name in files(&whole) {
        let (a, b) = (whole.join(&name), run.join(&name));
        if name.ends_with(".png") {
            assert!(
                std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
                "{name}"
            );
        } else if name.ends_with(".json") {
            assert_eq!(comparable(&a), comparable(&b), "{name}");
        }
    }
    let done_dir = |r: &Path| r.join("journal/done");
    assert_eq!(files(&done_dir(&whole)), files(&done_dir(&run)));
    for name in files(&done_dir(&whole)) {
        assert_eq!(
            read_json(&done_dir(&whole).join(&name)),
            read_json(&done_dir(&run).join(&name)),
            "{name}"
        );
    }
    let st = status(dir.path(), &run, &base_url);
    assert_eq!(done_prompts(&st).len(), 6);
    assert_eq!(st["shards_started"], serde_json::json!([0, 1, 2]));
    let whole_st = status(whole_dir.path(), &whole, &base_url);
    assert_eq!(whole_st["nfe"], st["nfe"]);
    assert_eq!(whole_st["verifier_calls"], serde_json::json!(asked_whole));
    // 6 prompts, 2 + 4 candidates each, 6 NFEs an image (PNDM's 2 steps visit 3 timesteps,
    // each twice under guidance).
    assert_eq!(st["nfe"], 6 * 6 * 6);
    // `merge` of the shared folder: summary.csv and summary.json, one row per prompt and round,
    // their numbers those of the round JSON.
    let (code, stdout, stderr) = finish(spawn(
        dir.path(),
        &base_url,
        &["merge", &run.display().to_string()],
        &[],
    ));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("merged 6 prompt(s), 12 round row(s)"),
        "{stdout}"
    );
    let summary = read_json(&run.join("summary.json"));
    let rows = summary["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 12);
    for row in rows {
        let json = run.join(row["best_image"].as_str().unwrap().replace(".png", ".json"));
        let round = read_json(&json);
        assert_eq!(row["best_score"], round["best_score"]["score"]);
        assert_eq!(row["nfe_so_far"], round["budget"]["nfe_so_far"]);
        assert_eq!(row["round"], round["search_round"]);
        assert_eq!(row["prompt"], round["prompt"]);
    }
    let csv = std::fs::read_to_string(run.join("summary.csv")).unwrap();
    assert_eq!(csv.lines().count(), 13);
    assert!(csv.starts_with("prompt,shard,round,candidates,metric,best_label,best_score"));
    // The report: one self-contained page whose numbers are the JSON's.
    let (code, stdout, stderr) = finish(spawn(
        dir.path(),
        &base_url,
        &["report", &run.display().to_string()],
        &[],
    ));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("report.html (6 prompt(s), 12 round row(s)"),
        "{stdout}"
    );
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(!html.contains("src=\"http") && !html.contains("<script"));
    assert_eq!(html.matches("<figure class=\"cand").count(), 6 * 6);
    assert_eq!(html.matches("<figure class=\"cand chosen\"").count(), 12);
    assert_eq!(html.matches("src=\"data:image/png;base64,").count(), 36);
    let shown: Vec<f64> = html
        .split("<span class=\"best\" data-score=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().parse().unwrap())
        .collect();
    let want: Vec<f64> = rows
        .iter()
        .map(|r| r["best_score"].as_f64().unwrap())
        .collect();
    assert_eq!(
        shown, want,
        "the report's best scores are the JSON's, in order"
    );
    assert!(html.matches("<svg class=\"chart\"").count() >= 2);
    // The text form says the same.
    let (code, text, _) = finish(spawn(
        dir.path(),
        &base_url,
        &["status", &run.display().to_string()],
        &[],
    ));
    assert_eq!(code, Some(0));
    assert!(
        text.contains("prompts: 6 (done 6, started 0, pending 0)"),
        "{text}"
    );
}

#[test]
fn sweep_mistakes_are_refused_with_what_to_do() {
    let (base_url, _server) = FakeGemini::start(Behaviour::always(Reply::PixelScore));
    let dir = tempfile::tempdir().unwrap();
    let run = setup(dir.path());
    // Shards without a common master seed would draw different candidates.
    let mut args = run_args(&["--shard", "0/2"]);
    let i = args.iter().position(|a| *a == "--seed").unwrap();
    args.drain(i..i + 2);
    let (code, _, stderr) = finish(spawn(dir.path(), &base_url, &args, &[]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--seed"), "{stderr}");
    // `auto` outside an array task, a bad spec, a bad run name.
    let (code, _, stderr) = finish(spawn(
        dir.path(),
        &base_url,
        &run_args(&["--shard", "auto"]),
        &[],
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("SLURM_ARRAY_TASK_ID"), "{stderr}");
    let (code, _, stderr) = finish(spawn(
        dir.path(),
        &base_url,
        &run_args(&["--shard", "3/3"]),
        &[],
    ));
    assert_eq!(code, Some(2), "{stderr}");
    let mut args = run_args(&[]);
    let n = args.len();
    args[n - 1] = "../escape";
    let (code, _, stderr) = finish(spawn(dir.path(), &base_url, &args, &[]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--run-name"), "{stderr}");
    // A shard started with another seed than the folder's run is refused, nothing written.
    let (code, _, stderr) = finish(spawn(
        dir.path(),
        &base_url,
        &run_args(&["--shard", "1/2"]),
        &[],
    ));
    assert_eq!(code, Some(0), "{stderr}");
    let mut args = run_args(&["--shard", "0/2"]);
    let i = args.iter().position(|a| *a == "11").unwrap();
    args[i] = "12";
    let before = files(&run);
    let (code, _, stderr) = finish(spawn(dir.path(), &base_url, &args, &[]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("another config.json"), "{stderr}");
    assert_eq!(files(&run), before);
    // Status of a folder that is not a run.
    let (code, _, stderr) = finish(spawn(dir.path(), &base_url, &["status", "."], &[]));
    assert_eq!(code, Some(2));
    assert!(stderr.contains("not a tt-scale run folder"), "{stderr}");
    // Half the sweep: 3 prompts done, 3 pending, shard 0 not started; merge names the gaps.
    let st = status(dir.path(), &run, &base_url);
    assert_eq!(st["shards_started"], serde_json::json!([1]));
    assert_eq!(done_prompts(&st).len(), 3);
    let (code, _, stderr) = finish(spawn(
        dir.path(),
        &base_url,
        &["merge", &run.display().to_string()],
        &[],
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("not done") && stderr.contains("a red apple"),
        "{stderr}"
    );
}

/// Shards in folders of their own (no --run-name) merge into one folder that equals the
/// unsharded run; a folder missing, or given twice, is refused.
#[test]
fn per_shard_folders_merge_into_the_unsharded_run() {
    let (base_url, _server) = FakeGemini::start(Behaviour::always(Reply::PixelScore));
    let whole_dir = tempfile::tempdir().unwrap();
    let whole = setup(whole_dir.path());
    let (code, _, stderr) = finish(spawn(whole_dir.path(), &base_url, &run_args(&[]), &[]));
    assert_eq!(code, Some(0), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let mut folders = Vec::new();
    for shard in ["0/2", "1/2"] {
        let mut args = run_args(&["--shard", shard]);
        args.truncate(args.len() - 4);
        args.extend(["--shard", shard]);
        let (code, _, stderr) = finish(spawn(dir.path(), &base_url, &args, &[]));
        assert_eq!(code, Some(0), "{stderr}");
        let line = stderr.lines().find(|l| l.contains("writing to")).unwrap();
        folders.push(
            line.rsplit("writing to ")
                .next()
                .unwrap()
                .trim()
                .to_string(),
        );
    }
    let merge = |args: &[&str]| {
        let mut all = vec!["merge"];
        all.extend_from_slice(args);
        finish(spawn(dir.path(), &base_url, &all, &[]))
    };
    let (code, _, stderr) = merge(&[&folders[0]]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, _, stderr) = merge(&[&folders[0], &folders[0], "--into", "m"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("more than one"), "{stderr}");
    let (code, _, stderr) = merge(&[&folders[0], &folders[1]]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--into"), "{stderr}");
    let (code, stdout, stderr) = merge(&[&folders[0], &folders[1], "--into", "merged"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("merged 6 prompt(s)"), "{stdout}");
    let merged = dir.path().join("merged");
    let mut want = files(&whole);
    want.insert("summary.csv".into());
    want.insert("summary.json".into());
    assert_eq!(files(&merged), want);
    for name in files(&whole).iter().filter(|n| n.ends_with(".png")) {
        assert!(
            std::fs::read(whole.join(name)).unwrap() == std::fs::read(merged.join(name)).unwrap(),
            "{name}"
        );
    }
    let st = status(dir.path(), &merged, &base_url);
    assert_eq!(done_prompts(&st).len(), 6);
    assert_eq!(st["shards_started"], serde_json::json!([0, 1]));
}

/// `--device cpu,cpu`: one worker process a device, sharing out the prompts into one folder that
/// equals the single-device run; `--json` adds up the workers' summaries.
#[test]
fn several_devices_run_one_worker_each_into_the_single_device_folder() {
    let (base_url, _server) = FakeGemini::start(Behaviour::always(Reply::PixelScore));
    let whole_dir = tempfile::tempdir().unwrap();
    let whole = setup(whole_dir.path());
    let (code, _, stderr) = finish(spawn(whole_dir.path(), &base_url, &run_args(&[]), &[]));
    assert_eq!(code, Some(0), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let run = setup(dir.path());
    let mut args = run_args(&["--json"]);
    let i = args.iter().position(|a| *a == "cpu").unwrap();
    args[i] = "cpu,cpu";
    let (code, stdout, stderr) = finish(spawn(dir.path(), &base_url, &args, &[]));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("2 workers (cpu, cpu)"), "{stderr}");
    assert!(
        stderr.contains("[cpu] "),
        "worker logs are forwarded: {stderr}"
    );
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["images"], 36);
    assert_eq!(summary["prompts"].as_array().unwrap().len(), 6);
    assert_eq!(files(&whole), files(&run));
    for name in files(&whole) {
        let (a, b) = (whole.join(&name), run.join(&name));
        if name.ends_with(".png") {
            assert!(
                std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
                "{name}"
            );
        } else if name.ends_with(".json") {
            assert_eq!(comparable(&a), comparable(&b), "{name}");
        }
    }
    let st = status(dir.path(), &run, &base_url);
    assert_eq!(st["shards_started"], serde_json::json!([0, 1]));
    // A bad list is refused by the parser; --resume takes one device.
    args[i] = "cpu,tpu";
    let (code, _, stderr) = finish(spawn(dir.path(), &base_url, &args, &[]));
    assert_eq!(code, Some(2), "{stderr}");
    let run_s = run.display().to_string();
    let (code, _, stderr) = finish(spawn(
        dir.path(),
        &base_url,
        &["run", "--resume", &run_s, "--device", "cpu,cpu"],
        &[],
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("one device") && stderr.contains("again"),
        "{stderr}"
    );
}
