"""pipeline.models.randomisation: the cascade's stages, and equality with Quantus's MPRT."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import TinyCNN
from torch import nn

from pipeline.errors import SettingsError
from pipeline.metrics.similarity import spearman
from pipeline.models.randomisation import (
    check_modules,
    network_of,
    randomisation_stages,
    randomise,
    stages_upto,
)


class BlockNet(nn.Module):
    """A stem, a top-level Sequential of two conv-BN-ReLU blocks, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.blocks = nn.Sequential(
                nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()),
                nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(8, 5)
            for module in self.modules():  # trained-looking BN statistics, not the reset ones
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 1.5)
                    nn.init.uniform_(module.weight, 0.5, 1.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


def input_gradient(model, inputs, targets, **kwargs) -> np.ndarray:
    """|∂ logit_target / ∂ x| summed over colour: N×H×W (an explain_func for Quantus too)."""
    x = torch.as_tensor(np.asarray(inputs)).float().requires_grad_(True)
    logits = model(x)
    picked = logits.gather(1, torch.as_tensor(np.asarray(targets)).long().view(-1, 1))
    picked.sum().backward()
    return x.grad.abs().sum(1).numpy()


def test_block_stages_expand_a_top_level_sequential_and_run_top_down() -> None:
    stages = randomisation_stages(BlockNet(), "blocks")
    assert [s.name for s in stages] == ["head", "blocks.1", "blocks.0", "stem"]
    assert stages[1].modules == ("blocks.1.1", "blocks.1.0")  # the block's own, top first
    layers = randomisation_stages(BlockNet(), "layers")
    assert [s.name for s in layers] == [
        "head",
        "blocks.1.1",
        "blocks.1.0",
        "blocks.0.1",
        "blocks.0.0",
        "stem",
    ]
    assert stages_upto(stages, 2) == ("head", "blocks.1.1", "blocks.1.0")
    tiny = randomisation_stages(network_of(TinyCNN()), "blocks")
    assert [s.name for s in tiny] == ["head", "features.4", "features.2", "features.0"]


def test_randomise_resets_only_the_named_modules_and_keeps_the_global_rng() -> None:
    net = BlockNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    randomise(net, ("head", "blocks.1.1"), seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("head.", "blocks.1.1.")) for k in changed)
    # BatchNorm's reset: running statistics back to mean 0, variance 1, scale 1, shift 0
    assert torch.equal(after["blocks.1.1.running_var"], torch.ones(8))
    assert torch.equal(after["blocks.1.1.weight"], torch.ones(8))
    # the same seed gives the same weights again
    again = randomise(BlockNet(), ("head", "blocks.1.1"), seed=7)
    assert torch.equal(again.head.weight, net.head.weight)


def test_unknown_or_parameterless_layer_is_a_clear_error() -> None:
    with pytest.raises(SettingsError, match="'blocks.9' is not a module"):
        check_modules(BlockNet(), ["blocks.9"])
    with pytest.raises(SettingsError, match="'pool' has no parameters"):
        randomise(BlockNet(), ["pool"], seed=0)
    with pytest.raises(SettingsError, match="granularity"):
        randomisation_stages(BlockNet(), "neurons")


def test_layer_stages_equal_quantus_mprt_and_block_stages_are_its_subsequence() -> None:
    """Quantus 0.6's MPRT (top-down, seed 42, Spearman) against mpbatch's cascade on the same
    network, images and explanation function: equal at every layer. The paper's block stages
    equal Quantus's value after each block's last module (the difference is which stages
    are reported, not what they compute)."""
    quantus = pytest.importorskip("quantus")
    net = BlockNet()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)).numpy()
    y = np.array([0, 1, 2, 3])
    metric = quantus.MPRT(
        layer_order="top_down", seed=42, disable_warnings=True, display_progressbar=False
    )
    theirs = metric(
        model=net,
        x_batch=x,
        y_batch=y,
        a_batch=None,
        explain_func=input_gradient,
        device="cpu",
        batch_size=4,
    )
    original = input_gradient(net, x, y)
    layers = randomisation_stages(net, "layers")
    assert [s.name for s in layers] == [k for k in theirs if k != "original"]
    ours = {}
    for number, stage in enumerate(layers, start=1):
        randomised = randomise(copy.deepcopy(net), stages_upto(layers, number), seed=42)
        ours[stage.name] = spearman(original, input_gradient(randomised, x, y))
        np.testing.assert_allclose(ours[stage.name], theirs[stage.name], atol=1e-6)
    assert not np.allclose(ours["head"], 1.0)  # the check can fail: randomising moved the maps
    blocks = randomisation_stages(net, "blocks")
    for number, stage in enumerate(blocks, start=1):
        randomised = randomise(copy.deepcopy(net), stages_upto(blocks, number), seed=42)
        value = spearman(original, input_gradient(randomised, x, y))
        np.testing.assert_allclose(value, theirs[stage.modules[-1]], atol=1e-6)
