"""Tests of the adaptation losses: LPIPS, the DINO discriminator, the generator objective."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adapt.augment import cutout, diff_augment, translate  # noqa: E402
from adapt.discriminator import (  # noqa: E402
    DINO_BLOCKS,
    DinoDiscriminator,
    discriminator_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    lecam_penalty,
    update_lecam_ema,
)
from adapt.losses import GeneratorObjective, LossWeights, adaptive_gan_weight  # noqa: E402
from adapt.perceptual import PerceptualLoss, vgg_features_to_lpips_keys  # noqa: E402


@pytest.fixture(scope="module")
def disc() -> DinoDiscriminator:
    torch.manual_seed(0)
    return DinoDiscriminator(random_backbone=True, hidden=16)


@pytest.fixture(scope="module")
def perceptual() -> PerceptualLoss:
    return PerceptualLoss(random_backbone=True)


def test_discriminator_tap_logit_shapes(disc):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    logits = disc(x)
    assert len(logits) == 1 + len(DINO_BLOCKS)
    for tap in logits:
        assert tap.shape == (2, 196)  # 14 x 14 patches of 16 px at 224 px


def test_discriminator_backbone_frozen_heads_trainable(disc):
    disc.zero_grad(set_to_none=True)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    torch.cat(disc(x), dim=1).mean().backward()
    assert all(not p.requires_grad and p.grad is None for p in disc.backbone.parameters())
    heads = list(disc.heads.parameters())
    assert heads and all(p.requires_grad for p in heads)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
    assert x.grad is not None and x.grad.abs().sum() > 0  # the generator gets gradients through the backbone
    disc.train()
    assert not disc.backbone.training


def test_discriminator_taps_match_timm_intermediates(disc):
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = disc.tap_tokens(x)
        theirs = disc.backbone.forward_intermediates(x, indices=list(DINO_BLOCKS), output_fmt="NLC",
                                                     intermediates_only=True, return_prefix_tokens=True)
    for tokens, (patches, cls) in zip(ours[1:], theirs):
        torch.testing.assert_close(tokens, patches + cls)


def test_backbone_input_normalised(disc):
    grey = torch.zeros(3, 3, 256, 256)  # 0 in [-1, 1] is 0.5 in [0, 1]
    out = disc.to_backbone_input(grey)
    assert out.shape == (3, 3, 224, 224)
    expected = (0.5 - disc.mean) / disc.std
    torch.testing.assert_close(out, expected.expand_as(out))


def test_hinge_losses_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # margins: 0, 0.5, 2 -> mean 2.5 / 3
    fake = torch.tensor([-2.0, 0.0, 1.0])  # margins: 0, 1, 2 -> mean 1
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(2.5 / 3 + 1.0)
    assert hinge_discriminator_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0
    assert hinge_generator_loss(fake).item() == pytest.approx(1.0 / 3)
    assert hinge_generator_loss(torch.full((2,), 5.0)).item() < 0  # a fooled discriminator lowers the loss


def test_lecam_penalty_and_ema_update(disc):
    real = torch.tensor([1.0, 3.0])
    fake = torch.tensor([-2.0, 0.0])
    # relu(real - ema_fake)^2 with ema_fake = 2 -> (0, 1); relu(ema_real - fake)^2 with ema_real = -1 -> (1, 0)
    assert lecam_penalty(real, fake, torch.tensor(-1.0), torch.tensor(2.0)).item() == pytest.approx(1.0)

    disc.ema_real.fill_(1.0)
    disc.ema_fake.fill_(-1.0)
    update_lecam_ema(disc, real, fake, decay=0.9)
    assert disc.ema_real.item() == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    assert disc.ema_fake.item() == pytest.approx(0.9 * -1.0 + 0.1 * -1.0)


def test_discriminator_loss_terms_and_grads(disc):
    torch.manual_seed(1)
    disc.zero_grad(set_to_none=True)
    disc.ema_real.zero_()
    disc.ema_fake.zero_()
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    fake = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    loss, stats = discriminator_loss(disc, real, fake)
    loss.backward()
    assert set(stats) == {"d_hinge", "d_consistency", "d_lecam", "d_real", "d_fake"}
    assert stats["d_hinge"] > 0
    assert stats["d_consistency"] >= 0
    assert stats["d_lecam"] >= 0
    assert fake.grad is None  # fakes are detached for the discriminator step
    assert disc.ema_real.item() == pytest.approx(0.001 * float(stats["d_real"]), rel=1e-4)
    assert disc.ema_fake.item() == pytest.approx(0.001 * float(stats["d_fake"]), rel=1e-4)


def test_diff_augment_shapes_and_gradients():
    x = (torch.rand(3, 3, 16, 16) * 2 - 1).requires_grad_()
    y = diff_augment(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None


def test_translate_and_cutout_exact():
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(5, 3, 4, 4)
    torch.manual_seed(0)
    shifted = translate(x, ratio=0.0)
    torch.testing.assert_close(shifted, x)  # no room to shift
    erased = cutout(torch.ones(64, 1, 8, 8), ratio=0.5)
    per_image = (erased == 0).flatten(1).sum(1)
    assert per_image.max().item() == 16  # a 4x4 square when it lies inside the image
    assert per_image.min().item() >= 4  # at least a quarter of it when its centre sits in a corner


def test_lpips_random_backbone_zero_on_identical(perceptual):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d_same = perceptual(x, x)
    assert d_same.shape == (2,)
    torch.testing.assert_close(d_same, torch.zeros(2))
    assert (perceptual(x, x.flip(-1)) > 0).all()


def test_lpips_frozen(perceptual):
    assert all(not p.requires_grad for p in perceptual.parameters())
    perceptual.train()
    assert not any(m.training for m in perceptual.modules())
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_()
    perceptual(x, torch.zeros_like(x)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_loads_local_vgg_file(tmp_path, perceptual):
    # A torchvision-style VGG-16 checkpoint (features only) written from a random trunk.
    trunk = {}
    for key, value in perceptual.net.net.state_dict().items():
        _, index, kind = key.split(".")
        trunk[f"features.{index}.{kind}"] = torch.randn_like(value)
    trunk["classifier.0.weight"] = torch.zeros(2, 2)  # ignored: not part of the LPIPS trunk
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(trunk, path)

    loaded = PerceptualLoss(vgg_file=path)
    expected = vgg_features_to_lpips_keys(trunk)
    for key, value in loaded.net.net.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    assert all(not p.requires_grad for p in loaded.parameters())


def test_adaptive_weight_formula():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False)
    x = torch.randn(4, 3)
    out = layer(x)
    rec = out.pow(2).mean()
    gan = 3.0 * out.sum()
    weight = adaptive_gan_weight(rec, gan, layer.weight, max_weight=1e4, eps=0.0)

    rec_grad = 2 * (out.detach().T @ x) / out.numel()  # d mean(out^2) / dW
    gan_grad = 3.0 * torch.ones(2, 4) @ x
    assert weight.item() == pytest.approx((rec_grad.norm() / gan_grad.norm()).item(), rel=1e-5)
    assert not weight.requires_grad

    clamped = adaptive_gan_weight(rec, 0.0 * out.sum(), layer.weight, max_weight=7.0, eps=1e-12)
    assert clamped.item() == 7.0


def test_objective_reports_only_active_terms(perceptual, disc):
    torch.manual_seed(0)
    conv_out = nn.Conv2d(3, 3, 3, padding=1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat = conv_out(torch.rand(2, 3, 32, 32) * 2 - 1)

    l2_only = GeneratorObjective(LossWeights(perceptual=0.0, gan=0.0), perceptual, disc)
    total, terms = l2_only(x_hat, x)
    assert set(terms) == {"l2", "total"}
    assert total.item() == pytest.approx(torch.nn.functional.mse_loss(x_hat, x).item())

    no_nets = GeneratorObjective(LossWeights())  # weights on, networks missing: those terms are off
    assert set(no_nets(x_hat, x)[1]) == {"l2", "total"}

    full = GeneratorObjective(LossWeights(gan=0.5), perceptual, disc)
    total, terms = full(x_hat, x, last_layer=conv_out.weight)
    assert set(terms) == {"l2", "lpips", "gan", "gan_weight", "total"}
    expected = float(terms["l2"] + terms["lpips"] + terms["gan_weight"] * terms["gan"])
    assert float(terms["total"]) == pytest.approx(expected, rel=1e-5)
    assert terms["gan_weight"] > 0
    total.backward()
    assert conv_out.weight.grad is not None

    with pytest.raises(ValueError, match="last_layer"):
        full(x_hat, x)


def test_discriminator_loads_local_dino_file(tmp_path, disc):
    from safetensors.torch import save_file

    state = {k: torch.randn_like(v) for k, v in disc.backbone.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))

    loaded = DinoDiscriminator(weights_file=path, hidden=8)
    for key, value in loaded.backbone.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert all(not p.requires_grad for p in loaded.backbone.parameters())


def test_discriminator_trainable_state_skips_backbone(disc):
    from adapt.training import trainable_state

    state = trainable_state(disc)
    assert not any(k.startswith("backbone.") for k in state)
    assert "ema_real" in state
    assert "ema_fake" in state
    assert any(k.startswith("heads.") for k in state)


def test_translate_shifts_by_whole_pixels():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8) + 1  # strictly positive, so zero fill marks the pixels shifted in
    y = translate(x, ratio=0.25)
    for image, shifted in zip(x, y):
        inside = shifted[0] != 0
        rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
        dy, dx = (8 - len(rows)) * (1 if rows[0] > 0 else -1), (8 - len(cols)) * (1 if cols[0] > 0 else -1)
        assert abs(dy) <= 2
        assert abs(dx) <= 2
        torch.testing.assert_close(shifted[0], torch.roll(image[0], (dy, dx), (0, 1)) * inside)


def test_corrupt_backbone_files_raise_checkpoint_error(tmp_path):
    """A bad LPIPS or DINO weights file must name the file instead of failing deep inside torch or timm."""
    from common.tokenizer import CheckpointError

    page = tmp_path / "vgg16.pth"
    page.write_text("<html><body>sign in</body></html>")
    with pytest.raises(CheckpointError, match="vgg16.pth is an HTML page"):
        PerceptualLoss(vgg_file=page)
    for seed in range(6):  # random bytes fail inside torch's unpickler with several exception types
        garbage = tmp_path / f"dino-{seed}.pth"
        garbage.write_bytes(torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(seed),
                                          dtype=torch.uint8).numpy().tobytes())
        with pytest.raises(CheckpointError, match=f"dino-{seed}.pth could not be loaded.*--dino-weights"):
            DinoDiscriminator(weights_file=garbage, hidden=8)
        with pytest.raises(CheckpointError, match=f"dino-{seed}.pth"):
            PerceptualLoss(vgg_file=garbage)
