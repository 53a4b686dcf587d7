//! `--device A,B,...`: one worker process a device (this binary, `tt-scale run` with `--device`
//! one of them and `--shard` its share of the prompts, [`Shard::within`]), all writing into one
//! named run folder with one master seed, so the folder is the one a single device makes. The
//! workers' logs are forwarded line by line, prefixed with their device; their summaries (read
//! from their `--json` output) are added up.

use std::io::{BufRead, Write};
use std::time::Instant;

use serde_json::Value;

use super::{RunError, RunPlan, RunSummary};
use crate::device::DeviceSpec;
use crate::output::journal::Shard;
use crate::prompts::NumPrompts;

/// The command line of one worker (after the program name): the plan's options rendered as
/// the flags `tt-scale run` parses back into them, with the worker's device and shard, the
/// plan's master seed and run name, and `--json` so that it reports its summary.
pub fn worker_args(
    plan: &RunPlan,
    device: DeviceSpec,
    shard: Shard,
    run_name: &str,
) -> Vec<String> {
    let opts = &plan.opts;
    let mut args: Vec<String> = vec![
        "run".into(),
        "--pipeline-config".into(),
        opts.config_path.display().to_string(),
    ];
    if let Some(p) = &opts.prompt {
        args.extend(["--prompt".into(), p.clone()]);
    }
    if let Some(f) = &opts.prompts_file {
        args.extend(["--prompts-file".into(), f.display().to_string()]);
    }
    if let Some(num) = opts.num_prompts {
        let v = match num {
            None => "none".to_string(),
            Some(NumPrompts::All) => "all".to_string(),
            Some(NumPrompts::First(k)) => k.to_string(),
        };
        args.extend(["--num-prompts".into(), v]);
    }
    args.extend([
        "--batch-size".into(),
        opts.batch_size.to_string(),
        "--seed".into(),
        plan.master_seed.to_string(),
        "--output-dir".into(),
        opts.output_dir.display().to_string(),
        "--run-name".into(),
        run_name.to_string(),
        "--device".into(),
        device.to_string(),
        "--shard".into(),
        shard.spec(),
        "--json".into(),
    ]);
    if opts.low_vram {
        args.push("--low-vram".into());
    }
    args
}

/// Runs one worker a device of `plan.opts.workers` and adds their summaries up.
pub fn run_workers(plan: &RunPlan, started: Instant) -> Result<RunSummary, RunError> {
    let opts = &plan.opts;
    let run_name = opts
        .run_name
        .clone()
        .unwrap_or_else(|| chrono::Local::now().format("%Y%m%d_%H%M%S").to_string());
    let exe = std::env::current_exe().map_err(|e| {
        RunError::Device(format!(
            "cannot find this program to start its workers: {e}"
        ))
    })?;
    let run_dir = crate::output::named_run_path(
        &opts.output_dir,
        &plan.config.model,
        plan.config.verifier_args.name(),
        &plan.config.verifier_args.choice_of_metric,
        &run_name,
    );
    let n = opts.workers.len();
    let seed = plan.master_seed;
    let _ = writeln!(
        std::io::stderr(),
        "tt-scale: {n} workers ({}), master seed {seed}, writing to {}",
        opts.workers
            .iter()
            .map(DeviceSpec::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        run_dir.display()
    );
    let mut children = Vec::with_capacity(n);
    for (w, device) in opts.workers.iter().enumerate() {
        let shard = Shard::within(plan.shard, w, n);
        let args = worker_args(plan, *device, shard, &run_name);
        let mut child = std::process::Command::new(&exe)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| RunError::Device(format!("cannot start the worker for {device}: {e}")))?;
        let prefix = format!("[{device}] ");
        let forward = child.stderr.take().map(|err| {
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                    let _ = writeln!(std::io::stderr(), "{prefix}{line}");
                }
            })
        });
        children.push((*device, child, forward));
    }
    let mut failed = Vec::new();
    let mut summaries = Vec::new();
    for (device, child, forward) in children {
        let out = child.wait_with_output();
        if let Some(t) = forward {
            let _ = t.join();
        }
        match out {
            Ok(o) if o.status.success() => {
                let text = String::from_utf8_lossy(&o.stdout);
                if let Some(v) = text
                    .lines()
                    .rev()
                    .find_map(|l| serde_json::from_str::<Value>(l).ok())
                {
                    summaries.push(v);
                }
            }
            Ok(o) => failed.push((device, o.status.code())),
            Err(_) => failed.push((device, None)),
        }
    }
    if !failed.is_empty() {
        return Err(RunError::Workers {
            workers: n,
            failed,
            run_dir,
        });
    }
    Ok(RunSummary::sum_of_workers(
        run_dir,
        seed,
        &summaries,
        started.elapsed().as_secs_f64(),
    ))
}
