//! Search over paths and particle search end to end: `tt-scale run` with the tiny SD 1.5 and
//! Flux models and the loopback fake Gemini judge (which scores brighter images higher). Each
//! run must complete, choose the image the judge scores best, and give the same files for the
//! same master seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::fake_verifier::{pixel_score, Behaviour, FakeGemini};
use crate::sd15::tt_scale;

const PROMPT: &str = "a lighthouse on a cliff at dusk";

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn config(model: &str, search: Value) -> String {
    let call_args = match model {
        "tiny-flux" => json!({"height": 32, "width": 32, "num_inference_steps": 6,
                              "guidance_scale": 3.5, "max_sequence_length": 16}),
        "tiny-sdxl" => json!({"height": 64, "width": 96, "num_inference_steps": 6,
                              "guidance_scale": 5.0}),
        "tiny-pixart" => json!({"height": 200, "width": 256, "num_inference_steps": 6}),
        _ => json!({"num_inference_steps": 6, "guidance_scale": 7.5}),
    };
    json!({
        "pretrained_model_name_or_path": fixture(model),
        "torch_dtype": "fp32",
        "pipeline_call_args": call_args,
        "verifier_args": {"name": "gemini", "choice_of_metric": "overall_score",
                          "max_new_tokens": 800, "max_attempts": 2},
        "search_args": search,
    })
    .to_string()
}

/// Runs the search in a fresh folder under `root` and returns the run folder's files by name
/// (JSON without its timings).
fn run(
    root: &Path,
    name: &str,
    config: &str,
    base_url: &str,
) -> (PathBuf, BTreeMap<String, Vec<u8>>) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("c.json"), config).unwrap();
    let o = tt_scale(
        &dir,
        &[
            "run",
            "--pipeline-config",
            "c.json",
            "--prompt",
            PROMPT,
            "--seed",
            "7",
            "--output-dir",
            "out",
            "--run-name",
            "r",
            "--batch-size",
            "3",
            "--device",
            "cpu",
        ],
        &[("GEMINI_API_KEY", "k"), ("GEMINI_BASE_URL", base_url)],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "tt-scale run failed: {stderr}");
    let metric = dir
        .join("out")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let run = metric.join("gemini/overall_score/r");
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(&run).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".png") {
            files.insert(name, std::fs::read(&p).unwrap());
        } else if name.ends_with(".json") && name.contains("_i@") {
            let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            v.as_object_mut().unwrap().remove("timings");
            files.insert(name, serde_json::to_vec(&v).unwrap());
        }
    }
    (run, files)
}

/// The round JSONs of a run, by round.
fn rounds(files: &BTreeMap<String, Vec<u8>>) -> BTreeMap<u64, Value> {
    files
        .iter()
        .filter(|(n, _)| n.ends_with(".json"))
        .map(|(_, b)| {
            let v: Value = serde_json::from_slice(b).unwrap();
            (v["search_round"].as_u64().unwrap(), v)
        })
        .collect()
}

/// Checks a finished run: every round graded its candidates with the judge's scores, the
/// last round's choice is the image the judge scores best, and a second run with the same
/// master seed wrote the same files. Returns the rounds.
fn check(
    model: &str,
    search: Value,
    stages: Option<usize>,
    per_stage: usize,
) -> BTreeMap<u64, Value> {
    let (base_url, server) = FakeGemini::start(Behaviour::good());
    let root = tempfile::tempdir().unwrap();
    let cfg = config(model, search);
    let (dir, a) = run(root.path(), "a", &cfg, &base_url);
    let (_, b) = run(root.path(), "b", &cfg, &base_url);
    assert!(server.violations().is_empty(), "{:?}", server.violations());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, bytes) in &a {
        assert!(
            b[name] == *bytes,
            "{name} differs between two runs with the same seed"
        );
    }
    let rounds = rounds(&a);
    let stages = stages.unwrap_or(rounds.len());
    assert_eq!(rounds.len(), stages, "{:?}", a.keys());
    let mut all_scores = Vec::new();
    for (r, d) in &rounds {
        let candidates = d["candidates"].as_array().unwrap();
        assert_eq!(candidates.len(), per_stage, "round {r}");
        assert!(d["stage"].is_object(), "round {r} records its stage");
        // One request a grading; the fake judge reports 1290 input and 150 output tokens.
        let n = candidates.len() as u64;
        assert_eq!(d["budget"]["verifier_calls"].as_u64(), Some(n));
        assert_eq!(
            d["budget"]["verifier_input_tokens"].as_u64(),
            Some(1290 * n)
        );
        assert_eq!(
            d["budget"]["verifier_output_tokens"].as_u64(),
            Some(150 * n)
        );
        // The recorded scores are the judge's on the saved images.
        let mut best = f64::NEG_INFINITY;
        for c in candidates {
            let file = Path::new(c["img_path"].as_str().unwrap())
                .file_name()
                .unwrap();
            let image = image::open(dir.join(file)).unwrap().to_rgb8();
            let judged = pixel_score(&image);
            assert!((c["score"]["score"].as_f64().unwrap() - judged).abs() < 1e-9);
            best = best.max(judged);
            all_scores.push(judged);
        }
        assert_eq!(d["best_score"]["score"].as_f64(), Some(best), "round {r}");
    }
    assert!(
        all_scores.iter().any(|s| *s != all_scores[0]),
        "the judge must tell the images apart for the choice to mean something"
    );
    // The result is the last round's best finished image, whatever the earlier rounds'
    // predictions scored.
    let last = &rounds[&(stages as u64)];
    assert_eq!(
        last["best_so_far"]["search_round"].as_u64(),
        Some(stages as u64)
    );
    assert_eq!(last["best_so_far"]["img_path"], last["best_img_path"]);
    assert!(last["best_so_far"].get("provisional").is_none());
    rounds
}

fn paths() -> Value {
    json!({"search_method": "paths", "num_paths": 2, "paths_width": 2,
           "search_start_sigma": 0.4, "delta_f": 0.3, "delta_b": 0.4})
}

fn particles() -> Value {
    json!({"search_method": "particles", "num_particles": 3, "resample_interval": 2,
           "lambda": 2.0})
}

#[test]
fn paths_with_tiny_sd15_completes_chooses_the_judges_best_and_repeats_exactly() {
    // PNDM, 6 steps (levels 0.831, 0.665, 0.499, 0.333, 0.167, 0.001, 0): three stages of
    // 2 paths x 2 branches, the last one final images.
    let rounds = check("tiny-sd15", paths(), Some(3), 4);
    let stages: Vec<&Value> = rounds.values().map(|d| &d["stage"]["levels"]).collect();
    assert_eq!(stages[0], &json!({"from": 3, "renoised_to": 1, "to": 4}));
    assert_eq!(stages[2]["to"], 6);
    // Round 1 spent the 2 initial paths' 3 steps and the 4 branches' 3 steps, each PLMS run
    // with one warm-up call more, all under guidance (2 evaluations a call).
    assert_eq!(rounds[&1]["budget"]["nfe"], 2 * 4 * 2 + 4 * 4 * 2);
}

#[test]
fn paths_with_tiny_flux_completes_chooses_the_judges_best_and_repeats_exactly() {
    // The flow schedule of 6 steps at this size is coarser near the end: two stages.
    let rounds = check("tiny-flux", paths(), Some(2), 4);
    assert_eq!(rounds[&1]["stage"]["scored_on"], "x0 prediction");
    assert_eq!(rounds[&2]["stage"]["scored_on"], "final image");
}

#[test]
fn particles_with_tiny_sd15_completes_chooses_the_judges_best_and_repeats_exactly() {
    // Potentials at steps 2 and 4 of 6, then the final images.
    let rounds = check("tiny-sd15", particles(), Some(3), 3);
    assert_eq!(rounds[&1]["stage"]["step"], 2);
    assert_eq!(rounds[&3]["stage"]["final"], true);
    // 3 particles, one guided call a step: steps 0-2, then 3-4, then 5.
    let nfe: Vec<u64> = rounds
        .values()
        .map(|d| d["budget"]["nfe"].as_u64().unwrap())
        .collect();
    assert_eq!(nfe, vec![3 * 3 * 2, 2 * 3 * 2, 3 * 2]);
}

#[test]
fn particles_with_tiny_flux_completes_chooses_the_judges_best_and_repeats_exactly() {
    let rounds = check("tiny-flux", particles(), Some(3), 3);
    let line = &rounds[&3]["candidates"][0]["noise"];
    assert_eq!(line["kind"], "particle");
    // The initial noise and one seed a step.
    assert_eq!(line["seeds"].as_array().unwrap().len(), 7);
}

#[test]
fn paths_and_particles_run_on_tiny_sdxl_euler_and_pixart_dpm_solver() {
    // Euler starts a segment at its step index, DPM-Solver++ without its history.
    for model in ["tiny-sdxl", "tiny-pixart"] {
        let rounds = check(model, paths(), None, 4);
        assert!(!rounds.is_empty(), "{model}");
        let rounds = check(model, particles(), Some(3), 3);
        assert_eq!(rounds[&3]["stage"]["final"], true, "{model}");
    }
}
