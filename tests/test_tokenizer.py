"""VAR tokenizer architecture, checkpoint loading and the native quantizer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from common.quantize import Codebook, MultiScaleQuantizer, SharedPhis, usage_counts
from common.tokenizer import PRESETS, build_tokenizer, load_tokenizer, save_tokenizer
from common.tokenizer import CheckpointError

KEYS_TSV = Path(__file__).parent / "data" / "var_vae_ch160v4096z32.keys.tsv"


def reference_shapes() -> dict[str, tuple[int, ...]]:
    rows = KEYS_TSV.read_text().splitlines()[1:]
    return {key: tuple(ast.literal_eval(shape)) for key, shape, _ in (row.split("\t") for row in rows)}


def random_var_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}


def test_var_preset_has_checkpoint_keys_and_shapes():
    model = build_tokenizer("var")
    mine = {k: tuple(v.shape) for k, v in model.var_state_dict().items()}
    assert mine == reference_shapes()


@pytest.mark.slow
def test_real_key_set_loads_strictly(tmp_path):
    path = tmp_path / "vae_ch160v4096z32.pth"
    torch.save(random_var_state(reference_shapes()), path)
    model = load_tokenizer(path)
    assert model.config == PRESETS["var"]
    assert len(model.sha256) == 64
    assert torch.equal(model.quantizer.codebook.embedding.weight, torch.load(path)["quantize.embedding.weight"])


def test_safetensors_round_trip(tmp_path, tiny_tokenizer):
    path = save_tokenizer(tiny_tokenizer, tmp_path / "copy")
    again = load_tokenizer(path)
    assert again.config == tiny_tokenizer.config
    for (k, a), (_, b) in zip(tiny_tokenizer.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_demo_preset_latent_shape(tiny_tokenizer):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = tiny_tokenizer.encode(x)
    assert z.shape == (2, 32, 16, 16)
    z_q, idx = tiny_tokenizer.quantizer.quantize(z)
    assert z_q.shape == z.shape
    assert idx.shape == (2, 680)
    assert idx.dtype == torch.int64
    assert tiny_tokenizer.decode(z_q).abs().max() <= 1


def test_indices_rebuild_quantized_latents(tiny_tokenizer):
    z = torch.randn(3, 32, 16, 16)
    z_q, idx = tiny_tokenizer.quantizer.quantize(z)
    torch.testing.assert_close(tiny_tokenizer.quantizer.dequantize(idx), z_q, atol=1e-5, rtol=1e-5)


def test_quantize_is_nearest_code_at_last_scale():
    torch.manual_seed(0)
    q = MultiScaleQuantizer(Codebook(16, 4), patch_nums=(1, 2))
    z = torch.randn(2, 4, 2, 2)
    _, idx = q.quantize(z)
    # Rebuild the residual before the last scale by hand and check the last scale's choice is the argmin.
    first = q.codebook.embed(idx[:, :1]).view(2, 4, 1, 1).expand(2, 4, 2, 2)
    h = torch.nn.functional.interpolate(first.contiguous(), size=(2, 2), mode="bicubic")
    rest = z - q.quant_resi(h, 0, 2)
    vectors = rest.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(vectors, q.codebook.weight.detach()).argmin(dim=1)
    assert torch.equal(idx[:, 1:].reshape(-1), expected)


@pytest.mark.parametrize("scale,expected", [(0, 0), (1, 0), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2), (7, 3), (8, 3), (9, 3)])
def test_phi_choice_for_ten_scales(scale, expected):
    # Ticks 1/12, 13/36, 23/36, 11/12 against k/9. Scale 2 (2/9) is equally far from the first two ticks in exact
    # arithmetic; VAR's float64 rounding gives it the second φ.
    assert SharedPhis(4, 4).index_for(scale, 10) == expected


def test_usage_counts_per_scale(tiny_tokenizer):
    z = torch.randn(2, 32, 16, 16)
    _, idx = tiny_tokenizer.quantizer.quantize(z)
    counts = usage_counts(tiny_tokenizer.quantizer, idx)
    assert counts.shape == (10, 256)
    assert counts.sum(dim=1).tolist() == [2 * p * p for p in PRESETS["var"].patch_nums]


def test_encode_rejects_bad_input(tiny_tokenizer):
    with pytest.raises(TypeError, match="uint8"):
        tiny_tokenizer.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="3, H, W"):
        tiny_tokenizer.encode(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="divisible"):
        tiny_tokenizer.encode(torch.zeros(1, 3, 62, 62))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny_tokenizer.encode(torch.full((1, 3, 64, 64), 255.0))
    tiny_tokenizer.encode(torch.full((1, 3, 64, 64), 1.01))


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_tokenizer(tmp_path / "nothing.pth")


@pytest.mark.parametrize(
    "content,message",
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "Git LFS pointer"),
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "HTML page"),
    ],
)
def test_non_checkpoint_files_are_named(tmp_path, content, message):
    path = tmp_path / "vae.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_tokenizer(path)


def test_truncated_checkpoint(tmp_path, tiny_tokenizer):
    path = tmp_path / "vae.pth"
    torch.save(tiny_tokenizer.var_state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_tokenizer(path)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"encoder.conv_in.weight": torch.zeros(1), "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_tokenizer(path)
    assert "this must never run" not in capsys.readouterr().out


def test_other_model_lists_few_keys(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({f"layer{i}.weight": torch.zeros(2) for i in range(300)}, path)
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(path)
    assert "not a VAR-family tokenizer" in str(err.value)
    assert str(err.value).count("layer") <= 5


def test_wrong_shape_names_tensor(tmp_path, tiny_tokenizer):
    state = tiny_tokenizer.var_state_dict()
    state["post_quant_conv.weight"] = torch.zeros(32, 32, 1, 1)
    path = tmp_path / "vae.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"post_quant_conv.weight has shape \(32, 32, 1, 1\).*\(32, 32, 3, 3\)"):
        load_tokenizer(path)


def test_unexpected_key_is_listed(tmp_path, tiny_tokenizer):
    state = tiny_tokenizer.var_state_dict()
    state["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "vae.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="decoder.extra.weight"):
        load_tokenizer(path)


def test_usage_buffer_of_other_scale_count_only_warns(tmp_path, tiny_tokenizer, caplog):
    state = tiny_tokenizer.var_state_dict()
    state["quantize.ema_vocab_hit_SV"] = torch.ones(7, 256)
    path = tmp_path / "vae.pth"
    torch.save(state, path)
    model = load_tokenizer(path)
    assert "usage statistics are reset" in caplog.text
    assert model.quantizer.ema_vocab_hit_SV.shape == (10, 256)


def test_random_bytes_pth_called_corrupt(tmp_path):
    """Bytes that are no pickle at all are a corrupt download, not a checkpoint refused for its classes."""
    for seed in range(8):
        path = tmp_path / f"garbage-{seed}.pth"
        path.write_bytes(torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.uint8).numpy().tobytes())
        with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
            load_tokenizer(path)
        assert "could run code" not in str(info.value)
