#!/usr/bin/env bash
# Checks the launchers in deploy/ (run by .ci/run; needs bash, python3 with venv, and PyPI):
#  - the sbatch script parses (bash -n), and its dry run reads the Slurm array variables (a
#    task of `--array=4-6` is shard 1 of 3) and refuses to start without SEED;
#  - the Kubernetes manifest validates against the Kubernetes OpenAPI schema (strict: unknown
#    fields fail) with a pinned kubernetes-validate, and its shard count equals `completions`.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "-- deploy/slurm/sweep.sbatch"
bash -n deploy/slurm/sweep.sbatch
out=$(env -i PATH="$PATH" SLURM_ARRAY_TASK_ID=5 SLURM_ARRAY_TASK_MIN=4 SLURM_ARRAY_TASK_COUNT=3 \
  SEED=7 RUN_NAME=ci PROMPTS=prompts.txt DRY_RUN=1 bash deploy/slurm/sweep.sbatch)
echo "$out"
grep -q "shard 1/3" <<<"$out" || { echo "the dry run did not read the Slurm variables" >&2; exit 1; }
grep -q -- "--shard auto" <<<"$out" || { echo "the command does not pass --shard auto" >&2; exit 1; }
grep -q -- "--run-name ci" <<<"$out" || { echo "the command does not pass --run-name" >&2; exit 1; }
if env -i PATH="$PATH" SLURM_ARRAY_TASK_ID=0 SLURM_ARRAY_TASK_COUNT=2 RUN_NAME=ci PROMPTS=p \
  DRY_RUN=1 bash deploy/slurm/sweep.sbatch >/dev/null 2>&1; then
  echo "the sbatch script started without SEED" >&2
  exit 1
fi

echo "-- deploy/k8s/indexed-job.yaml"
venv=${DEPLOY_CHECK_VENV:-${TMPDIR:-/tmp}/tt-scale-deploy-check}
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==1.37.0"
fi
"$venv/bin/kubernetes-validate" --strict -k 1.31.0 deploy/k8s/indexed-job.yaml
"$venv/bin/python" - deploy/k8s/indexed-job.yaml <<'PY'
import sys, yaml
job = yaml.safe_load(open(sys.argv[1]))
spec = job["spec"]
assert spec["completionMode"] == "Indexed", "not an Indexed Job"
env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0]["env"]}
count = int(env["TT_SCALE_SHARD_COUNT"]["value"])
assert count == spec["completions"], f"TT_SCALE_SHARD_COUNT {count} != completions {spec['completions']}"
args = spec["template"]["spec"]["containers"][0]["args"]
assert "--shard" in args and args[args.index("--shard") + 1] == "auto", "no --shard auto"
assert "--seed" in args and "--run-name" in args, "shards need --seed and --run-name"
assert env["GEMINI_API_KEY"]["valueFrom"]["secretKeyRef"], "the key must come from a Secret"
print(f"{sys.argv[1]}: {count} shards, --shard auto, key from a Secret")
PY
echo "deploy/ checks passed"
