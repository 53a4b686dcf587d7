//! The CLIP verifiers (`laion_aesthetic`, `clip_score`) against transformers' `CLIPModel`,
//! `CLIPImageProcessor` (Pillow backend) and the aesthetic MLP in torch, on the tiny CLIP and
//! MLP written by tools/reference/make_clip_fixtures.py: preprocessing of non-square images
//! value for value, embeddings, cosines and aesthetic scores within 1e-4 relative of the
//! float64 reference.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use tt_scale::loading::ModelSource;
use tt_scale::verifiers::clip::{AestheticHead, ClipVerifier};
use tt_scale::verifiers::{ImageInput, ImageVerifier, VerifierKind};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("clip/reference.safetensors"), &Device::Cpu)
        .unwrap()
}

fn meta() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("clip/meta.json")).unwrap())
        .unwrap()
}

fn images() -> Vec<image::RgbImage> {
    meta()["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            image::open(fixtures().join("clip").join(n.as_str().unwrap()))
                .unwrap()
                .to_rgb8()
        })
        .collect()
}

fn verifier(name: &'static str) -> ClipVerifier {
    let kind = VerifierKind::from_name(name).unwrap();
    let head = (kind == VerifierKind::LaionAesthetic).then(|| {
        AestheticHead::from_pth(&fixtures().join("clip/aesthetic-model.pth"), &Device::Cpu).unwrap()
    });
    let source = ModelSource::Local(fixtures().join("tiny-clip"));
    ClipVerifier::load(kind, "tiny-clip", &source, None, head, Device::Cpu, 4).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Every 13th value of our preprocessed images equals the reference's within 1e-6.
fn assert_pixel_sample(ours: &[f64], r: &HashMap<String, Tensor>) {
    let sample: Vec<f64> = ours.iter().step_by(13).copied().collect();
    let want = values(&r["pixel_values_sample"]);
    let worst = sample
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-6, "pixel values differ by up to {worst}");
}

/// max |a - b| / max |b|.
fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let norm = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    diff / norm.max(1e-12)
}

#[test]
fn preprocessing_of_non_square_images_equals_the_clip_image_processor() {
    let v = verifier("clip_score");
    let images = images();
    assert_eq!(
        images
            .iter()
            .map(|i| (i.width(), i.height()))
            .collect::<Vec<_>>(),
        [(300, 200), (150, 260), (224, 224)]
    );
    let mut ours = Vec::new();
    for image in &images {
        let (px, h, w) = v.processor().pixel_values(image);
        assert_eq!((h, w), (224, 224));
        ours.extend(px.into_iter().map(f64::from));
    }
    let r = reference();
    assert_pixel_sample(&ours, &r);
    let sum: f64 = ours.iter().sum();
    let want_sum = values(&r["pixel_values_sum"])[0];
    assert!((sum - want_sum).abs() < 1e-2, "{sum} vs {want_sum}");
}

#[test]
fn image_and_text_embeddings_match_transformers_within_1e_4() {
    let v = verifier("clip_score");
    let r = reference();
    let images = images();
    let refs: Vec<&image::RgbImage> = images.iter().collect();
    let ours = values(&v.image_embeddings(&refs).unwrap());
    // The reference embeddings are not normalised; compare directions.
    let want = r["image_embeds_f64"].clone();
    let norm = want.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
    let want = values(&want.broadcast_div(&norm).unwrap());
    let e = rel(&ours, &want);
    assert!(e < 1e-4, "image embeddings: relative error {e}");
    // transformers' own float32 run, for scale.
    let f32_ref = r["image_embeds_f32"].clone();
    let n32 = f32_ref
        .sqr()
        .unwrap()
        .sum_keepdim(1)
        .unwrap()
        .sqrt()
        .unwrap();
    let e32 = rel(&values(&f32_ref.broadcast_div(&n32).unwrap()), &want);
    eprintln!("image embeddings: ours {e:.1e}, transformers fp32 {e32:.1e} from fp64");
}

#[test]
fn clip_scores_and_aesthetic_scores_match_the_reference_within_1e_4() {
    let prompts: Vec<String> = meta()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let r = reference();
    let cosine = r["cosine_f64"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let aesthetic = values(&r["aesthetic_f64"]);
    let images = images();
    let v = verifier("laion_aesthetic");
    for (p, prompt) in prompts.iter().enumerate() {
        let inputs: Vec<ImageInput<'_>> = images
            .iter()
            .map(|image| ImageInput { prompt, image })
            .collect();
        let gradings = v.score(&inputs);
        for (i, g) in gradings.iter().enumerate() {
            let g = g.as_ref().unwrap();
            let cos = g["clip_score"].score;
            assert!(
                (cos - cosine[i][p]).abs() <= 1e-4 * cosine[i][p].abs().max(0.1),
                "image {i}, prompt {p}: {cos} vs {}",
                cosine[i][p]
            );
            assert!((g["clip_s"].score - 2.5 * cos.max(0.0)).abs() < 1e-12);
            let a = g["laion_aesthetic_score"].score;
            assert!(
                (a - aesthetic[i]).abs() <= 1e-4 * aesthetic[i].abs(),
                "aesthetic of image {i}: {a} vs {}",
                aesthetic[i]
            );
        }
    }
    // Eval mode: the same image gets the same score every time.
    let again = v.score(&[ImageInput {
        prompt: &prompts[0],
        image: &images[0],
    }]);
    let first = v.score(&[ImageInput {
        prompt: &prompts[0],
        image: &images[0],
    }]);
    assert_eq!(
        again[0].as_ref().unwrap()["laion_aesthetic_score"],
        first[0].as_ref().unwrap()["laion_aesthetic_score"]
    );
}

#[test]
fn the_clip_tokenizer_gives_transformers_ids() {
    let r = reference();
    let want = r["input_ids"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    let source = fixtures().join("tiny-clip");
    let tok = tt_scale::models::clip_tokenizer::ClipTokenizer::from_files(
        &source.join("vocab.json"),
        &source.join("merges.txt"),
        Some(&source.join("tokenizer_config.json")),
        Some(&source.join("special_tokens_map.json")),
    )
    .unwrap();
    for (p, prompt) in meta()["prompts"].as_array().unwrap().iter().enumerate() {
        let ids: Vec<i64> = tok
            .encode(prompt.as_str().unwrap())
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(ids, want[p]);
    }
}

#[test]
fn a_file_that_is_not_a_pickle_is_refused_and_the_mlp_width_comes_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let not_pth = dir.path().join("x.pth");
    std::fs::write(&not_pth, b"not a pickle").unwrap();
    let err = AestheticHead::from_pth(&not_pth, &Device::Cpu)
        .err()
        .unwrap();
    assert!(err.contains("not a PyTorch state dict"), "{err}");
    // The fixture's MLP takes 24-wide embeddings; a CLIP with another projection is refused.
    let head = AestheticHead::from_pth(&fixtures().join("clip/aesthetic-model.pth"), &Device::Cpu)
        .unwrap();
    assert_eq!(head.input_width(), Some(24));
}

#[test]
fn pickscore_is_the_exponentiated_logit_scale_times_the_cosine() {
    // PickScore is a CLIPModel; the tiny CLIP stands in for PickScore_v1 (its processor and
    // tokenizer given as another source, as PickScore's come from the LAION CLIP-H repo).
    let source = ModelSource::Local(fixtures().join("tiny-clip"));
    let v = ClipVerifier::load(
        VerifierKind::PickScore,
        "tiny-clip",
        &source,
        Some(&source),
        None,
        Device::Cpu,
        4,
    )
    .unwrap();
    let scale = meta()["logit_scale"].as_f64().unwrap().exp();
    let r = reference();
    let cosine = r["cosine_f64"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let images = images();
    let prompt = meta()["prompts"][1].as_str().unwrap().to_string();
    let inputs: Vec<ImageInput<'_>> = images
        .iter()
        .map(|image| ImageInput {
            prompt: &prompt,
            image,
        })
        .collect();
    for (i, g) in v.score(&inputs).iter().enumerate() {
        let g = g.as_ref().unwrap();
        let want = scale * cosine[i][1];
        assert!(
            (g["pickscore"].score - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{i}"
        );
        assert_eq!(g.len(), 1, "PickScore records its own metric only");
    }
}

/// HPS v2 against a faithful re-implementation of OpenCLIP (tools/reference/make_hpsv2_fixtures.py):
/// the checkpoint in OpenCLIP's state-dict layout and pickle, OpenCLIP's preprocessing (its centre
/// crop rounds half to even: the 301x201 image checks it), the score within 1e-4.
#[test]
fn hpsv2_scores_match_the_open_clip_reference() {
    let dir = fixtures().join("hpsv2");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let r =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let tokenizer = ModelSource::Local(fixtures().join("tiny-clip"));
    let v = ClipVerifier::load_open_clip(
        VerifierKind::Hpsv2,
        "tiny-hpsv2",
        &dir.join("HPS_v2.1_compressed.pt"),
        &tokenizer,
        Device::Cpu,
        4,
    )
    .unwrap();
    let images: Vec<image::RgbImage> = meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            image::open(Path::new(env!("CARGO_MANIFEST_DIR")).join(p.as_str().unwrap()))
                .unwrap()
                .to_rgb8()
        })
        .collect();
    assert_eq!((images[3].width(), images[3].height()), (301, 201));
    let mut px = Vec::new();
    for image in &images {
        px.extend(
            v.processor()
                .pixel_values(image)
                .0
                .into_iter()
                .map(f64::from),
        );
    }
    assert_pixel_sample(&px, &r);
    let scores = r["score_f64"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    for (p, prompt) in meta["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt = prompt.as_str().unwrap();
        let inputs: Vec<ImageInput<'_>> = images
            .iter()
            .map(|image| ImageInput { prompt, image })
            .collect();
        for (i, g) in v.score(&inputs).iter().enumerate() {
            let got = g.as_ref().unwrap()["hpsv2"].score;
            assert!(
                (got - scores[i][p]).abs() <= 1e-4 * scores[i][p].abs().max(0.1),
                "image {i}, prompt {p}: {got} vs {}",
                scores[i][p]
            );
        }
    }
}
