"""The model-randomisation sanity check's stages (Adebayo et al., NeurIPS 2018).

The check re-initialises a trained network's weights cumulatively from the output down and
explains the same images after each stage; a map that stays alike once the weights that
made the prediction are random does not explain the model.

What a stage re-initialises, in the network's registration order read backwards (its top
first):

- granularity "blocks" (the default, the paper's): one stage per top-level child of the
  network that holds parameters; a top-level `nn.Sequential` (timm's `blocks`, torchvision
  VGG's `features`, ResNet's `layer4`) gives one stage per child of it instead, so the stages
  are the network's blocks (EfficientNet's stages, ResNet's bottlenecks, VGG's layers);
- granularity "layers": one stage per module with a `reset_parameters` method, the order of
  Quantus's MPRT (`get_random_layer_generator(order="top_down")`).

How a module is re-initialised, as Quantus does it: `torch.manual_seed(seed + 1)` and then
the module's own `reset_parameters()` (PyTorch's default initialisation; BatchNorm's resets
its scale, shift and running statistics). Every module draws from the same seed, so a
stage's network is the same whichever granularity reached it: the "blocks" stage after a
block equals the "layers" stage after that block's last module. The paper draws from a
truncated normal; PyTorch's defaults are what a PyTorch user gets and what Quantus compares
with. The global random state is restored afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SettingsError

GRANULARITIES = ("blocks", "layers")
DEFAULT_RANDOMISATION_SEED = 42  # Quantus's MPRT default


@dataclass(frozen=True)
class Stage:
    """One step of the cascade: its name (a module path) and the modules it re-initialises
    (paths in the network, each with `reset_parameters`, top first)."""

    name: str
    modules: tuple[str, ...]


def network_of(model: nn.Module) -> nn.Module:
    """The network inside mpbatch's normalising wrapper (the model itself otherwise)."""
    return getattr(model, "model", model)


def _resettable(module: nn.Module, prefix: str) -> list[str]:
    """Paths (under `prefix`) of `module` and its descendants that have reset_parameters, in
    registration order."""
    paths = []
    for name, child in module.named_modules(prefix=prefix):
        if hasattr(child, "reset_parameters"):
            paths.append(name)
    return paths


def randomisation_stages(network: nn.Module, granularity: str = "blocks") -> list[Stage]:
    """The cascade's stages for `network`, top (output side) first."""
    if granularity not in GRANULARITIES:
        raise SettingsError(f"granularity {granularity!r}: choose from {', '.join(GRANULARITIES)}")
    if granularity == "layers":
        return [Stage(path, (path,)) for path in reversed(_resettable(network, ""))]
    blocks: list[tuple[str, nn.Module]] = []
    for name, child in network.named_children():
        if isinstance(child, nn.Sequential):
            blocks += [(f"{name}.{n}", c) for n, c in child.named_children()]
        else:
            blocks.append((name, child))
    stages = []
    for name, block in reversed(blocks):
        modules = tuple(reversed(_resettable(block, name)))
        if modules:
            stages.append(Stage(name, modules))
    return stages


def stages_upto(stages: list[Stage], count: int) -> tuple[str, ...]:
    """The modules the first `count` stages re-initialise, top first."""
    return tuple(path for stage in stages[:count] for path in stage.modules)


def check_modules(network: nn.Module, paths: tuple[str, ...] | list[str]) -> None:
    """Raise SettingsError naming the first path that is not a module of `network` with
    reset_parameters."""
    modules = dict(network.named_modules())
    for path in paths:
        if path not in modules:
            raise SettingsError(f"layer {path!r} is not a module of the model")
        if not hasattr(modules[path], "reset_parameters"):
            raise SettingsError(f"layer {path!r} has no parameters to re-initialise")


@torch.no_grad()
def randomise(network: nn.Module, paths: tuple[str, ...] | list[str], seed: int) -> nn.Module:
    """Re-initialise the modules at `paths` of `network` in place, in the order given, each
    right after torch.manual_seed(seed + 1); returns `network`. The global RNG is restored."""
    check_modules(network, paths)
    modules = dict(network.named_modules())
    frozen = {p: p.requires_grad for p in network.parameters()}
    with torch.random.fork_rng(devices=[]):
        for path in paths:
            torch.manual_seed(seed + 1)
            modules[path].reset_parameters()
    for parameter, requires_grad in frozen.items():
        parameter.requires_grad_(requires_grad)
    return network
