//! The `tt-scale` binary: parses the command line and reports errors at the edge.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use tt_scale::cli::{Cli, Command, DeviceArg, NumPromptsArg};
use tt_scale::run::{self, RunOptions};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn,tt_scale=info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(cli.verbose > 0)
        .init();
    match cli.command {
        Command::Run(a) => {
            let opts = RunOptions {
                config_path: a.pipeline_config,
                prompt: a.prompt,
                prompts_file: a.prompts_file,
                num_prompts: a.num_prompts.map(|n| match n {
                    NumPromptsArg::Take(n) => Some(n),
                    NumPromptsArg::NoneGiven => None,
                }),
                batch_size: a.batch_size,
                seed: a.seed,
                output_dir: a.output_dir,
                low_vram: a.low_vram,
                device: match a.device {
                    DeviceArg::Auto => None,
                    DeviceArg::Named(d) => Some(d),
                },
            };
            match run::run(&opts) {
                Ok(summary) => {
                    eprintln!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code() as u8)
                }
            }
        }
        Command::Collage(a) => match run::collage(&a.path) {
            Ok(paths) => {
                for p in paths {
                    println!("{}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
    }
}
