"""Transfer learning: real pretrained weights, freezing, the activation cache, missing weights."""
import pytest
import torch
import torch.nn.functional as F

from fmnist import data as fdata
from fmnist.config import TrainConfig
from fmnist.errors import ConfigError, WeightsError
from fmnist.features import extract, features_dir, prepare
from fmnist.models import build_model
from fmnist.models.backbones import load_backbone, torchvision_weights
from fmnist.models.layers import fold_batchnorm
from fmnist.train import fit, resolve_runtime

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
SMALL = {"resolution": 32, "mode": "finetune", "unfrozen_blocks": 2}  # fast on CPU, still the real network


def test_efficientnet_lite0_weights_are_really_imagenet_pretrained():
    skimage = pytest.importorskip("skimage.data")
    photo = torch.from_numpy(skimage.chelsea()).permute(2, 0, 1).float().unsqueeze(0) / 255
    photo = F.interpolate(photo, size=(224, 224), mode="bilinear", antialias=True)
    for pretrained in (True, False):
        torch.manual_seed(0)
        backbone = load_backbone("efficientnet_lite0", pretrained=pretrained)
        mean, std = torch.tensor(backbone.mean).view(1, 3, 1, 1), torch.tensor(backbone.std).view(1, 3, 1, 1)
        probs = backbone.imagenet.eval()((photo - mean) / std).softmax(1)[0]
        if pretrained:
            assert probs.argmax().item() in IMAGENET_CATS and probs.max().item() > 0.5
        else:  # the same check must fail for random weights, or it proves nothing
            assert probs.max().item() < 0.1


def test_model_equals_trained_part_on_frozen_part_and_freezes_only_the_frozen_part():
    torch.manual_seed(0)
    model = build_model("transfer", **SMALL).eval()
    x = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(model(x), model.trained_part()(model.frozen_part()(x)))
    assert model.cut == len(model.stages) - 2
    assert not any(p.requires_grad for p in model.frozen_part().parameters())
    assert all(p.requires_grad for p in model.trained_part().parameters())
    model.train()
    assert not any(m.training for stage in model.frozen_part() for m in stage.modules())
    assert all(m.training for stage in model.trained_part() for m in stage.modules())
    frozen = build_model("transfer", resolution=32, mode="frozen")
    assert frozen.cut == len(frozen.stages) and frozen.frozen_part()(x).shape == (4, 1280)
    assert build_model("transfer", resolution=32, mode="full").cut == 0


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18", "mobilenet_v3_large"])
def test_folding_batch_norm_into_convolutions_changes_no_output(backbone):
    torch.manual_seed(0)
    frozen = build_model("transfer", backbone=backbone, pretrained=False, resolution=32, mode="frozen").eval()
    frozen = frozen.frozen_part()
    for bn in (m for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics far from 0/1
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-1, 1)
    folded = fold_batchnorm(frozen)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), frozen(x), rtol=1e-4, atol=1e-4)


def test_training_on_cached_features_leaves_frozen_weights_and_batch_norm_untouched(tiny_data, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    data = fdata.load(tiny_data, 0.2, seed=0)
    torch.manual_seed(0)
    model = build_model("transfer", **SMALL)
    before = {k: v.clone() for k, v in model.frozen_part().state_dict().items()}
    cfg = TrainConfig(epochs=2, batch_size=32, lr=3e-3, threads=2, augment=True)
    rt = resolve_runtime(cfg, model)
    prepared = prepare(model, data, rt, cfg)
    assert len(prepared.data.y_train) == 2 * len(data.y_train)  # a flipped copy of every training image
    assert not prepared.train.augment  # no image augmentation on activations
    history = fit(prepared.model, prepared.data, prepared.train, rt)
    assert history.best_val_accuracy > 0.3  # chance is 0.1
    for k, v in model.frozen_part().state_dict().items():
        assert torch.equal(v, before[k]), k


CFG = TrainConfig(epochs=1, batch_size=32, lr=1e-3)


def cached(model, data, rt):
    return prepare(model, data, rt, CFG)


def test_activation_cache_is_hit_the_second_time_and_keyed_by_content_and_weights(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    data = fdata.load(tiny_data, 0.2, seed=0)
    torch.manual_seed(0)
    model = build_model("transfer", **SMALL)
    rt = resolve_runtime(CFG, model)
    first, second = cached(model, data, rt), cached(model, data, rt)
    assert first.tags == {"feature_cache": "miss"} and second.tags == {"feature_cache": "hit"}
    assert len(list(features_dir().glob("*.pt"))) == 2  # train + validation, test
    for split in ("x_train", "x_val", "x_test"):
        assert torch.equal(getattr(first.data, split), getattr(second.data, split))
    # Another seed splits the same images otherwise: it reads the same entry, each image's own activations.
    other = fdata.load(tiny_data, 0.2, seed=1)
    assert not torch.equal(other.x_val, data.x_val)
    reused = cached(model, other, rt)
    assert reused.tags["feature_cache"] == "hit" and len(list(features_dir().glob("*.pt"))) == 2
    frozen = fold_batchnorm(model.frozen_part())
    for images, activations in ((other.x_train, reused.data.x_train), (other.x_val, reused.data.x_val)):
        torch.testing.assert_close(activations, extract(frozen, images, rt, CFG.eval_batch_size, "check"))
    with torch.no_grad():
        model.stages[0][0].weight.mul_(1.01)  # other frozen weights: never served the old activations
    assert cached(model, data, rt).tags["feature_cache"] == "miss"
    torch.manual_seed(1)
    random = build_model("transfer", **SMALL | {"pretrained": False})
    assert random.cache_tag is None and cached(random, data, rt).tags["feature_cache"] == "miss"  # nothing to reuse


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated", "empty"])
def test_a_damaged_cache_entry_is_reported_removed_and_computed_again(tiny_data, tmp_path, monkeypatch, capsys,
                                                                     damage):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    data = fdata.load(tiny_data, 0.2, seed=0)
    torch.manual_seed(0)
    model = build_model("transfer", **SMALL)
    rt = resolve_runtime(CFG, model)
    good = cached(model, data, rt)
    entry = max(features_dir().glob("*.pt"), key=lambda p: p.stat().st_size)  # the training split's
    raw = bytearray(entry.read_bytes())
    if damage == "flipped bytes":  # same size, so only the stored digest can tell
        middle = len(raw) // 2
        raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
    entry.write_bytes(bytes(raw[:len(raw) // 2] if damage == "truncated" else b"" if damage == "empty" else raw))
    again = cached(model, data, rt)
    err = capsys.readouterr().err
    assert f"activation cache entry {entry} is damaged" in err and "removed, computing it again" in err
    assert again.tags["feature_cache"] == "miss" and torch.equal(again.data.x_train, good.data.x_train)
    assert cached(model, data, rt).tags["feature_cache"] == "hit"  # written anew, whole


def test_a_leftover_half_written_entry_is_cleaned(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    features_dir().mkdir(parents=True)
    dead = features_dir() / "x-v2-abc.999999999.tmp"  # a writer killed mid-write: no such process
    dead.write_bytes(b"half")
    alive = features_dir() / f"x-v2-abc.{__import__('os').getpid()}.tmp"  # a writer still at work
    alive.write_bytes(b"half")
    torch.manual_seed(0)
    model = build_model("transfer", **SMALL)
    cached(model, fdata.load(tiny_data, 0.2, seed=0), resolve_runtime(CFG, model))
    assert not dead.exists() and alive.exists()


def test_missing_torchvision_weights_name_the_backbone_and_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # no internet: the download is refused at once
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(WeightsError) as e:
        build_model("transfer", backbone="resnet18")
    message = str(e.value)
    assert "backbone resnet18" in message and "resnet18-f37072fd.pth" in message and "pretrained=false" in message
    assert not build_model("transfer", backbone="resnet18", pretrained=False, resolution=32).cache_tag


def test_torchvision_weights_are_used_from_the_hub_cache_without_network(tmp_path, monkeypatch):
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    torch.manual_seed(7)
    saved = resnet18().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(saved, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    loaded = torchvision_weights("resnet18")
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    model = build_model("transfer", backbone="resnet18", resolution=32, mode="frozen")
    assert torch.equal(model.stages[0][0].weight, saved["conv1.weight"])


@pytest.mark.parametrize("params,message", [
    ({"mode": "partial"}, "model.mode='partial': expected one of frozen, finetune, full"),
    ({"unfrozen_blocks": 18}, "model.unfrozen_blocks=18: efficientnet_lite0 has 18 stages; expected 1 to 17"),
    ({"resolution": 16}, "model.resolution=16: expected 32 to 512"),
    ({"backbone": "alexnet"}, "model.backbone='alexnet': expected one of efficientnet_b0, efficientnet_lite0"),
])
def test_bad_transfer_options_are_refused(params, message):
    with pytest.raises(ConfigError) as e:
        build_model("transfer", **params)
    assert message in str(e.value)

