"""Helpers shared by the benchmark scripts: the machine's measured peak, timers, peak memory, tables.

Nothing here is a benchmark itself; see bench_vq.py, bench_extraction.py, bench_train.py and
run_all.py. Every figure a benchmark reports is measured in the same process as the baseline it
is compared with (the dense-matmul peak is re-measured per run), so a busy machine lowers both.
"""
import datetime
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def use_repo_modules():
    """Make the project's top-level scripts importable when a benchmark runs as `python benchmarks/x.py`."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def set_threads():
    """All cores for the intra-op pool: the benchmarks measure what the machine can do."""
    torch.set_num_threads(os.cpu_count() or 1)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu", repeat=3, warmup=1):
    """-> list of wall seconds of `repeat` calls of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def measure_peak_flops(device="cpu", dtype=torch.float32, n=None, seconds=1.5):
    """FLOP/s of a large dense square matmul: the practical compute-bound ceiling of this device
    (dtype torch.int8: torch._int_mm's operations per second).

    The best of several timed products is kept (the least disturbed by other processes), so it
    is an upper estimate of what the same run can reach; MFU figures divide by it.
    """
    n = n or (2048 if torch.device(device).type == "cpu" else 8192)
    if dtype == torch.int8:  # int8 products with int32 sums, as CTranslate2's int8 runs them
        a = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device)
        product = torch._int_mm
    else:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        product = torch.matmul
    for _ in range(2):
        product(a, b)
    synchronize(device)
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        start = time.perf_counter()
        product(a, b)
        synchronize(device)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * n ** 3 / best


def _proc_status(field):
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB -> MB
    except OSError:
        pass
    return None


def rss_mb():
    """Resident set size now, MB (Linux); None elsewhere."""
    return _proc_status("VmRSS")


def reset_peak_rss():
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM). -> False if impossible."""
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory():
    """Hand freed heap memory back to the OS (glibc malloc_trim), so that the next peak-RSS window
    starts from what is really in use rather than from what an earlier, larger job left cached."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_mb():
    """Peak resident set size since the process started or the last reset_peak_rss(), MB."""
    peak = _proc_status("VmHWM")
    if peak is None:  # not Linux: the lifetime peak (kB on Linux, bytes on macOS)
        scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024 ** 2
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return peak


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device="cpu"):
    """What the figures were measured on: CPU, cores, threads, versions, date, load."""
    import numpy
    import transformers
    use_repo_modules()
    from mmser.utils import cpu_has_native_bf16
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "load_average_1_5_15min": load_average(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(title, rows, columns=None):
    """Print a list of dicts as an aligned text table (floats to 3 significant digits)."""
    if not rows:
        return
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.3e}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def device_arg(parser):
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    return parser
