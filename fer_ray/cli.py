"""What every job script shares: logging, Ray start-up, and one-sentence errors."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from fer_ray.config import ConfigError

log = logging.getLogger("fer_ray")


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_job(job: Callable[[], None]) -> int:
    """Run a job; user errors end in one clear sentence and exit status 2."""
    setup_logging()
    try:
        job()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume where possible", file=sys.stderr)
        return 130
    return 0


def init_ray(min_cpus: int = 4) -> None:
    """Connect to the cluster in RAY_ADDRESS (as `ray job submit` sets it) or start one locally.

    A local start gets at least `min_cpus` logical CPUs: a trial, its Train worker and the
    Ray Data tasks feeding it each hold one, and on a 2-core laptop they would otherwise
    wait on each other forever.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus))
