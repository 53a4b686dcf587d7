//! The batch-and-grade queue of the strategies that generate whole images (random and
//! zero-order search): every generated batch is saved, then graded on its own thread while the
//! pipeline denoises the next batch; a round is reported once all its grades are in, in round
//! order. What an earlier attempt saved and graded ([`CandidateStore`]) is not asked again.

use std::sync::OnceLock;
use std::time::Instant;

use super::{
    Candidate, CandidateStore, GradedRound, NoiseOrigin, ObserverError, RoundResult, SearchError,
    SearchObserver, SearchSettings,
};
use crate::media::Media;
use crate::noise::Noise;
use crate::pipelines::Pipeline;
use crate::verifiers::{Graded, Grading, ScoreFailure, TokenUsage, Verifier, VerifierInput};

/// A generated batch and its grades (or the thread grading it).
enum Batch<'scope> {
    Done(BatchResult),
    Grading(std::thread::ScopedJoinHandle<'scope, BatchResult>),
}

pub(super) struct BatchResult {
    pub media: Vec<Media>,
    pub gradings: Vec<Result<Grading, ScoreFailure>>,
    pub seconds: f64,
    /// Why a grading could not be recorded in the store, if it could not.
    pub record_error: Option<ObserverError>,
    /// The API tokens the batch's gradings cost (those read back from the store included).
    pub tokens: TokenUsage,
}

struct PendingRound<'scope> {
    round: usize,
    origins: Vec<NoiseOrigin>,
    /// Images generated so far.
    generated: usize,
    batches: Vec<Batch<'scope>>,
    generation_s: f64,
}

/// Rounds whose batches are generated and are being graded, oldest first.
pub(super) struct RoundQueue<'scope, 'env> {
    scope: &'scope std::thread::Scope<'scope, 'env>,
    verifier: &'env dyn Verifier,
    prompt: &'env str,
    overlap: bool,
    /// The next batch is graded before another is generated (see `probe_first_batch`).
    probe: bool,
    /// The first failure that no further request can avoid, set by the grading threads.
    fatal: &'env OnceLock<String>,
    /// Saved media and recorded grades.
    store: &'env dyn CandidateStore,
    /// Whether the pipeline has been given the prompt.
    prompt_set: bool,
    pending: std::collections::VecDeque<PendingRound<'scope>>,
}

/// A batch to grade: its media, the noises that made them, and the gradings already known.
pub(super) struct ToGrade {
    pub round: usize,
    pub origins: Vec<NoiseOrigin>,
    pub media: Vec<Media>,
    pub known: Vec<Option<(Graded, TokenUsage)>>,
}

impl ToGrade {
    /// Whether some image has no grading yet, so the verifier will be asked.
    fn asks(&self) -> bool {
        self.known.iter().any(Option::is_none)
    }
}

/// Grades the media of `batch` that have no known grading, records each new grading in
/// `store`, and notes the first fatal failure in `fatal`.
pub(super) fn grade(
    verifier: &dyn Verifier,
    prompt: &str,
    batch: ToGrade,
    fatal: &OnceLock<String>,
    store: &dyn CandidateStore,
) -> BatchResult {
    let t = Instant::now();
    let ToGrade {
        round,
        origins,
        media,
        known,
    } = batch;
    let missing: Vec<usize> = (0..media.len())
        .filter(|&i| known.get(i).is_none_or(Option::is_none))
        .collect();
    let mut fresh = if missing.is_empty() {
        Vec::new()
    } else {
        let inputs: Vec<VerifierInput<'_>> = missing
            .iter()
            .map(|&i| VerifierInput {
                prompt,
                media: &media[i],
            })
            .collect();
        verifier.score_with_usage(&inputs)
    };
    // A verifier that returns fewer results than inputs must not shift scores onto the wrong
    // candidates: missing slots are failures.
    let no_result = || {
        Err(ScoreFailure {
            message: "the verifier returned no result for this image".into(),
            attempts: 0,
            fatal: false,
        })
    };
    fresh.resize_with(missing.len(), || (no_result(), TokenUsage::default()));
    fresh.truncate(missing.len());
    let mut record_error = None;
    for (&i, (g, usage)) in missing.iter().zip(&fresh) {
        match g {
            // The first fatal failure wins; later ones say the same. A fatal failure is not
            // recorded: once the cause is fixed, a resumed run asks again.
            Err(f) if f.fatal => {
                let _ = fatal.set(f.message.clone());
            }
            _ => {
                if let Some(origin) = origins.get(i) {
                    if let Err(e) = store.record(round, origin, g, *usage) {
                        record_error.get_or_insert(e);
                    }
                }
            }
        }
    }
    let mut fresh = fresh.into_iter();
    let mut tokens = TokenUsage::default();
    let gradings = known
        .into_iter()
        .map(|k| {
            let (g, usage) = k
                .or_else(|| fresh.next())
                .unwrap_or_else(|| (no_result(), TokenUsage::default()));
            tokens += usage;
            g
        })
        .collect();
    BatchResult {
        media,
        gradings,
        seconds: t.elapsed().as_secs_f64(),
        record_error,
        tokens,
    }
}

impl<'scope, 'env> RoundQueue<'scope, 'env> {
    /// An empty queue grading on threads of `scope` with `verifier`, recording in `store`.
    pub fn new(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        run: (&'env str, &'env dyn Verifier, &'env dyn CandidateStore),
        settings: &SearchSettings,
        fatal: &'env OnceLock<String>,
    ) -> Self {
        let (prompt, verifier, store) = run;
        RoundQueue {
            scope,
            verifier,
            prompt,
            overlap: settings.overlap,
            probe: settings.probe_first_batch,
            fatal,
            store,
            prompt_set: false,
            pending: std::collections::VecDeque::new(),
        }
    }

    /// Generates `noises` batch by batch, handing each batch to the verifier; between batches,
    /// reports (with `finish`) the rounds at the head of the queue whose grades are all in.
    /// Without `finish` the round stays queued for [`RoundQueue::collect_round`].
    #[allow(clippy::too_many_arguments)]
    pub fn generate_round(
        &mut self,
        round: usize,
        origins: Vec<NoiseOrigin>,
        noises: &[Noise],
        pipeline: &mut dyn Pipeline,
        settings: &SearchSettings,
        observer: &mut dyn SearchObserver,
        finish: Option<&mut dyn FnMut(usize, GradedRound) -> RoundResult>,
    ) -> Result<(), SearchError> {
        let mut finish = finish;
        self.pending.push_back(PendingRound {
            round,
            origins,
            generated: 0,
            batches: Vec::new(),
            generation_s: 0.0,
        });
        for batch in noises.chunks(settings.batch_size.max(1)) {
            let stop = match self.fatal.get() {
                Some(message) => Some(SearchError::FatalVerifier(message.clone())),
                None if settings.stop.is_set() => Some(SearchError::Interrupted),
                None => None,
            };
            if let Some(error) = stop {
                // No more images: report the rounds before this one (complete), not this one.
                if let Some(f) = finish.as_deref_mut() {
                    let current = self.pending.pop_back();
                    self.report_ready(observer, f, true)?;
                    drop(current);
                }
                return Err(error);
            }
            let (start, origins) = match self.pending.back() {
                Some(p) => (
                    p.generated,
                    p.origins
                        .get(p.generated..p.generated + batch.len())
                        .unwrap_or(&[])
                        .to_vec(),
                ),
                None => (0, Vec::new()),
            };
            // A batch saved whole by an earlier attempt is read back, not generated.
            let saved: Option<Vec<Media>> = origins
                .iter()
                .map(|o| self.store.media(round, o))
                .collect::<Option<Vec<_>>>()
                .filter(|media| !media.is_empty() && media.len() == batch.len());
            let (media, generation_s) = match saved {
                Some(media) => (media, 0.0),
                None => {
                    if !self.prompt_set {
                        pipeline.set_prompt(self.prompt)?;
                        self.prompt_set = true;
                    }
                    let t = Instant::now();
                    let media = pipeline.generate(batch)?;
                    // Generation only: without overlap, grading below runs on this thread.
                    let generation_s = t.elapsed().as_secs_f64();
                    if media.len() != batch.len() {
                        return Err(SearchError::ImageCount {
                            expected: batch.len(),
                            got: media.len(),
                        });
                    }
                    observer.batch_generated(round, &origins, &media)?;
                    (media, generation_s)
                }
            };
            observer.images_generated(media.len());
            if let Some(p) = self.pending.back_mut() {
                p.generated = start + media.len();
            }
            let known = origins
                .iter()
                .map(|o| self.store.grading(round, o))
                .collect();
            let to_grade = ToGrade {
                round,
                origins,
                media,
                known,
            };
            let (verifier, prompt, fatal, store) =
                (self.verifier, self.prompt, self.fatal, self.store);
            let graded = if !to_grade.asks() {
                Batch::Done(grade(verifier, prompt, to_grade, fatal, store))
            } else if self.overlap && !self.probe {
                Batch::Grading(
                    self.scope
                        .spawn(move || grade(verifier, prompt, to_grade, fatal, store)),
                )
            } else {
                self.probe = false;
                Batch::Done(grade(verifier, prompt, to_grade, fatal, store))
            };
            if let Some(p) = self.pending.back_mut() {
                p.generation_s += generation_s;
                p.batches.push(graded);
            }
            if let Some(f) = finish.as_deref_mut() {
                self.report_ready(observer, f, false)?;
            }
        }
        Ok(())
    }

    /// Reports, in round order, the rounds at the head of the queue that are complete (all of
    /// them, waiting for their grades, when `wait`). The round being generated (the last one)
    /// is left alone unless `wait`.
    fn report_ready(
        &mut self,
        observer: &mut dyn SearchObserver,
        finish: &mut dyn FnMut(usize, GradedRound) -> RoundResult,
        wait: bool,
    ) -> Result<(), SearchError> {
        while self.pending.len() > usize::from(!wait) {
            let ready = self.pending.front().is_some_and(|p| {
                p.batches.iter().all(|b| match b {
                    Batch::Done(_) => true,
                    Batch::Grading(h) => h.is_finished(),
                })
            });
            if !ready && !wait {
                break;
            }
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let round = p.round;
            let graded = Self::collect(p)?;
            observer.round_finished(self.prompt, &finish(round, graded))?;
        }
        Ok(())
    }

    /// The verifier's fatal failure, if a grading met one.
    pub fn check_fatal(&self) -> Result<(), SearchError> {
        match self.fatal.get() {
            Some(message) => Err(SearchError::FatalVerifier(message.clone())),
            None => Ok(()),
        }
    }

    /// Waits for and reports every queued round.
    pub fn drain(
        &mut self,
        observer: &mut dyn SearchObserver,
        finish: &mut dyn FnMut(usize, GradedRound) -> RoundResult,
    ) -> Result<(), SearchError> {
        self.report_ready(observer, finish, true)
    }

    /// Waits for the grades of the only queued round and returns it.
    pub fn collect_round(&mut self) -> Result<GradedRound, SearchError> {
        match self.pending.pop_front() {
            Some(p) => Self::collect(p),
            None => Ok(GradedRound {
                candidates: Vec::new(),
                generation_s: 0.0,
                verification_s: 0.0,
                tokens: TokenUsage::default(),
            }),
        }
    }

    /// Waits for a round's grades and puts its candidates together; fails when a grading
    /// could not be recorded.
    fn collect(p: PendingRound<'scope>) -> Result<GradedRound, SearchError> {
        let mut media = Vec::with_capacity(p.origins.len());
        let mut gradings = Vec::with_capacity(p.origins.len());
        let mut verification_s = 0.0;
        let mut tokens = TokenUsage::default();
        for b in p.batches {
            let r = match b {
                Batch::Done(r) => r,
                Batch::Grading(h) => h
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            };
            if let Some(e) = r.record_error {
                return Err(SearchError::Observer(e));
            }
            verification_s += r.seconds;
            tokens += r.tokens;
            media.extend(r.media);
            gradings.extend(r.gradings);
        }
        let candidates = p
            .origins
            .into_iter()
            .zip(media)
            .zip(gradings)
            .map(|((origin, media), grading)| Candidate {
                origin,
                media,
                grading,
                carried_over: false,
            })
            .collect();
        Ok(GradedRound {
            candidates,
            generation_s: p.generation_s,
            verification_s,
            tokens,
        })
    }
}
