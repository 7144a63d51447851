"""Tests of the transplant quantizers: every codebook kind in both layouts, on tiny latents."""

import json

import pytest
import torch

from common.quantize import VAR_SCALE_WEIGHTS, FixedScaleQuantizer, MultiScaleQuantizer
from substitute.losses import mmd_loss
from substitute.metrics import quantization_stats
from substitute.quantizers import CODEBOOKS, LAYOUTS, build_quantizer, load_quantizer, save_quantizer
from substitute.quantizers.base import FeatureQueue

KINDS = sorted(CODEBOOKS)
PATCH_NUMS = (1, 2, 4)
DIM = 8
SIZE = 32


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_quantizer(kind, layout, **kwargs):
    torch.manual_seed(0)
    return build_quantizer(kind, layout=layout, codebook_size=SIZE, dim=DIM, patch_nums=PATCH_NUMS, **kwargs)


def tiny_latents(batch=5, seed=1):
    return torch.randn(batch, DIM, 4, 4, generator=torch.Generator().manual_seed(seed))


def expected_tokens(layout):
    return sum(p * p for p in PATCH_NUMS) if layout == "multiscale" else 2 * 4 * 4


def test_registry_lists_all_kinds():
    assert set(CODEBOOKS) == {"vanilla", "ema", "online", "wasserstein", "mmd"}
    assert LAYOUTS == ("multiscale", "fixed")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_quantize_shapes_and_index_range(kind, layout):
    quantizer = tiny_quantizer(kind, layout)
    z = tiny_latents()
    z_q, indices = quantizer.quantize(z)
    assert z_q.shape == z.shape
    assert indices.shape == (5, expected_tokens(layout))
    assert indices.dtype == torch.int64
    assert int(indices.min()) >= 0
    assert int(indices.max()) < SIZE
    assert sum(s.tokens for s in quantizer.segments) == indices.shape[1]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_quantize_equals_rebuild_from_indices(kind, layout):
    quantizer = tiny_quantizer(kind, layout)
    z_q, indices = quantizer.quantize(tiny_latents())
    assert torch.allclose(quantizer.dequantize(indices), z_q, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_quantize_in_eval(kind, layout):
    quantizer = tiny_quantizer(kind, layout).eval()
    z = tiny_latents()
    z_q, indices = quantizer.quantize(z)
    out = quantizer(z)
    assert torch.equal(out.indices, indices)
    assert torch.allclose(out.z_q, z_q, atol=1e-6)
    assert out.loss.dim() == 0
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_straight_through_gradient(kind, layout):
    quantizer = tiny_quantizer(kind, layout).eval()
    z = tiny_latents().requires_grad_(True)
    upstream = torch.randn_like(z)
    out = quantizer(z)
    (out.z_q * upstream).sum().backward()
    assert torch.allclose(z.grad, upstream)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["vanilla", "online", "wasserstein", "mmd"])
def test_gradient_reaches_every_codebook(kind, layout):
    quantizer = tiny_quantizer(kind, layout).eval()
    quantizer(tiny_latents()).loss.backward()
    for codebook in quantizer.codebooks():
        assert codebook.weight.grad is not None
        assert codebook.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_utilization_independent_of_batch_size(kind, layout):
    quantizer = tiny_quantizer(kind, layout).eval()
    z = tiny_latents(batch=12)
    whole = quantization_stats(quantizer, [z])
    single = quantization_stats(quantizer, list(z.split(1)))
    uneven = quantization_stats(quantizer, list(z.split(5)))
    for stats in (single, uneven):
        assert stats["U"] == whole["U"]
        # float32 convolutions round differently for different batch sizes
        assert stats["E"] == pytest.approx(whole["E"], rel=1e-6)
        for segment in quantizer.segments:
            assert stats[f"U/{segment.name}"] == whole[f"U/{segment.name}"]
    assert whole["num_latents"] == 12


def test_quantization_stats_values_by_hand():
    quantizer = tiny_quantizer("vanilla", "fixed").eval()
    z = tiny_latents(batch=3)
    z_q, indices = quantizer.quantize(z)
    stats = quantization_stats(quantizer, [z])
    assert stats["E"] == pytest.approx(float((z_q - z).square().mean()), rel=1e-6)
    half = indices.shape[1] // 2
    used_per_group = [indices[:, :half].unique().numel(), indices[:, half:].unique().numel()]
    assert stats["U"] == pytest.approx(sum(used_per_group) / (2 * SIZE))
    assert stats["U/group0"] == pytest.approx(used_per_group[0] / SIZE)


def test_multiscale_default_scale_weights():
    quantizer = build_quantizer("mmd", codebook_size=16, dim=32)
    assert isinstance(quantizer, MultiScaleQuantizer)
    assert quantizer.scale_weights == tuple(float(w) for w in VAR_SCALE_WEIGHTS)
    assert tiny_quantizer("mmd", "multiscale").scale_weights == (1.0, 1.0, 1.0)


def test_fixed_layout_groups():
    quantizer = build_quantizer("mmd", layout="fixed", codebook_size=16, dim=32, groups=2)
    assert isinstance(quantizer, FixedScaleQuantizer)
    assert [cb.dim for cb in quantizer.codebooks()] == [16, 16]
    assert quantizer.codebooks()[0] is not quantizer.codebooks()[1]
    assert sum(s.tokens for s in quantizer.segments) == 512


def test_public_api_example():
    quantizer = build_quantizer("mmd", layout="multiscale", codebook_size=8192, dim=32)
    z = torch.randn(1, 32, 16, 16)
    z_q, indices = quantizer.quantize(z)
    assert z_q.shape == (1, 32, 16, 16)
    assert indices.shape == (1, 680)


def test_build_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown quantizer kind"):
        build_quantizer("kmeans", codebook_size=8)
    with pytest.raises(ValueError, match="unknown layout"):
        build_quantizer("mmd", layout="pyramid", codebook_size=8)
    with pytest.raises(ValueError, match="equal channel groups"):
        build_quantizer("mmd", layout="fixed", codebook_size=8, dim=9, groups=2)
    with pytest.raises(ValueError, match="invalid options"):
        build_quantizer("ema", codebook_size=8, gamma=0.3)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, layout, tmp_path):
    quantizer = tiny_quantizer(kind, layout)
    quantizer(tiny_latents())  # a training-mode step, so EMA and usage buffers hold non-initial values
    quantizer.eval()
    z = tiny_latents(seed=7)
    save_quantizer(quantizer, tmp_path / "quantizer", stats={"E": 0.5})
    document = json.loads((tmp_path / "quantizer.json").read_text())
    assert document["spec"]["kind"] == kind
    assert document["spec"]["layout"] == layout
    assert document["stats"] == {"E": 0.5}
    for source in (tmp_path, tmp_path / "quantizer", tmp_path / "quantizer.safetensors"):
        loaded = load_quantizer(source).eval()
        for key, value in quantizer.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        assert torch.equal(loaded.quantize(z)[1], quantizer.quantize(z)[1])


def test_saved_spec_records_resolved_options(tmp_path):
    quantizer = build_quantizer("mmd", codebook_size=16, dim=8, patch_nums=(1, 2), gamma=0.3)
    save_quantizer(quantizer, tmp_path / "q")
    spec = json.loads((tmp_path / "q.json").read_text())["spec"]
    assert spec["codebook_args"] == {
        "init": "uniform", "gamma": 0.3, "block_size": 4096, "estimator": "biased", "bandwidth": "mean"
    }
    assert spec["beta"] == 0.0


def test_load_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="quantizer.json"):
        load_quantizer(tmp_path)


@pytest.mark.parametrize("damage,message", [
    ("json_syntax", "is not valid JSON"),
    ("json_list", "is not a saved quantizer"),
    ("weights_garbage", "is not a readable safetensors file"),
    ("weights_other_size", r"does not match the quantizer described .* torch.Size\(\[16, 4\]\)"),
    ("json_without_spec", "has no quantizer spec"),
])
def test_load_damaged_quantizer_names_file(tmp_path, damage, message):
    save_quantizer(build_quantizer("vanilla", layout="multiscale", codebook_size=8, dim=4), tmp_path / "q")
    if damage == "json_syntax":
        (tmp_path / "q.json").write_text("{not json")
    elif damage == "json_list":
        (tmp_path / "q.json").write_text("[1, 2]")
    elif damage == "json_without_spec":
        document = json.loads((tmp_path / "q.json").read_text())
        del document["spec"]
        (tmp_path / "q.json").write_text(json.dumps(document))
    elif damage == "weights_garbage":
        (tmp_path / "q.safetensors").write_bytes(b"junk")
    else:
        save_quantizer(build_quantizer("vanilla", layout="multiscale", codebook_size=16, dim=4), tmp_path / "other")
        (tmp_path / "other.safetensors").replace(tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match=message):
        load_quantizer(tmp_path / "q")


def test_mmd_codebook_loss_is_gamma_times_mmd():
    quantizer = tiny_quantizer("mmd", "fixed", gamma=0.5, block_size=7)
    codebook = quantizer.codebooks()[0]
    features = torch.randn(40, DIM // 2)
    indices = codebook.lookup(features)
    expected = 0.5 * mmd_loss(features, codebook.weight)
    assert codebook.codebook_loss(features, indices).item() == pytest.approx(expected.item(), rel=1e-5)


def test_wasserstein_codebook_init_and_queue():
    quantizer = tiny_quantizer("wasserstein", "multiscale", queue_size=50)
    weight = quantizer.codebook.weight
    assert float(weight.detach().abs().max()) <= 1.0 / SIZE
    quantizer(tiny_latents(batch=2))  # 2 x (1 + 4 + 16) = 42 vectors
    assert len(quantizer.codebook.queue) == 42
    quantizer(tiny_latents(batch=2))
    assert len(quantizer.codebook.queue) == 50
    quantizer.eval()(tiny_latents(batch=2))
    assert len(quantizer.codebook.queue) == 50


def test_ema_codebook_moves_to_assigned_mean():
    quantizer = tiny_quantizer("ema", "fixed", decay=0.8)
    codebook = quantizer.codebooks()[0]
    assert not codebook.weight.requires_grad
    features = torch.randn(30, DIM // 2)
    indices = codebook.lookup(features)
    before = codebook.weight.clone()
    codebook.update(features, indices)
    for code in range(SIZE):
        assigned = features[indices == code]
        if len(assigned):
            assert torch.allclose(codebook.weight[code], assigned.mean(0), atol=1e-5)
        else:
            assert torch.equal(codebook.weight[code], before[code])


def test_online_codebook_replaces_dead_codes():
    quantizer = tiny_quantizer("online", "fixed", usage_decay=0.5, dead_threshold=0.2)
    codebook = quantizer.codebooks()[0]
    features = torch.randn(100, DIM // 2)
    indices = codebook.lookup(features)
    before = codebook.weight.detach().clone()
    codebook.update(features, indices)
    # Averages start at 0, so after one update every code that was not chosen is dead and drawn from the queue.
    chosen = torch.zeros(SIZE, dtype=torch.bool)
    chosen[indices] = True
    assert 0 < int(chosen.sum()) < SIZE
    after = codebook.weight.detach()
    assert torch.equal(after[chosen], before[chosen])
    # each replaced code is a copy of one of the features, compared exactly rather than through a distance
    copies = (after[~chosen, None, :] == features[None, :, :]).all(dim=2)
    assert torch.all(copies.any(dim=1))
    assert torch.all(codebook.usage[~chosen] == 1.0)
    assert torch.all(codebook.usage[chosen] >= 0.5)


def test_feature_queue_keeps_latest():
    queue = FeatureQueue(4)
    queue.push(torch.arange(3.0)[:, None])
    queue.push(torch.arange(3.0, 6.0)[:, None])
    assert sorted(queue.contents().squeeze(1).tolist()) == [2.0, 3.0, 4.0, 5.0]
    queue.push(torch.arange(10.0, 20.0)[:, None])
    assert sorted(queue.contents().squeeze(1).tolist()) == [16.0, 17.0, 18.0, 19.0]


def test_synthetic_mixture_means():
    from substitute.synthetic import sample_mixture

    samples = sample_mixture(20000, 3, 4.0, torch.Generator().manual_seed(0))
    first = samples[:, 0]
    assert float(first[first > 0].mean()) == pytest.approx(2.0, abs=0.1)
    assert float(first[first < 0].mean()) == pytest.approx(-2.0, abs=0.1)
    assert float(samples[:, 1:].std()) == pytest.approx(1.0, abs=0.05)


def test_synthetic_benchmark_rows():
    from substitute.synthetic import SyntheticConfig, main

    cfg = SyntheticConfig(separations=(0.0, 4.0), kinds=("wasserstein", "mmd"), dim=2, codebook_size=8, steps=3,
                          batch_size=64, eval_size=256)
    rows = main(cfg)
    assert [(row["separation"], row["kind"]) for row in rows] == [
        (0.0, "wasserstein"), (0.0, "mmd"), (4.0, "wasserstein"), (4.0, "mmd")
    ]
    for row in rows:
        assert row["E"] > 0
        assert 0 < row["U"] <= 1


def test_quantizer_records_its_tokenizer(tmp_path):
    from substitute.quantizers import check_quantizer_tokenizer

    quantizer = build_quantizer("mmd", codebook_size=16, dim=8, patch_nums=(1, 2))
    save_quantizer(quantizer, tmp_path / "q", provenance={"tokenizer_sha256": "a" * 64})
    loaded = load_quantizer(tmp_path / "q")
    assert loaded.provenance["tokenizer_sha256"] == "a" * 64
    check_quantizer_tokenizer(loaded, "a" * 64, "q")
    with pytest.raises(ValueError, match=f"{'a' * 64}.*{'b' * 64}"):
        check_quantizer_tokenizer(loaded, "b" * 64, "q")
