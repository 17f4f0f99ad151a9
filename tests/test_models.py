import pytest
import torch

from fmnist.errors import ConfigError
from fmnist.models import available, build_model, builder_params
from fmnist.models.layers import FMNIST_MEAN, FMNIST_STD, Normalize


@pytest.mark.parametrize("arch", available())
@pytest.mark.parametrize("shape", [(5, 28, 28), (5, 1, 28, 28)])
def test_every_model_maps_raw_images_to_ten_logits(arch, shape):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    out = model(x)
    assert out.shape == (5, 10) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_builders_take_their_parameters_from_keywords():
    assert set(builder_params("cnn")) >= {"widths", "dropout", "convs_per_block"}
    small = build_model("cnn", widths=(4, 8), convs_per_block=1)
    large = build_model("cnn", widths=(8, 16), convs_per_block=2)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < count(large)
    assert build_model("ann", widths=(7,))[3].num_features == 7


def test_unknown_architecture_and_bad_values():
    with pytest.raises(ConfigError, match="expected one of ann, cnn"):
        build_model("vgg")
    with pytest.raises(ConfigError, match="model.dropout=1.5"):
        build_model("ann", dropout=1.5)
    with pytest.raises(ConfigError, match=r"model.widths=\[0\]"):
        build_model("ann", widths=(0,))


def test_normalize_standardises_raw_pixels():
    x = torch.tensor([[[0, 255]]], dtype=torch.uint8).expand(1, 28, 2)
    out = Normalize()(x)
    assert out.shape == (1, 1, 28, 2)
    assert out[0, 0, 0, 0].item() == pytest.approx(-FMNIST_MEAN / FMNIST_STD, rel=1e-5)
    assert out[0, 0, 0, 1].item() == pytest.approx((1 - FMNIST_MEAN) / FMNIST_STD, rel=1e-5)


def test_fast_dropout_drops_p_scales_the_rest_and_follows_the_seed():
    from fmnist.models.layers import Dropout

    drop = Dropout(0.2)  # 0.2 * 256 = 51.2: 51 of 256 byte values drop
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    out = drop(x)
    assert abs((out == 0).float().mean().item() - 51 / 256) < 0.003
    assert out.unique().tolist() == pytest.approx([0.0, 256 / 205])
    torch.manual_seed(0)
    assert torch.equal(drop(x), out)  # the same seed, the same mask
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # gradients flow through kept elements only, scaled alike
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.3])
def test_fast_dropout_keeps_the_expected_value(p):
    """Rescaling must use the rate actually applied (p rounded to 1/256): E[dropout(x)] = x."""
    from fmnist.models.layers import Dropout

    torch.manual_seed(0)
    out = Dropout(p)(torch.ones(4000, 4000))
    assert out.mean().item() == pytest.approx(1.0, abs=5e-4)  # 16M elements: sampling error ~1e-4


def test_cnn_layouts_place_pooling_and_stem_where_asked():
    from fmnist.models.layers import fold_batchnorm

    def conv_sides(model):
        sides = []
        hooks = [m.register_forward_hook(lambda m, i, o: sides.append(i[0].shape[-1]))
                 for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        model.eval()(torch.zeros(2, 28, 28, dtype=torch.uint8))
        for hook in hooks:
            hook.remove()
        return sides

    assert conv_sides(build_model("cnn", widths=(8, 16), average_mirror=False)) == [28, 28, 14, 14]
    early = build_model("cnn", widths=(8, 16), stem=4, pool_early=True, average_mirror=False)
    assert conv_sides(early) == [28, 28, 14, 14, 7]  # stem, then each block's second conv after its pooling
    # Batch norm after a max pool stays unfolded (max does not commute with a negative scale): same outputs.
    torch.manual_seed(0)
    for bn in (m for m in early.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        with torch.no_grad():
            bn.weight.uniform_(-1, 1)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(fold_batchnorm(early)(x), early.eval()(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="model.stem=-1"):
        build_model("cnn", stem=-1)


def test_cnn_answers_with_its_mean_over_the_image_and_its_mirror_in_eval_mode_only():
    torch.manual_seed(0)
    model = build_model("cnn", widths=(4, 8))
    single = torch.nn.Sequential(*model)  # the same layers, one view
    x = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    model.eval()
    torch.testing.assert_close(model(x), (single(x) + single(x.flip(-1))) / 2)
    assert not torch.allclose(model(x), single(x), atol=1e-3)
    torch.testing.assert_close(model(x.flip(-1)), model(x))  # so a mirrored image gets the same answer
    model.train()
    torch.manual_seed(1)
    trained_view = model(x)
    torch.manual_seed(1)  # the same dropout draws
    torch.testing.assert_close(trained_view, single(x))  # training sees the augmentation's views, one each
    assert type(build_model("cnn", average_mirror=False)) is torch.nn.Sequential
