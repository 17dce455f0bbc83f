"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

Achieved = 3 x ``clip_core.model_flops_per_sample`` (forward + backward = 3 forwards) x samples/s;
feature-cached accumulation's extra no-grad forward is overhead, not model FLOPs, so it lowers MFU
as it should. GPU peaks are the vendors' dense bf16 tensor-core figures; a CPU's peak is measured
(a large fp32 matmul on this process's threads) unless ``train.peak_flops`` sets it.
"""

from __future__ import annotations

import resource
import sys
import time

import torch

# Dense bf16 peak FLOP/s by device-name fragment (first match wins: more specific names first).
GPU_PEAK_BF16 = {
    "GH200": 989e12, "H200": 989e12, "H100": 989e12, "B200": 2250e12, "A100": 312e12, "A10G": 70e12,
    "A10": 125e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "V100": 125e12, "T4": 65e12,
}


def measure_cpu_peak_flops(size: int = 1024, trials: int = 5, seconds: float = 0.1) -> float:
    """fp32 matmul FLOP/s with torch's current thread count: what this worker can reach. The best of
    several short trials, since other processes sharing the cores only ever make a trial slower."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            calls += 1
        best = max(best, 2 * size ** 3 * calls / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, configured: float = 0.0) -> float:
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, flops in GPU_PEAK_BF16.items():
            if fragment in name:
                return flops
        raise ValueError(f"no peak FLOP/s known for GPU {name!r}; set train.peak_flops")
    return measure_cpu_peak_flops()


def mfu(flops_per_sample: float, samples_per_second: float, peak_per_device: float, devices: int) -> float:
    return 3 * flops_per_sample * samples_per_second / (peak_per_device * devices)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory (GPU: allocator peak; CPU: the process's peak resident set)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
