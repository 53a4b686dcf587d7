//! The API verifiers against fake Gemini and OpenAI servers on 127.0.0.1: request shape,
//! index-ordered results, retries and their bounds, reply validation, stats, and key hygiene.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::fake_verifier::{pixel_score, Behaviour, FakeGemini, FakeOpenAi, FakeServer, Reply};
use image::{Rgb, RgbImage};
use tt_scale::media::Media;
use tt_scale::verifiers::{
    build_with_env, ApiKey, GeminiVerifier, Grading, ImageInput, ImageVerifier, OpenAiVerifier,
    RetryPolicy, ScoreFailure, VerifierArgs, VerifierError, VerifierInput, VerifierKind, METRICS,
    RUBRIC,
};

const GEMINI_KEY: &str = "AIzaFAKE-gemini-key-0123456789";
const OPENAI_KEY: &str = "sk-FAKE-openai-key-0123456789";
const PROMPT: &str = "a photo of an astronaut riding a horse";

/// Image `i`: 6x4, every pixel (10*i, 255 - 10*i, 7), so each image has its own pixel score
/// and its first byte tells its index.
fn image(i: usize) -> RgbImage {
    let v = (10 * i).min(250) as u8;
    RgbImage::from_pixel(6, 4, Rgb([v, 255 - v, 7]))
}

fn index_of(image: &RgbImage) -> usize {
    usize::from(image.get_pixel(0, 0)[0] / 10)
}

fn images(n: usize) -> Vec<RgbImage> {
    (0..n).map(image).collect()
}

fn inputs(images: &[RgbImage]) -> Vec<ImageInput<'_>> {
    images
        .iter()
        .map(|image| ImageInput {
            prompt: PROMPT,
            image,
        })
        .collect()
}

/// The images as media, for a verifier that [`build_with_env`] built.
fn media(images: &[RgbImage]) -> Vec<Media> {
    images.iter().cloned().map(Media::Image).collect()
}

fn media_inputs(media: &[Media]) -> Vec<VerifierInput<'_>> {
    media
        .iter()
        .map(|media| VerifierInput {
            prompt: PROMPT,
            media,
        })
        .collect()
}

/// Args for fast tests: 3 attempts, 2 re-asks, 5 s timeout.
fn args(name: &str) -> VerifierArgs {
    let kind = VerifierKind::from_name(name).expect("a verifier's name");
    let mut args = VerifierArgs::new(kind, "overall_score");
    args.max_attempts = 3;
    args.max_invalid_replies = 2;
    args.timeout_s = 5.0;
    args
}

fn gemini(args: &VerifierArgs, behaviour: Behaviour) -> (GeminiVerifier, FakeServer) {
    let (url, server) = FakeGemini::start(behaviour);
    let key = ApiKey::new(GEMINI_KEY).unwrap();
    let verifier =
        GeminiVerifier::new(args, &url, key, RetryPolicy::fast(args.max_attempts)).unwrap();
    (verifier, server)
}

fn openai(args: &VerifierArgs, behaviour: Behaviour) -> (OpenAiVerifier, FakeServer) {
    let (url, server) = FakeOpenAi::start(behaviour);
    let key = ApiKey::new(OPENAI_KEY);
    let verifier =
        OpenAiVerifier::new(args, &url, key, RetryPolicy::fast(args.max_attempts)).unwrap();
    (verifier, server)
}

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |var| map.get(var).cloned()
}

fn overall(result: &Result<Grading, ScoreFailure>) -> f64 {
    result.as_ref().expect("graded")["overall_score"].score
}

fn failure(result: &Result<Grading, ScoreFailure>) -> &ScoreFailure {
    result.as_ref().expect_err("a failure")
}

fn build_error(args: &VerifierArgs, pairs: &[(&str, &str)]) -> VerifierError {
    match build_with_env(args, &env(pairs)) {
        Ok(_) => panic!("build succeeded"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------- factory and configuration

#[test]
fn every_registered_verifier_builds_from_its_name() {
    // Each verifier of the table, built through the table from its name and default metric,
    // its model from the test fixtures and the API keys from the (test) environment.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let at = |p: &str| fixtures.join(p).display().to_string();
    let keys = [
        ("GEMINI_API_KEY", GEMINI_KEY),
        ("OPENAI_API_KEY", OPENAI_KEY),
    ];
    let local = |kind: VerifierKind| -> VerifierArgs {
        let mut a = VerifierArgs::new(kind, kind.metrics()[0]);
        a.device = Some(tt_scale::device::DeviceSpec::Cpu);
        match kind.name() {
            "qwen" => a.model_name = Some(at("tiny-qwen")),
            "laion_aesthetic" => {
                a.model_name = Some(at("tiny-clip"));
                a.aesthetic_model = Some(at("clip/aesthetic-model.pth"));
            }
            "clip_score" | "pickscore" => {
                a.model_name = Some(at("tiny-clip"));
                a.processor_model = Some(at("tiny-clip"));
            }
            "hpsv2" => {
                a.model_name = Some(at("hpsv2/HPS_v2.1_compressed.pt"));
                a.processor_model = Some(at("tiny-clip"));
            }
            "image_reward" => {
                a.model_name = Some(at("image-reward/ImageReward.pt"));
                a.processor_model = Some(at("image-reward/bert-tokenizer"));
            }
            _ => {}
        }
        a
    };
    let image = media(&images(1));
    for &kind in VerifierKind::ALL {
        let mut a = local(kind);
        if kind.is_ensemble() {
            a.ensemble = vec![local(VerifierKind::ClipScore), local(VerifierKind::Hpsv2)];
        }
        let verifier = build_with_env(&a, &env(&keys))
            .unwrap_or_else(|e| panic!("{} does not build: {e}", kind.name()));
        assert_eq!(verifier.name(), kind.name());
        if !matches!(kind, VerifierKind::Gemini | VerifierKind::OpenAi) {
            // The local ones grade offline: every metric their table entry names (the
            // ensemble: its members', its rank is the search's), by name.
            let g = verifier.score(&media_inputs(&image)).remove(0).unwrap();
            let want: Vec<String> = if kind.is_ensemble() {
                vec!["clip_score/clip_score".into(), "hpsv2/hpsv2".into()]
            } else {
                kind.metrics().iter().map(|m| m.to_string()).collect()
            };
            for m in want {
                assert!(g.contains_key(&m), "{}: {m} in {g:?}", kind.name());
            }
        }
    }
    assert_eq!(VerifierKind::from_name("clip"), None);
}

#[test]
fn vlm_verifiers_support_the_six_metrics_and_clip_verifiers_their_own() {
    for kind in [
        VerifierKind::Gemini,
        VerifierKind::OpenAi,
        VerifierKind::Qwen,
    ] {
        assert_eq!(kind.metrics(), &METRICS[..], "{}", kind.name());
    }
    assert_eq!(
        VerifierKind::LaionAesthetic.metrics(),
        &["laion_aesthetic_score", "clip_score", "clip_s"][..]
    );
    assert_eq!(
        VerifierKind::ClipScore.metrics(),
        &["clip_score", "clip_s"][..]
    );
    assert_eq!(VerifierKind::ImageReward.metrics(), &["image_reward"][..]);
}

#[test]
fn qwen_with_a_missing_model_folder_names_it() {
    let mut a = args("qwen");
    a.model_name = Some("/nonexistent/qwen-folder".to_string());
    let message = build_error(&a, &[]).to_string();
    assert!(message.contains("/nonexistent/qwen-folder"), "{message}");
}

#[test]
fn gemini_without_key_fails_at_build_naming_the_variable() {
    let message = build_error(&args("gemini"), &[]).to_string();
    assert!(message.contains("GEMINI_API_KEY"), "{message}");
}

#[test]
fn openai_without_key_fails_at_build_for_the_public_endpoint() {
    let message = build_error(&args("openai"), &[]).to_string();
    assert!(message.contains("OPENAI_API_KEY"), "{message}");
}

#[test]
fn openai_needs_no_key_with_a_custom_base_url() {
    let (url, server) = FakeOpenAi::start_without_auth(Behaviour::good());
    let mut args = args("openai");
    args.base_url = Some(url);
    let verifier = build_with_env(&args, &env(&[])).unwrap();
    let imgs = images(1);
    let results = verifier.score(&media_inputs(&media(&imgs)));
    assert_eq!(overall(&results[0]), pixel_score(&imgs[0]));
    assert_eq!(server.requests()[0].headers.get("authorization"), None);
}

#[test]
fn gemini_seed_beyond_int32_is_rejected_at_build() {
    let mut args = args("gemini");
    args.seed = Some(1 << 40);
    let message = build_error(&args, &[("GEMINI_API_KEY", GEMINI_KEY)]).to_string();
    assert!(message.contains("seed"), "{message}");
}

#[test]
fn unreadable_prompt_path_is_an_error_naming_the_file() {
    let mut args = args("gemini");
    args.prompt_path = Some("/no/such/dir/rubric.txt".into());
    let message = build_error(&args, &[("GEMINI_API_KEY", GEMINI_KEY)]).to_string();
    assert!(message.contains("/no/such/dir/rubric.txt"), "{message}");
}

#[test]
fn build_reads_key_and_base_url_from_the_environment() {
    let (url, server) = FakeGemini::start(Behaviour::good());
    let verifier = build_with_env(
        &args("gemini"),
        &env(&[("GEMINI_API_KEY", GEMINI_KEY), ("GEMINI_BASE_URL", &url)]),
    )
    .unwrap();
    assert_eq!(verifier.name(), "gemini");
    let imgs = images(2);
    let results = verifier.score(&media_inputs(&media(&imgs)));
    assert_eq!(overall(&results[1]), pixel_score(&imgs[1]));
    assert_eq!(server.requests()[0].key.as_deref(), Some(GEMINI_KEY));
}

#[test]
fn base_url_from_args_wins_over_the_environment() {
    let (url, server) = FakeOpenAi::start(Behaviour::good());
    let mut args = args("openai");
    args.base_url = Some(url);
    let verifier = build_with_env(
        &args,
        &env(&[
            ("OPENAI_API_KEY", OPENAI_KEY),
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1"),
        ]),
    )
    .unwrap();
    assert!(verifier.score(&media_inputs(&media(&images(1))))[0].is_ok());
    assert_eq!(server.request_count(), 1);
}

// ---------------------------------------------------------------- request shape

#[test]
fn gemini_request_matches_the_generate_content_api() {
    let mut args = args("gemini");
    args.max_new_tokens = Some(800);
    args.seed = Some(1994);
    args.model_name = Some("gemini-test-model".into());
    let (verifier, server) = gemini(&args, Behaviour::good());
    let imgs = images(1);
    verifier.score(&inputs(&imgs));
    assert_eq!(server.violations(), Vec::<String>::new());
    let request = &server.requests()[0];
    assert_eq!(
        request.path,
        "/v1beta/models/gemini-test-model:generateContent"
    );
    assert_eq!(request.key.as_deref(), Some(GEMINI_KEY));
    assert_eq!(request.system.as_deref(), Some(RUBRIC.trim()));
    assert_eq!(request.prompt.as_deref(), Some(PROMPT));
    assert_eq!(request.image.as_ref(), Some(&imgs[0]));
    assert_eq!(request.body["generationConfig"]["maxOutputTokens"], 800);
    assert_eq!(request.body["generationConfig"]["seed"], 1994);
}

#[test]
fn gemini_uses_its_default_model() {
    let (verifier, server) = gemini(&args("gemini"), Behaviour::good());
    verifier.score(&inputs(&images(1)));
    assert_eq!(
        server.requests()[0].model.as_deref(),
        Some("gemini-2.0-flash")
    );
    assert!(server.requests()[0].body["generationConfig"]
        .get("seed")
        .is_none());
}

#[test]
fn openai_request_matches_the_chat_completions_api() {
    let mut args = args("openai");
    args.max_new_tokens = Some(800);
    args.seed = Some(1994);
    let (verifier, server) = openai(&args, Behaviour::good());
    let imgs = images(1);
    verifier.score(&inputs(&imgs));
    assert_eq!(server.violations(), Vec::<String>::new());
    let request = &server.requests()[0];
    assert_eq!(request.path, "/v1/chat/completions");
    assert_eq!(request.key.as_deref(), Some(OPENAI_KEY));
    assert_eq!(request.model.as_deref(), Some("gpt-4o-2024-11-20"));
    assert_eq!(request.system.as_deref(), Some(RUBRIC.trim()));
    assert_eq!(request.prompt.as_deref(), Some(PROMPT));
    assert_eq!(request.image.as_ref(), Some(&imgs[0]));
    assert_eq!(request.body["max_completion_tokens"], 800);
    assert_eq!(request.body["seed"], 1994);
}

#[test]
fn openai_omits_optional_fields_when_unset() {
    let (verifier, server) = openai(&args("openai"), Behaviour::good());
    verifier.score(&inputs(&images(1)));
    let body = &server.requests()[0].body;
    assert!(body.get("max_completion_tokens").is_none() && body.get("seed").is_none());
}

#[test]
fn prompt_path_replaces_the_rubric() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("my_rubric.txt");
    std::fs::write(&path, "Grade harshly.\n").unwrap();
    let mut args = args("openai");
    args.prompt_path = Some(path);
    let (verifier, server) = openai(&args, Behaviour::good());
    verifier.score(&inputs(&images(1)));
    assert_eq!(
        server.requests()[0].system.as_deref(),
        Some("Grade harshly.")
    );
}

// ---------------------------------------------------------------- results and concurrency

#[test]
fn gemini_grades_every_image_with_all_metrics() {
    let (verifier, _server) = gemini(&args("gemini"), Behaviour::good());
    let imgs = images(5);
    let results = verifier.score(&inputs(&imgs));
    assert_eq!(results.len(), 5);
    for (i, result) in results.iter().enumerate() {
        let grading = result.as_ref().unwrap();
        assert_eq!(grading.len(), METRICS.len());
        assert_eq!(grading["accuracy_to_prompt"].score, pixel_score(&imgs[i]));
        assert!(grading["accuracy_to_prompt"]
            .explanation
            .contains("fake judge"));
    }
}

/// Image `i` of `n` is answered after `(n - i) * 40` ms, so replies complete in reverse order.
fn reverse_order_delays(n: usize) -> Behaviour {
    Behaviour::custom(move |seen| {
        let wait = Duration::from_millis(40 * (n - index_of(seen.image)) as u64);
        Reply::Delayed(wait, Box::new(Reply::PixelScore))
    })
}

#[test]
fn gemini_results_keep_input_order_when_replies_complete_out_of_order() {
    let mut args = args("gemini");
    args.concurrency = 6;
    let (verifier, _server) = gemini(&args, reverse_order_delays(6));
    let imgs = images(6);
    let results = verifier.score(&inputs(&imgs));
    for (i, result) in results.iter().enumerate() {
        assert_eq!(overall(result), pixel_score(&imgs[i]), "index {i}");
    }
}

#[test]
fn openai_results_keep_input_order_when_replies_complete_out_of_order() {
    let mut args = args("openai");
    args.concurrency = 6;
    let (verifier, _server) = openai(&args, reverse_order_delays(6));
    let imgs = images(6);
    let results = verifier.score(&inputs(&imgs));
    for (i, result) in results.iter().enumerate() {
        assert_eq!(overall(result), pixel_score(&imgs[i]), "index {i}");
    }
}

#[test]
fn requests_run_concurrently_up_to_the_configured_limit() {
    let mut args = args("gemini");
    args.concurrency = 3;
    let slow = Reply::Delayed(Duration::from_millis(80), Box::new(Reply::PixelScore));
    let (verifier, server) = gemini(&args, Behaviour::always(slow));
    let results = verifier.score(&inputs(&images(8)));
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(server.max_in_flight(), 3);
}

#[test]
fn empty_input_makes_no_requests() {
    let (verifier, server) = gemini(&args("gemini"), Behaviour::good());
    assert!(verifier.score(&[]).is_empty());
    assert_eq!(server.request_count(), 0);
}

// ---------------------------------------------------------------- retries

#[test]
fn rate_limited_request_waits_for_retry_after_then_succeeds() {
    let limited = Reply::Status {
        code: 429,
        retry_after: Some(1),
        message: None,
    };
    let (verifier, server) = gemini(&args("gemini"), Behaviour::first_then_good(1, limited));
    let imgs = images(1);
    let start = Instant::now();
    let results = verifier.score(&inputs(&imgs));
    // Retry-After (1 s) outweighs the 1 ms backoff and is capped by the fast policy's 300 ms.
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(290), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1000), "{elapsed:?}");
    assert_eq!(overall(&results[0]), pixel_score(&imgs[0]));
    assert_eq!(server.request_count(), 2);
}

#[test]
fn server_errors_are_retried_until_success() {
    let (verifier, server) = openai(
        &args("openai"),
        Behaviour::first_then_good(2, Reply::status(500)),
    );
    let results = verifier.score(&inputs(&images(3)));
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(server.request_count(), 9);
}

#[test]
fn retries_stop_after_max_attempts_and_record_the_error() {
    let mut args = args("gemini");
    args.max_attempts = 4;
    let (verifier, server) = gemini(&args, Behaviour::always(Reply::status(503)));
    let results = verifier.score(&inputs(&images(2)));
    for result in &results {
        let failure = failure(result);
        assert_eq!(failure.attempts, 4);
        assert!(failure.message.contains("503"), "{}", failure.message);
        assert!(
            failure.message.contains("max_attempts"),
            "{}",
            failure.message
        );
    }
    assert_eq!(server.request_count(), 8);
}

#[test]
fn slow_replies_time_out_and_are_retried_then_fail() {
    let mut args = args("gemini");
    args.timeout_s = 0.2;
    args.max_attempts = 2;
    let slow = Reply::Delayed(Duration::from_secs(3), Box::new(Reply::PixelScore));
    let (verifier, server) = gemini(&args, Behaviour::always(slow));
    let start = Instant::now();
    let results = verifier.score(&inputs(&images(1)));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let failure = failure(&results[0]);
    assert!(failure.message.contains("timed out"), "{}", failure.message);
    assert!(failure.message.contains("timeout_s"), "{}", failure.message);
    assert_eq!(server.request_count(), 2);
}

#[test]
fn a_slow_first_reply_is_retried_and_then_succeeds() {
    let mut args = args("openai");
    args.timeout_s = 0.2;
    let slow = Reply::Delayed(Duration::from_secs(3), Box::new(Reply::PixelScore));
    let (verifier, server) = openai(&args, Behaviour::first_then_good(1, slow));
    let imgs = images(1);
    let results = verifier.score(&inputs(&imgs));
    assert_eq!(overall(&results[0]), pixel_score(&imgs[0]));
    assert_eq!(server.request_count(), 2);
}

#[test]
fn connection_refused_is_retried_then_fails_naming_base_url() {
    // Bind then drop a listener to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let args = args("gemini");
    let key = ApiKey::new(GEMINI_KEY).unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let verifier = GeminiVerifier::new(&args, &url, key, RetryPolicy::fast(3)).unwrap();
    let results = verifier.score(&inputs(&images(1)));
    let failure = failure(&results[0]);
    assert_eq!(failure.attempts, 3);
    assert!(failure.message.contains("base_url"), "{}", failure.message);
}

#[test]
fn unauthorized_is_not_retried_and_names_the_key_variable() {
    let (verifier, server) = gemini(&args("gemini"), Behaviour::always(Reply::status(401)));
    let results = verifier.score(&inputs(&images(1)));
    let failure = failure(&results[0]);
    assert_eq!(failure.attempts, 1);
    assert!(failure.message.contains("401"), "{}", failure.message);
    assert!(
        failure.message.contains("GEMINI_API_KEY"),
        "{}",
        failure.message
    );
    assert_eq!(server.request_count(), 1);
}

#[test]
fn openai_forbidden_is_not_retried_and_names_the_key_variable() {
    let (verifier, server) = openai(&args("openai"), Behaviour::always(Reply::status(403)));
    let failure = verifier.score(&inputs(&images(1))).remove(0).unwrap_err();
    assert!(failure.message.contains("403"), "{}", failure.message);
    assert!(
        failure.message.contains("OPENAI_API_KEY"),
        "{}",
        failure.message
    );
    assert_eq!(server.request_count(), 1);
}

#[test]
fn not_found_is_not_retried_and_names_the_model() {
    let (verifier, server) = openai(&args("openai"), Behaviour::always(Reply::status(404)));
    let failure = verifier.score(&inputs(&images(1))).remove(0).unwrap_err();
    assert!(failure.message.contains("404"), "{}", failure.message);
    assert!(
        failure.message.contains("model_name"),
        "{}",
        failure.message
    );
    assert_eq!(server.request_count(), 1);
}

#[test]
fn one_failing_image_does_not_affect_the_others() {
    // Image 1 always gets 400; the others are graded.
    let behaviour = Behaviour::custom(|seen| {
        if index_of(seen.image) == 1 {
            Reply::status(400)
        } else {
            Reply::PixelScore
        }
    });
    let (verifier, _server) = gemini(&args("gemini"), behaviour);
    let imgs = images(3);
    let results = verifier.score(&inputs(&imgs));
    assert_eq!(overall(&results[0]), pixel_score(&imgs[0]));
    assert!(failure(&results[1]).message.contains("400"));
    assert_eq!(overall(&results[2]), pixel_score(&imgs[2]));
}

// ---------------------------------------------------------------- reply validation

#[test]
fn malformed_json_is_asked_again_then_succeeds() {
    let bad = Reply::Text("{\"accuracy_to_prompt\": {\"explanation\": \"cut".into());
    let (verifier, server) = gemini(&args("gemini"), Behaviour::first_then_good(1, bad));
    let imgs = images(1);
    let results = verifier.score(&inputs(&imgs));
    assert_eq!(overall(&results[0]), pixel_score(&imgs[0]));
    assert_eq!(server.request_count(), 2);
}

#[test]
fn invalid_replies_are_asked_again_at_most_max_invalid_replies_times() {
    let mut args = args("gemini");
    args.max_invalid_replies = 2;
    let (verifier, server) = gemini(&args, Behaviour::always(Reply::Text("not json".into())));
    let results = verifier.score(&inputs(&images(1)));
    let failure = failure(&results[0]);
    assert_eq!(failure.attempts, 3);
    assert!(
        failure.message.contains("not valid JSON"),
        "{}",
        failure.message
    );
    assert_eq!(server.request_count(), 3);
}

#[test]
fn reply_missing_a_metric_is_rejected() {
    let wrong = Reply::Text(r#"{"overall_score": {"explanation": "ok", "score": 5}}"#.into());
    let (verifier, _server) = openai(&args("openai"), Behaviour::always(wrong));
    let failure = verifier.score(&inputs(&images(1))).remove(0).unwrap_err();
    assert!(
        failure.message.contains("accuracy_to_prompt"),
        "{}",
        failure.message
    );
}

#[test]
fn reply_with_scores_out_of_range_is_rejected() {
    let (verifier, _server) = gemini(&args("gemini"), Behaviour::always(Reply::Score(11.0)));
    let failure = verifier.score(&inputs(&images(1))).remove(0).unwrap_err();
    assert!(
        failure.message.contains("outside 0 to 10"),
        "{}",
        failure.message
    );
}

#[test]
fn openai_refusal_is_a_failure() {
    let (verifier, server) = openai(&args("openai"), Behaviour::always(Reply::Refusal));
    let failure = verifier.score(&inputs(&images(1))).remove(0).unwrap_err();
    assert!(failure.message.contains("refused"), "{}", failure.message);
    assert_eq!(server.request_count(), 3);
}

#[test]
fn gemini_blocked_prompt_is_a_failure() {
    let (verifier, _server) = gemini(&args("gemini"), Behaviour::always(Reply::Refusal));
    let failure = verifier.score(&inputs(&images(1))).remove(0).unwrap_err();
    assert!(failure.message.contains("SAFETY"), "{}", failure.message);
}

// ---------------------------------------------------------------- stats and key hygiene

#[test]
fn call_stats_count_requests_and_failures() {
    let (verifier, _server) = gemini(
        &args("gemini"),
        Behaviour::first_then_good(1, Reply::status(500)),
    );
    verifier.score(&inputs(&images(2)));
    let stats = verifier.call_stats();
    assert_eq!((stats.requests, stats.failed_requests), (4, 2));
    verifier.score(&inputs(&images(1)));
    assert_eq!(verifier.call_stats().requests, 5);
}

#[test]
fn api_keys_never_appear_in_errors_or_debug_output() {
    // Servers that echo the key back in their error message.
    let echo = |key: &str| Reply::Status {
        code: 401,
        retry_after: None,
        message: Some(format!("API key {key} is invalid")),
    };
    let (gemini, _g) = gemini(&args("gemini"), Behaviour::always(echo(GEMINI_KEY)));
    let (openai, _o) = openai(&args("openai"), Behaviour::always(echo(OPENAI_KEY)));
    let gemini_failure = gemini.score(&inputs(&images(1))).remove(0).unwrap_err();
    let openai_failure = openai.score(&inputs(&images(1))).remove(0).unwrap_err();
    for text in [
        gemini_failure.to_string(),
        format!("{gemini_failure:?}"),
        openai_failure.to_string(),
        format!("{openai_failure:?}"),
        format!("{gemini:?}"),
        format!("{openai:?}"),
    ] {
        assert!(
            !text.contains(GEMINI_KEY) && !text.contains(OPENAI_KEY),
            "{text}"
        );
    }
    assert!(gemini_failure.message.contains("[redacted]"));
}

#[test]
fn build_errors_never_contain_the_key() {
    let mut args = args("gemini");
    args.prompt_path = Some("/missing/prompt.txt".into());
    let error = build_error(&args, &[("GEMINI_API_KEY", GEMINI_KEY)]);
    assert!(!error.to_string().contains(GEMINI_KEY));
    assert!(!format!("{error:?}").contains(GEMINI_KEY));
}

/// Collects formatted log lines for [`keys_never_appear_in_log_lines`].
#[derive(Clone, Default)]
struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn keys_never_appear_in_log_lines() {
    // The only test in this binary that installs a (process-wide) log subscriber.
    let logs = LogBuffer::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let echo_429 = Reply::Status {
        code: 429,
        retry_after: None,
        message: Some(format!("quota exceeded for key {GEMINI_KEY}")),
    };
    let echo_text = Reply::Text(format!("key {GEMINI_KEY}"));
    let behaviour = Behaviour::custom(move |seen| match seen.attempt {
        0 => echo_429.clone(),
        1 => echo_text.clone(),
        _ => Reply::PixelScore,
    });
    let (verifier, server) = gemini(&args("gemini"), behaviour);
    assert!(verifier.score(&inputs(&images(1)))[0].is_ok());
    assert_eq!(server.request_count(), 3);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("retrying") && text.contains("asking again"),
        "{text}"
    );
    assert!(!text.contains(GEMINI_KEY), "{text}");
}

#[test]
fn verifier_can_be_used_and_dropped_inside_an_async_runtime() {
    let (url, _server) = FakeGemini::start(Behaviour::good());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let imgs = images(2);
    let results = runtime.block_on(async {
        let key = ApiKey::new(GEMINI_KEY).unwrap();
        let verifier =
            GeminiVerifier::new(&args("gemini"), &url, key, RetryPolicy::fast(3)).unwrap();
        verifier.score(&inputs(&imgs))
    });
    assert_eq!(overall(&results[1]), pixel_score(&imgs[1]));
}

// ---------------------------------------------------------------- fatal for the run vs transient

fn status_with(code: u16, message: &str) -> Reply {
    Reply::Status {
        code,
        retry_after: None,
        message: Some(message.to_string()),
    }
}

#[test]
fn rejected_keys_unknown_models_and_refused_requests_are_fatal_for_the_run() {
    for code in [400, 401, 403, 404] {
        let (gemini, server) = gemini(&args("gemini"), Behaviour::always(Reply::status(code)));
        let f = gemini.score(&inputs(&images(1))).remove(0).unwrap_err();
        assert!(f.fatal, "HTTP {code}: {}", f.message);
        assert_eq!(f.attempts, 1, "HTTP {code} is not retried");
        assert_eq!(server.request_count(), 1);
        let (openai, _o) = openai(&args("openai"), Behaviour::always(Reply::status(code)));
        let f = openai.score(&inputs(&images(1))).remove(0).unwrap_err();
        assert!(f.fatal, "OpenAI HTTP {code}: {}", f.message);
    }
}

#[test]
fn an_exhausted_quota_is_fatal_but_a_rate_limit_is_retried() {
    let quota = status_with(
        429,
        "You exceeded your current quota, please check your plan",
    );
    let (openai, server) = openai(&args("openai"), Behaviour::always(quota));
    let f = openai.score(&inputs(&images(1))).remove(0).unwrap_err();
    assert!(f.fatal, "{}", f.message);
    assert!(f.message.contains("quota"), "{}", f.message);
    assert_eq!(server.request_count(), 1);

    let daily = status_with(
        429,
        "Quota exceeded for metric: GenerateRequestsPerDayPerProject",
    );
    let (daily_verifier, _g) = gemini(&args("gemini"), Behaviour::always(daily));
    assert!(
        daily_verifier
            .score(&inputs(&images(1)))
            .remove(0)
            .unwrap_err()
            .fatal
    );

    let rate = status_with(429, "Resource has been exhausted (e.g. check quota).");
    let (rate_verifier, server) = gemini(&args("gemini"), Behaviour::always(rate));
    let f = rate_verifier
        .score(&inputs(&images(1)))
        .remove(0)
        .unwrap_err();
    assert!(!f.fatal, "{}", f.message);
    assert!(server.request_count() > 1, "a rate limit is retried");
}

#[test]
fn server_errors_and_invalid_replies_stay_per_image_failures() {
    let (gemini, _g) = gemini(&args("gemini"), Behaviour::always(Reply::status(503)));
    assert!(
        !gemini
            .score(&inputs(&images(1)))
            .remove(0)
            .unwrap_err()
            .fatal
    );
    let (openai, _o) = openai(
        &args("openai"),
        Behaviour::always(Reply::Text("not json".into())),
    );
    assert!(
        !openai
            .score(&inputs(&images(1)))
            .remove(0)
            .unwrap_err()
            .fatal
    );
}

// ---------------------------------------------------------------- credentials stay at home

/// A server on loopback that answers every request with `307` to `target` + the same path,
/// as a proxy or a compromised endpoint might. Stops when the sender is dropped.
fn start_redirector(target: String) -> (String, tokio::sync::oneshot::Sender<()>) {
    use axum::http::{header::LOCATION, StatusCode, Uri};
    use axum::response::IntoResponse;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let address = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = axum::Router::new().fallback(move |uri: Uri| {
                let to = format!("{target}{uri}");
                async move { (StatusCode::TEMPORARY_REDIRECT, [(LOCATION, to)]).into_response() }
            });
            tokio::select! {
                _ = std::future::IntoFuture::into_future(axum::serve(listener, app)) => {}
                _ = rx => {}
            }
        });
    });
    (format!("http://{address}"), tx)
}

#[test]
fn a_redirect_to_another_origin_never_receives_the_key_and_stops_the_run() {
    let (target, server) = FakeGemini::start(Behaviour::good());
    let (redirector, _stop) = start_redirector(target);
    let key = ApiKey::new(GEMINI_KEY).unwrap();
    let args = args("gemini");
    let verifier = GeminiVerifier::new(&args, &redirector, key, RetryPolicy::fast(3)).unwrap();
    let f = verifier.score(&inputs(&images(1))).remove(0).unwrap_err();
    assert_eq!(server.request_count(), 0, "the other origin was reached");
    assert!(f.fatal, "{}", f.message);
    assert!(f.message.contains("another origin"), "{}", f.message);
    assert!(!f.message.contains(GEMINI_KEY));
}

#[test]
fn model_names_are_percent_encoded_into_one_path_segment() {
    let (url, server) = FakeGemini::start(Behaviour::good());
    let mut args = args("gemini");
    args.model_name = Some("../../evil?x=1#".into());
    let key = ApiKey::new(GEMINI_KEY).unwrap();
    let verifier = GeminiVerifier::new(&args, &url, key, RetryPolicy::fast(1)).unwrap();
    let _ = verifier.score(&inputs(&images(1)));
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].path,
        "/v1beta/models/..%2F..%2Fevil%3Fx%3D1%23:generateContent"
    );
    assert_eq!(requests[0].query, None);
    assert_eq!(
        tt_scale::verifiers::http::path_segment("gemini-2.0-flash_x~1"),
        "gemini-2.0-flash_x~1"
    );
}

#[test]
fn a_reply_over_the_size_cap_is_a_transient_failure_not_an_allocation() {
    let huge = "x".repeat(tt_scale::verifiers::http::MAX_REPLY_BYTES + 1);
    let (gemini, server) = gemini(&args("gemini"), Behaviour::always(Reply::Text(huge)));
    let f = gemini.score(&inputs(&images(1))).remove(0).unwrap_err();
    assert!(!f.fatal, "{}", f.message);
    assert!(f.message.contains("larger than 8 MiB"), "{}", f.message);
    assert_eq!(server.request_count(), 3, "retried up to max_attempts");
}

#[test]
fn the_access_check_is_one_cheap_get_with_the_key_before_any_image() {
    let (g, server) = gemini(&args("gemini"), Behaviour::good());
    g.check_access().unwrap();
    assert_eq!(server.request_count(), 0, "no grading request");
    let checks = server.access_checks();
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].0, "/v1beta/models/gemini-2.0-flash");
    assert_eq!(checks[0].1.as_deref(), Some(GEMINI_KEY));

    let (o, server) = openai(&args("openai"), Behaviour::good());
    o.check_access().unwrap();
    assert_eq!(
        server.access_checks(),
        [("/v1/models".to_string(), Some(OPENAI_KEY.to_string()))]
    );
}

#[test]
fn a_rejected_key_or_unknown_model_fails_the_access_check_as_fatal() {
    for (code, message, expect) in [
        (
            400,
            "API key not valid. Please pass a valid API key.",
            "GEMINI_API_KEY",
        ),
        (403, "Permission denied", "GEMINI_API_KEY"),
        (
            404,
            "models/gemini-9 is not found",
            "verifier_args.model_name",
        ),
    ] {
        let (g, server) = gemini(&args("gemini"), Behaviour::good());
        server.set_access_reply(Reply::Status {
            code,
            retry_after: None,
            message: Some(message.into()),
        });
        let f = g.check_access().unwrap_err();
        assert!(f.fatal, "{code}");
        assert!(
            f.message.contains(&format!("HTTP {code}"))
                && f.message.contains(message)
                && f.message.contains(expect),
            "{}",
            f.message
        );
        assert!(!f.message.contains(GEMINI_KEY), "the key is scrubbed");
    }
    let (o, server) = openai(&args("openai"), Behaviour::good());
    server.set_access_reply(Reply::status(401));
    let f = o.check_access().unwrap_err();
    assert!(
        f.fatal && f.message.contains("OPENAI_API_KEY"),
        "{}",
        f.message
    );
}

#[test]
fn an_access_check_that_cannot_tell_lets_the_run_go_on() {
    // Server trouble, or an OpenAI-compatible server without a model list: the first batch will
    // tell, so the check does not stop the run.
    let (g, server) = gemini(&args("gemini"), Behaviour::good());
    server.set_access_reply(Reply::status(503));
    g.check_access().unwrap();
    let (o, server) = openai(&args("openai"), Behaviour::good());
    server.set_access_reply(Reply::status(404));
    o.check_access().unwrap();
}
