//! `tt-scale run` end to end with the tiny Flux-architecture model (diffusers layout) and a fake
//! Gemini server on loopback: the output tree and the per-round JSON.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fake_verifier::{Behaviour, FakeGemini};
use serde_json::Value;

const PROMPT: &str = "a tiny astronaut hatching from an egg on the moon";
const PROMPT_NAME: &str = "prompt@a_tiny_astronaut_hatching_from_an_egg_on_the_moon_hash@8a6a79d2";

fn config() -> String {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-flux");
    serde_json::json!({
        "pretrained_model_name_or_path": model.display().to_string(),
        "torch_dtype": "fp32",
        "pipeline_call_args": {"height": 32, "width": 32, "num_inference_steps": 2,
                               "guidance_scale": 3.5, "max_sequence_length": 16},
        "verifier_args": {"name": "gemini", "choice_of_metric": "overall_score",
                          "max_new_tokens": 800, "max_attempts": 2},
        "search_args": {"search_method": "random", "search_rounds": 2},
    })
    .to_string()
}

#[test]
fn random_search_with_the_tiny_flux_model_writes_the_originals_tree_and_json() {
    let (base_url, server) = FakeGemini::start(Behaviour::good());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.json"), config()).unwrap();
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
            "3",
            "--device",
            "cpu",
            "--low-vram",
        ])
        .current_dir(dir.path())
        .env_remove("OPENAI_API_KEY")
        .env("HF_HUB_OFFLINE", "1")
        .env("GEMINI_API_KEY", "test-key-123")
        .env("GEMINI_BASE_URL", base_url.as_str())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "tt-scale run failed: {stderr}");
    assert!(server.violations().is_empty(), "{:?}", server.violations());

    let metric = dir.path().join("out/tiny-flux/gemini/overall_score");
    let runs: Vec<PathBuf> = std::fs::read_dir(&metric)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "one run folder");
    let names: Vec<String> = std::fs::read_dir(&runs[0])
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let pngs: Vec<&String> = names.iter().filter(|n| n.ends_with(".png")).collect();
    let jsons: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".json") && n.contains("hash@"))
        .collect();
    // 2 + 4 candidates, plus one collage per round... as the SD 1.5 run: 2^r images per round.
    let candidates = pngs
        .iter()
        .filter(|p| p.starts_with(PROMPT_NAME) && p.contains("_s@"))
        .count();
    assert_eq!(candidates, 2 + 4, "{names:?}");
    assert_eq!(jsons.len(), 2, "{names:?}");
    assert!(names.contains(&"config.json".to_string()));
    for round in 1..=2usize {
        let name = jsons
            .iter()
            .find(|j| j.contains(&format!("_i@{round}_s@")))
            .unwrap();
        let d: Value =
            serde_json::from_str(&std::fs::read_to_string(runs[0].join(name.as_str())).unwrap())
                .unwrap();
        assert_eq!(d["prompt"], PROMPT);
        assert_eq!(d["num_noises"], 1 << round);
        assert_eq!(d["choice_of_metric"], "overall_score");
        let img = image::open(
            runs[0].join(
                Path::new(d["best_img_path"].as_str().unwrap())
                    .file_name()
                    .unwrap(),
            ),
        )
        .unwrap()
        .to_rgb8();
        assert_eq!(img.dimensions(), (32, 32));
    }
}

#[test]
fn full_size_flux_on_the_cpu_warns_with_a_time_estimate_before_loading() {
    let (base_url, _server) = FakeGemini::start(Behaviour::good());
    let dir = tempfile::tempdir().unwrap();
    let hf_home = dir.path().join("hf").display().to_string();
    // The shipped config by name; offline with an empty cache, loading then fails (exit 1),
    // but only after the estimate.
    let o = crate::sd15::tt_scale(
        dir.path(),
        &[
            "run",
            "--pipeline-config",
            "flux.1_dev",
            "--prompt",
            "a cat",
            "--device",
            "cpu",
        ],
        &[
            ("GEMINI_API_KEY", "k"),
            ("GEMINI_BASE_URL", base_url.as_str()),
            ("HF_HOME", hf_home.as_str()),
        ],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    let warning = stderr
        .lines()
        .find(|l| l.contains("on the CPU: at least"))
        .unwrap_or_else(|| panic!("no estimate: {stderr}"));
    assert!(
        warning.contains("black-forest-labs/FLUX.1-dev at 1024x1024")
            && warning.contains("50 steps")
            && warning.contains("30 image(s)")
            && warning.contains("--device cuda"),
        "{warning}"
    );
}
