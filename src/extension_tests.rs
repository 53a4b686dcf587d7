//! The extension points, end to end. Three stand-ins, each one new file and one registry line
//! (compiled into test builds only): a video model (`pipelines/fake_video.rs`, `families!`), an
//! image judge (`verifiers/fake.rs`, `verifiers!`) and a strategy (`search/fake.rs`,
//! `strategies!`). Nothing else knows them, yet a config names them like the built-in ones and
//! every part of a run takes them: the config check, the search, the video files, the
//! frame-sampled grading, the round JSON, the journal and a resumed run, collages, the report
//! and rescore.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::Config;
use crate::device::DeviceSpec;
use crate::media::Media;
use crate::output::media::read_media;
use crate::run::{run, RunOptions};
use crate::search::SearchMethod;
use crate::verifiers::VerifierKind;

/// A model folder of the fake video model and a config searching it with the fake judge and
/// strategy; returns the config's path.
fn fake_setup(dir: &Path, extra_search: Value) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("model_index.json"),
        r#"{"_class_name": "TtScaleFakeVideoPipeline"}"#,
    )
    .unwrap();
    let mut search = json!({"search_method": "fake", "fake_candidates": 4});
    for (k, v) in extra_search.as_object().unwrap() {
        search[k] = v.clone();
    }
    let config = json!({
        "pretrained_model_name_or_path": model.display().to_string(),
        "torch_dtype": "fp32",
        "pipeline_call_args": {"num_inference_steps": 2},
        "verifier_args": {"name": "fake", "choice_of_metric": "brightness", "video_frames": 2},
        "search_args": search,
    });
    let path = dir.join("c.json");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

fn options(dir: &Path, config: PathBuf) -> RunOptions {
    RunOptions {
        config_path: config,
        prompt: Some("a red apple".into()),
        prompts_file: None,
        num_prompts: None,
        batch_size: 3,
        seed: Some(3),
        output_dir: dir.join("out"),
        low_vram: false,
        device: Some(DeviceSpec::Cpu),
        resume: None,
        shard: None,
        workers: Vec::new(),
        run_name: Some("ext".into()),
    }
}

/// The round JSON files of a run folder.
fn round_jsons(run_dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(run_dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("prompt@") && name.ends_with(".json") {
            out.push(serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap());
        }
    }
    out
}

#[test]
fn the_fakes_are_named_by_a_config_like_the_built_in_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = fake_setup(dir.path(), json!({"num_paths": 3}));
    let config = Config::load(&path).unwrap();
    assert_eq!(config.verifier_args.kind, VerifierKind::Fake);
    let SearchMethod::Fake(args) = &config.search_args.method else {
        panic!("{:?}", config.search_args.method);
    };
    assert_eq!(args.candidates, 4);
    // Keys of another strategy are computed from the table, not listed.
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.contains("`search_args.num_paths` is ignored by the fake strategy")),
        "{:?}",
        config.warnings
    );
    assert!(SearchMethod::NAMES.contains(&"fake"));
    assert!(VerifierKind::names().contains("fake"));
}

#[test]
fn a_fake_video_model_judge_and_strategy_run_resume_collage_report_and_rescore() {
    let dir = tempfile::tempdir().unwrap();
    let config = fake_setup(dir.path(), json!({}));
    let opts = options(dir.path(), config);
    let summary = run(&opts).unwrap();
    assert_eq!(summary.images, 4);
    // The fake model: 2 steps an image, no guidance.
    assert_eq!(summary.nfe, Some(8));
    let run_dir = summary.run_dir.clone();

    // Videos are written as animated PNGs and read back as videos.
    let rounds = round_jsons(&run_dir);
    assert_eq!(rounds.len(), 1);
    let round = &rounds[0];
    let candidates = round["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 4);
    let mut best = (f64::MIN, String::new());
    for c in candidates {
        assert_eq!(
            c["media"],
            json!({"kind": "video", "frames": 5, "fps": 8.0})
        );
        let file = run_dir.join(
            Path::new(c["img_path"].as_str().unwrap())
                .file_name()
                .unwrap(),
        );
        let Media::Video(video) = read_media(&file).unwrap() else {
            panic!("{} is not a video", file.display());
        };
        assert_eq!((video.frames.len(), video.fps), (5, 8.0));
        // The judge grades images: the video was graded on 2 sampled frames, first and last.
        let g = &c["grading"]["brightness"];
        assert!(
            g["explanation"]
                .as_str()
                .unwrap()
                .starts_with("mean over frames 0, 4: "),
            "{g}"
        );
        let mean = |f: &image::RgbImage| {
            f.as_raw().iter().map(|&v| f64::from(v)).sum::<f64>() / f.as_raw().len() as f64 / 25.5
        };
        let want = (mean(&video.frames[0]) + mean(&video.frames[4])) / 2.0;
        let got = g["score"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        if got > best.0 {
            best = (got, c["label"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(round["best_score"]["score"].as_f64(), Some(best.0));
    assert!(round["best_img_path"].as_str().unwrap().contains(&best.1));
    let files_before: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    assert_eq!(files_before.len(), 4);

    // The same command again continues the named run: every video and grade is reused.
    let again = run(&opts).unwrap();
    assert_eq!((again.reused_images, again.reused_grades), (4, 4));
    for (p, bytes) in &files_before {
        assert_eq!(&std::fs::read(p).unwrap(), bytes, "{}", p.display());
    }

    // A collage shows each round's best video by its first frame; the report embeds the
    // videos as animated thumbnails.
    let collages = crate::collage::make_collages(&run_dir).unwrap();
    assert_eq!(collages.len(), 1);
    assert!(matches!(read_media(&collages[0]).unwrap(), Media::Image(_)));
    let report = crate::report::report(&run_dir).unwrap();
    let html = std::fs::read_to_string(&report.html).unwrap();
    assert_eq!(html.matches("data:image/png;base64,").count(), 4);

    // Rescore grades the videos again with the fake judge by name (on sampled frames).
    let rescored = crate::rescore::rescore(&run_dir, "fake", None, None).unwrap();
    assert_eq!((rescored.asked, rescored.failed), (4, 0));
    assert_eq!(rescored.rounds.len(), 1);
    assert_eq!(rescored.rounds[0].chosen.as_deref(), Some(best.1.as_str()));
    assert!(rescored.rounds[0].best.is_some());
}
