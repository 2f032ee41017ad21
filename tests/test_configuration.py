"""pipeline/commands/configuration.py: options, the typed run record, and which speed options
apply."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.commands.configuration import (
    EvalOptions,
    RunOptions,
    RunRecord,
    applied_speed,
    upgrade_stored,
)
from pipeline.models.speed import SpeedOptions


def test_cuda_speed_options_follow_the_h100_measurements(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda")
    assert SpeedOptions.recommended(cuda, "vgg19") == SpeedOptions("bf16", channels_last=True)
    assert SpeedOptions.recommended(cuda, "resnet50") == SpeedOptions("bf16")
    options = RunOptions(data=".", out=".", model="vgg19", compile=True, cuda_graphs=True)
    assert applied_speed(options, cuda) == SpeedOptions(
        "bf16", channels_last=True, compile=True, cuda_graphs=True
    )
    explicit = RunOptions(data=".", out=".", model="resnet50", precision="bf16")
    assert applied_speed(explicit, cuda) == SpeedOptions("bf16")
    cpu_bf16 = RunOptions(data=".", out=".", model="efficientnet_lite0", precision="bf16")
    assert applied_speed(cpu_bf16, torch.device("cpu")) == SpeedOptions("bf16", channels_last=True)
    fp32 = RunOptions(data=".", out=".", precision="fp32", cuda_graphs=True)
    assert applied_speed(fp32, cuda) == SpeedOptions()  # graphs only ever with compile


def test_gradcam_refuses_speed_options_and_records_fp32(monkeypatch) -> None:
    """On a GPU, `auto` used to record bf16 for a run that ran fp32 eager."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    asking = ({"compile": True}, {"cuda_graphs": True}, {"precision": "bf16"}, {"reference": True})
    for asked in asking:
        with pytest.raises(ValueError, match="does not apply to --method gradcam"):
            RunOptions(data=".", out=".", method="gradcam", **asked)
    options = RunOptions(data=".", out=".", method="gradcam")  # precision auto
    assert applied_speed(options, torch.device("cuda")) == SpeedOptions(precision="fp32")


def test_extremal_auto_is_the_fast_path_in_float32_and_reference_is_asked_for(
    monkeypatch,
) -> None:
    """Extremal's bf16 fidelity is unmeasured, so `auto` stays float32 even where bf16 wins
    for the meaningful methods; bf16, compile and CUDA graphs are there when asked for."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda")
    auto = RunOptions(data=".", out=".", model="resnet50", method="extremal")
    assert applied_speed(auto, cuda) == SpeedOptions(precision="fp32")
    meaningful = RunOptions(data=".", out=".", model="resnet50")
    assert applied_speed(meaningful, cuda).precision == "bf16"
    asked = RunOptions(
        data=".", out=".", method="extremal", precision="bf16", compile=True, cuda_graphs=True
    )
    assert applied_speed(asked, cuda) == SpeedOptions("bf16", compile=True, cuda_graphs=True)
    reference = RunOptions(data=".", out=".", method="extremal", reference=True)
    assert applied_speed(reference, cuda) == SpeedOptions(precision="fp32", reference=True)
    for flag in ({"precision": "bf16"}, {"compile": True}):
        with pytest.raises(ValueError, match="--reference runs float32 eager"):
            RunOptions(data=".", out=".", method="extremal", reference=True, **flag)
    with pytest.raises(ValueError, match="reference path is float32 eager"):
        SpeedOptions(precision="bf16", reference=True)


def test_result_fields_are_marked_on_the_record() -> None:
    resume = RunRecord.resume_keys()
    assert {"method", "mask", "area", "scoring", "speed", "shard"} <= set(resume)
    assert not {"batch_size", "workers", "device", "preset", "name", "evaluation"} & set(resume)
    assert RunRecord.merge_keys() == [k for k in resume if k != "shard"]
    record = RunRecord(
        data="/d",
        model="m",
        weights=None,
        method="extremal",
        mask={"areas": (0.1, 0.2)},
        area=None,
        size=32,
        target="label",
        limit=None,
        layout="flat",
        scoring=None,
        speed={"precision": "fp32"},
    )
    assert record.to_config()["mask"] == {"areas": [0.1, 0.2]}  # as stored: lists
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.size = 64


def test_files_of_older_versions_still_resume() -> None:
    described = EvalOptions(baselines=("center", "random")).describe()
    del described["smooth"]  # files from before pointing could be smoothed
    old = {
        "speed": {"precision": "fp32", "channels_last": False, "adam": "default"},
        "evaluation": described,
    }
    upgraded = upgrade_stored(old, torch.device("cpu"))
    assert upgraded["method"] == "meaningful" and upgraded["area"] is None
    assert upgraded["speed"]["device"] == "cpu" and upgraded["speed"]["cuda_graphs"] is False
    assert upgraded["speed"]["reference"] is False  # as new meaningful runs record
    # extremal had only the reference path before it was recorded
    old_extremal = upgrade_stored({**old, "method": "extremal"}, torch.device("cpu"))
    assert old_extremal["speed"]["reference"] is True
    # what decides the scores is compared, not the wording of the protocol
    now = EvalOptions(baselines=("center", "random")).for_method("meaningful").settings()
    assert upgraded["scoring"] == now
    assert upgrade_stored({"evaluation": None}, torch.device("cpu"))["scoring"] is None


def test_evaluation_defaults_follow_the_method() -> None:
    assert EvalOptions().baselines == ("center", "random", "gradcam")
    extremal = EvalOptions().for_method("extremal")
    assert extremal.smooth == 0.09 and extremal.baselines == ("center", "random", "gradcam")
    gradcam = EvalOptions().for_method("gradcam")
    assert gradcam.smooth == 0.0 and gradcam.baselines == ("center", "random")  # not itself
    assert EvalOptions(smooth=0.2).for_method("extremal").smooth == 0.2
    with pytest.raises(ValueError, match="unknown baseline 'occlusion'"):
        EvalOptions(baselines=("occlusion",))
