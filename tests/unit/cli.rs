//! The command line as a user meets it: bad flags and bad configs give a clear error naming the
//! key, a non-zero exit code, and write nothing.

use std::path::Path;
use std::process::{Command, Output};

const GOOD: &str = r#"{
    "pretrained_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "torch_dtype": "fp32",
    "pipeline_call_args": {"height": 512, "width": 512, "negative_prompt": "bad"},
    "verifier_args": {"name": "gemini", "max_new_tokens": 800, "choice_of_metric": "overall_score"},
    "search_args": {"search_method": "random", "search_rounds": 2}
}"#;

fn tt_scale(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tt-scale"))
        .args(args)
        .current_dir(dir)
        .env_remove("GEMINI_API_KEY")
        .env_remove("OPENAI_API_KEY")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", dir.join("hf-home"))
        .output()
        .expect("run tt-scale")
}

/// Writes `config` and runs `tt-scale run` on it; returns (exit code, stderr).
fn run_config(config: &str, extra: &[&str]) -> (i32, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.json"), config).unwrap();
    let mut args = vec![
        "run",
        "--pipeline-config",
        "c.json",
        "--prompt",
        "a cat",
        "--output-dir",
        "out",
    ];
    args.extend_from_slice(extra);
    let out = tt_scale(&args, dir.path());
    let code = out.status.code().unwrap_or(-1);
    (code, String::from_utf8_lossy(&out.stderr).into_owned(), dir)
}

fn edit(f: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
    f(&mut v);
    v.to_string()
}

#[test]
fn bad_configs_name_the_key_exit_2_and_write_nothing() {
    use serde_json::json;
    type Case = (
        &'static str,
        Box<dyn FnOnce(&mut serde_json::Value)>,
        &'static [&'static str],
    );
    let cases: Vec<Case> = vec![
        (
            "missing model",
            Box::new(|v| {
                v.as_object_mut()
                    .unwrap()
                    .remove("pretrained_model_name_or_path");
            }),
            &["pretrained_model_name_or_path", "missing"],
        ),
        (
            "missing dtype",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("torch_dtype");
            }),
            &["torch_dtype", "fp32, fp16, bf16"],
        ),
        (
            "bad dtype",
            Box::new(|v| v["torch_dtype"] = json!("fp8")),
            &["torch_dtype", "fp8", "fp32, fp16, bf16"],
        ),
        (
            "dtype wrong type",
            Box::new(|v| v["torch_dtype"] = json!(16)),
            &["torch_dtype", "must be a string"],
        ),
        (
            "missing search_args",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("search_args");
            }),
            &["search_args", "missing"],
        ),
        (
            "search_args not object",
            Box::new(|v| v["search_args"] = json!([1])),
            &["search_args", "JSON object"],
        ),
        (
            "unknown method",
            Box::new(|v| v["search_args"]["search_method"] = json!("beam")),
            &["search_args.search_method", "random, zero-order"],
        ),
        (
            "rounds zero",
            Box::new(|v| v["search_args"]["search_rounds"] = json!(0)),
            &["search_args.search_rounds", ">= 1"],
        ),
        (
            "rounds missing",
            Box::new(|v| {
                v["search_args"]
                    .as_object_mut()
                    .unwrap()
                    .remove("search_rounds");
            }),
            &["search_args.search_rounds", "missing"],
        ),
        (
            "rounds fractional",
            Box::new(|v| v["search_args"]["search_rounds"] = json!(2.5)),
            &["search_args.search_rounds", "whole number"],
        ),
        (
            "threshold missing",
            Box::new(|v| {
                v["search_args"] =
                    json!({"search_method": "zero-order", "search_rounds": 2, "num_neighbors": 2})
            }),
            &["search_args.threshold", "missing", "(0, 1)"],
        ),
        (
            "threshold one",
            Box::new(
                |v| v["search_args"] = json!({"search_method": "zero-order", "search_rounds": 2, "threshold": 1.0, "num_neighbors": 2}),
            ),
            &["search_args.threshold", "(0, 1)"],
        ),
        (
            "threshold negative",
            Box::new(
                |v| v["search_args"] = json!({"search_method": "zero-order", "search_rounds": 2, "threshold": -0.5, "num_neighbors": 2}),
            ),
            &["search_args.threshold", "(0, 1)"],
        ),
        (
            "neighbors zero",
            Box::new(
                |v| v["search_args"] = json!({"search_method": "zero-order", "search_rounds": 2, "threshold": 0.9, "num_neighbors": 0}),
            ),
            &["search_args.num_neighbors", ">= 1"],
        ),
        (
            "paths that never reach the end",
            Box::new(|v| {
                v["search_args"] = json!({"search_method": "paths", "delta_f": 0.8, "delta_b": 0.7})
            }),
            &["search_args.delta_b", "more than delta_f"],
        ),
        (
            "paths scored on something unknown",
            Box::new(|v| {
                v["search_args"] = json!({"search_method": "paths", "paths_score": "mean"})
            }),
            &["search_args.paths_score", "x0, final"],
        ),
        (
            "paths with no paths",
            Box::new(|v| v["search_args"] = json!({"search_method": "paths", "num_paths": 0})),
            &["search_args.num_paths"],
        ),
        (
            "a start level beyond pure noise",
            Box::new(|v| {
                v["search_args"] = json!({"search_method": "paths", "search_start_sigma": 1.5})
            }),
            &["search_args.search_start_sigma"],
        ),
        (
            "an unknown potential",
            Box::new(|v| {
                v["search_args"] = json!({"search_method": "particles", "potential": "min"})
            }),
            &["search_args.potential", "max, add, diff"],
        ),
        (
            "a deterministic particle sampler",
            Box::new(|v| v["search_args"] = json!({"search_method": "particles", "eta": 0})),
            &["search_args.eta"],
        ),
        (
            "an ESS threshold of zero",
            Box::new(|v| {
                v["search_args"] = json!({"search_method": "particles", "ess_threshold": 0})
            }),
            &["search_args.ess_threshold"],
        ),
        (
            "a resampling window that ends before it starts",
            Box::new(|v| {
                v["search_args"] = json!({"search_method": "particles", "resample_start": 10,
                                          "resample_end": 5})
            }),
            &["search_args.resample_end", "resample_start"],
        ),
        (
            "unknown verifier",
            Box::new(|v| v["verifier_args"]["name"] = json!("claude")),
            &["verifier_args.name", "gemini, openai, qwen"],
        ),
        (
            "budget with two limits",
            Box::new(|v| v["search_args"]["budget"] = json!({"nfe": 100, "seconds": 10})),
            &[
                "search_args.budget",
                "exactly one of nfe, seconds, verifier_calls",
            ],
        ),
        (
            "budget of zero NFEs",
            Box::new(|v| v["search_args"]["budget"] = json!({"nfe": 0})),
            &["search_args.budget.nfe"],
        ),
        (
            "ensemble of one",
            Box::new(|v| {
                v["verifier_args"] = json!({"name": "ensemble", "choice_of_metric": "ensemble_rank",
                    "ensemble": [{"name": "clip_score", "choice_of_metric": "clip_score"}]})
            }),
            &["verifier_args.ensemble", "at least 2 members"],
        ),
        (
            "ensemble member with a bad metric",
            Box::new(|v| {
                v["verifier_args"] = json!({"name": "ensemble", "choice_of_metric": "ensemble_rank",
                    "ensemble": [{"name": "clip_score", "choice_of_metric": "clip_score"},
                                 {"name": "laion_aesthetic", "choice_of_metric": "overall_score"}]})
            }),
            &[
                "verifier_args.ensemble[1].choice_of_metric",
                "laion_aesthetic_score",
            ],
        ),
        (
            "nested ensemble",
            Box::new(|v| {
                v["verifier_args"] = json!({"name": "ensemble", "choice_of_metric": "ensemble_rank",
                    "ensemble": [{"name": "ensemble", "choice_of_metric": "ensemble_rank"},
                                 {"name": "clip_score", "choice_of_metric": "clip_score"}]})
            }),
            &["verifier_args.ensemble[0].name"],
        ),
        (
            "ensemble list on another verifier",
            Box::new(|v| v["verifier_args"]["ensemble"] = json!([])),
            &["verifier_args.ensemble", "only for"],
        ),
        (
            "also_score not a list",
            Box::new(|v| v["verifier_args"]["also_score"] = json!("clip_score")),
            &["verifier_args.also_score", "array"],
        ),
        (
            "laion with a rubric metric",
            Box::new(|v| v["verifier_args"]["name"] = json!("laion_aesthetic")),
            &[
                "verifier_args.choice_of_metric",
                "laion_aesthetic_score, clip_score, clip_s",
            ],
        ),
        (
            "unknown metric",
            Box::new(|v| v["verifier_args"]["choice_of_metric"] = json!("beauty")),
            &["verifier_args.choice_of_metric", "overall_score"],
        ),
        (
            "missing metric",
            Box::new(|v| {
                v["verifier_args"]
                    .as_object_mut()
                    .unwrap()
                    .remove("choice_of_metric");
            }),
            &["verifier_args.choice_of_metric", "missing"],
        ),
        (
            "height not multiple",
            Box::new(|v| v["pipeline_call_args"]["height"] = json!(500)),
            &["pipeline_call_args.height", "multiple of 8"],
        ),
        (
            "width zero",
            Box::new(|v| v["pipeline_call_args"]["width"] = json!(0)),
            &["pipeline_call_args.width", ">= 1"],
        ),
        (
            "steps zero",
            Box::new(|v| v["pipeline_call_args"]["num_inference_steps"] = json!(0)),
            &["pipeline_call_args.num_inference_steps", ">= 1"],
        ),
        (
            "guidance string",
            Box::new(|v| v["pipeline_call_args"]["guidance_scale"] = json!("7")),
            &["pipeline_call_args.guidance_scale", "number"],
        ),
        (
            "negative prompt number",
            Box::new(|v| v["pipeline_call_args"]["negative_prompt"] = json!(3)),
            &["pipeline_call_args.negative_prompt", "string"],
        ),
        (
            "bad base url",
            Box::new(|v| v["verifier_args"]["base_url"] = json!("localhost:8000")),
            &["verifier_args.base_url", "http://"],
        ),
        (
            "prompt_path missing file",
            Box::new(|v| v["verifier_args"]["prompt_path"] = json!("nope.txt")),
            &["verifier_args.prompt_path", "nope.txt"],
        ),
        (
            "concurrency zero",
            Box::new(|v| v["verifier_args"]["concurrency"] = json!(0)),
            &["verifier_args.concurrency", ">= 1"],
        ),
        (
            "timeout negative",
            Box::new(|v| v["verifier_args"]["timeout_s"] = json!(-1)),
            &["verifier_args.timeout_s", "> 0"],
        ),
        (
            "bad noise kernel",
            Box::new(|v| v["noise_kernel"] = json!("avx")),
            &["noise_kernel", "portable"],
        ),
        (
            "timeout too large for a Duration",
            Box::new(|v| v["verifier_args"]["timeout_s"] = json!(1e20)),
            &["verifier_args.timeout_s", "<= 3600"],
        ),
        (
            "steps beyond any schedule",
            Box::new(|v| v["pipeline_call_args"]["num_inference_steps"] = json!(1e12)),
            &["pipeline_call_args.num_inference_steps", "from 1 to 1000"],
        ),
        (
            "steps above 1000",
            Box::new(|v| v["pipeline_call_args"]["num_inference_steps"] = json!(1001)),
            &["pipeline_call_args.num_inference_steps", "from 1 to 1000"],
        ),
        (
            "attempts uncapped",
            Box::new(|v| v["verifier_args"]["max_attempts"] = json!(1000)),
            &["verifier_args.max_attempts", "from 1 to 100"],
        ),
        (
            "re-asks uncapped",
            Box::new(|v| v["verifier_args"]["max_invalid_replies"] = json!(50)),
            &["verifier_args.max_invalid_replies", "from 0 to 20"],
        ),
        (
            "guidance absurd",
            Box::new(|v| v["pipeline_call_args"]["guidance_scale"] = json!(1e9)),
            &["pipeline_call_args.guidance_scale", "<= 1000"],
        ),
        (
            "token budget absurd",
            Box::new(|v| v["verifier_args"]["max_new_tokens"] = json!(1_000_000)),
            &["verifier_args.max_new_tokens", "from 1 to 32768"],
        ),
    ];
    for (name, f, needles) in cases {
        let (code, stderr, dir) = run_config(&edit(f), &[]);
        assert_eq!(code, 2, "{name}: exit code; stderr: {stderr}");
        assert!(
            stderr.contains("c.json"),
            "{name}: names the file: {stderr}"
        );
        for n in needles {
            assert!(stderr.contains(n), "{name}: expected {n:?} in: {stderr}");
        }
        assert!(!dir.path().join("out").exists(), "{name}: wrote output");
    }
}

#[test]
fn paths_and_particles_parse_with_the_papers_defaults() {
    use tt_scale::config::Config;
    use tt_scale::search::particles::Potential;
    use tt_scale::search::paths::PathScore;
    use tt_scale::search::SearchMethod;
    let parse = |search: serde_json::Value| {
        Config::parse(&edit(|v| v["search_args"] = search), Path::new("c.json")).unwrap()
    };
    let c = parse(serde_json::json!({"search_method": "paths"}));
    let SearchMethod::Paths(p) = c.search_args.method else {
        panic!("{:?}", c.search_args.method);
    };
    assert_eq!((p.num_paths, p.paths_width), (2, 2));
    assert_eq!(
        (p.search_start_sigma, p.delta_f, p.delta_b),
        (0.11, 0.78, 0.81)
    );
    assert_eq!(p.score, PathScore::X0);
    let c = parse(
        serde_json::json!({"search_method": "particles", "potential": "diff",
                                     "budget": {"verifier_calls": 40}}),
    );
    let SearchMethod::Particles(k) = c.search_args.method else {
        panic!("{:?}", c.search_args.method);
    };
    assert_eq!(
        (k.num_particles, k.lambda, k.potential),
        (4, 10.0, Potential::Diff)
    );
    assert_eq!((k.resample_interval, k.ess_threshold, k.eta), (5, 0.5, 1.0));
    assert!(k.adaptive);
    // Keys of another strategy are warned about, not silently used.
    let c = parse(
        serde_json::json!({"search_method": "random", "search_rounds": 2,
                                     "num_paths": 3}),
    );
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("search_args.num_paths")),
        "{:?}",
        c.warnings
    );
}

#[test]
fn json_syntax_errors_give_line_and_column() {
    let (code, stderr, dir) = run_config("{\"torch_dtype\": \"fp32\",,}", &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("c.json") && stderr.contains("line 1"),
        "{stderr}"
    );
    assert!(!dir.path().join("out").exists());
}

#[test]
fn a_missing_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = tt_scale(
        &["run", "--pipeline-config", "nope.json", "--prompt", "x"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nope.json") && stderr.contains("--pipeline-config"),
        "{stderr}"
    );
}

#[test]
fn unknown_keys_warn_with_a_suggestion() {
    let cfg = edit(|v| {
        let s = v.as_object_mut().unwrap().remove("search_args").unwrap();
        v["search_args"] = s.clone();
        v["serach_args"] = s;
    });
    // The run still fails later (no API key), but the warning comes first.
    let (code, stderr, dir) = run_config(&cfg, &[]);
    assert!(
        stderr.contains("serach_args") && stderr.contains("did you mean `search_args`"),
        "{stderr}"
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("GEMINI_API_KEY"), "{stderr}");
    assert!(!dir.path().join("out").exists());
}

#[test]
fn a_missing_api_key_stops_the_run_before_anything_is_written() {
    let (code, stderr, dir) = run_config(GOOD, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("GEMINI_API_KEY"), "{stderr}");
    assert!(!dir.path().join("out").exists());
}

#[test]
fn bad_flags_are_rejected_with_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&["--num-prompts", "zero"], "--num-prompts"),
        (&["--num-prompts", "0"], "positive whole number"),
        (&["--batch-size", "0"], "--batch-size"),
        (&["--seed=-3"], "--seed"),
        (&["--device", "tpu"], "cpu, cuda, cuda:N"),
        (&["--prompts-file", "p.txt"], "cannot be used with"),
        (&["--bogus"], "--bogus"),
    ];
    for (extra, needle) in cases {
        let (code, stderr, dir) = run_config(GOOD, extra);
        assert_eq!(code, 2, "{extra:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{extra:?}: expected {needle:?} in {stderr}"
        );
        assert!(!dir.path().join("out").exists());
    }
}

#[test]
fn num_prompts_with_a_single_prompt_is_a_usage_error() {
    let (code, stderr, _dir) = run_config(GOOD, &["--num-prompts", "3"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--num-prompts"), "{stderr}");
}

#[test]
fn the_originals_spellings_are_accepted() {
    // `--num_prompts=None` with `--prompt`, as the original's README says, reaches the API key
    // check (exit 1), so every flag parsed.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.json"), GOOD).unwrap();
    let out = tt_scale(
        &[
            "run",
            "--pipeline_config_path=c.json",
            "--prompt=a cat",
            "--num_prompts=None",
            "--batch_size_for_img_gen=2",
            "--use_low_gpu_vram",
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("GEMINI_API_KEY"), "{stderr}");
}

#[test]
fn help_documents_every_flag_with_its_default() {
    let dir = tempfile::tempdir().unwrap();
    let out = tt_scale(&["run", "--help"], dir.path());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--pipeline-config",
        "--prompt",
        "--prompts-file",
        "--num-prompts",
        "--batch-size",
        "--seed",
        "--output-dir",
        "--low-vram",
        "--device",
        "[default: configs/flux.1_dev.json]",
        "[default: 1]",
        "[default: output]",
        "[default: auto]",
        "pipeline_config_path",
        "batch_size_for_img_gen",
        "use_low_gpu_vram",
        "num_prompts",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn shipped_configs_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let cfg = tt_scale::config::Config::load(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            cfg.warnings.is_empty(),
            "{}: {:?}",
            path.display(),
            cfg.warnings
        );
        n += 1;
    }
    assert_eq!(
        n,
        tt_scale::config::SHIPPED.len(),
        "every config is shipped by name"
    );
    // The paper's Table 2 setting: FLUX.1-dev, 30 Euler steps, guidance 3.5, 1024², ranked by
    // the ensemble of aesthetic, CLIPScore and ImageReward.
    let ens = tt_scale::config::Config::load(&root.join("flux.1_dev_ensemble.json")).unwrap();
    let call = &ens.pipeline_call_args;
    assert_eq!(
        (
            call.num_inference_steps,
            call.guidance_scale,
            call.height,
            call.width
        ),
        (Some(30), Some(3.5), Some(1024), Some(1024))
    );
    let members: Vec<_> = ens
        .verifier_args
        .ensemble
        .iter()
        .map(|m| (m.name(), m.choice_of_metric.as_str()))
        .collect();
    assert_eq!(
        members,
        [
            ("laion_aesthetic", "laion_aesthetic_score"),
            ("clip_score", "clip_score"),
            ("image_reward", "image_reward")
        ]
    );
    let zo = tt_scale::config::Config::load(&root.join("flux.1_dev_zero_order.json")).unwrap();
    assert_eq!(
        zo.search_args.method,
        tt_scale::search::SearchMethod::ZeroOrder(tt_scale::search::zero_order::ZeroOrderArgs {
            rounds: 4,
            threshold: 0.95,
            num_neighbors: 4
        })
    );
}

#[test]
fn collage_of_a_folder_without_results_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = tt_scale(&["collage", "--path", "."], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no per-round results"), "{stderr}");
}

#[test]
fn bench_rejects_unknown_models_and_sizes_as_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = tt_scale(&["bench", "--model", "nope", "--device", "cpu"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no benchmark named nope") && err.contains("search"),
        "{err}"
    );

    let out = tt_scale(
        &[
            "bench", "--model", "search", "--height", "24", "--device", "cpu",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("multiples of 16"), "{err}");

    let out = tt_scale(
        &[
            "bench", "--model", "search", "--steps", "0", "--device", "cpu",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--steps"));
}

#[test]
fn bench_ops_times_the_candle_compositions_on_the_cpu_and_reports_rates() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("ops.json");
    let out = tt_scale(
        &[
            "bench",
            "--model",
            "ops",
            "--height",
            "16",
            "--width",
            "16",
            "--dtype",
            "fp32",
            "--device",
            "cpu",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--json",
            json.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let names: Vec<&str> = reports
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    // No fused kernels on the CPU: one candle row per operation.
    assert_eq!(
        names,
        [
            "attention flux candle",
            "attention sdxl candle",
            "attention pixart-sigma candle",
            "attention sd15 candle",
            "attention qwen-prefill candle",
            "linear flux qkv candle",
            "linear flux mlp-in+gelu candle",
            "linear flux out candle",
            "gated_residual flux candle",
            "layer_norm_modulate flux candle",
            "group_norm+silu sdxl candle",
            "conv2d sdxl 3x3 candle",
        ]
    );
    for r in reports.as_array().unwrap() {
        let rate = r["tflop_s"].as_f64().or(r["gb_s"].as_f64());
        assert!(rate.is_some_and(|x| x > 0.0), "{r}");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("TFLOP/s") && stdout.contains("GB/s"),
        "{stdout}"
    );
}

#[test]
fn an_endless_config_or_prompts_file_is_refused_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = tt_scale(
        &["run", "--pipeline-config", "/dev/zero", "--prompt", "a cat"],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("/dev/zero") && stderr.contains("larger than"),
        "{stderr}"
    );

    // A local OpenAI-compatible server needs no key, so the prompts are read next.
    let local = edit(|v| {
        v["verifier_args"]["name"] = serde_json::json!("openai");
        v["verifier_args"]["base_url"] = serde_json::json!("http://127.0.0.1:9/v1");
    });
    std::fs::write(dir.path().join("c.json"), local).unwrap();
    let out = tt_scale(
        &[
            "run",
            "--pipeline-config",
            "c.json",
            "--prompts-file",
            "/dev/zero",
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("/dev/zero") && stderr.contains("larger than"),
        "{stderr}"
    );
}

#[test]
fn a_dtype_the_device_cannot_run_and_a_missing_model_folder_exit_2() {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd15");
    let local = |model: &str, dtype: &str| {
        edit(|v| {
            v["pretrained_model_name_or_path"] = serde_json::json!(model);
            v["torch_dtype"] = serde_json::json!(dtype);
            v["verifier_args"]["name"] = serde_json::json!("openai");
            v["verifier_args"]["base_url"] = serde_json::json!("http://127.0.0.1:9/v1");
        })
    };
    let (code, stderr, _dir) =
        run_config(&local(tiny.to_str().unwrap(), "bf16"), &["--device", "cpu"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("bf16") && stderr.contains("fp32"),
        "{stderr}"
    );

    let (code, stderr, _dir) = run_config(
        &local("/no/such/model folder", "fp32"),
        &["--device", "cpu"],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("/no/such/model folder"), "{stderr}");
}

#[test]
fn a_shipped_configs_name_works_from_any_folder() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["sd1.5_gemini", "configs/flux.1_dev.json"] {
        let out = tt_scale(
            &["run", "--pipeline-config", name, "--prompt", "a cat"],
            dir.path(),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Parsed and validated: the run stops later, at the missing API key.
        assert!(
            stderr.contains("GEMINI_API_KEY is not set"),
            "{name}: {stderr}"
        );
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
    }
    let out = tt_scale(
        &[
            "run",
            "--pipeline-config",
            "no_such_config",
            "--prompt",
            "a cat",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_config"));
}

#[test]
fn relative_paths_in_a_config_resolve_beside_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("experiments");
    std::fs::create_dir_all(&sub).unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd15");
    std::os::unix::fs::symlink(&tiny, sub.join("tiny-model")).unwrap();
    std::fs::write(sub.join("rubric.txt"), "Grade the image.").unwrap();
    let cfg = serde_json::json!({
        "pretrained_model_name_or_path": "tiny-model",
        "torch_dtype": "fp32",
        "pipeline_call_args": {"num_inference_steps": 1},
        "verifier_args": {"name": "openai", "choice_of_metric": "overall_score",
                          "base_url": "http://127.0.0.1:9/v1", "max_attempts": 1,
                          "prompt_path": "rubric.txt"},
        "search_args": {"search_method": "random", "search_rounds": 1}
    });
    std::fs::write(sub.join("c.json"), cfg.to_string()).unwrap();
    let out = tt_scale(
        &[
            "run",
            "--pipeline-config",
            "experiments/c.json",
            "--prompt",
            "a cat",
            "--device",
            "cpu",
            "--output-dir",
            "out",
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(dir.path().join("out/tiny-model").is_dir(), "{stderr}");

    // A missing file says where it was looked for.
    std::fs::remove_file(sub.join("rubric.txt")).unwrap();
    let out = tt_scale(
        &[
            "run",
            "--pipeline-config",
            "experiments/c.json",
            "--prompt",
            "a cat",
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("experiments/rubric.txt"), "{stderr}");
}
