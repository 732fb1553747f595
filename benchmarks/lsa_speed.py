"""Speed of the toy LSA experiment: training steps per second and wall time to imitation KL 0.01.

    .venv/bin/python benchmarks/lsa_speed.py [--config recipes/lsa/linear_bandit.yaml] [--field value ...]

Runs the recipe (without the ablation, held-out KL checked every 5 steps) in a temporary directory.
Training time counts sampling tasks, the teacher's rollouts and the optimizer steps, not the held-out
checks; the end-to-end time adds the evaluation, the plots and the start of accelerate.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from icpo_infer.config import parse_config
from icpo_train.lsa.experiment import LSAConfig, run_lsa

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "lsa" / "linear_bandit.yaml"
TARGET_KL = 0.01


def main(argv: list[str]) -> int:
    if "--config" not in argv:
        argv = ["--config", str(DEFAULT_RECIPE), *argv]
    with tempfile.TemporaryDirectory() as output_dir:
        config = parse_config(
            LSAConfig, ["--eval_every", "5", *argv, "--ablation", "false", "--output_dir", output_dir]
        )
        start = time.perf_counter()
        metrics = run_lsa(config)
        end_to_end = time.perf_counter() - start

    curve = metrics["training_curve"]
    reached = next((i for i, kl in enumerate(curve["imitation_kl"]) if kl < TARGET_KL), None)
    print(f"teacher={config.teacher} loss={config.loss} K={config.num_arms} d={config.dim} T={config.horizon} "
          f"batch={config.batch_size} steps={config.train_steps} threads={config.num_threads}")  # fmt: skip
    print(f"training steps per second: {config.train_steps / curve['train_seconds'][-1]:.1f}")
    if reached is None:
        print(f"imitation KL {TARGET_KL}: not reached (final {curve['imitation_kl'][-1]:.2e})")
    else:
        print(
            f"imitation KL {TARGET_KL}: reached at step {curve['step'][reached]} after "
            f"{curve['train_seconds'][reached]:.2f} s of training"
        )
    print(f"final imitation KL: {metrics['imitation_kl']:.2e} nats; end-to-end run: {end_to_end:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
