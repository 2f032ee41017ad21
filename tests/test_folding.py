"""pipeline.models.folding: batch norm folded into convolutions gives the same logits, only where
the data flow allows, and never from a stale copy."""

from __future__ import annotations

import logging

import torch
import torchvision
from timm.layers import BatchNormAct2d
from torch import nn

from pipeline.models import folding
from pipeline.models.folding import fold_batch_norm, foldable_pairs, scoring_model
from pipeline.models.registry import NormalizedClassifier


class OddNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass whose forward folding cannot know."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


class Mixed(nn.Module):
    """Every case: conv→BN, conv→timm BatchNormAct2d, a conv read twice (by its BN and a
    skip connection), a BN subclass, and a BN whose input is no convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(8, act_layer=nn.ReLU6)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)  # conv3 also skips
        self.conv4, self.bn4 = nn.Conv2d(8, 8, 1), OddNorm(8)
        self.bn5 = nn.BatchNorm2d(8)  # after a ReLU
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        y = self.conv3(x)
        x = self.bn3(y) + y
        x = self.bn5(torch.relu(self.bn4(self.conv4(x))))
        return self.head(x.mean((2, 3)))


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.2)
    return model.eval()


def test_only_a_convolution_read_by_its_norm_alone_is_folded() -> None:
    model = _trained_like(Mixed())
    assert foldable_pairs(model) == [("conv1", "bn1"), ("conv2", "bn2")]
    folded = fold_batch_norm(model)
    assert folded is not model and isinstance(model.bn1, nn.BatchNorm2d)  # a copy
    assert isinstance(folded.bn1, nn.Identity)
    assert isinstance(folded.bn2, nn.Sequential) and isinstance(folded.bn2[1], nn.ReLU6)
    assert isinstance(folded.bn3, nn.BatchNorm2d) and isinstance(folded.bn4, OddNorm)
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_real_resnet_folds_every_norm_and_keeps_its_logits() -> None:
    network = _trained_like(torchvision.models.resnet18(num_classes=10), seed=2)
    model = NormalizedClassifier(network, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert len(foldable_pairs(network)) == 20  # every BatchNorm of ResNet-18
    folded = fold_batch_norm(model.eval())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(folded(x), expected, atol=1e-4 * expected.abs().max(), rtol=0)
    assert fold_batch_norm(NormalizedClassifier(nn.Sequential(nn.Flatten()))).model is not None


def test_the_cached_copy_is_rebuilt_after_the_weights_change() -> None:
    model = _trained_like(Mixed())
    probe = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    first = scoring_model(model, probe)
    assert first is not model and scoring_model(model, probe) is first  # cached
    with torch.no_grad():
        model.bn1.running_mean.add_(0.5)  # written in place: the copy is stale now
    second = scoring_model(model, probe)
    assert second is not first
    with torch.no_grad():
        torch.testing.assert_close(second(probe), model(probe), atol=1e-5, rtol=1e-5)
    model.train()
    assert scoring_model(model, probe) is model  # training mode: batch statistics


def test_a_fold_that_changes_the_logits_is_refused_and_said(monkeypatch, caplog) -> None:
    model = _trained_like(Mixed())

    def broken(conv, norm) -> None:
        with torch.no_grad():
            conv.weight.mul_(3.0)

    monkeypatch.setattr(folding, "_fold_into", broken)
    with caplog.at_level(logging.WARNING, logger="pipeline.models.folding"):
        chosen = scoring_model(model, torch.rand(2, 3, 12, 12))
    assert chosen is model
    assert "left unfolded" in caplog.text


def test_scoring_with_folding_equals_scoring_without(monkeypatch) -> None:
    from pipeline.commands.configuration import EvalOptions
    from pipeline.data.datasets import Sample
    from pipeline.metrics.scoring import evaluate_batch

    network = _trained_like(torchvision.models.resnet18(num_classes=6), seed=5)
    model = NormalizedClassifier(network, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()
    generator = torch.Generator().manual_seed(6)
    images = torch.rand(2, 3, 32, 32, generator=generator)
    saliency = torch.rand(2, 8, 8, generator=generator)
    targets = torch.tensor([1, 4])
    samples = [Sample(path=f"img{i}.png", label=int(t)) for i, t in enumerate(targets)]
    options = EvalOptions(step=64, baselines=("center",))
    args = (model, images, saliency, targets, samples, [(32, 32)] * 2, options)
    folded = evaluate_batch(*args)
    monkeypatch.setattr("pipeline.metrics.scoring.scoring_model", lambda model, probe: model)
    plain = evaluate_batch(*args)
    for key in ("deletion_auc", "insertion_auc", "center_deletion_auc", "deletion_curve"):
        torch.testing.assert_close(
            torch.as_tensor(folded[key]), torch.as_tensor(plain[key]), atol=1e-5, rtol=0
        )
