"""Run several trainer runs one after another against one local Ray instance.

    python -m benchmarks.ray_session SPEC.json

SPEC.json is a list of ``{"name", "config", "overrides", "env"}``. Ray is started once (as
``training.driver.launch.connect_ray`` would), so each run pays only the trainer's own start-up, not
Ray's. ``env`` holds ``RAY_TRAIN_*`` variables for that run: Ray Train propagates them from the
driver to the controller and workers when the trainer starts, so they can differ per run.
The harness follows progress through the lines printed here (``BENCH-RUN ...``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def main(spec_path: str) -> int:
    import ray

    from training.driver import launch
    from training.driver.settings import load_config

    specs = json.loads(open(spec_path).read())  # noqa: SIM115
    # None: the dashboard starts where its packages are installed (always, with this project's
    # dependencies; a machine with Ray's minimal install can still run the benchmark).
    ray.init(num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=None)
    failed = 0
    for spec in specs:
        saved = {key: os.environ.get(key) for key in spec.get("env", {})}
        os.environ.update(spec.get("env", {}))
        print(f"BENCH-RUN begin {spec['name']} {time.time():.6f}", flush=True)
        status = "ok"
        try:
            cfg = load_config(spec["config"], spec["overrides"])
            launch.train(cfg)
        except Exception:
            traceback.print_exc()
            status = "failed"
            failed += 1
        print(f"BENCH-RUN end {spec['name']} {time.time():.6f} {status}", flush=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    ray.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
