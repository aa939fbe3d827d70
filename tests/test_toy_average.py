"""toyworld.average: the tensor-wise mean of toy base model files, a start train_base can continue from."""
from dataclasses import replace

import pytest
import safetensors.torch
import torch

from toyworld import average, train_base
from toyworld.model import TOY_UNET, build_toy_model, load_toy_model, read_metadata, save_toy_model


def _base(path, seed, config=TOY_UNET, prediction="v"):
    torch.manual_seed(seed)
    unet, encoder = build_toy_model(config)
    return save_toy_model(str(path), unet, encoder, {"prediction": prediction, "steps": 10 * (seed + 1),
                                                    "seed": seed, "total_steps": 100 * (seed + 1)})


def test_the_average_is_the_mean_of_every_tensor_and_records_its_sources(tmp_path):
    a, b = _base(tmp_path / "a.safetensors", 0), _base(tmp_path / "b.safetensors", 1)
    out = str(tmp_path / "soup.safetensors")
    assert average.main([a, b, "--out", out]) == 0
    ta, tb, mean = (safetensors.torch.load_file(p) for p in (a, b, out))
    assert mean.keys() == ta.keys()
    assert all(torch.allclose(mean[k], (ta[k] + tb[k]) / 2, atol=1e-7) for k in ta)
    assert any(not torch.equal(mean[k], ta[k]) for k in ta)
    meta = read_metadata(out)
    assert meta["sources"] == f"a.safetensors ({train_base.init_digest(a)}), b.safetensors ({train_base.init_digest(b)})"
    assert meta["script"] == "toyworld.average" and meta["prediction"] == "v" and meta["total_steps"] == "200"
    again = str(tmp_path / "again.safetensors")
    average.main([a, b, "--out", again])
    rebuilt = safetensors.torch.load_file(again)
    assert all(torch.equal(rebuilt[k], mean[k]) for k in mean)  # the same command, the same tensors
    unet, _ = load_toy_model(out)  # a base model file the sampler and the gate load
    assert unet.prediction == "v"


def test_a_round_continues_from_an_average(tmp_path):
    a, b = _base(tmp_path / "a.safetensors", 0), _base(tmp_path / "b.safetensors", 1)
    soup, after = str(tmp_path / "soup.safetensors"), str(tmp_path / "after.safetensors")
    average.main([a, b, "--out", soup])
    assert train_base.main(["--out", after, "--init", soup, "--steps", "1", "--batch", "2", "--threads", "1"]) == 0
    assert read_metadata(after)["init"] == f"soup.safetensors ({train_base.init_digest(soup)})"
    assert read_metadata(after)["total_steps"] == "201"


def test_files_of_other_bases_or_bad_arguments_are_refused(tmp_path, capsys):
    a, b = _base(tmp_path / "a.safetensors", 0), _base(tmp_path / "b.safetensors", 1)
    eps = _base(tmp_path / "eps.safetensors", 2, prediction="eps")
    wide = _base(tmp_path / "wide.safetensors", 3, config=replace(TOY_UNET, model_channels=32))
    out = str(tmp_path / "out.safetensors")
    for argv, message in (([a, "--out", out], "two or more"),
                          ([a, eps, "--out", out], "disagree on prediction"),
                          ([a, wide, "--out", out], "disagree on config"),
                          ([a, str(tmp_path / "missing.safetensors"), "--out", out], "no such file"),
                          ([a, b, "--out", a], "must differ")):
        with pytest.raises(SystemExit):
            average.main(argv)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
