//! The run folder of a new run: made (a time-stamped folder, or the named folder the shards of
//! a sweep share), checked against what is already there, and given its `config.json` and the
//! process's resume record before anything is generated.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{resume_command, RunError, RunPlan};
use crate::output::journal::{record_file_name, ResumeRecord, Shard, JOURNAL_DIR, RESUME_FORMAT};
use crate::output::{self, OutputError};

/// `cpu` or `cuda`: the kind of device media are made on, as the resume record names it.
pub fn device_kind(on_cuda: bool) -> &'static str {
    if on_cuda {
        "cuda"
    } else {
        "cpu"
    }
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The named folder this very command already started in (same `config.json`, this shard's
/// resume record present), when the command is run again (a requeued Slurm task, a restarted
/// pod): it continues there. Needs `--run-name` and `--seed`.
pub fn started_before(plan: &RunPlan) -> Option<PathBuf> {
    plan.opts.seed?;
    let dir = plan.named_dir()?;
    let started_here = dir
        .join(JOURNAL_DIR)
        .join(record_file_name(plan.shard))
        .is_file();
    let same = crate::files::read_capped(&dir.join("config.json"), crate::config::MAX_CONFIG_BYTES)
        .is_ok_and(|bytes| bytes == plan.config_json().as_bytes());
    (started_here && same).then(|| {
        let _ = writeln!(
            std::io::stderr(),
            "tt-scale: {} already started in {}: continuing it",
            plan.shard
                .map_or_else(|| "this run".to_string(), |s| format!("shard {}", s.spec())),
            dir.display()
        );
        dir
    })
}

/// Makes the run folder of `plan`, writes its `config.json` (a named folder's is made by the
/// first process and checked by the others) and this process's resume record (`prompts`: the
/// run's whole list; `on_cuda`: the kind of device the media are made on, which a resumed run
/// must match). Returns the folder.
pub fn make(plan: &RunPlan, prompts: &[String], on_cuda: bool) -> Result<PathBuf, RunError> {
    let (opts, config, shard) = (&plan.opts, &plan.config, plan.shard);
    let config_json = plan.config_json();
    let run_dir = match &opts.run_name {
        Some(name) => {
            let dir = output::named_run_dir(
                &opts.output_dir,
                &config.model,
                config.verifier_args.name(),
                &config.verifier_args.choice_of_metric,
                name,
            )?;
            check_shared_folder(&dir, &config_json, shard)?;
            dir
        }
        None => output::create_run_dir(
            &opts.output_dir,
            &config.model,
            config.verifier_args.name(),
            &config.verifier_args.choice_of_metric,
            chrono::Local::now(),
        )?,
    };
    let config_path = run_dir.join("config.json");
    if opts.run_name.is_some() {
        // Shards of one sweep start together: one of them makes config.json, the others find
        // it and must agree with it.
        let made =
            crate::files::write_new(&config_path, config_json.as_bytes()).map_err(|source| {
                OutputError {
                    path: config_path.clone(),
                    source,
                }
            })?;
        if !made {
            check_shared_folder(&run_dir, &config_json, shard)?;
        }
    } else {
        output::write_atomic(&config_path, config_json.as_bytes())?;
    }
    let journal_dir = run_dir.join(JOURNAL_DIR);
    std::fs::create_dir_all(&journal_dir).map_err(|source| OutputError {
        path: journal_dir.clone(),
        source,
    })?;
    let record = ResumeRecord {
        format: RESUME_FORMAT,
        tt_scale_version: env!("CARGO_PKG_VERSION").to_string(),
        cwd: std::env::current_dir().unwrap_or_default(),
        run_dir: run_dir.clone(),
        config_sha256: sha256_hex(config_json.as_bytes()),
        device: device_kind(on_cuda).to_string(),
        prompts: prompts.to_vec(),
        shard,
    };
    output::write_json(&journal_dir.join(record_file_name(shard)), &record)?;
    Ok(run_dir)
}

/// Before a process writes into a named run folder that may already hold a run (the other
/// shards of its sweep): its `config.json`, if any, must be the one this process would write
/// (same config, seed, prompts, batch size), and this shard must not have started there before.
fn check_shared_folder(
    dir: &Path,
    config_json: &str,
    shard: Option<Shard>,
) -> Result<(), RunError> {
    let refuse = |problem: String| RunError::Resume {
        dir: dir.to_path_buf(),
        problem,
    };
    let existing = dir.join("config.json");
    if existing.is_file() {
        let bytes = crate::files::read_capped(&existing, crate::config::MAX_CONFIG_BYTES)
            .map_err(|e| refuse(format!("its config.json cannot be read ({e})")))?;
        if bytes != config_json.as_bytes() {
            return Err(refuse(
                "it holds a run with another config.json (config, seed, prompts, batch size, device or version differ): the shards of one sweep must be started with the same flags apart from --shard; choose another --run-name".into(),
            ));
        }
    }
    if dir
        .join(JOURNAL_DIR)
        .join(record_file_name(shard))
        .is_file()
    {
        return Err(refuse(format!(
            "this {} already started there; continue it with: {}",
            shard.map_or_else(|| "run".to_string(), |s| format!("shard ({})", s.spec())),
            resume_command(dir, shard)
        )));
    }
    Ok(())
}
