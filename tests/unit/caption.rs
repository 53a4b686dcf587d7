//! Caption cleaning against diffusers' own `_clean_caption` / `_text_preprocessing` (with
//! beautifulsoup4 and ftfy installed) on a corpus of messy prompts
//! (tests/fixtures/pixart/captions.json, made by tools/reference/make_pixart_fixtures.py).

use std::path::Path;

use serde_json::Value;
use tt_scale::pipelines::caption::{clean_caption, preprocess_caption};

fn corpus() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pixart/captions.json");
    serde_json::from_str::<Vec<Value>>(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn one_clean_caption_pass_matches_diffusers() {
    for case in corpus() {
        let input = case["input"].as_str().unwrap();
        assert_eq!(
            clean_caption(input),
            case["clean_once"].as_str().unwrap(),
            "input {input:?}"
        );
    }
}

#[test]
fn text_preprocessing_with_clean_caption_matches_diffusers() {
    for case in corpus() {
        let input = case["input"].as_str().unwrap();
        assert_eq!(
            preprocess_caption(input, true),
            case["preprocessed"].as_str().unwrap(),
            "input {input:?}"
        );
    }
}

#[test]
fn text_preprocessing_without_clean_caption_only_lowercases_and_trims() {
    for case in corpus() {
        let input = case["input"].as_str().unwrap();
        assert_eq!(
            preprocess_caption(input, false),
            case["not_cleaned"].as_str().unwrap(),
            "input {input:?}"
        );
    }
}
