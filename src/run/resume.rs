//! `tt-scale run --resume DIR`: a run folder continued exactly, or refused with the reason.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Map, Value};

use super::folder::{device_kind, sha256_hex};
use super::{search_prompts, RunError, RunOptions, RunPlan, RunSummary};
use crate::config::Config;
use crate::output;
use crate::output::journal::{
    record_file_name, record_files, ResumeRecord, JOURNAL_DIR, RESUME_FORMAT,
};
use crate::sweep::ShardArg;

/// `tt-scale run --resume DIR`: checks that the folder is a run this binary can continue
/// exactly, then searches its prompts again, reusing every saved image and journaled grade.
pub fn resume(opts: &RunOptions, dir: &Path) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let refuse = |problem: String| RunError::Resume {
        dir: dir.to_path_buf(),
        problem,
    };
    if !dir.is_dir() {
        return Err(refuse(
            "it is not a folder; give the run folder that tt-scale printed (output/<model>/<verifier>/<metric>/<time>)".into(),
        ));
    }
    let config_path = dir.join("config.json");
    let config_bytes = crate::files::read_capped(&config_path, crate::config::MAX_CONFIG_BYTES)
        .map_err(|e| {
            refuse(format!(
                "its config.json cannot be read ({e}); is it a tt-scale run folder?"
            ))
        })?;
    let shard = opts.shard.map(ShardArg::resolve).transpose()?;
    let record_path = dir.join(JOURNAL_DIR).join(record_file_name(shard));
    if shard.is_none() && !record_path.is_file() {
        let shards: Vec<String> = record_files(&dir.join(JOURNAL_DIR))
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .collect();
        if !shards.is_empty() {
            return Err(refuse(format!(
                "it is a sharded sweep ({}): resume one shard with --resume {} --shard INDEX/COUNT (or --shard auto in its array task)",
                shards.join(", "),
                dir.display()
            )));
        }
    }
    let record: ResumeRecord = crate::files::read_capped(&record_path, 1 << 30)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| {
            refuse(format!(
                "{} is missing or unreadable: the run was made by an older tt-scale, or stopped before it began; start a new run",
                record_path.display()
            ))
        })?;
    if record.shard != shard {
        return Err(refuse(format!(
            "{} records shard {:?}, not {:?}",
            record_path.display(),
            record.shard.map(|s| s.spec()),
            shard.map(|s| s.spec())
        )));
    }
    let version = env!("CARGO_PKG_VERSION");
    if record.format != RESUME_FORMAT || record.tt_scale_version != version {
        return Err(refuse(format!(
            "it was made by tt-scale {}, and this is {version}, whose images or grades may differ; resume it with tt-scale {} or start a new run",
            record.tt_scale_version, record.tt_scale_version
        )));
    }
    if sha256_hex(&config_bytes) != record.config_sha256 {
        return Err(refuse(
            "its config.json was changed after the run started, so the images already made would not match the rest; undo the change, or start a new run with the new config".into(),
        ));
    }
    let text = String::from_utf8(config_bytes)
        .map_err(|_| refuse("its config.json is not UTF-8".into()))?;
    let recorded: Map<String, Value> = serde_json::from_str(&text)
        .map_err(|e| refuse(format!("its config.json is not a JSON object ({e})")))?;
    let recorded_path = recorded
        .get("pipeline_config_path")
        .and_then(Value::as_str)
        .map(PathBuf::from)
        .unwrap_or_else(|| config_path.clone());
    // The config is the folder's copy; relative paths in it resolve as when the run started.
    let mut config = Config::parse(&text, &record.cwd.join(recorded_path))?;
    if !Path::new(&config.model).is_dir() && record.cwd.join(&config.model).is_dir() {
        config.model = record.cwd.join(&config.model).display().to_string();
    }
    let master_seed = recorded.get("seed").and_then(Value::as_u64);
    let batch_size = recorded
        .get("batch_size_for_img_gen")
        .and_then(Value::as_u64)
        .and_then(|b| usize::try_from(b).ok())
        .filter(|&b| b >= 1);
    let (Some(master_seed), Some(batch_size)) = (master_seed, batch_size) else {
        return Err(refuse(
            "its config.json has no `seed` or `batch_size_for_img_gen`; it was not written by `tt-scale run`".into(),
        ));
    };
    let recorded_device = recorded
        .get("device")
        .and_then(Value::as_str)
        .and_then(crate::device::parse_device);
    let plan = RunPlan {
        opts: RunOptions {
            config_path: config.path.clone(),
            seed: Some(master_seed),
            batch_size,
            device: opts.device.or(recorded_device),
            resume: Some(dir.to_path_buf()),
            ..opts.clone()
        },
        config,
        shard,
        master_seed,
    };
    let device = plan.open_device()?;
    if device_kind(device.is_cuda()) != record.device {
        return Err(refuse(format!(
            "its images were made on {}, and this run would make them on {}, where they differ; resume it with --device {}",
            record.device,
            device_kind(device.is_cuda()),
            record.device
        )));
    }
    let verifier = plan.build_verifier()?;
    let mut pipeline = plan.load_pipeline(&device)?;
    for folder in [dir.to_path_buf(), dir.join(JOURNAL_DIR)] {
        output::remove_stale_temp_files(&folder)?;
    }
    let prompts = shard.map_or_else(|| record.prompts.clone(), |s| s.select(&record.prompts));
    let _ = writeln!(
        std::io::stderr(),
        "tt-scale: resuming {} (master seed {master_seed}, {} prompt(s))",
        dir.display(),
        prompts.len()
    );
    search_prompts(
        &plan,
        (dir, &record.run_dir),
        &prompts,
        pipeline.as_mut(),
        verifier.as_ref(),
        started,
    )
}
