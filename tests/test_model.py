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


# ---------------------------------------------------------------------------------------------
# The fast paths compute the same networks and step as the plain ones (CPU equivalence; the GPU speed is bench.py's)
# ---------------------------------------------------------------------------------------------

def test_period_discriminator_convolves_each_phase_as_the_official_2d_image_does():
    torch.manual_seed(0)
    discriminator = model.DiscriminatorP(3, width_divisor=8).eval()
    audio = torch.randn(2, 1, 1000)  # 1000 % 3 != 0: the reflect padding too
    score, feature_maps = discriminator(audio)
    # The official computation: (k, 1) Conv2d over the [T / period, period] image, written out independently.
    x = torch.nn.functional.pad(audio, (0, 2), "reflect").view(2, 1, 334, 3)
    official_maps = []
    for layer in discriminator.convs:
        x = torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(
            x, layer.weight, layer.bias, layer.stride, layer.padding), model.LRELU_SLOPE)
        official_maps.append(x)
    x = torch.nn.functional.conv2d(x, discriminator.conv_post.weight, discriminator.conv_post.bias, 1, (1, 0))
    official_maps.append(x)
    torch.testing.assert_close(score, torch.flatten(x, 1), rtol=1e-5, atol=1e-6)
    # Folded maps hold the same values, phase by phase (what the averaging losses see).
    for folded, official in zip(feature_maps, official_maps):
        torch.testing.assert_close(folded.view(2, 3, official.shape[1], -1).permute(0, 2, 3, 1), official,
                                   rtol=1e-5, atol=1e-6)


def test_channels_last_layout_computes_the_same_networks_and_losses():
    torch.manual_seed(0)
    generator = model.Generator(TINY).eval()
    mpd, msd = MultiPeriodDiscriminator((2, 3), 8).eval(), MultiScaleDiscriminator(8).eval()
    mel, audio = torch.randn(2, TINY.num_mels, 12), torch.randn(2, 1, 12 * TINY.hop_size).clamp(-1, 1)
    plain = (generator(mel), mpd(audio, generator(mel)), msd(audio, generator(mel)))
    model.channels_last(generator, mpd, msd)
    fast = (generator(mel), mpd(audio, generator(mel)), msd(audio, generator(mel)))
    assert fast[0].shape == plain[0].shape and fast[0].dim() == 3
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-6)
    for plain_out, fast_out in zip(plain[1:], fast[1:]):
        torch.testing.assert_close(fast_out[0], plain_out[0], rtol=1e-5, atol=1e-6)  # scores
        assert fast_out[2][0][0].dim() == 4  # feature maps really were channels-last [N, C, 1, T]
        torch.testing.assert_close(model.feature_matching_loss(fast_out[2], fast_out[3]),
                                   model.feature_matching_loss(plain_out[2], plain_out[3]), rtol=1e-5, atol=1e-6)


def test_full_precision_networks_run_float32_under_autocast():
    """--mixed_precision_networks discriminators: the generator marked full_precision computes its exact fp32 output
    under the bf16 autocast accelerate wraps around its forward, while unmarked networks run in bf16."""
    torch.manual_seed(0)
    generator = model.Generator(TINY).eval()
    mpd, msd = MultiPeriodDiscriminator((2, 3), 8).eval(), MultiScaleDiscriminator(8).eval()
    mel, audio = torch.randn(2, TINY.num_mels, 12), torch.randn(2, 1, 12 * TINY.hop_size).clamp(-1, 1)
    audio_generated = generator(mel)
    plain = (audio_generated, mpd(audio, audio_generated), msd(audio, audio_generated))

    def under_autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return generator(mel), mpd(audio, audio_generated), msd(audio, audio_generated)
    mixed = under_autocast()
    assert not torch.equal(mixed[0], plain[0]) and mixed[1][2][0][1].dtype == torch.bfloat16  # autocast took hold
    model.full_precision(generator)
    generator_only = under_autocast()
    assert torch.equal(generator_only[0], plain[0])
    assert generator_only[1][2][0][1].dtype == torch.bfloat16  # the discriminators still in bf16
    model.full_precision(mpd, msd)
    everything = under_autocast()
    for plain_out, out in zip(plain[1:], everything[1:]):
        assert all(torch.equal(a, b) for a, b in zip(plain_out[0], out[0]))  # scores
        assert out[2][0][1].dtype == torch.float32


def _tiny_training(fused: bool):
    import accelerate
    torch.manual_seed(0)
    generator = model.Generator(TINY)
    mpd, msd = MultiPeriodDiscriminator((2, 3), 8), MultiScaleDiscriminator(8)
    optim_g = torch.optim.AdamW(generator.parameters(), 2e-4, betas=(0.8, 0.99), fused=fused)
    optim_d = torch.optim.AdamW([*mpd.parameters(), *msd.parameters()], 2e-4, betas=(0.8, 0.99), fused=fused)
    return accelerate.Accelerator(cpu=True), generator, mpd, msd, optim_g, optim_d


def test_fused_adamw_step_trains_like_the_plain_one_and_skips_nonfinite_steps_on_the_device():
    from utils import mel_spectrogram
    audio = 0.5 * torch.sin(torch.arange(2 * 2048).view(2, 2048) * 0.05)
    mel = mel_spectrogram(audio, **TINY.mel_kwargs())
    runs = {}
    for fused in (False, True):
        accelerator, generator, mpd, msd, optim_g, optim_d = _tiny_training(fused)
        losses = [model.train_step(accelerator, generator, mpd, msd, optim_g, optim_d, mel, audio, mel,
                                   TINY.mel_kwargs(for_loss=True)) for _ in range(3)]
        runs[fused] = [float(result["loss_generator"]) for result in losses]
        # the fused path's flags stay on the device (no host synchronisation inside the step)
        assert isinstance(losses[-1]["generator_stepped"], torch.Tensor) == fused
        before = {k: v.clone() for k, v in generator.state_dict().items()}
        result = model.train_step(accelerator, generator, mpd, msd, optim_g, optim_d, mel * float("nan"), audio,
                                  mel, TINY.mel_kwargs(for_loss=True))
        assert not bool(result["generator_stepped"])
        assert all(torch.equal(before[k], v) for k, v in generator.state_dict().items())
        assert all(float(state["step"]) == 3 for state in optim_g.state.values())  # the skipped step is not counted
    # Same losses to fp32 rounding after three steps (fused and foreach AdamW order their arithmetic differently).
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


def test_the_generator_pass_computes_no_discriminator_gradients_and_trains_the_same(monkeypatch):
    """The discriminators are frozen while the generator's loss goes back through them: each of their parameters
    gets its gradient once a step (the discriminator step), and the weights after the steps equal those of the step
    that computed and threw away the extra gradients."""
    import contextlib

    import hifigan.losses
    from utils import mel_spectrogram
    audio = 0.5 * torch.sin(torch.arange(2 * 2048).view(2, 2048) * 0.05)
    mel = mel_spectrogram(audio, **TINY.mel_kwargs())
    weights = {}
    for freeze in (True, False):
        if not freeze:
            monkeypatch.setattr(hifigan.losses, "frozen", lambda *modules: contextlib.nullcontext())
        accelerator, generator, mpd, msd, optim_g, optim_d = _tiny_training(fused=True)
        calls = []
        for parameter in [*mpd.parameters(), *msd.parameters()]:
            parameter.register_hook(lambda grad, calls=calls: calls.append(1))
        for _ in range(2):
            model.train_step(accelerator, generator, mpd, msd, optim_g, optim_d, mel, audio, mel,
                             TINY.mel_kwargs(for_loss=True))
        parameters = len(list(mpd.parameters())) + len(list(msd.parameters()))
        assert len(calls) == (1 if freeze else 2) * 2 * parameters
        assert all(p.requires_grad for p in [*mpd.parameters(), *msd.parameters()])  # restored
        weights[freeze] = [t.clone() for m in (generator, mpd, msd) for t in m.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(weights[True], weights[False]))


def test_step_log_fetches_device_flags_in_batches_and_reports_each_skipped_step(capsys):
    import accelerate
    from tqdm import tqdm

    from training import StepLog
    accelerator = accelerate.Accelerator(cpu=True)
    log = StepLog(accelerator, tqdm(disable=True), 0, tracker_every=4, console_every=4)
    flags = [True, False, False, True]  # step 2 and 3 skipped by the generator
    for step, good in enumerate(flags, 1):
        log.count(step, {"discriminator": torch.tensor(True), "generator": torch.tensor(good)})
        if step < 4:  # tensors wait for the step that is due for logging
            assert log.pending and "non-finite" not in capsys.readouterr().out
    assert not log.pending and log.nonfinite_total == 2 and log.nonfinite_in_a_row == 0
    out = capsys.readouterr().out
    assert "step 2: non-finite loss or gradient, generator step skipped (1 in a row)" in out
    assert "step 3: non-finite loss or gradient, generator step skipped (2 in a row)" in out
    assert log.too_many_nonfinite(2) == "2 steps in a row had a non-finite loss or gradient (the last at step 3)"
    assert log.too_many_nonfinite(2) is None  # reported once


def test_channels_last_training_steps_match_the_plain_layout():
    """Backward too: the same losses and weights after steps in either layout (fp32 on the CPU)."""
    from utils import mel_spectrogram
    audio = 0.5 * torch.sin(torch.arange(2 * 2048).view(2, 2048) * 0.05)
    mel = mel_spectrogram(audio, **TINY.mel_kwargs())
    runs = {}
    for layout in (False, True):
        accelerator, generator, mpd, msd, optim_g, optim_d = _tiny_training(fused=True)
        model.channels_last(generator, mpd, msd, enabled=layout)
        losses = [float(model.train_step(accelerator, generator, mpd, msd, optim_g, optim_d, mel, audio, mel,
                                         TINY.mel_kwargs(for_loss=True))["loss_generator"]) for _ in range(2)]
        runs[layout] = losses, generator.state_dict()
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, rtol=1e-4, atol=1e-5)
