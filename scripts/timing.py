"""What the benchmarks (scripts/bench_*.py) share: a median timer, and a measurement in a fresh process."""
from __future__ import annotations

import json
import statistics
import subprocess
import time
from typing import Callable


def median_ms(step: Callable[[], None], reps: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall-clock milliseconds of `step` over `reps` calls, after one untimed warm-up call;
    `sync` (torch.cuda.synchronize on a GPU) runs before and after each timed call."""
    step()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def json_from_child(cmd: list[str], what: str) -> dict:
    """Run a benchmark's measurement in a fresh process (its own threads and allocator) and read
    the JSON object on the last line it prints; a failure raises with `what` and its stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
