"""pd_core.metrics: the FID Inception network's weights (pytorch-fid names, strict loading, safe formats)."""

from __future__ import annotations

import hashlib
import pickle

import fsspec
import pytest
import torch
from safetensors.torch import save as save_safetensors

from pd_core import metrics
from pd_core.metrics.inception import FID_WEIGHTS_FILE


def _random_inception() -> metrics.FIDInceptionV3:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = metrics.FIDInceptionV3()
        for m in model.modules():  # non-trivial BN statistics, so a wrong load would change features
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_inception_has_pytorch_fid_weight_names():
    sd = metrics.FIDInceptionV3().state_dict()
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Mixed_5b.branch5x5_2.conv.weight",
                "Mixed_6e.branch7x7dbl_5.bn.bias", "Mixed_7c.branch3x3dbl_3b.conv.weight", "fc.bias"):
        assert key in sd
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert len(sd) == 566  # torchvision Inception3 (no aux) with pytorch-fid's FID blocks


@pytest.mark.slow
def test_inception_loads_strict_from_path_and_memory_and_gives_2048_features(tmp_path):
    model = _random_inception()
    sd = model.state_dict()
    pth = tmp_path / FID_WEIGHTS_FILE
    torch.save(sd, pth)
    loaded = metrics.load_inception(str(pth))
    u = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = loaded(u)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32 and bool(torch.isfinite(feats).all())
    assert torch.equal(feats, model(u))
    # safetensors through fsspec memory://, an old-style file without BN counters, and a sha256 check
    old_style = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    with fsspec.open("memory://pd-tests/inception/w.safetensors", "wb") as f:
        f.write(save_safetensors(old_style))
    digest = hashlib.sha256(save_safetensors(old_style)).hexdigest()
    mem = metrics.load_inception("memory://pd-tests/inception/w.safetensors", sha256=digest)
    for k, v in mem.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with pytest.raises(metrics.InceptionWeightsError, match="sha256"):
        metrics.load_inception("memory://pd-tests/inception/w.safetensors", sha256="0" * 64)


def test_inception_strict_load_refuses_wrong_keys(tmp_path):
    sd = metrics.FIDInceptionV3().state_dict()
    sd["Mixed_7c.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        metrics.load_inception(str(tmp_path / "bad.pth"))


def test_missing_inception_weights_say_what_to_get_and_where_to_point():
    for weights in (None, "/nonexistent/dir/pt_inception.pth"):
        with pytest.raises(metrics.InceptionWeightsError) as err:
            metrics.load_inception(weights)
        msg = str(err.value)
        assert FID_WEIGHTS_FILE in msg and "eval.inception_weights" in msg and "pytorch-fid" in msg
        assert "\n" not in msg


class _NotATensor:
    pass


def test_weight_files_cannot_execute_code(tmp_path):
    torch.save({"x": _NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        metrics.read_state_dict(str(tmp_path / "evil.pth"))
