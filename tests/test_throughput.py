"""GPU peak lookup: a device name resolves to its own entry of ``GPU_PEAK_BF16``, never to a shorter
fragment it happens to contain ("GH200" contains "H200", "L40S" contains "L4")."""

from __future__ import annotations

import pytest
import torch

from workflows.train import throughput


@pytest.mark.parametrize("device_name, fragment", [
    ("NVIDIA GH200 480GB", "GH200"), ("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA B200", "B200"), ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A10G", "A10G"), ("NVIDIA A10", "A10"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA L40", "L40"), ("NVIDIA L4", "L4"), ("Tesla V100-SXM2-16GB", "V100"),
    ("Tesla T4", "T4"),
])
def test_gpu_name_resolves_to_its_most_specific_entry(monkeypatch, device_name, fragment):
    # Distinct values in the table's own order, so a shorter fragment matching first shows up
    # (several real peaks are equal: GH200, H200 and H100 all read 989 TFLOP/s).
    distinct = {name: float(i + 1) for i, name in enumerate(throughput.GPU_PEAK_BF16)}
    monkeypatch.setattr(throughput, "GPU_PEAK_BF16", distinct)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert throughput.peak_flops(torch.device("cuda")) == distinct[fragment]


def test_unknown_gpu_asks_for_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery Accelerator 9000")
    with pytest.raises(ValueError, match="train.peak_flops"):
        throughput.peak_flops(torch.device("cuda"))
