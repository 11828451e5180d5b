"""RL from feedback: rollout tokens/s and training samples/s per iteration, colocated vs
spread roles, on the same setup in one run, side by side.

Both runs are `launch configs/examples/ppo.yaml` (actor, critic, reference; the rule-based
reward) on a fresh local Ray head, the same seed, iterations and total CPUs: colocate with
`resources.cpus_per_worker` C (2 bundles, each shared by the 3 roles), spread with C / 3 per
bundle (6 bundles). What differs is only where the workers sit. The first `--warmup`
iterations are left out. Per iteration the run logs rollout tokens/s (`tokens_per_s`:
response tokens over the generation time), training samples/s (`samples_per_s`) and the time
split between generation, scoring and training.

A benchmark, not a test: nothing here asserts on time. Usage:

    python bench/rl_throughput.py                       # 12 iterations, 2 warmup, C = 1
    python bench/rl_throughput.py --iterations 4 --warmup 1   # smoke run
    python bench/rl_throughput.py --model PATH --cpus 3 --gpus 1   # a larger model on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "launcher.cli"]
KEYS = ("tokens_per_s", "samples_per_s", "time_generate", "time_score", "time_train")


def one_run(home: str, placement: str, cpus: float, args) -> dict:
    roles = 3  # actor, critic, reference
    per_bundle = cpus if placement == "colocate" else round(cpus / roles, 4)
    cmd = [*LAUNCH, "configs/examples/ppo.yaml", "--json", f"name=bench-rl-{placement}",
           f"train.max_steps={args.iterations}", "train.eval_at_start=false", "checkpoint.every_n_steps=0",
           f"ppo.placement={placement}", f"resources.cpus_per_worker={per_bundle}", "checkpoint.resume=never"]
    if args.model:
        cmd.append(f"model.path={args.model}")
    if args.gpus:
        cmd.append(f"resources.gpus_per_worker={args.gpus}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "LLMLAUNCH_HOME": home}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{placement} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    events = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    steps = [e for e in events if e.get("event") == "progress" and "reward_mean" in e][args.warmup:]
    out = {k: statistics.fmean(e[k] for e in steps) for k in KEYS}
    out.update(iterations=len(steps), wall_s=wall, bundle_cpus=per_bundle)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpus", type=float, default=1.0, help="CPUs per colocated bundle (spread: a third each)")
    ap.add_argument("--gpus", type=int, default=0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    home = tempfile.mkdtemp(prefix="bench-rl-", dir="/tmp")
    env = {**os.environ, "LLMLAUNCH_HOME": home}
    subprocess.run([*LAUNCH, "up", "local"], cwd=REPO, env=env, check=True, capture_output=True)
    try:
        results = {p: one_run(home, p, args.cpus, args) for p in ("colocate", "spread")}
    finally:
        subprocess.run([*LAUNCH, "down", "local"], cwd=REPO, env=env, capture_output=True)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"ppo.yaml, {args.iterations} iterations ({args.warmup} warmup left out), 2 workers per role, "
          f"{2 * args.cpus:g} CPUs in all, load average before: {load_before:.2f}")
    print(f"{'':10}{'bundle CPUs':>12}{'rollout tok/s':>15}{'train samples/s':>17}{'gen s':>8}{'score s':>9}"
          f"{'train s':>9}{'wall s':>8}")
    for p, r in results.items():
        print(f"{p:10}{r['bundle_cpus']:>12g}{r['tokens_per_s']:>15,.0f}{r['samples_per_s']:>17.1f}"
              f"{r['time_generate']:>8.2f}{r['time_score']:>9.2f}{r['time_train']:>9.2f}{r['wall_s']:>8.0f}")
    c, s = results["colocate"], results["spread"]
    print(f"spread / colocate: rollout tokens/s {s['tokens_per_s'] / c['tokens_per_s']:.3f}, "
          f"training samples/s {s['samples_per_s'] / c['samples_per_s']:.3f}")


if __name__ == "__main__":
    main()
