//! Why a run stopped ([`RunError`]), its exit code, and the command that continues it.

use std::path::{Path, PathBuf};

use crate::config::ConfigError;
use crate::device::DeviceSpec;
use crate::output::journal::Shard;
use crate::output::OutputError;
use crate::pipelines::PipelineError;
use crate::prompts::PromptsError;
use crate::search::SearchError;
use crate::sweep::ShardError;
use crate::verifiers::VerifierError;

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The flags contradict each other.
    #[error("{0}")]
    Usage(String),
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The prompts could not be loaded.
    #[error(transparent)]
    Prompts(#[from] PromptsError),
    /// The verifier could not be set up.
    #[error(transparent)]
    Verifier(#[from] VerifierError),
    /// The model could not be loaded or run.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The search failed.
    #[error(transparent)]
    Search(#[from] SearchError),
    /// Output could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The device is not available.
    #[error("{0}")]
    Device(String),
    /// The folder given to `--resume` cannot be resumed (not a run folder, changed since, or
    /// made by another version).
    #[error("cannot resume {}: {problem}", dir.display())]
    Resume {
        /// The folder.
        dir: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },
    /// Worker processes (`--device` with several devices) failed.
    #[error("{} of the {workers} workers failed ({}); their logs are above. The files of every finished round are in {}; run the same command again to continue", failed.len(), failed.iter().map(|(d, c)| format!("{d}: exit {}", c.map_or_else(|| "by signal".to_string(), |c| c.to_string()))).collect::<Vec<_>>().join(", "), run_dir.display())]
    Workers {
        /// How many workers ran.
        workers: usize,
        /// The failed workers' devices and exit codes.
        failed: Vec<(DeviceSpec, Option<i32>)>,
        /// The run folder.
        run_dir: PathBuf,
    },
    /// `--shard` could not be worked out.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// The SIGINT/SIGTERM handlers could not be installed.
    #[error("cannot install the SIGINT/SIGTERM handlers: {0}")]
    Signals(std::io::Error),
    /// SIGINT (Ctrl-C) or SIGTERM (Slurm preemption, `kill`) stopped the run before its next
    /// batch; every file written is whole.
    #[error(
        "interrupted by {signal}: stopped before the next batch; the {images} image(s) of the rounds completed so far are in {}; continue with: {}",
        run_dir.display(), resume_command(run_dir, *shard)
    )]
    Interrupted {
        /// `SIGINT` or `SIGTERM`.
        signal: &'static str,
        /// The run folder.
        run_dir: PathBuf,
        /// Images of the rounds written.
        images: usize,
        /// The shard this process ran, if any.
        shard: Option<Shard>,
    },
    /// The verifier refused access before any image was made (checked with one cheap request).
    #[error("the verifier cannot grade any image, so nothing was generated: {0}")]
    VerifierAccess(String),
    /// The verifier cannot grade any image (a rejected key, an unknown model, a refused
    /// request, an exhausted quota); the run stopped with its files consistent.
    #[error(
        "the verifier cannot grade any image, so the run stopped (the rounds completed so far are in {}): {message}\nOnce that is fixed, continue with: {}",
        run_dir.display(), resume_command(run_dir, *shard)
    )]
    FatalVerifier {
        /// The API's message and what to do.
        message: String,
        /// The run folder.
        run_dir: PathBuf,
        /// The shard this process ran, if any.
        shard: Option<Shard>,
    },
}

impl RunError {
    /// The process exit code (the README's table): 2 for a mistake in the flags, the config or
    /// the files they name (a missing prompts file or model folder, a dtype the device cannot
    /// run); 3 when the verifier cannot grade any image; 1 for anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Usage(_)
            | RunError::Config(_)
            | RunError::Device(_)
            | RunError::Shard(_)
            | RunError::Resume { .. } => 2,
            RunError::Prompts(
                PromptsError::EmptyPrompt
                | PromptsError::ReadFile { .. }
                | PromptsError::NotUtf8 { .. }
                | PromptsError::NoPrompts { .. },
            ) => 2,
            RunError::Verifier(
                VerifierError::PromptFile { .. }
                | VerifierError::EmptyPrompt { .. }
                | VerifierError::InvalidArg { .. }
                | VerifierError::BaseUrl { .. },
            ) => 2,
            RunError::Pipeline(
                PipelineError::InvalidArgument(_) | PipelineError::Unsupported(_),
            ) => 2,
            RunError::FatalVerifier { .. }
            | RunError::VerifierAccess(_)
            | RunError::Search(SearchError::FatalVerifier(_)) => 3,
            RunError::Workers { failed, .. } => failed
                .iter()
                .find_map(|(_, c)| c.filter(|&c| c != 0))
                .unwrap_or(1),
            RunError::Interrupted { signal, .. } => {
                if *signal == "SIGTERM" {
                    143
                } else {
                    130
                }
            }
            _ => 1,
        }
    }
}

/// The command that resumes the run (or `shard` of it) in `run_dir`, from any folder (the path
/// made absolute).
pub fn resume_command(run_dir: &Path, shard: Option<Shard>) -> String {
    let dir = std::path::absolute(run_dir).unwrap_or_else(|_| run_dir.to_path_buf());
    let shard = shard.map_or_else(String::new, |s| format!(" --shard {}", s.spec()));
    format!(
        "tt-scale run --resume {}{shard}",
        shell_quote(&dir.display().to_string())
    )
}

/// `text` as one shell word: unchanged when it is plain, else in single quotes.
fn shell_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&b));
    if plain {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_commands_quote_folders_for_the_shell() {
        assert_eq!(
            shell_quote("output/sd-v1.5/gemini/x_1"),
            "output/sd-v1.5/gemini/x_1"
        );
        assert_eq!(shell_quote("my runs/it's"), "'my runs/it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
