"""The run controls in ZOTrainingArguments: the zo_* fields reach the method built by ZOTrainer,
with RunConfig's checks and method rules, named by their field."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")
torch.set_num_threads(1)


def test_zo_controls_reach_the_optimizer_and_bad_ones_are_refused(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from zoengine.hf import ZOTrainer, ZOTrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    args = ZOTrainingArguments(str(tmp_path / "o"), zo_method="kerzoo", zo_kernel_order=5,
                               zo_r_range=0.5, zo_n_samples=2, weight_decay=0.01,
                               use_cpu=True, report_to=[], max_steps=1)
    opt = ZOTrainer(model=model, args=args).create_optimizer()
    h = opt.hyperparameters()
    assert (opt.n_samples, h["kernel_order"], h["r_range"]) == (2, 5, 0.5)
    assert opt.param_groups[0]["weight_decay"] == 0.01
    for bad, name in ((dict(zo_n_samples=0), "zo_n_samples"),
                      (dict(zo_pool_size=64), "zo_pool_size"),  # mezo has no pool
                      (dict(zo_method="dizo", zo_tau=1.0), "zo_tau"),
                      (dict(zo_dizo_interval=5), "zo_dizo_interval")):
        with pytest.raises(ValueError, match=name):
            ZOTrainingArguments(str(tmp_path / "o"), use_cpu=True, **bad)
