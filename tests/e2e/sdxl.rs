//! `tt-scale run` end to end with the tiny SDXL model (tests/fixtures/tiny-sdxl)
//! graded by a fake Gemini server: the output tree, the JSON contents, and images of the
//! requested size.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fake_verifier::{Behaviour, FakeGemini};
use serde_json::Value;

const PROMPT: &str = "a tiny astronaut hatching from an egg on the moon";

fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn sdxl_random_search_with_gemini_writes_the_tree_json_and_images_of_the_requested_size() {
    let (base_url, server) = FakeGemini::start(Behaviour::good());
    let dir = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl");
    let cfg = serde_json::json!({
        "pretrained_model_name_or_path": model.display().to_string(),
        "torch_dtype": "fp32",
        "pipeline_call_args": {"num_inference_steps": 2, "height": 64, "width": 96,
                               "guidance_scale": 5.0, "negative_prompt": "blurry"},
        "verifier_args": {"name": "gemini", "choice_of_metric": "overall_score", "max_new_tokens": 800, "max_attempts": 2},
        "search_args": {"search_method": "random", "search_rounds": 2},
    });
    std::fs::write(dir.path().join("c.json"), cfg.to_string()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tt-scale"))
        .args([
            "run",
            "--pipeline-config",
            "c.json",
            "--prompt",
            PROMPT,
            "--seed",
            "7",
            "--output-dir",
            "out",
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ])
        .current_dir(dir.path())
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env("GEMINI_API_KEY", "test-key-123")
        .env("GEMINI_BASE_URL", &base_url)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "tt-scale run failed: {stderr}");
    assert!(server.violations().is_empty(), "{:?}", server.violations());

    let metric_dir = dir.path().join("out/tiny-sdxl/gemini/overall_score");
    let runs: Vec<PathBuf> = std::fs::read_dir(&metric_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "one run folder");
    let run = &runs[0];
    let names = files(run);
    let pngs: Vec<&String> = names.iter().filter(|n| n.ends_with(".png")).collect();
    let jsons: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".json") && n.contains("hash@"))
        .collect();
    // Rounds of 2 and 4 noises, one JSON per round, plus config.json.
    assert_eq!(pngs.len(), 6, "{names:?}");
    assert_eq!(jsons.len(), 2, "{names:?}");
    assert!(names.contains("config.json"));
    assert_eq!(server.request_count(), 6);
    for png in &pngs {
        let img = image::open(run.join(png.as_str())).unwrap().to_rgb8();
        assert_eq!(
            img.dimensions(),
            (96, 64),
            "{png}: the requested width x height"
        );
    }
    for round in 1..=2usize {
        let name = jsons
            .iter()
            .find(|j| j.contains(&format!("_i@{round}_s@")))
            .unwrap();
        let d: Value =
            serde_json::from_str(&std::fs::read_to_string(run.join(name.as_str())).unwrap())
                .unwrap();
        assert_eq!(d["prompt"], PROMPT);
        assert_eq!(d["search_round"], round);
        assert_eq!(d["num_noises"], 1 << round);
        assert_eq!(d["choice_of_metric"], "overall_score");
        assert_eq!(d["candidates"].as_array().unwrap().len(), 1 << round);
    }
}
