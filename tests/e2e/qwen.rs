//! `tt-scale run` end to end with the tiny SD 1.5 model and the local Qwen2.5-VL verifier on
//! its tiny random-weight model: the output tree, and every candidate graded with a valid
//! grading (constrained decoding) without any API.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const PROMPT: &str = "a tiny astronaut hatching from an egg on the moon";

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn run(dir: &Path) -> PathBuf {
    let config = serde_json::json!({
        "pretrained_model_name_or_path": fixture("tiny-sd15"),
        "torch_dtype": "fp32",
        "pipeline_call_args": {"num_inference_steps": 2, "guidance_scale": 7.5},
        "verifier_args": {
            "name": "qwen",
            "model_name": fixture("tiny-qwen"),
            "device": "cpu",
            "choice_of_metric": "overall_score",
            "max_new_tokens": 300
        },
        "search_args": {"search_method": "random", "search_rounds": 2},
    });
    std::fs::write(dir.join("c.json"), config.to_string()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tt-scale"))
        .args([
            "run",
            "--pipeline-config",
            "c.json",
            "--prompt",
            PROMPT,
            "--seed",
            "42",
            "--output-dir",
            "out",
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ])
        .current_dir(dir)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("GEMINI_API_KEY")
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "tt-scale run failed: {stderr}");
    let metric_dir = dir.join("out/tiny-sd15/qwen/overall_score");
    let mut runs: Vec<PathBuf> = std::fs::read_dir(&metric_dir)
        .unwrap_or_else(|e| panic!("{}: {e}; stderr: {stderr}", metric_dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "one run folder");
    runs.pop().unwrap()
}

#[test]
fn random_search_with_the_local_qwen_verifier_writes_the_expected_tree() {
    let dir = tempfile::tempdir().unwrap();
    let run = run(dir.path());
    let names: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let pngs = names.iter().filter(|n| n.ends_with(".png")).count();
    let jsons: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".json") && n.contains("hash@"))
        .collect();
    // Rounds of 2 and 4 noises, one best-of-round JSON each, and the run's config.
    assert_eq!(pngs, 6, "{names:?}");
    assert_eq!(jsons.len(), 2, "{names:?}");
    assert!(names.iter().any(|n| n == "config.json"), "{names:?}");
    for name in jsons {
        let d: Value =
            serde_json::from_str(&std::fs::read_to_string(run.join(name)).unwrap()).unwrap();
        let best = &d["best_score"];
        assert!(best["explanation"].is_string(), "{d}");
        let s = best["score"].as_f64().unwrap();
        assert!((0.0..=10.0).contains(&s), "{s}");
        for c in d["candidates"].as_array().unwrap() {
            assert!(
                c["score"]["score"].is_number(),
                "every candidate graded: {c}"
            );
        }
    }
}
