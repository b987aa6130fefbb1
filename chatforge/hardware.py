"""What the hardware can do and cost: peak FLOP/s per GPU (for MFU and time estimates), rough
cloud prices (for cost estimates), and how busy the CPU already is. Tables and lookups, no torch state.

MFU (model FLOPs utilisation, PaLM, https://arxiv.org/abs/2204.02311 appendix B) =
training FLOPs per token x tokens/s / peak FLOP/s of the devices used.
"""

from __future__ import annotations

import time

# Dense bf16 tensor-core peak FLOP/s per GPU, from the vendors' datasheets (no sparsity). Matched
# against torch.cuda.get_device_name(), longest name first. Used for MFU and the time estimates.
GPU_PEAK_FLOPS: dict[str, float] = {
    "B200": 2250e12,
    "H200": 989e12,
    "GH200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "RTX 6000 Ada": 364e12,
    "RTX A6000": 155e12,
    "A10G": 70e12,  # AWS does not publish it; ~70 TFLOP/s is the commonly measured figure
    "A10": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,  # fp16/bf16 with fp32 accumulate
    "V100": 125e12,  # fp16 (no bf16 on Volta)
    "MI300X": 1307e12,
    "MI250X": 383e12,
}
# Rough on-demand cloud prices in US$ per GPU-hour (2025 list prices of Lambda / RunPod class
# providers); only for the printed cost estimate.
GPU_PRICE_PER_HOUR: dict[str, float] = {
    "B200": 5.0, "H200": 3.5, "H100": 3.0, "A100": 1.8, "L40S": 1.0, "L4": 0.8, "A10": 0.75,
    "RTX 4090": 0.5, "V100": 0.5, "MI300X": 2.5,
}
# MFU assumed for the estimates: nanochat reports ~40-50% on H100 with torch.compile; 40% is a
# conservative round number. The real MFU is logged every step.
ASSUMED_MFU = 0.40
# Reference setups printed with every plan, so a CPU machine can size a GPU run.
REFERENCE_SETUPS = [("H100", 1), ("H100", 8), ("A100", 8)]


def _lookup(table: dict[str, float], name: str) -> float | None:
    for key in sorted(table, key=len, reverse=True):
        if key.lower() in name.lower():
            return table[key]
    return None


def gpu_peak_flops(name: str) -> float | None:
    """Peak bf16 FLOP/s for a GPU name, or None when it is not in the table.

    >>> gpu_peak_flops("NVIDIA H100 80GB HBM3"), gpu_peak_flops("NVIDIA A10G"), gpu_peak_flops("Some GPU")
    (989000000000000.0, 70000000000000.0, None)
    """
    return _lookup(GPU_PEAK_FLOPS, name)


def gpu_price(name: str) -> float | None:
    """US$ per hour for a GPU name, or None when it is not in the table.

    >>> gpu_price("NVIDIA H100 80GB HBM3"), gpu_price("Some GPU")
    (3.0, None)
    """
    return _lookup(GPU_PRICE_PER_HOUR, name)


def device_name(device) -> str | None:
    """The GPU's marketing name on CUDA (what the tables match), None elsewhere."""
    import torch

    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None


def device_peak_flops(device) -> float | None:
    """Peak FLOP/s of one device, None when unknown (CPUs, GPUs missing from the table)."""
    name = device_name(device)
    return gpu_peak_flops(name) if name else None


def fmt_hours(h: float) -> str:
    """A duration in hours, printed at a readable scale.

    >>> fmt_hours(0.0001), fmt_hours(0.005), fmt_hours(0.5), fmt_hours(3)
    ('<1 s', '18 s', '30.0 min', '3.00 h')
    """
    if h < 1 / 3600:
        return "<1 s"
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.1f} min"
    return f"{h:.2f} h"


def cpu_busy_share(seconds: float = 0.5) -> float | None:
    """Share of all cores' time spent busy over `seconds` while this process sleeps (Linux /proc/stat:
    user, nice, system, idle, iowait, irq, softirq, steal, then guest times already counted in user);
    None where there is no /proc/stat. Not the load average: that lags by minutes, so a job that just
    ended still reads as busy."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # the 8 fields that do not overlap
        return sum(v), v[3] + v[4]
    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)
