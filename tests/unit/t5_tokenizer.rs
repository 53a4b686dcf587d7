//! The T5 tokenizer of Flux (`tokenizer_2`) and PixArt (`tokenizer`) loads from a folder with
//! only `tokenizer.json` (as transformers' `save_pretrained` writes it) or only `spiece.model`,
//! and both give transformers' ids (fixtures by tools/reference/make_t5_tokenizer_fixtures.py).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tt_scale::loading::tokenizers::t5_tokenizer;
use tt_scale::loading::ModelSource;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A model folder whose `tokenizer_2/` holds only `file` (copied from `from`).
fn folder_with(from: &Path, file: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tokenizer_2")).unwrap();
    std::fs::copy(from, dir.path().join("tokenizer_2").join(file)).unwrap();
    dir
}

#[test]
fn tokenizer_json_alone_or_spiece_model_alone_give_transformers_ids() {
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("t5-tokenizer/tokens.json")).unwrap(),
    )
    .unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 16);
    let json_only = folder_with(
        &fixtures().join("t5-tokenizer/tokenizer.json"),
        "tokenizer.json",
    );
    let spiece_only = folder_with(
        &fixtures().join("tiny-pixart/tokenizer/spiece.model"),
        "spiece.model",
    );
    for folder in [json_only.path(), spiece_only.path()] {
        let tok = t5_tokenizer(&ModelSource::Local(folder.to_path_buf()), "tokenizer_2").unwrap();
        for case in cases {
            let prompt = case["prompt"].as_str().unwrap();
            let max_length = case["max_length"].as_u64().unwrap() as usize;
            let (ids, mask) = tok.encode(prompt, max_length).unwrap();
            let want = |key: &str| -> Vec<u32> {
                case[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect()
            };
            assert_eq!(
                ids,
                want("ids"),
                "{prompt:?} ({max_length}) from {folder:?}"
            );
            assert_eq!(mask, want("mask"), "{prompt:?} ({max_length})");
        }
    }
}

#[test]
fn a_folder_without_either_file_names_both() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tokenizer_2")).unwrap();
    let err = t5_tokenizer(&ModelSource::Local(dir.path().to_path_buf()), "tokenizer_2")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tokenizer_2")
            && err.contains("tokenizer.json")
            && err.contains("spiece.model"),
        "{err}"
    );
}
