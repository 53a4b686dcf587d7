//! The search's behaviour with fake pipelines, verifiers and stores: batches overlap with
//! grading, a store that knows everything asks for nothing, only missing batches are made,
//! the ensemble selects by rank, budgets stop before a round that would exceed them.

use super::random::RandomArgs;
use super::seeds::{SeedPurpose, SeedStream};
use super::zero_order::ZeroOrderArgs;
use super::*;
use crate::media::Media;
use crate::noise::Noise;
use crate::pipelines::ImagePipeline;
use crate::verifiers::{Graded, Grading, Score, ScoreFailure, TokenUsage, VerifierInput};
use image::RgbImage;

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Counts generated batches, so the fake verifier can tell whether the next batch was
/// generated while it was grading.
#[derive(Default)]
struct Progress {
    generated: Mutex<usize>,
    changed: Condvar,
}

struct FakePipeline<'a> {
    progress: &'a Progress,
}

impl ImagePipeline for FakePipeline<'_> {
    fn noise_shape(&self) -> Vec<usize> {
        vec![1, 1, 4, 4]
    }
    fn set_prompt(&mut self, _prompt: &str) -> Result<(), PipelineError> {
        Ok(())
    }
    fn generate(&mut self, noises: &[Noise]) -> Result<Vec<RgbImage>, PipelineError> {
        let images = noises
            .iter()
            .map(|n| {
                let v = (n.data.iter().sum::<f32>().abs() * 10.0) as u8;
                RgbImage::from_pixel(2, 2, image::Rgb([v, v, v]))
            })
            .collect();
        *self.progress.generated.lock().unwrap() += 1;
        self.progress.changed.notify_all();
        Ok(images)
    }
}

/// Grades an image by its brightness. Before answering batch k it waits (up to `patience`)
/// until batch k+1 has been generated (or every batch has), and counts the times it gave up.
struct FakeVerifier<'a> {
    progress: &'a Progress,
    calls: Mutex<usize>,
    total_batches: usize,
    patience: Duration,
    gave_up: Mutex<usize>,
}

impl Verifier for FakeVerifier<'_> {
    fn name(&self) -> &str {
        "fake"
    }
    fn score(&self, inputs: &[VerifierInput<'_>]) -> Vec<Result<Grading, ScoreFailure>> {
        let k = {
            let mut c = self.calls.lock().unwrap();
            *c += 1;
            *c - 1
        };
        let target = (k + 2).min(self.total_batches);
        let generated = self.progress.generated.lock().unwrap();
        let (_g, timeout) = self
            .progress
            .changed
            .wait_timeout_while(generated, self.patience, |g| *g < target)
            .unwrap();
        if timeout.timed_out() {
            *self.gave_up.lock().unwrap() += 1;
        }
        inputs
            .iter()
            .map(|i| {
                let mut g = Grading::new();
                g.insert(
                    "overall_score".into(),
                    Score {
                        explanation: "brightness".into(),
                        score: f64::from(i.media.poster().get_pixel(0, 0)[0]) / 25.5,
                    },
                );
                Ok(g)
            })
            .collect()
    }
}

/// Per round: its number, the best candidate, every candidate's score.
type Rounds = Vec<(usize, Option<usize>, Vec<Option<f64>>)>;

#[derive(Default)]
struct Recorder {
    rounds: Rounds,
    generation_s: f64,
    verification_s: f64,
}

impl SearchObserver for Recorder {
    fn round_finished(&mut self, _p: &str, r: &RoundResult) -> Result<(), ObserverError> {
        let scores = r
            .candidates
            .iter()
            .map(|c| c.score("overall_score"))
            .collect();
        self.rounds.push((r.round, r.best, scores));
        self.generation_s += r.generation_s;
        self.verification_s += r.verification_s;
        Ok(())
    }
}

fn run(
    method: SearchMethod,
    overlap: bool,
    patience: Duration,
    total_batches: usize,
) -> (Recorder, usize) {
    let progress = Progress::default();
    let mut pipeline = FakePipeline {
        progress: &progress,
    };
    let verifier = FakeVerifier {
        progress: &progress,
        calls: Mutex::new(0),
        total_batches,
        patience,
        gave_up: Mutex::new(0),
    };
    let settings = SearchSettings {
        method,
        batch_size: 2,
        metric: "overall_score".into(),
        master_seed: 11,
        noise_kernel: RandnKernel::Portable,
        overlap,
        probe_first_batch: false,
        stop: StopFlag::default(),
        rank_metrics: Vec::new(),
        budget: None,
    };
    let mut rec = Recorder::default();
    search_prompt("p", &mut pipeline, &verifier, &settings, &mut rec, &NoStore).unwrap();
    let gave_up = *verifier.gave_up.lock().unwrap();
    (rec, gave_up)
}

#[test]
fn batches_are_graded_while_the_next_batch_is_generated() {
    // Random search, 3 rounds of 2, 4, 8 candidates in batches of 2: 7 batches. Each
    // grading waits for the next batch to be generated; with overlap it never has to give up.
    let (rec, gave_up) = run(
        SearchMethod::Random(RandomArgs { rounds: 3 }),
        true,
        Duration::from_secs(20),
        7,
    );
    assert_eq!(gave_up, 0);
    let rounds: Vec<usize> = rec.rounds.iter().map(|r| r.0).collect();
    assert_eq!(rounds, [1, 2, 3], "rounds are reported in order");
    assert!(rec.rounds.iter().all(|r| r.2.iter().all(Option::is_some)));
}

#[test]
fn without_overlap_grading_waits_for_nothing_and_results_are_the_same() {
    // Without overlap the next batch is never generated during grading, so the verifier gives
    // up waiting on every batch but the last: the fake can tell the two apart.
    let (serial, gave_up) = run(
        SearchMethod::Random(RandomArgs { rounds: 3 }),
        false,
        Duration::from_millis(50),
        7,
    );
    assert_eq!(gave_up, 6);
    let (overlapped, _) = run(
        SearchMethod::Random(RandomArgs { rounds: 3 }),
        true,
        Duration::from_secs(20),
        7,
    );
    assert_eq!(serial.rounds, overlapped.rounds);
    // Grading ran on the search's thread (6 waits of 50 ms); it is not generation time.
    assert!(serial.verification_s >= 0.3, "{}", serial.verification_s);
    assert!(
        serial.generation_s < serial.verification_s / 2.0,
        "generation {} s includes grading",
        serial.generation_s
    );
}

#[test]
fn zero_order_overlaps_batches_within_a_round() {
    // 1 base + 3 neighbours in batches of 2 per fresh round; rounds wait for their grades.
    let method = SearchMethod::ZeroOrder(ZeroOrderArgs {
        rounds: 3,
        threshold: 0.9,
        num_neighbors: 3,
    });
    let (serial, _) = run(method.clone(), false, Duration::from_millis(1), usize::MAX);
    let (overlapped, _) = run(method, true, Duration::from_millis(1), usize::MAX);
    assert_eq!(serial.rounds, overlapped.rounds);
    assert_eq!(serial.rounds.len(), 3);
}
/// Counts what it is asked: prompts encoded, images generated, images graded.
#[derive(Default)]
struct Counting {
    prompts: Mutex<usize>,
    generated: Mutex<Vec<usize>>,
    graded: Mutex<usize>,
}

struct CountingPipeline<'a>(&'a Counting);

impl ImagePipeline for CountingPipeline<'_> {
    fn noise_shape(&self) -> Vec<usize> {
        vec![1, 1, 4, 4]
    }
    fn set_prompt(&mut self, _prompt: &str) -> Result<(), PipelineError> {
        *self.0.prompts.lock().unwrap() += 1;
        Ok(())
    }
    fn generate(&mut self, noises: &[Noise]) -> Result<Vec<RgbImage>, PipelineError> {
        self.0.generated.lock().unwrap().push(noises.len());
        Ok(noises
            .iter()
            .map(|n| {
                let v = (n.data.iter().sum::<f32>().abs() * 10.0) as u8;
                RgbImage::from_pixel(2, 2, image::Rgb([v, v, v]))
            })
            .collect())
    }
}

impl Verifier for &Counting {
    fn name(&self) -> &str {
        "counting"
    }
    fn score(&self, inputs: &[VerifierInput<'_>]) -> Vec<Result<Grading, ScoreFailure>> {
        *self.graded.lock().unwrap() += inputs.len();
        inputs
            .iter()
            .map(|i| {
                let mut g = Grading::new();
                let score = f64::from(i.media.poster().get_pixel(0, 0)[0]);
                g.insert(
                    "overall_score".into(),
                    Score {
                        explanation: String::new(),
                        score,
                    },
                );
                Ok(g)
            })
            .collect()
    }
}

/// Keeps images and grades in memory, as the journal and the PNGs do on disk.
#[derive(Default)]
struct MemoryStore {
    images: Mutex<std::collections::HashMap<(usize, String), Media>>,
    grades: Mutex<std::collections::HashMap<(usize, String), (Graded, TokenUsage)>>,
}

impl CandidateStore for MemoryStore {
    fn media(&self, round: usize, origin: &NoiseOrigin) -> Option<Media> {
        self.images
            .lock()
            .unwrap()
            .get(&(round, origin.label()))
            .cloned()
    }
    fn grading(&self, round: usize, origin: &NoiseOrigin) -> Option<(Graded, TokenUsage)> {
        self.grades
            .lock()
            .unwrap()
            .get(&(round, origin.label()))
            .cloned()
    }
    fn record(
        &self,
        round: usize,
        origin: &NoiseOrigin,
        grading: &Graded,
        usage: TokenUsage,
    ) -> Result<(), ObserverError> {
        self.grades
            .lock()
            .unwrap()
            .insert((round, origin.label()), (grading.clone(), usage));
        Ok(())
    }
}

/// Saves every generated image into the store, as the run's output writer saves PNGs.
struct Saving<'a> {
    store: &'a MemoryStore,
    rec: Recorder,
}

impl SearchObserver for Saving<'_> {
    fn batch_generated(
        &mut self,
        round: usize,
        origins: &[NoiseOrigin],
        media: &[Media],
    ) -> Result<(), ObserverError> {
        let mut saved = self.store.images.lock().unwrap();
        for (o, i) in origins.iter().zip(media) {
            saved.insert((round, o.label()), i.clone());
        }
        Ok(())
    }
    fn round_finished(&mut self, p: &str, r: &RoundResult) -> Result<(), ObserverError> {
        self.rec.round_finished(p, r)
    }
}

fn search_with_store(method: SearchMethod, store: &MemoryStore) -> (Rounds, Counting) {
    let counting = Counting::default();
    let mut pipeline = CountingPipeline(&counting);
    let settings = SearchSettings {
        method,
        batch_size: 3,
        metric: "overall_score".into(),
        master_seed: 5,
        noise_kernel: RandnKernel::Portable,
        overlap: true,
        probe_first_batch: true,
        stop: StopFlag::default(),
        rank_metrics: Vec::new(),
        budget: None,
    };
    let mut obs = Saving {
        store,
        rec: Recorder::default(),
    };
    search_prompt("p", &mut pipeline, &&counting, &settings, &mut obs, store).unwrap();
    (obs.rec.rounds, counting)
}

#[test]
fn a_store_with_everything_asks_for_nothing_and_gives_the_same_rounds() {
    for method in [
        SearchMethod::Random(RandomArgs { rounds: 3 }),
        SearchMethod::ZeroOrder(ZeroOrderArgs {
            rounds: 3,
            threshold: 0.95,
            num_neighbors: 4,
        }),
    ] {
        let store = MemoryStore::default();
        let (first, fresh) = search_with_store(method.clone(), &store);
        assert_eq!(*fresh.prompts.lock().unwrap(), 1);
        let images = store.images.lock().unwrap().len();
        assert_eq!(*fresh.graded.lock().unwrap(), images);
        assert_eq!(
            store.grades.lock().unwrap().len(),
            images,
            "every grade recorded"
        );

        let (again, counted) = search_with_store(method.clone(), &store);
        assert_eq!(again, first, "{method:?}");
        assert_eq!(
            *counted.prompts.lock().unwrap(),
            0,
            "the prompt is not even encoded"
        );
        assert!(counted.generated.lock().unwrap().is_empty());
        assert_eq!(*counted.graded.lock().unwrap(), 0);
    }
}

#[test]
fn only_batches_missing_an_image_are_generated_whole_and_only_missing_grades_asked() {
    // Random search, rounds of 2, 4, 8 in batches of 3: [2], [3, 1], [3, 3, 2].
    let store = MemoryStore::default();
    let (first, _) = search_with_store(SearchMethod::Random(RandomArgs { rounds: 3 }), &store);
    // As after a crash in round 3: its second batch lost one image, its last batch was
    // never made, and two grades of round 2 were never recorded.
    let round3: Vec<String> = {
        let mut images = store.images.lock().unwrap();
        // Round 3's seeds in draw order, drawn as the search draws them.
        let mut stream = SeedStream::new(5, "p");
        for (round, n) in [(1, 2), (2, 4)] {
            for k in 0..n {
                stream.seed(round, SeedPurpose::Noise, k);
            }
        }
        let order: Vec<String> = (0..8)
            .map(|k| stream.seed(3, SeedPurpose::Noise, k).to_string())
            .collect();
        images.remove(&(3, order[4].clone()));
        for l in &order[6..] {
            images.remove(&(3, l.clone()));
        }
        order
    };
    let mut grades = store.grades.lock().unwrap();
    for l in &round3[3..] {
        grades.remove(&(3, l.clone()));
    }
    let round2: Vec<(usize, String)> = grades
        .keys()
        .filter(|k| k.0 == 2)
        .take(2)
        .cloned()
        .collect();
    for k in &round2 {
        grades.remove(k);
    }
    drop(grades);
    let (again, counted) =
        search_with_store(SearchMethod::Random(RandomArgs { rounds: 3 }), &store);
    assert_eq!(again, first);
    assert_eq!(
        *counted.generated.lock().unwrap(),
        [3, 2],
        "round 3's last two batches"
    );
    assert_eq!(*counted.graded.lock().unwrap(), 2 + 5);
    assert_eq!(*counted.prompts.lock().unwrap(), 1);
}
fn graded(scores: &[(&str, f64)]) -> Candidate {
    let mut g = Grading::new();
    for (m, v) in scores {
        g.insert(
            m.to_string(),
            Score {
                explanation: String::new(),
                score: *v,
            },
        );
    }
    Candidate {
        origin: NoiseOrigin::Seed { seed: 0 },
        media: Media::Image(RgbImage::new(1, 1)),
        grading: Ok(g),
        carried_over: false,
    }
}

#[test]
fn the_ensemble_selects_by_average_rank_not_by_average_score() {
    let a = [1.0, 3.0, 3.0, 2.0];
    let b = [10.0, 0.0, 5.0, 5.0];
    let mut candidates: Vec<Candidate> = (0..4)
        .map(|i| graded(&[("x/a", a[i]), ("y/b", b[i])]))
        .collect();
    candidates.push(graded(&[("x/a", 9.0)])); // y could not grade it
    let metrics = vec!["x/a".to_string(), "y/b".to_string()];
    apply_ensemble_rank(&mut candidates, &metrics);
    // Directly: ascending ranks with ties averaged, over the candidates graded on each
    // metric, normalised by (n - 1). Under x/a all five count; under y/b the first four.
    let rank = |v: f64, all: &[f64]| {
        let below = all.iter().filter(|t| **t < v).count() as f64;
        let equal = all.iter().filter(|t| **t == v).count() as f64;
        (below + (equal + 1.0) / 2.0 - 1.0) / (all.len() - 1) as f64
    };
    let a_all = [1.0, 3.0, 3.0, 2.0, 9.0];
    for i in 0..4 {
        let want = (rank(a[i], &a_all) + rank(b[i], &b)) / 2.0;
        let got = candidates[i].score(ENSEMBLE).unwrap();
        assert!((got - want).abs() < 1e-12, "candidate {i}: {got} vs {want}");
    }
    assert_eq!(
        candidates[4].score(ENSEMBLE),
        None,
        "a missing member score, no rank"
    );
    assert_eq!(select_best(&candidates, ENSEMBLE), Some(2));
    // Averaging raw scores would pick candidate 0 (5.5): b's scale would dominate.
    let raw: Vec<f64> = (0..4).map(|i| (a[i] + b[i]) / 2.0).collect();
    assert_eq!(
        raw.iter()
            .cloned()
            .enumerate()
            .fold((0, f64::MIN), |m, (i, v)| if v > m.1 { (i, v) } else { m })
            .0,
        0
    );
    // A lone candidate is the best of its round.
    let mut one = vec![graded(&[("x/a", 1.0), ("y/b", 2.0)])];
    apply_ensemble_rank(&mut one, &metrics);
    assert_eq!(one[0].score(ENSEMBLE), Some(1.0));
}

#[test]
fn a_budget_stops_the_search_before_a_round_that_would_exceed_it() {
    let run_with = |budget: SearchBudget| {
        let counting = Counting::default();
        let mut pipeline = CountingPipeline(&counting);
        let settings = SearchSettings {
            method: SearchMethod::Random(RandomArgs { rounds: 3 }),
            batch_size: 3,
            metric: "overall_score".into(),
            master_seed: 5,
            noise_kernel: RandnKernel::Portable,
            overlap: true,
            probe_first_batch: false,
            stop: StopFlag::default(),
            rank_metrics: Vec::new(),
            budget: Some(budget),
        };
        let mut rec = Recorder::default();
        search_prompt(
            "p",
            &mut pipeline,
            &&counting,
            &settings,
            &mut rec,
            &NoStore,
        )
        .unwrap();
        let graded = *counting.graded.lock().unwrap();
        (rec.rounds.iter().map(|r| r.0).collect::<Vec<_>>(), graded)
    };
    // Rounds of 2, 4, 8 candidates: 7 calls admit rounds 1 and 2 (6), not round 3 (14).
    assert_eq!(run_with(SearchBudget::VerifierCalls(7)), (vec![1, 2], 6));
    assert_eq!(
        run_with(SearchBudget::VerifierCalls(14)),
        (vec![1, 2, 3], 14)
    );
    // The first round always runs; a spent time budget stops before the next.
    assert_eq!(run_with(SearchBudget::VerifierCalls(1)), (vec![1], 2));
    assert_eq!(run_with(SearchBudget::Seconds(1e-9)), (vec![1], 2));
    // This pipeline cannot count NFEs: the NFE budget is not applied.
    assert_eq!(run_with(SearchBudget::Nfe(1)), (vec![1, 2, 3], 14));
}

const ENSEMBLE: &str = crate::verifiers::ensemble::ENSEMBLE_METRIC;
