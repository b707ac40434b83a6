"""Generator/discriminator structure, official-checkpoint parity, losses and the export round trip."""

import json

import pytest
import torch
from conftest import TINY_CONFIG, shared_path

import model
from model import (
    HifiGanConfig,
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    build_generator,
    load_generator,
    save_generator,
    to_official_names,
)
from utils import UserError

TINY = TINY_CONFIG


def official_shapes():
    return json.loads(shared_path("fixtures", "official_state_dict_shapes.json").read_text())


@pytest.mark.parametrize("preset", ["v1", "v2", "v3"])
def test_presets_match_official_shapes_and_counts_shared_fixture(preset):
    shapes = official_shapes()
    generator = build_generator(preset)
    ours = {k: list(v.shape) for k, v in to_official_names(generator.state_dict()).items()}
    assert ours == shapes[f"generator_{preset}"]
    generator.remove_weight_norm()
    expected = shapes[f"generator_{preset}_params_after_weight_norm_removal"]
    assert sum(p.numel() for p in generator.parameters()) == expected


def test_discriminators_match_official_shapes_shared_fixture():
    shapes = official_shapes()
    for module, name in ((MultiPeriodDiscriminator(), "mpd"), (MultiScaleDiscriminator(), "msd")):
        ours = {k: list(v.shape) for k, v in to_official_names(module.state_dict()).items()}
        assert ours == shapes[name]
        # and back: official names map onto exactly our parameter names
        assert set(model.from_official_names(to_official_names(module.state_dict()))) == set(module.state_dict())


def test_official_v2_checkpoint_reproduces_official_audio_shared_fixture():
    io = torch.load(shared_path("fixtures", "official_v2_io.pt"), map_location="cpu", weights_only=True)
    with pytest.warns(UserWarning, match="V2"):
        generator = load_generator(shared_path("fixtures", "official_v2_generator.pt"))
    with torch.no_grad():
        audio = generator(io["mel"])
    assert audio.shape == io["audio"].shape
    assert (audio - io["audio"]).abs().max().item() <= 1e-4
    # folding weight norm changes no output
    with torch.no_grad():
        folded = generator.remove_weight_norm()(io["mel"])
    assert (folded - io["audio"]).abs().max().item() <= 1e-4


def test_real_v2_weights_load_as_v2_shared_fixture():
    with pytest.warns(UserWarning, match="V2"):
        generator = load_generator(shared_path("fixtures", "generator_v2"))
    assert generator.config.upsample_initial_channel == 128 and not generator.training


@pytest.mark.parametrize("config", [TINY, HifiGanConfig(upsample_initial_channel=32)])
def test_generator_output_length_is_frames_times_hop(config):
    generator = model.Generator(config)
    mel = torch.randn(2, config.num_mels, 7)
    assert generator(mel).shape == (2, 1, 7 * config.hop_size)


def test_export_round_trip_folds_weight_norm_and_keeps_output(tmp_path):
    generator = model.Generator(TINY).eval()
    mel = torch.randn(1, 80, 10)
    with torch.no_grad():
        expected = generator(mel)
    save_generator(generator, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["upsample_initial_channel"] == 16
    loaded = load_generator(tmp_path)
    from safetensors.torch import load_file
    assert not any("parametrizations" in k for k in load_file(tmp_path / "generator.safetensors"))  # stored folded
    with torch.no_grad():
        assert torch.allclose(loaded(mel), expected, atol=1e-5)
        # folded_copy: the same output, plain weights, and the original keeps its weight norm
        folded = generator.folded_copy()
        assert not any("parametrizations" in k for k in folded.state_dict())
        assert any("parametrizations" in k for k in generator.state_dict())
        assert torch.allclose(folded(mel), expected, atol=1e-5) and torch.allclose(generator(mel), expected)


def test_load_generator_refuses_wrong_config_naming_tensor(tmp_path):
    torch.save({"generator": to_official_names(build_generator("v2").state_dict())}, tmp_path / "g_00000001")
    with pytest.raises(UserError, match=r"conv_pre.*looks like v2"):
        load_generator(tmp_path / "g_00000001", config="v1")


def test_load_generator_refuses_discriminator_file(tmp_path):
    torch.save({"mpd": {}, "msd": {}}, tmp_path / "do_00000001")
    with pytest.raises(UserError, match="discriminator checkpoint"):
        load_generator(tmp_path / "do_00000001")


def test_discriminator_outputs_and_feature_maps():
    mpd, msd = MultiPeriodDiscriminator((2, 3), width_divisor=8), MultiScaleDiscriminator(width_divisor=8)
    audio, generated = torch.randn(2, 1, 2047), torch.randn(2, 1, 2047)  # odd length exercises period padding
    real, fake, real_maps, fake_maps = mpd(audio, generated)
    assert len(real) == len(fake) == 2 and all(len(m) == 6 for m in real_maps)
    assert [m.shape for m in fake_maps[1]] == [m.shape for m in real_maps[1]]
    real, _, real_maps, _ = msd(audio, generated)
    assert len(real) == 3 and all(len(m) == 8 for m in real_maps)
    # the pooled scales see shorter signals
    assert real_maps[0][0].shape[-1] > real_maps[1][0].shape[-1] > real_maps[2][0].shape[-1]


def test_losses_have_the_lsgan_optimum():
    ones, zeros = [torch.ones(3, 5)], [torch.zeros(3, 5)]
    assert model.discriminator_loss(ones, zeros).item() == 0.0
    assert model.discriminator_loss(zeros, ones).item() == 2.0
    assert model.generator_loss(ones).item() == 0.0 and model.generator_loss(zeros).item() == 1.0
    maps = [[torch.ones(2, 3), torch.zeros(2, 3)]]
    assert model.feature_matching_loss(maps, maps).item() == 0.0
    assert model.feature_matching_loss(maps, [[torch.zeros(2, 3), torch.zeros(2, 3)]]).item() == 1.0
