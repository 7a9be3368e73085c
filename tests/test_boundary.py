"""The kernel boundary (csrc/include/grpo_boundary.h) as the extension modules bind it, against its Python mirror
(grpo_kernels.backends.base.LossParams); the CUDA emulation module runs the same check in test_cuda_emu.py."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

from kernel_checks import check_boundary_binding


@pytest.mark.parametrize("name", ["grpo_kernels._cpu", "grpo_kernels._cuda"])
def test_binding_matches_the_python_mirror(name):
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not built")
    check_boundary_binding(importlib.import_module(name))


def test_pack_is_the_one_packing():
    """The custom ops take the loss parameters as list[float]: pack / unpack round-trip every config."""
    from grpo_kernels import GRPOConfig
    from grpo_kernels.backends.base import LossParams

    for cfg in (GRPOConfig(), GRPOConfig(loss_type="cispo", epsilon_high=5.0),
                GRPOConfig(loss_type="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=1.6),
                GRPOConfig(delta=1.3, beta=0.04, use_bias_correction_kl=False)):
        p = LossParams.from_config(cfg)
        assert LossParams.unpack(p.pack()) == p
        back = p.to_config(loss_type=cfg.loss_type, temperature=cfg.temperature)
        assert back == cfg.replace(epsilon_high=cfg.resolved_epsilon_high)
    with pytest.raises(ValueError, match="LossParams.unpack"):
        LossParams.unpack([0.0] * 3)
