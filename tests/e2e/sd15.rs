//! `tt-scale run` end to end: the tiny SD 1.5-architecture model in diffusers layout, graded by
//! fake Gemini and OpenAI servers on loopback; the exact output tree, the JSON contents, the
//! collage, reproducibility, and a run whose verifier always fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::fake_verifier::{pixel_score, Behaviour, FakeGemini, FakeOpenAi, Reply};
use serde_json::Value;

pub(crate) const PROMPT: &str = "a tiny astronaut hatching from an egg on the moon";
pub(crate) const PROMPT_NAME: &str =
    "prompt@a_tiny_astronaut_hatching_from_an_egg_on_the_moon_hash@8a6a79d2";

pub(crate) fn tiny_model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny-sd15")
        .display()
        .to_string()
}

pub(crate) fn config(verifier: &str, search: Value) -> String {
    serde_json::json!({
        "pretrained_model_name_or_path": tiny_model(),
        "torch_dtype": "fp32",
        "pipeline_call_args": {"num_inference_steps": 2, "guidance_scale": 7.5, "negative_prompt": "blurry"},
        "verifier_args": {"name": verifier, "choice_of_metric": "overall_score", "max_new_tokens": 800, "max_attempts": 2},
        "search_args": search,
    })
    .to_string()
}

/// Runs `tt-scale` in `dir` with the verifier's base URL and key in the environment.
pub(crate) fn tt_scale(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tt-scale"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("GEMINI_API_KEY")
        .env_remove("OPENAI_API_KEY")
        .env_remove("GEMINI_BASE_URL")
        .env_remove("OPENAI_BASE_URL")
        .env("HF_HUB_OFFLINE", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run tt-scale")
}

/// Runs a search with `config` and returns the run folder.
fn run_search(dir: &Path, config: &str, env: &[(&str, &str)], seed: &str, out: &str) -> PathBuf {
    std::fs::write(dir.join("c.json"), config).unwrap();
    let o = tt_scale(
        dir,
        &[
            "run",
            "--pipeline-config",
            "c.json",
            "--prompt",
            PROMPT,
            "--seed",
            seed,
            "--output-dir",
            out,
            "--batch-size",
            "3",
            "--device",
            "cpu",
        ],
        env,
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "tt-scale run failed: {stderr}");
    assert!(stderr.contains("Summary"), "{stderr}");
    // Without a terminal (here a pipe), progress is one line per round.
    assert!(
        stderr.contains("round 1: best overall_score = "),
        "{stderr}"
    );
    let parent = dir.join(out).join("tiny-sd15");
    let verifier_dir = std::fs::read_dir(&parent)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let metric_dir = verifier_dir.join("overall_score");
    let mut runs: Vec<PathBuf> = std::fs::read_dir(&metric_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "one run folder");
    runs.pop().unwrap()
}

/// The one run folder a Gemini run of the tiny SD 1.5 wrote under `dir/out`.
fn run_folder(dir: &Path) -> PathBuf {
    let parent = dir.join("out/tiny-sd15/gemini/overall_score");
    let mut runs = std::fs::read_dir(&parent).unwrap();
    runs.next().unwrap().unwrap().path()
}

pub(crate) fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

pub(crate) fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn random_search_with_gemini_writes_the_originals_tree_and_a_collage() {
    let (base_url, server) = FakeGemini::start(Behaviour::good());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        "gemini",
        serde_json::json!({"search_method": "random", "search_rounds": 3}),
    );
    let env = [
        ("GEMINI_API_KEY", "test-key-123"),
        ("GEMINI_BASE_URL", base_url.as_str()),
    ];
    let run = run_search(dir.path(), &cfg, &env, "42", "out");
    assert!(run.starts_with(dir.path().join("out/tiny-sd15/gemini/overall_score")));
    assert!(server.violations().is_empty(), "{:?}", server.violations());
    assert_eq!(server.request_count(), 14);

    let names = files(&run);
    let pngs: Vec<&String> = names.iter().filter(|n| n.ends_with(".png")).collect();
    let jsons: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".json") && n.contains("hash@"))
        .collect();
    assert_eq!(pngs.len(), 14, "{names:?}");
    assert_eq!(jsons.len(), 3, "{names:?}");
    assert!(names.contains("config.json"));
    assert_eq!(names.len(), 19, "nothing else: {names:?}");
    // The journal for --resume: the resume record, one line per grade, and the prompt's
    // completion record (for status, merge and report).
    let journal = run.join("journal");
    assert_eq!(
        files(&journal),
        BTreeSet::from([
            "run.json".to_string(),
            "done".to_string(),
            format!("{PROMPT_NAME}.jsonl")
        ])
    );
    let done = read_json(&journal.join(format!("done/{PROMPT_NAME}.json")));
    assert_eq!(done["rounds"], 3);
    assert_eq!(done["images"], 14);
    assert_eq!(done["verifier_calls"], 14);
    let lines = std::fs::read_to_string(journal.join(format!("{PROMPT_NAME}.jsonl"))).unwrap();
    assert_eq!(lines.lines().count(), 14);
    for round in 1..=3 {
        let n = pngs
            .iter()
            .filter(|p| p.contains(&format!("_i@{round}_s@")))
            .count();
        assert_eq!(n, 1 << round, "round {round}");
    }
    assert!(pngs.iter().all(|p| p.starts_with(PROMPT_NAME)));

    let mut best_so_far = f64::MIN;
    for round in 1..=3usize {
        let name = jsons
            .iter()
            .find(|j| j.contains(&format!("_i@{round}_s@")))
            .unwrap();
        let d = read_json(&run.join(name.as_str()));
        assert_eq!(
            keys(&d)[..7],
            [
                "prompt",
                "search_round",
                "num_noises",
                "best_noise_seed",
                "best_score",
                "choice_of_metric",
                "best_img_path"
            ]
        );
        assert_eq!(d["prompt"], PROMPT);
        assert_eq!(d["search_round"], round);
        assert_eq!(d["num_noises"], 1 << round);
        // Compute spent: SD 1.5's PNDM visits 3 timesteps for 2 steps, twice each under
        // guidance: 6 denoiser evaluations an image; one grading each, of the fake judge's
        // 1290 input and 150 output tokens.
        let so_far = (2u64 << round) - 2;
        assert_eq!(
            d["budget"],
            serde_json::json!({
                "nfe": 6 << round,
                "nfe_so_far": 6 * so_far,
                "verifier_calls": 1 << round,
                "verifier_calls_so_far": so_far,
                "verifier_input_tokens": 1290 << round,
                "verifier_output_tokens": 150 << round,
                "verifier_input_tokens_so_far": 1290 * so_far,
                "verifier_output_tokens_so_far": 150 * so_far,
            }),
            "round {round}"
        );
        assert_eq!(d["choice_of_metric"], "overall_score");
        assert_eq!(keys(&d["best_score"]), ["explanation", "score"]);
        // The JSON is named after the best image, which exists.
        let best_img = PathBuf::from(d["best_img_path"].as_str().unwrap());
        assert_eq!(best_img.file_stem(), Path::new(name.as_str()).file_stem());
        let img = image::open(run.join(best_img.file_name().unwrap()))
            .unwrap()
            .to_rgb8();
        // The fake judge scores the image it was sent; the recorded best is the maximum
        // over the round's candidates, ties to the earliest.
        let candidates = d["candidates"].as_array().unwrap();
        assert_eq!(candidates.len(), 1 << round);
        let scores: Vec<f64> = candidates
            .iter()
            .map(|c| c["score"]["score"].as_f64().unwrap())
            .collect();
        let max = scores.iter().cloned().fold(f64::MIN, f64::max);
        let first_max = scores.iter().position(|s| *s == max).unwrap();
        assert_eq!(d["best_noise_seed"], candidates[first_max]["seed"]);
        assert!((d["best_score"]["score"].as_f64().unwrap() - max).abs() < 1e-9);
        assert!(
            (pixel_score(&img) - max).abs() < 1e-6,
            "the best image is the one scored {max}"
        );
        for c in candidates {
            let p = PathBuf::from(c["img_path"].as_str().unwrap());
            let im = image::open(run.join(p.file_name().unwrap()))
                .unwrap()
                .to_rgb8();
            assert!(
                (pixel_score(&im) - c["score"]["score"].as_f64().unwrap()).abs() < 1e-6,
                "scores are matched to candidates by index"
            );
            assert_eq!(c["noise"]["kind"], "seed");
        }
        best_so_far = best_so_far.max(max);
        assert!((d["best_so_far"]["score"].as_f64().unwrap() - best_so_far).abs() < 1e-9);
        assert_eq!(d["num_failed"], 0);
    }
    // Seeds are all distinct.
    let seeds: BTreeSet<String> = pngs
        .iter()
        .map(|p| p.rsplit("_s@").next().unwrap().to_string())
        .collect();
    assert_eq!(seeds.len(), 14);

    let c = read_json(&run.join("config.json"));
    assert_eq!(c["pretrained_model_name_or_path"], tiny_model());
    assert_eq!(c["seed"], 42);
    assert_eq!(c["prompt"], PROMPT);
    assert_eq!(c["num_prompts"], Value::Null);
    assert_eq!(c["batch_size_for_img_gen"], 3);
    assert_eq!(c["tt_scale_version"], env!("CARGO_PKG_VERSION"));
    let all = std::fs::read_to_string(run.join("config.json")).unwrap();
    assert!(
        !all.contains("test-key-123"),
        "keys never appear in outputs"
    );

    // The collage: one PNG per prompt, the three round bests in a row.
    let o = tt_scale(
        dir.path(),
        &["collage", "--path", run.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let collage = run.join(format!(
        "collage_{}_i@1-3.png",
        PROMPT_NAME
            .trim_start_matches("prompt@")
            .split("_hash@")
            .next()
            .unwrap()
    ));
    let img = image::open(&collage).unwrap_or_else(|e| panic!("{}: {e}", collage.display()));
    let first = image::open(run.join(pngs[0].as_str())).unwrap();
    assert_eq!(img.width(), 3 * first.width());
    assert_eq!(img.height(), first.height());
}

#[test]
fn the_same_seed_gives_the_same_files_and_selections() {
    let (base_url, _server) = FakeGemini::start(Behaviour::good());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        "gemini",
        serde_json::json!({"search_method": "random", "search_rounds": 2}),
    );
    let env = [
        ("GEMINI_API_KEY", "k"),
        ("GEMINI_BASE_URL", base_url.as_str()),
    ];
    let a = run_search(dir.path(), &cfg, &env, "7", "a");
    let b = run_search(dir.path(), &cfg, &env, "7", "b");
    let c = run_search(dir.path(), &cfg, &env, "8", "c");
    assert_eq!(files(&a), files(&b));
    assert_ne!(
        files(&a),
        files(&c),
        "another master seed draws other seeds"
    );
    for name in files(&a) {
        if name.ends_with(".png") {
            assert_eq!(
                std::fs::read(a.join(&name)).unwrap(),
                std::fs::read(b.join(&name)).unwrap(),
                "{name}"
            );
        } else if name.contains("hash@") {
            let (mut x, mut y) = (read_json(&a.join(&name)), read_json(&b.join(&name)));
            for v in [&mut x, &mut y] {
                v.as_object_mut().unwrap().remove("timings");
            }
            let rel = |run: &Path| {
                run.strip_prefix(dir.path())
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string()
            };
            let strip = |v: &Value, run: &Path| v.to_string().replace(&rel(run), "<run>");
            assert_eq!(strip(&x, &a), strip(&y, &b), "{name}");
        }
    }
}

#[test]
fn zero_order_search_records_how_to_regenerate_each_neighbor() {
    let (base_url, server) = FakeGemini::start(Behaviour::good());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        "gemini",
        serde_json::json!({"search_method": "zero-order", "search_rounds": 3, "threshold": 0.95, "num_neighbors": 2}),
    );
    let env = [
        ("GEMINI_API_KEY", "k"),
        ("GEMINI_BASE_URL", base_url.as_str()),
    ];
    let run = run_search(dir.path(), &cfg, &env, "3", "out");
    assert!(server.violations().is_empty());
    let names = files(&run);
    let jsons: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".json") && n.contains("hash@"))
        .collect();
    assert_eq!(jsons.len(), 3, "one JSON per round: {names:?}");
    let mut generated = 0;
    let mut prev: Option<Value> = None;
    for round in 1..=3usize {
        let name = jsons
            .iter()
            .find(|j| j.contains(&format!("_i@{round}_s@")))
            .unwrap();
        let d = read_json(&run.join(name.as_str()));
        // Carried-over bases are neither denoised nor graded again: not counted.
        let new = d["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c.get("carried_over").is_none())
            .count() as u64;
        assert_eq!(d["budget"]["verifier_calls"], new);
        assert_eq!(d["budget"]["nfe"], 6 * new);
        assert_eq!(
            keys(&d)[..8],
            [
                "prompt",
                "search_round",
                "num_noises",
                "best_noise_seed",
                "best_score",
                "choice_of_metric",
                "best_img_path",
                "neighbors_improvement"
            ]
        );
        assert_eq!(d["num_noises"], 3, "the base and two neighbours");
        let cands = d["candidates"].as_array().unwrap();
        let base = &cands[0];
        let carried = base.get("carried_over").is_some();
        // A round that improved hands its best neighbour on as the next base.
        if let Some(p) = &prev {
            if p["neighbors_improvement"] == true {
                assert!(carried);
                assert_eq!(base["noise"], p["best_noise"]);
            } else {
                assert!(!carried);
                assert_eq!(base["noise"]["kind"], "seed");
            }
        }
        generated += if carried { 2 } else { 3 };
        for (i, n) in cands[1..].iter().enumerate() {
            assert_eq!(n["noise"]["kind"], "neighbor");
            assert_eq!(n["noise"]["neighbor_index"], i);
            assert_eq!(n["noise"]["threshold"], 0.95);
            assert_eq!(n["noise"]["base"], base["noise"]);
            assert!(n["noise"]["direction_seed"].is_u64());
            let label = n["label"].as_str().unwrap();
            assert!(label.contains("-n"), "{label}");
        }
        let s: Vec<f64> = cands
            .iter()
            .map(|c| c["score"]["score"].as_f64().unwrap())
            .collect();
        let improved = s[1..].iter().any(|x| *x > s[0]);
        assert_eq!(d["neighbors_improvement"], improved);
        prev = Some(d);
    }
    let pngs = names.iter().filter(|n| n.ends_with(".png")).count();
    assert_eq!(pngs, 9, "every round's three candidates are saved");
    assert_eq!(
        server.request_count(),
        generated,
        "carried bases are not graded again"
    );
}

#[test]
fn random_search_with_openai_writes_the_same_tree() {
    let (base_url, server) = FakeOpenAi::start(Behaviour::good());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        "openai",
        serde_json::json!({"search_method": "random", "search_rounds": 3}),
    );
    let env = [
        ("OPENAI_API_KEY", "sk-test"),
        ("OPENAI_BASE_URL", base_url.as_str()),
    ];
    let run = run_search(dir.path(), &cfg, &env, "5", "out");
    assert!(run.starts_with(dir.path().join("out/tiny-sd15/openai/overall_score")));
    assert!(server.violations().is_empty(), "{:?}", server.violations());
    let names = files(&run);
    assert_eq!(names.iter().filter(|n| n.ends_with(".png")).count(), 14);
    assert_eq!(names.iter().filter(|n| n.ends_with(".json")).count(), 4);
}

#[test]
fn a_verifier_that_always_fails_is_recorded_and_the_run_completes() {
    // A transient failure (503), retried until verifier_args.max_attempts, then recorded.
    let (base_url, server) = FakeGemini::start(Behaviour::always(Reply::status(503)));
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        "gemini",
        serde_json::json!({"search_method": "random", "search_rounds": 2}),
    );
    let env = [
        ("GEMINI_API_KEY", "secret-key-xyz"),
        ("GEMINI_BASE_URL", base_url.as_str()),
    ];
    std::fs::write(dir.path().join("c.json"), &cfg).unwrap();
    let o = tt_scale(
        dir.path(),
        &[
            "run",
            "--pipeline-config",
            "c.json",
            "--prompt",
            PROMPT,
            "--seed",
            "1",
            "--output-dir",
            "out",
        ],
        &env,
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("rounds with none graded")
            && stderr.contains("6 candidates without a grade"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret-key-xyz"));
    assert!(server.request_count() >= 6);
    let run = run_folder(dir.path());
    let names = files(&run);
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".png")).count(),
        6,
        "images are kept"
    );
    for round in 1..=2 {
        let f = run.join(format!("{PROMPT_NAME}_i@{round}_failed.json"));
        let d = read_json(&f);
        assert_eq!(d["best_noise_seed"], Value::Null);
        assert_eq!(d["all_failed"], true);
        for c in d["candidates"].as_array().unwrap() {
            assert!(c["error"].as_str().unwrap().contains("503"), "{c}");
            assert!(!c["error"].as_str().unwrap().contains("secret-key-xyz"));
        }
    }
}

#[test]
fn a_rejected_key_stops_the_run_after_one_batch_with_exit_code_3() {
    let reply = Reply::Status {
        code: 401,
        retry_after: None,
        message: Some("API key not valid. Please pass a valid API key.".into()),
    };
    let (base_url, server) = FakeGemini::start(Behaviour::always(reply));
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        "gemini",
        serde_json::json!({"search_method": "random", "search_rounds": 3}),
    );
    let env = [
        ("GEMINI_API_KEY", "secret-key-xyz"),
        ("GEMINI_BASE_URL", base_url.as_str()),
    ];
    std::fs::write(dir.path().join("c.json"), &cfg).unwrap();
    let started = std::time::Instant::now();
    let o = tt_scale(
        dir.path(),
        &[
            "run",
            "--pipeline-config",
            "c.json",
            "--prompt",
            PROMPT,
            "--seed",
            "1",
            "--output-dir",
            "out",
            "--device",
            "cpu",
        ],
        &env,
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{stderr}");
    assert!(started.elapsed().as_secs() < 60, "{stderr}");
    assert!(stderr.contains("API key not valid"), "{stderr}");
    assert!(
        stderr.contains("GEMINI_API_KEY"),
        "says what to do: {stderr}"
    );
    assert!(!stderr.contains("secret-key-xyz"));
    // One batch (batch size 1: one image) was graded; nothing more was generated or asked.
    assert_eq!(server.request_count(), 1, "{stderr}");
    // The one image generated is kept (saved before grading); the incomplete round has no
    // JSON.
    let run = run_folder(dir.path());
    let names = files(&run);
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(
        names.contains("config.json") && names.contains("journal"),
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".png")).count(),
        1,
        "{names:?}"
    );
}

#[test]
fn a_key_rejected_by_the_access_check_costs_no_image_and_exits_3() {
    let (base_url, server) = FakeGemini::start(Behaviour::good());
    server.set_access_reply(Reply::Status {
        code: 400,
        retry_after: None,
        message: Some("API key not valid. Please pass a valid API key.".into()),
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        "gemini",
        serde_json::json!({"search_method": "random", "search_rounds": 3}),
    );
    std::fs::write(dir.path().join("c.json"), &cfg).unwrap();
    let env = [
        ("GEMINI_API_KEY", "secret-key-xyz"),
        ("GEMINI_BASE_URL", base_url.as_str()),
    ];
    let o = tt_scale(
        dir.path(),
        &[
            "run",
            "--pipeline-config",
            "c.json",
            "--prompt",
            PROMPT,
            "--device",
            "cpu",
        ],
        &env,
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("API key not valid") && stderr.contains("GEMINI_API_KEY"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was generated"), "{stderr}");
    assert!(!stderr.contains("secret-key-xyz"));
    assert_eq!(server.access_checks().len(), 1);
    assert_eq!(server.request_count(), 0, "no image was graded");
    assert!(
        !dir.path().join("output").exists(),
        "no run folder was made"
    );
}

/// Copies `from` into `to` recursively.
pub(crate) fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn offline_a_hub_model_loads_from_the_cache_and_a_missing_file_is_named() {
    let (base_url, _server) = FakeGemini::start(Behaviour::good());
    let dir = tempfile::tempdir().unwrap();
    // The hf-hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}.
    let hf_home = dir.path().join("hf");
    let repo_dir = hf_home.join("hub/models--tt-scale--tiny-sd15");
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), "0123abcd").unwrap();
    copy_tree(
        Path::new(&tiny_model()),
        &repo_dir.join("snapshots/0123abcd"),
    );
    let mut cfg: Value = serde_json::from_str(&config(
        "gemini",
        serde_json::json!({"search_method": "random", "search_rounds": 1}),
    ))
    .unwrap();
    cfg["pretrained_model_name_or_path"] = Value::from("tt-scale/tiny-sd15");
    let hf_home_s = hf_home.display().to_string();
    let env = [
        ("GEMINI_API_KEY", "k"),
        ("GEMINI_BASE_URL", base_url.as_str()),
        ("HF_HOME", hf_home_s.as_str()),
    ];
    let run = run_search(dir.path(), &cfg.to_string(), &env, "1", "out");
    assert_eq!(
        files(&run).iter().filter(|n| n.ends_with(".png")).count(),
        2
    );

    // Without the scheduler config in the cache, the run names the file and HF_HUB_OFFLINE.
    std::fs::remove_file(repo_dir.join("snapshots/0123abcd/scheduler/scheduler_config.json"))
        .unwrap();
    std::fs::write(dir.path().join("c.json"), cfg.to_string()).unwrap();
    let o = tt_scale(
        dir.path(),
        &[
            "run",
            "--pipeline-config",
            "c.json",
            "--prompt",
            PROMPT,
            "--device",
            "cpu",
        ],
        &env,
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("scheduler/scheduler_config.json") && stderr.contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );
}

/// Starts a search whose every grading takes 1.5 s, sends `signal` once the second round is
/// being graded, and returns (exit code, stderr, run folder).
fn interrupted_run(signal: &str) -> (Option<i32>, String, PathBuf, tempfile::TempDir) {
    let slow = Reply::Delayed(Duration::from_millis(1500), Box::new(Reply::PixelScore));
    let (base_url, server) = FakeGemini::start(Behaviour::always(slow));
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        "gemini",
        serde_json::json!({"search_method": "random", "search_rounds": 4}),
    );
    std::fs::write(dir.path().join("c.json"), &cfg).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tt-scale"))
        .args([
            "run",
            "--pipeline-config",
            "c.json",
            "--prompt",
            PROMPT,
            "--seed",
            "1",
            "--output-dir",
            "out",
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ])
        .current_dir(dir.path())
        .env("GEMINI_API_KEY", "k")
        .env("GEMINI_BASE_URL", &base_url)
        .env("HF_HUB_OFFLINE", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while server.request_count() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = Command::new("kill")
        .args(["-s", signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "stopped within seconds"
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let run = run_folder(dir.path());
    (out.status.code(), stderr, run, dir)
}

/// Every file of a run folder is whole: the JSON parses, the PNGs decode, no temporary file.
pub(crate) fn assert_whole(run: &Path) {
    for name in files(run) {
        let path = run.join(&name);
        assert!(!name.contains(".tmp"), "a temporary file was left: {name}");
        if name.ends_with(".json") {
            read_json(&path);
        } else if name.ends_with(".png") {
            image::open(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

#[test]
fn ctrl_c_stops_before_the_next_batch_keeps_whole_files_and_exits_130() {
    let (code, stderr, run, _dir) = interrupted_run("INT");
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
    assert_whole(&run);
    // Only complete rounds have a JSON, with all their 2^round images; round 1 (one batch,
    // graded before anything else) is among them, and the run stopped before its last round.
    let names = files(&run);
    let mut rounds_written = 0;
    for round in 1..=4 {
        let tag = format!("_i@{round}_");
        let pngs = names
            .iter()
            .filter(|n| n.contains(&tag) && n.ends_with(".png"))
            .count();
        let jsons = names
            .iter()
            .filter(|n| n.contains(&tag) && n.ends_with(".json"))
            .count();
        // A round's JSON is written once all its images are graded; its images are saved as
        // they are decoded, so a round cut short has images but no JSON.
        if jsons > 0 {
            assert_eq!((pngs, jsons), (1 << round, 1), "round {round}: {names:?}");
            rounds_written += 1;
        } else {
            assert!(
                pngs < 1 << round,
                "round {round} has every image but no JSON"
            );
        }
    }
    assert!((1..4).contains(&rounds_written), "{names:?}");
}

#[test]
fn sigterm_stops_the_same_way_and_exits_143() {
    let (code, stderr, run, _dir) = interrupted_run("TERM");
    assert_eq!(code, Some(143), "{stderr}");
    assert!(stderr.contains("interrupted by SIGTERM"), "{stderr}");
    assert_whole(&run);
}

#[test]
fn a_closed_stderr_and_stdout_do_not_stop_the_run() {
    let (base_url, _server) = FakeGemini::start(Behaviour::good());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        "gemini",
        serde_json::json!({"search_method": "random", "search_rounds": 2}),
    );
    std::fs::write(dir.path().join("c.json"), &cfg).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tt-scale"))
        .args([
            "run",
            "--pipeline-config",
            "c.json",
            "--prompt",
            PROMPT,
            "--seed",
            "1",
            "--output-dir",
            "out",
            "--device",
            "cpu",
            "-v",
        ])
        .current_dir(dir.path())
        .env("GEMINI_API_KEY", "k")
        .env("GEMINI_BASE_URL", &base_url)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // As `tt-scale run ... 2>&1 | head -0`: nobody reads, the pipes are closed.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let run = run_folder(dir.path());
    assert_eq!(
        files(&run).iter().filter(|n| n.ends_with(".png")).count(),
        6
    );
    assert_whole(&run);
}

#[test]
fn collage_skips_a_missing_or_corrupt_image_and_makes_the_collage() {
    let (base_url, _server) = FakeGemini::start(Behaviour::good());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        "gemini",
        serde_json::json!({"search_method": "random", "search_rounds": 3}),
    );
    let env = [
        ("GEMINI_API_KEY", "k"),
        ("GEMINI_BASE_URL", base_url.as_str()),
    ];
    let run = run_search(dir.path(), &cfg, &env, "1", "out");
    let bests: Vec<String> = (1..=3)
        .map(|round| {
            let tag = format!("_i@{round}_");
            let json = files(&run)
                .into_iter()
                .find(|n| n.contains(&tag) && n.ends_with(".json"))
                .unwrap();
            json.replace(".json", ".png")
        })
        .collect();
    std::fs::remove_file(run.join(&bests[0])).unwrap();
    std::fs::write(run.join(&bests[1]), b"not a png").unwrap();
    for old in files(&run)
        .into_iter()
        .filter(|n| n.starts_with("collage_"))
    {
        std::fs::remove_file(run.join(old)).unwrap();
    }
    let o = tt_scale(
        dir.path(),
        &["collage", "--path", run.to_str().unwrap()],
        &[],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("skipping"), "{stderr}");
    let collage = files(&run)
        .into_iter()
        .find(|n| n.starts_with("collage_"))
        .expect("the collage is made from the images left");
    let img = image::open(run.join(collage)).unwrap();
    let one = image::open(run.join(&bests[2])).unwrap();
    assert_eq!(img.width(), one.width(), "one image left in the row");
}

#[test]
fn the_laion_aesthetic_verifier_searches_offline_without_an_api_key() {
    let dir = tempfile::tempdir().unwrap();
    let run = offline_run(
        dir.path(),
        tiny_clip_args("laion_aesthetic", "laion_aesthetic_score"),
        2,
    );
    assert!(run.starts_with(
        dir.path()
            .join("out/tiny-sd15/laion_aesthetic/laion_aesthetic_score")
    ));
    let names = files(&run);
    assert_eq!(names.iter().filter(|n| n.ends_with(".png")).count(), 6);
    for round in 1..=2 {
        let json = names
            .iter()
            .find(|n| n.contains(&format!("_i@{round}_s@")) && n.ends_with(".json"))
            .unwrap();
        let d = read_json(&run.join(json));
        let candidates = d["candidates"].as_array().unwrap();
        let scores: Vec<f64> = candidates
            .iter()
            .map(|c| {
                let g = &c["grading"];
                // One CLIP pass records every CLIP metric.
                assert!(g["clip_score"]["score"].is_number() && g["clip_s"]["score"].is_number());
                g["laion_aesthetic_score"]["score"].as_f64().unwrap()
            })
            .collect();
        let best = scores.iter().cloned().fold(f64::MIN, f64::max);
        assert_eq!(
            d["best_score"]["score"].as_f64().unwrap(),
            best,
            "round {round}"
        );
        assert_eq!(d["choice_of_metric"], "laion_aesthetic_score");
    }
}

/// `verifier_args` of the tiny CLIP verifiers: `laion_aesthetic` or `clip_score`.
fn tiny_clip_args(name: &str, metric: &str) -> Value {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    serde_json::json!({
        "name": name,
        "choice_of_metric": metric,
        "model_name": fixtures.join("tiny-clip").display().to_string(),
        "aesthetic_model": fixtures.join("clip/aesthetic-model.pth").display().to_string(),
    })
}

/// `verifier_args` of the tiny ImageReward (tools/reference/make_image_reward_fixtures.py).
fn tiny_image_reward_args() -> Value {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image-reward");
    serde_json::json!({
        "name": "image_reward",
        "choice_of_metric": "image_reward",
        "model_name": dir.join("ImageReward.pt").display().to_string(),
        "processor_model": dir.join("bert-tokenizer").display().to_string(),
    })
}

/// Runs the tiny SD 1.5 offline with `verifier_args` and a random search of `rounds`; returns
/// the run folder.
fn offline_run(dir: &Path, verifier_args: Value, rounds: usize) -> PathBuf {
    let search = serde_json::json!({"search_method": "random", "search_rounds": rounds});
    offline_run_with(dir, verifier_args, search).0
}

/// Runs the tiny SD 1.5 offline with `verifier_args` and `search_args`; returns the run folder
/// and stderr.
fn offline_run_with(dir: &Path, verifier_args: Value, search_args: Value) -> (PathBuf, String) {
    let cfg = serde_json::json!({
        "pretrained_model_name_or_path": tiny_model(),
        "torch_dtype": "fp32",
        "pipeline_call_args": {"num_inference_steps": 2, "guidance_scale": 7.5},
        "verifier_args": verifier_args,
        "search_args": search_args,
    });
    std::fs::write(dir.join("c.json"), cfg.to_string()).unwrap();
    let o = tt_scale(
        dir,
        &[
            "run",
            "--pipeline-config",
            "c.json",
            "--prompt",
            PROMPT,
            "--seed",
            "3",
            "--output-dir",
            "out",
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{stderr}");
    let out = dir.join("out/tiny-sd15");
    let verifier = std::fs::read_dir(&out)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let metric = std::fs::read_dir(&verifier)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let run = std::fs::read_dir(&metric)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    (run, stderr)
}

/// The round JSON files of `run`, by round.
fn round_jsons(run: &Path, rounds: usize) -> Vec<Value> {
    let names = files(run);
    (1..=rounds)
        .map(|round| {
            let name = names
                .iter()
                .find(|n| n.contains(&format!("_i@{round}_s@")) && n.ends_with(".json"))
                .unwrap();
            read_json(&run.join(name))
        })
        .collect()
}

#[test]
fn the_ensemble_records_every_member_and_selects_by_average_rank() {
    let dir = tempfile::tempdir().unwrap();
    let args = serde_json::json!({
        "name": "ensemble",
        "choice_of_metric": "ensemble_rank",
        "ensemble": [
            tiny_clip_args("laion_aesthetic", "laion_aesthetic_score"),
            tiny_clip_args("clip_score", "clip_score"),
            tiny_image_reward_args(),
        ],
    });
    // The paper's ensemble: aesthetic, CLIPScore and ImageReward.
    let run = offline_run(dir.path(), args, 2);
    assert!(run.starts_with(dir.path().join("out/tiny-sd15/ensemble/ensemble_rank")));
    for d in round_jsons(&run, 2) {
        let candidates = d["candidates"].as_array().unwrap();
        let n = candidates.len() as f64;
        let score = |c: &Value, m: &str| c["grading"][m]["score"].as_f64().unwrap();
        // The rank recomputed from the members' recorded scores.
        let rank = |c: &Value, m: &str| {
            let v = score(c, m);
            let below = candidates.iter().filter(|o| score(o, m) < v).count() as f64;
            let equal = candidates.iter().filter(|o| score(o, m) == v).count() as f64;
            (below + (equal + 1.0) / 2.0 - 1.0) / (n - 1.0)
        };
        let mut best = (0, f64::MIN);
        for (i, c) in candidates.iter().enumerate() {
            let want = (rank(c, "laion_aesthetic/laion_aesthetic_score")
                + rank(c, "clip_score/clip_score")
                + rank(c, "image_reward/image_reward"))
                / 3.0;
            let got = score(c, "ensemble_rank");
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
            assert!(
                c["grading"]["laion_aesthetic/clip_s"].is_object(),
                "all member metrics kept"
            );
            if got > best.1 {
                best = (i, got);
            }
        }
        assert_eq!(d["best_score"]["score"].as_f64().unwrap(), best.1);
    }
}

#[test]
fn also_score_records_other_verifiers_without_changing_the_selection() {
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = offline_run(
        plain_dir.path(),
        tiny_clip_args("clip_score", "clip_score"),
        2,
    );
    let dir = tempfile::tempdir().unwrap();
    let mut args = tiny_clip_args("clip_score", "clip_score");
    args["also_score"] =
        serde_json::json!([tiny_clip_args("laion_aesthetic", "laion_aesthetic_score")]);
    let run = offline_run(dir.path(), args, 2);
    // Same files, same choices: the extra verifier only adds its scores.
    assert_eq!(files(&plain), files(&run));
    for (a, b) in round_jsons(&plain, 2).iter().zip(round_jsons(&run, 2)) {
        assert_eq!(a["best_noise_seed"], b["best_noise_seed"]);
        for c in b["candidates"].as_array().unwrap() {
            assert!(
                c["grading"]["also/laion_aesthetic/laion_aesthetic_score"]["score"].is_number()
            );
        }
    }
}

#[test]
fn rescore_grades_a_finished_run_with_another_verifier_and_caches_every_grading() {
    let (base_url, _server) = FakeGemini::start(Behaviour::good());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        "gemini",
        serde_json::json!({"search_method": "random", "search_rounds": 2}),
    );
    let env = [
        ("GEMINI_API_KEY", "k"),
        ("GEMINI_BASE_URL", base_url.as_str()),
    ];
    let run = run_search(dir.path(), &cfg, &env, "4", "out");
    let verifier = dir.path().join("aesthetic.json");
    std::fs::write(
        &verifier,
        serde_json::json!({"verifier_args": tiny_clip_args("laion_aesthetic", "laion_aesthetic_score")})
            .to_string(),
    )
    .unwrap();
    let rescore = |extra: &[&str]| {
        let run_s = run.display().to_string();
        let verifier_s = verifier.display().to_string();
        let mut args = vec!["rescore", run_s.as_str(), "--verifier", verifier_s.as_str()];
        args.extend(extra);
        let o = tt_scale(dir.path(), &args, &[]);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = rescore(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("Rescored with laion_aesthetic (laion_aesthetic_score)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("6 asked, 0 from the cache, 0 failed"),
        "{stdout}"
    );
    let jsons: Vec<Value> = round_jsons(&run, 2);
    for d in &jsons {
        let candidates = d["candidates"].as_array().unwrap();
        let score = |c: &Value| {
            c["rescore"]["laion_aesthetic"]["laion_aesthetic_score"]["score"]
                .as_f64()
                .unwrap()
        };
        let best = candidates
            .iter()
            .max_by(|a, b| score(a).total_cmp(&score(b)))
            .unwrap();
        let r = &d["rescore"]["laion_aesthetic"];
        assert_eq!(r["best_label"], best["label"]);
        assert_eq!(r["best_score"].as_f64().unwrap(), score(best));
        // The search's choice under gemini, and whether the new verifier agrees.
        let chosen = d["best_img_path"].as_str().unwrap();
        assert!(chosen.ends_with(&format!("_s@{}.png", r["chosen_label"].as_str().unwrap())));
        assert_eq!(r["same_choice"], r["chosen_label"] == r["best_label"]);
        // The search's own keys are untouched.
        assert_eq!(d["choice_of_metric"], "overall_score");
    }
    // Again, and with another metric of the same verifier: nothing is asked twice.
    let (code, stdout, _) = rescore(&["--metric", "clip_score"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("0 asked, 6 from the cache"), "{stdout}");
    assert_eq!(
        round_jsons(&run, 2)[0]["rescore"]["laion_aesthetic"]["choice_of_metric"],
        "clip_score"
    );
    // Mistakes exit 2 and say what to do.
    let o = tt_scale(
        dir.path(),
        &["rescore", "nowhere", "--verifier", "clip_score"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("run folder"));
    let run_s = run.display().to_string();
    let o = tt_scale(dir.path(), &["rescore", &run_s, "--verifier", "dalle"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("neither a verifier"));
}

#[test]
fn every_local_verifier_runs_a_search_offline() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let clip = fixtures.join("tiny-clip").display().to_string();
    let hps = fixtures
        .join("hpsv2/HPS_v2.1_compressed.pt")
        .display()
        .to_string();
    let reward = tiny_image_reward_args();
    let (reward_pt, bert) = (
        reward["model_name"].as_str().unwrap(),
        reward["processor_model"].as_str().unwrap(),
    );
    for (name, metric, model, processor) in [
        ("clip_score", "clip_s", clip.as_str(), clip.as_str()),
        ("pickscore", "pickscore", clip.as_str(), clip.as_str()),
        ("hpsv2", "hpsv2", hps.as_str(), clip.as_str()),
        ("image_reward", "image_reward", reward_pt, bert),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let args = serde_json::json!({
            "name": name, "choice_of_metric": metric,
            "model_name": model, "processor_model": processor,
        });
        let run = offline_run(dir.path(), args, 1);
        for d in round_jsons(&run, 1) {
            assert_eq!(d["choice_of_metric"], metric);
            for c in d["candidates"].as_array().unwrap() {
                assert!(c["grading"][metric]["score"].is_number(), "{name}: {c}");
            }
        }
    }
}

#[test]
fn an_nfe_budget_stops_the_search_before_the_round_that_would_exceed_it() {
    let dir = tempfile::tempdir().unwrap();
    // 6 NFEs an image: rounds of 2 and 4 images spend 36; round 3 would reach 84.
    let (run, stderr) = offline_run_with(
        dir.path(),
        tiny_clip_args("clip_score", "clip_score"),
        serde_json::json!({"search_method": "random", "search_rounds": 3, "budget": {"nfe": 40}}),
    );
    assert!(
        stderr.contains("denoiser evaluations (NFEs): 36"),
        "{stderr}"
    );
    let names = files(&run);
    assert_eq!(names.iter().filter(|n| n.ends_with(".png")).count(), 6);
    let last = &round_jsons(&run, 2)[1];
    assert_eq!(last["budget"]["nfe_so_far"], 36);
    assert!(!names.iter().any(|n| n.contains("_i@3_")));
}

#[test]
fn also_score_best_only_grades_each_rounds_best_and_nothing_else() {
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = offline_run(
        plain_dir.path(),
        tiny_clip_args("clip_score", "clip_score"),
        2,
    );
    let dir = tempfile::tempdir().unwrap();
    let mut args = tiny_clip_args("clip_score", "clip_score");
    args["also_score"] =
        serde_json::json!([tiny_clip_args("laion_aesthetic", "laion_aesthetic_score")]);
    args["also_score_best_only"] = serde_json::json!(true);
    let run = offline_run(dir.path(), args, 2);
    assert_eq!(files(&plain), files(&run));
    for (a, b) in round_jsons(&plain, 2).iter().zip(round_jsons(&run, 2)) {
        assert_eq!(a["best_noise_seed"], b["best_noise_seed"]);
        let key = "also/laion_aesthetic/laion_aesthetic_score";
        for c in b["candidates"].as_array().unwrap() {
            let is_best = c["seed"] == b["best_noise_seed"];
            assert_eq!(c["grading"][key]["score"].is_number(), is_best, "{c}");
        }
    }
}
