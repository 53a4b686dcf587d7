//! What search over paths and particle search share: batched calls to the pipeline's stepwise
//! interface, and grading a stage's images (reusing the grades a resumed run recorded).

use std::sync::OnceLock;
use std::time::Instant;

use candle_core::Tensor;

use super::queue::{grade, ToGrade};
use super::registry::Search;
use super::{
    Candidate, CandidateStore, GradedRound, NoiseOrigin, RoundResult, SearchError, SearchObserver,
    SearchSettings,
};
use crate::media::Media;
use crate::noise::Noise;
use crate::pipelines::{Pipeline, Span, StepSchedule};
use crate::verifiers::Verifier;

/// The pipeline, verifier and settings a stepwise search runs with, and its time tallies.
pub(super) struct Stepper<'a> {
    /// The pipeline, its prompt already set.
    pub pipeline: &'a mut dyn Pipeline,
    /// The judge.
    pub verifier: &'a dyn Verifier,
    /// Batch size, metric, stop flag, ensemble metrics.
    pub settings: &'a SearchSettings,
    /// Grades recorded by an earlier attempt, and where new ones are recorded.
    pub store: &'a dyn CandidateStore,
    /// The prompt being searched.
    pub prompt: &'a str,
    /// The shape of one initial noise ([`Pipeline::noise_shape`]).
    pub shape: Vec<usize>,
    /// Seconds spent in the pipeline since the last [`Stepper::graded`].
    pub generation_s: f64,
}

/// A stage as a round: the graded candidates' best on the selection metric, one verifier
/// call a candidate, `nfe` denoiser evaluations, the strategy's `stage` record; `provisional`
/// when the media are clean-sample predictions of unfinished paths or particles.
pub(super) fn stage_round(
    graded: GradedRound,
    round: usize,
    settings: &SearchSettings,
    nfe: u64,
    stage: serde_json::Value,
    provisional: bool,
) -> RoundResult {
    RoundResult {
        stage: Some(stage),
        provisional,
        ..graded.into_round(round, settings, Some(nfe))
    }
}

/// Rows `start..start + len` of `t` along the batch dimension.
fn rows(t: &Tensor, start: usize, len: usize) -> Result<Tensor, SearchError> {
    Ok(t.narrow(0, start, len)
        .map_err(crate::models::ModelError::from)?)
}

/// The rows `idx` of `t` (along the batch dimension), in that order.
pub(super) fn select_rows(t: &Tensor, idx: &[usize]) -> Result<Tensor, SearchError> {
    let idx: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    let ids = Tensor::new(idx.as_slice(), t.device()).map_err(crate::models::ModelError::from)?;
    Ok(t.index_select(&ids, 0)
        .map_err(crate::models::ModelError::from)?)
}

fn cat(parts: &[Tensor]) -> Result<Tensor, SearchError> {
    Ok(Tensor::cat(parts, 0).map_err(crate::models::ModelError::from)?)
}

impl<'a> Stepper<'a> {
    /// Sets the pipeline to the prompt and returns the stepper with the pipeline's schedule,
    /// and the observer.
    pub fn start(
        run: Search<'a>,
    ) -> Result<(Self, StepSchedule, &'a mut dyn SearchObserver), SearchError> {
        let Search {
            prompt,
            pipeline,
            verifier,
            settings,
            observer,
            store,
        } = run;
        let schedule = pipeline.schedule()?;
        let shape = pipeline.noise_shape();
        pipeline.set_prompt(prompt)?;
        let stepper = Stepper {
            pipeline,
            verifier,
            settings,
            store,
            prompt,
            shape,
            generation_s: 0.0,
        };
        Ok((stepper, schedule, observer))
    }

    /// The float32 `torch.randn` draws of `seeds` in the noise shape, as one batch in the
    /// pipeline's latent layout.
    pub fn noise_of(&self, seeds: &[u64]) -> Result<Tensor, SearchError> {
        let noises: Vec<Noise> = seeds
            .iter()
            .map(|&seed| {
                NoiseOrigin::Seed { seed }.regenerate(&self.shape, self.settings.noise_kernel)
            })
            .collect();
        Ok(self.pipeline.noise_latents(&noises)?)
    }

    /// Fails when a stop was asked for.
    pub fn check_stop(&self) -> Result<(), SearchError> {
        if self.settings.stop.is_set() {
            Err(SearchError::Interrupted)
        } else {
            Ok(())
        }
    }

    /// Runs `f` on `latents` in batches of the settings' batch size and concatenates the
    /// results along the batch dimension, timing it as generation.
    fn batched<T>(
        &mut self,
        latents: &Tensor,
        mut f: impl FnMut(&dyn Pipeline, &Tensor) -> Result<T, SearchError>,
        mut join: impl FnMut(Vec<T>) -> Result<T, SearchError>,
    ) -> Result<T, SearchError> {
        let t = Instant::now();
        let n = latents.dim(0).map_err(crate::models::ModelError::from)?;
        let size = self.settings.batch_size.max(1);
        let mut parts = Vec::new();
        for start in (0..n).step_by(size) {
            self.check_stop()?;
            let chunk = rows(latents, start, size.min(n - start))?;
            parts.push(f(&*self.pipeline, &chunk)?);
        }
        let out = join(parts)?;
        self.generation_s += t.elapsed().as_secs_f64();
        Ok(out)
    }

    /// [`Pipeline::denoise_span`] over a batch of any size.
    pub fn span(&mut self, latents: &Tensor, from: usize, to: usize) -> Result<Span, SearchError> {
        self.batched(
            latents,
            |p, chunk| Ok(p.denoise_span(chunk, from, to)?),
            |parts| {
                let evaluations = parts.first().map_or(0, |s| s.evaluations);
                let latents: Vec<Tensor> = parts.iter().map(|s| s.latents.clone()).collect();
                let x0: Vec<Tensor> = parts.iter().map(|s| s.x0.clone()).collect();
                Ok(Span {
                    latents: cat(&latents)?,
                    x0: cat(&x0)?,
                    evaluations,
                })
            },
        )
    }

    /// [`Pipeline::predict_x0`] over a batch of any size.
    pub fn predict_x0(&mut self, latents: &Tensor, level: usize) -> Result<Tensor, SearchError> {
        self.batched(
            latents,
            |p, chunk| Ok(p.predict_x0(chunk, level)?),
            |parts| cat(&parts),
        )
    }

    /// [`Pipeline::decode_latents`] over a batch of any size.
    pub fn decode(&mut self, latents: &Tensor) -> Result<Vec<Media>, SearchError> {
        let t = Instant::now();
        let n = latents.dim(0).map_err(crate::models::ModelError::from)?;
        let size = self.settings.batch_size.max(1);
        let mut media = Vec::with_capacity(n);
        for start in (0..n).step_by(size) {
            let chunk = rows(latents, start, size.min(n - start))?;
            media.extend(self.pipeline.decode_latents(&chunk)?);
        }
        if media.len() != n {
            return Err(SearchError::ImageCount {
                expected: n,
                got: media.len(),
            });
        }
        self.generation_s += t.elapsed().as_secs_f64();
        Ok(media)
    }

    /// Hands round `round`'s media to `observer` (saved before grading), grades those the
    /// store has no grade for, and ranks them for the ensemble. Stops the search when the
    /// verifier cannot grade any image.
    pub fn graded(
        &mut self,
        round: usize,
        origins: Vec<NoiseOrigin>,
        media: Vec<Media>,
        observer: &mut dyn SearchObserver,
    ) -> Result<GradedRound, SearchError> {
        observer.images_generated(media.len());
        observer.batch_generated(round, &origins, &media)?;
        let known: Vec<_> = origins
            .iter()
            .map(|o| self.store.grading(round, o))
            .collect();
        let fatal = OnceLock::new();
        let batch = ToGrade {
            round,
            origins: origins.clone(),
            media,
            known,
        };
        let result = grade(self.verifier, self.prompt, batch, &fatal, self.store);
        if let Some(message) = fatal.get() {
            return Err(SearchError::FatalVerifier(message.clone()));
        }
        if let Some(e) = result.record_error {
            return Err(SearchError::Observer(e));
        }
        let candidates: Vec<Candidate> = origins
            .into_iter()
            .zip(result.media)
            .zip(result.gradings)
            .map(|((origin, media), grading)| Candidate {
                origin,
                media,
                grading,
                carried_over: false,
            })
            .collect();
        let generation_s = std::mem::take(&mut self.generation_s);
        Ok(GradedRound {
            candidates,
            generation_s,
            verification_s: result.seconds,
            tokens: result.tokens,
        }
        .ranked(self.settings))
    }
}

/// A deterministic stepwise pipeline and verifier for the strategies' unit tests.
#[cfg(test)]
pub(super) mod fakes {
    use std::sync::Mutex;

    use candle_core::{Device, Tensor};
    use image::RgbImage;

    use crate::noise::{Noise, RandnKernel};
    use crate::pipelines::{ImagePipeline, PipelineError, Span, StepSchedule};
    use crate::schedulers::{NoiseLevel, Parameterization};
    use crate::search::{ObserverError, RoundResult, SearchObserver, SearchSettings, StopFlag};
    use crate::verifiers::{Grading, Score, ScoreFailure, Verifier, VerifierInput};

    /// Ten steps with levels 1.0, 0.9, ..., 0.1 and the final 0, two evaluations a call (as
    /// under guidance). A span halves the latents and predicts a quarter of them; a prediction
    /// is half of them. Every call is logged as (kind, from, to, rows).
    #[derive(Default)]
    pub struct FakeStepper {
        pub log: Mutex<Vec<(&'static str, usize, usize, usize)>>,
    }

    pub const SHAPE: [usize; 4] = [1, 1, 2, 2];

    impl ImagePipeline for FakeStepper {
        fn noise_shape(&self) -> Vec<usize> {
            SHAPE.to_vec()
        }
        fn set_prompt(&mut self, _prompt: &str) -> Result<(), PipelineError> {
            Ok(())
        }
        fn generate(&mut self, _noises: &[Noise]) -> Result<Vec<RgbImage>, PipelineError> {
            Err(PipelineError::Unsupported("stepwise only".into()))
        }
        fn schedule(&self) -> Result<StepSchedule, PipelineError> {
            let levels = (0..=10)
                .map(|i| {
                    let f = (10 - i) as f64 / 10.0;
                    NoiseLevel {
                        timestep: f * 1000.0,
                        alpha: 1.0 - f,
                        sigma: f,
                        fraction: f,
                    }
                })
                .collect();
            Ok(StepSchedule {
                levels,
                parameterization: Parameterization::FlowVelocity,
                init_noise_sigma: 1.0,
                evaluations_per_call: 2,
                warmup_calls: 0,
            })
        }
        fn noise_latents(&self, noises: &[Noise]) -> Result<Tensor, PipelineError> {
            let data: Vec<f32> = noises.iter().flat_map(|n| n.data.clone()).collect();
            Ok(Tensor::from_vec(
                data,
                (noises.len(), 1, 2, 2),
                &Device::Cpu,
            )?)
        }
        fn denoise_span(&self, x: &Tensor, from: usize, to: usize) -> Result<Span, PipelineError> {
            self.log.lock().unwrap().push(("span", from, to, x.dim(0)?));
            Ok(Span {
                latents: (x * 0.5)?,
                x0: (x * 0.25)?,
                evaluations: (to - from) * 2,
            })
        }
        fn predict_x0(&self, x: &Tensor, level: usize) -> Result<Tensor, PipelineError> {
            self.log
                .lock()
                .unwrap()
                .push(("predict", level, level + 1, x.dim(0)?));
            Ok((x * 0.5)?)
        }
        fn decode_latents(&self, x: &Tensor) -> Result<Vec<RgbImage>, PipelineError> {
            let means: Vec<f32> = x.mean_keepdim((1, 2, 3))?.flatten_all()?.to_vec1()?;
            Ok(means
                .iter()
                .map(|m| {
                    let v = (128.0 + 60.0 * m).clamp(0.0, 255.0) as u8;
                    RgbImage::from_pixel(1, 1, image::Rgb([v, v, v]))
                })
                .collect())
        }
    }

    /// Scores an image by its brightness (`overall_score`), counting the images it grades.
    #[derive(Default)]
    pub struct Brightness {
        pub graded: Mutex<usize>,
    }

    impl Verifier for Brightness {
        fn name(&self) -> &str {
            "brightness"
        }
        fn score(&self, inputs: &[VerifierInput<'_>]) -> Vec<Result<Grading, ScoreFailure>> {
            *self.graded.lock().unwrap() += inputs.len();
            inputs
                .iter()
                .map(|i| {
                    let mut g = Grading::new();
                    g.insert(
                        "overall_score".into(),
                        Score {
                            explanation: "brightness".into(),
                            score: f64::from(i.media.poster().get_pixel(0, 0)[0]),
                        },
                    );
                    Ok(g)
                })
                .collect()
        }
    }

    /// Keeps every round.
    #[derive(Default)]
    pub struct Rounds(pub Vec<RoundResult>);

    impl SearchObserver for Rounds {
        fn round_finished(&mut self, _p: &str, r: &RoundResult) -> Result<(), ObserverError> {
            self.0.push(r.clone());
            Ok(())
        }
    }

    /// Runs `method` on prompt "p" with [`FakeStepper`] and [`Brightness`] under `budget`.
    pub fn run(
        method: crate::search::SearchMethod,
        budget: Option<crate::search::SearchBudget>,
    ) -> (Rounds, FakeStepper) {
        let mut pipeline = FakeStepper::default();
        let verifier = Brightness::default();
        let mut s = settings(method);
        s.budget = budget;
        let mut rounds = Rounds::default();
        crate::search::search_prompt(
            "p",
            &mut pipeline,
            &verifier,
            &s,
            &mut rounds,
            &crate::search::NoStore,
        )
        .unwrap();
        (rounds, pipeline)
    }

    /// What identifies a search's outcome: every round's candidates and choice.
    pub fn key(r: &Rounds) -> Vec<(Vec<crate::search::NoiseOrigin>, Option<usize>)> {
        r.0.iter()
            .map(|r| {
                (
                    r.candidates.iter().map(|c| c.origin.clone()).collect(),
                    r.best,
                )
            })
            .collect()
    }

    /// Settings for `method` with batches of 3 and master seed 5.
    pub fn settings(method: crate::search::SearchMethod) -> SearchSettings {
        SearchSettings {
            method,
            batch_size: 3,
            metric: "overall_score".into(),
            master_seed: 5,
            noise_kernel: RandnKernel::Portable,
            overlap: false,
            probe_first_batch: false,
            stop: StopFlag::default(),
            rank_metrics: Vec::new(),
            budget: None,
        }
    }
}
