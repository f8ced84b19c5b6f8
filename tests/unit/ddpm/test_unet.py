"""The DDPM U-Net: presets, the paper's parameter count, attention kernels, bad configurations."""

import pytest
import torch

from pipeline.ddpm.unet import PRESETS, UNet, UNetConfig, count_parameters, preset


def test_cifar_preset_is_the_papers_35_7m_model():
    model = UNet(preset("cifar", image_size=32, in_channels=3))
    assert round(count_parameters(model) / 1e6, 1) == 35.7  # DDPM section 4: 35.7M parameters


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_map_images_to_images(name, channels):
    size = 16 if name == "cifar" else 8
    attn = (8,) if name == "cifar" else None  # 16x16 input: the cifar preset's 16 becomes the input level
    overrides = {"attention_resolutions": attn} if attn else {}
    model = UNet(preset(name, image_size=size, in_channels=channels, **overrides))
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sdpa_and_math_attention_agree():
    torch.manual_seed(0)
    a = UNet(preset("digits", image_size=8, in_channels=1, attention="sdpa"))
    for p in a.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    b = UNet(preset("digits", image_size=8, in_channels=1, attention="math"))
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999])
    torch.testing.assert_close(a(x, t), b(x, t), rtol=1e-4, atol=1e-5)


def test_time_conditioning_matters():
    torch.manual_seed(0)
    m = UNet(preset("tiny", image_size=8, in_channels=1))
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(1, 1, 8, 8).repeat(2, 1, 1, 1)
    out = m(x, torch.tensor([0, 900]))
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(image_size=30, channel_mult=(1, 2, 2, 2)), "image_size"),
        (dict(base_channels=20), "base_channels"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(dropout=1.5), "dropout"),
        (dict(attention_resolutions=(5,)), "attention_resolutions"),
        (dict(attention="flash3"), "attention"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        UNetConfig(**kwargs)


def test_unknown_preset_and_dict_round_trip():
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge", image_size=8, in_channels=1)
    c = preset("digits", image_size=8, in_channels=1)
    assert UNetConfig.from_dict(c.to_dict()) == c
