//! The `tt-scale` binary: parses the command line and reports errors at the edge.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use tt_scale::cli::{BenchArgs, Cli, Command, DeviceArg};
use tt_scale::run;

/// `println!` that never panics: a closed stdout (`tt-scale ... | head -1`) drops the text.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that never panics: a closed stderr drops the text, the run goes on.
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn,tt_scale=info",
        // Tokenizers and HTTP clients trace every token and packet: kept at info.
        1 => "debug,tokenizers=info,hyper_util=info,reqwest=info,ureq=info,rustls=info",
        _ => "trace,tokenizers=info,hyper_util=info,hyper=info,h2=info,reqwest=info,ureq=info,rustls=info",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Its default reports a failed write with `eprintln!`, which panics on a closed stderr.
        .log_internal_errors(false)
        .with_ansi(ansi)
        .with_target(cli.verbose > 0);
    if cli.verbose > 0 {
        builder.init();
    } else {
        builder.without_time().init();
    }
    match cli.command {
        Command::Run(a) => {
            let json = a.json;
            match run::run(&a.options()) {
                Ok(summary) => {
                    say_err!("{summary}");
                    if json {
                        say!("{}", summary.to_json());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    say_err!("error: {e}");
                    ExitCode::from(e.exit_code() as u8)
                }
            }
        }
        Command::Bench(a) => bench(a),
        Command::Merge(a) => match tt_scale::sweep::merge(&a.folders, a.into.as_deref()) {
            Ok(m) => {
                say!(
                    "merged {} prompt(s), {} round row(s): {}",
                    m.prompts,
                    m.rows,
                    m.run_dir.join("summary.csv").display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                say_err!("error: {e}");
                ExitCode::from(e.exit_code())
            }
        },
        Command::Report(a) => match tt_scale::report::report(&a.path) {
            Ok(r) => {
                say!(
                    "{} ({} prompt(s), {} round row(s); summary.csv and summary.json beside it)",
                    r.html.display(),
                    r.prompts,
                    r.rows
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                say_err!("error: {e}");
                let code = if matches!(e, tt_scale::report::ReportError::Output(_)) {
                    1
                } else {
                    2
                };
                ExitCode::from(code)
            }
        },
        Command::Status(a) => match tt_scale::sweep::status(&a.path) {
            Ok(status) => {
                if a.json {
                    match serde_json::to_string_pretty(&status) {
                        Ok(text) => say!("{text}"),
                        Err(e) => {
                            say_err!("error: {e}");
                            return ExitCode::from(1);
                        }
                    }
                } else {
                    say!("{status}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                say_err!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Rescore(a) => {
            use tt_scale::rescore::rescore;
            match rescore(&a.path, &a.verifier, a.metric.as_deref(), a.device) {
                Ok(summary) => {
                    say!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    say_err!("error: {e}");
                    let code = e.exit_code();
                    ExitCode::from(code as u8)
                }
            }
        }
        Command::Collage(a) => match tt_scale::collage::make_collages(&a.path) {
            Ok(paths) => {
                for p in paths {
                    say!("{}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                say_err!("error: {e}");
                ExitCode::from(1)
            }
        },
    }
}

/// `tt-scale bench`: runs each requested benchmark and prints one table.
fn bench(a: BenchArgs) -> ExitCode {
    let spec = match a.device {
        DeviceArg::Auto => None,
        DeviceArg::Named(d) => Some(d),
        DeviceArg::Several(_) => {
            say_err!("error: tt-scale bench runs on one device; give one --device");
            return ExitCode::from(2);
        }
    };
    let device = match run::plan::open_device(spec) {
        Ok(d) => d,
        Err(e) => {
            say_err!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = tt_scale::bench::BenchOptions {
        height: a.height,
        width: a.width,
        batch: a.batch,
        dtype: tt_scale::loading::candle_dtype(a.dtype.unwrap_or(if device.is_cuda() {
            tt_scale::loading::Dtype::Bf16
        } else {
            tt_scale::loading::Dtype::F32
        })),
        device,
        warmup: a.warmup,
        iters: a.iters,
        layers: a.layers,
        search_steps: a.steps,
        verifier_latency_ms: a.verifier_latency_ms,
    };
    let mut reports = Vec::new();
    for model in &a.models {
        match tt_scale::bench::run_model(model, &opts) {
            Ok(r) => reports.extend(r),
            Err(e) => {
                say_err!("error: bench {model}: {e}");
                // A name or size the benchmark cannot take is a usage error.
                let usage = matches!(e, tt_scale::pipelines::PipelineError::InvalidArgument(_));
                return ExitCode::from(if usage { 2 } else { 1 });
            }
        }
    }
    if let Some(path) = &a.json {
        if let Err(e) = tt_scale::output::write_json(path, &reports) {
            say_err!("error: {e}");
            return ExitCode::from(1);
        }
    }
    say!(
        "{:<48} {:>11} {:>11} {:>11} {:>6} {:>14}",
        "benchmark",
        "median ms",
        "min ms",
        "max ms",
        "iters",
        "parameters"
    );
    for r in &reports {
        say!(
            "{:<48} {:>11.2} {:>11.2} {:>11.2} {:>6} {:>14}",
            r.name,
            r.median_ms,
            r.min_ms,
            r.max_ms,
            r.iters,
            r.parameters
        );
        let rate = match (r.tflop_s, r.gb_s) {
            (Some(t), _) => format!("{} TFLOP/s; ", three_digits(t)),
            (None, Some(g)) => format!("{} GB/s; ", three_digits(g)),
            (None, None) => String::new(),
        };
        if !r.details.is_empty() || !rate.is_empty() {
            say!("    {rate}{}", r.details);
        }
    }
    ExitCode::SUCCESS
}

/// `x` with about three significant digits (`412`, `41.2`, `4.12`, `0.412`, `0.0412`).
fn three_digits(x: f64) -> String {
    let decimals = if x >= 100.0 {
        0
    } else if x > 0.0 {
        (2.0 - x.log10().floor()).clamp(1.0, 6.0) as usize
    } else {
        1
    };
    format!("{x:.decimals$}")
}
