"""utmos.py: the UTMOS22-strong port loads SpeechMOS's state dict key for key, computes what the reference computes,
and scores real speech sensibly when the real weights are on disk (that last test skips without them)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED, shared_path, synth_clip

import utmos
from utils import UserError

RATE = 16000


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of utmos22_strong_step7459_v1.pt and its shape, as SpeechMOS's module tree names them."""
    shapes = {"domain_emb": (1, 128), "judge_emb": (1, 128), "wav2vec2.mask_emb": (768,)}
    conv = "wav2vec2.feature_extractor.conv_layers"
    shapes[f"{conv}.0.0.weight"] = (512, 1, 10)  # 10-tap, stride 5, no bias, then GroupNorm(512, 512)
    shapes[f"{conv}.0.2.weight"] = shapes[f"{conv}.0.2.bias"] = (512,)
    for i in range(1, 5):
        shapes[f"{conv}.{i}.0.weight"] = (512, 512, 3)
    for i in (5, 6):
        shapes[f"{conv}.{i}.0.weight"] = (512, 512, 2)
    shapes["wav2vec2.layer_norm.weight"] = shapes["wav2vec2.layer_norm.bias"] = (512,)
    shapes["wav2vec2.post_extract_proj.weight"], shapes["wav2vec2.post_extract_proj.bias"] = (768, 512), (768,)
    encoder = "wav2vec2.encoder"
    shapes[f"{encoder}.pos_conv.0.weight_g"] = (1, 1, 128)  # weight_norm over dim 2: one magnitude per tap
    shapes[f"{encoder}.pos_conv.0.weight_v"] = (768, 48, 128)  # 16 groups of 48 channels, kernel 128
    shapes[f"{encoder}.pos_conv.0.bias"] = (768,)
    shapes[f"{encoder}.layer_norm.weight"] = shapes[f"{encoder}.layer_norm.bias"] = (768,)
    for i in range(12):
        layer = f"{encoder}.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}.self_attn.{proj}.weight"], shapes[f"{layer}.self_attn.{proj}.bias"] = (768, 768), (768,)
        shapes[f"{layer}.fc1.weight"], shapes[f"{layer}.fc1.bias"] = (3072, 768), (3072,)
        shapes[f"{layer}.fc2.weight"], shapes[f"{layer}.fc2.bias"] = (768, 3072), (768,)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[f"{layer}.{norm}.weight"] = shapes[f"{layer}.{norm}.bias"] = (768,)
    for suffix in ("", "_reverse"):  # input 768 + 128 + 128, hidden 512, gates x4
        shapes[f"blstm.weight_ih_l0{suffix}"], shapes[f"blstm.weight_hh_l0{suffix}"] = (2048, 1024), (2048, 512)
        shapes[f"blstm.bias_ih_l0{suffix}"] = shapes[f"blstm.bias_hh_l0{suffix}"] = (2048,)
    shapes["projection.0.weight"], shapes["projection.0.bias"] = (2048, 1024), (2048,)
    shapes["projection.2.weight"], shapes["projection.2.bias"] = (1, 2048), (1,)
    return shapes


@pytest.fixture(scope="module")
def model() -> utmos.UTMOS22Strong:
    torch.manual_seed(0)
    return utmos.UTMOS22Strong().eval()


def clips(*seeds: int, seconds: float = 1.0) -> torch.Tensor:
    return torch.from_numpy(np.stack([synth_clip(seconds, RATE, seed=seed) for seed in seeds]))


def windowed_sinc_resample(x: np.ndarray, orig: int, new: int, zero_crossings: int = 6,
                           rolloff: float = 0.99) -> np.ndarray:
    """Band-limited interpolation, evaluated directly in float64: y[j] = sum_n x[n] h(n - j * orig / new), with
    h(d) = (c / orig) sinc(c d / orig) cos²(π c d / (2 W orig)) for |c d / orig| <= W, c = rolloff * min(orig, new):
    the reference's Hann-windowed sinc, written from its definition."""
    c = rolloff * min(orig, new)
    n = np.arange(len(x), dtype=np.float64)
    y = np.empty(int(np.ceil(len(x) * new / orig)))
    for j in range(len(y)):
        u = (n - j * orig / new) * c / orig
        h = np.where(np.abs(u) <= zero_crossings, c / orig * np.sinc(u) * np.cos(np.pi * u / (2 * zero_crossings)) ** 2,
                     0.0)
        y[j] = np.dot(x.astype(np.float64), h)
    return y


@pytest.mark.parametrize("orig, new", [(22050, 16000), (24000, 16000), (44100, 16000), (8000, 16000), (16000, 22050)])
def test_resample_is_the_references_windowed_sinc(orig, new):
    x = np.random.default_rng(orig).standard_normal(1000).astype(np.float32)
    expected = windowed_sinc_resample(x, orig, new)
    got = utmos.resample(torch.from_numpy(x)[None], orig, new)[0].double().numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-5
    stacked = utmos.resample(torch.from_numpy(np.stack([x, 2 * x]))[:, None], orig, new)  # any leading dims
    assert stacked.shape == (2, 1, len(expected)) and torch.allclose(stacked[1, 0], 2 * stacked[0, 0], atol=1e-5)


def test_state_dict_matches_the_published_file(model):
    state = model.state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == expected_shapes()
    assert len(state) == 225


def reference_scores(state: dict[str, torch.Tensor], wave: torch.Tensor) -> torch.Tensor:
    """SpeechMOS's inference written out again with torch's own pieces (its weight-norm op, multi-head attention
    with a key padding mask, fairseq's padding to an even frame count), independently of utmos.py's modules."""
    x = wave.unsqueeze(1)
    conv = "wav2vec2.feature_extractor.conv_layers"
    for i, stride in enumerate((5, 2, 2, 2, 2, 2, 2)):
        x = F.conv1d(x, state[f"{conv}.{i}.0.weight"], stride=stride)
        if i == 0:
            x = F.group_norm(x, 512, state[f"{conv}.0.2.weight"], state[f"{conv}.0.2.bias"])
        x = F.gelu(x)
    x = F.layer_norm(x.transpose(1, 2), (512,), state["wav2vec2.layer_norm.weight"], state["wav2vec2.layer_norm.bias"])
    x = F.linear(x, state["wav2vec2.post_extract_proj.weight"], state["wav2vec2.post_extract_proj.bias"])
    enc = "wav2vec2.encoder"
    weight = torch._weight_norm(state[f"{enc}.pos_conv.0.weight_v"], state[f"{enc}.pos_conv.0.weight_g"], 2)
    position = F.conv1d(x.transpose(1, 2), weight, state[f"{enc}.pos_conv.0.bias"], padding=64, groups=16)
    x = x + F.gelu(position[:, :, :-1]).transpose(1, 2)
    x = F.layer_norm(x, (768,), state[f"{enc}.layer_norm.weight"], state[f"{enc}.layer_norm.bias"])
    frames = x.shape[1]
    pad = frames % 2
    x = F.pad(x, (0, 0, 0, pad)).transpose(0, 1)  # (time, batch, channels)
    mask = torch.zeros(x.shape[1], x.shape[0], dtype=torch.bool)
    mask[:, frames:] = True
    for i in range(12):
        p = f"{enc}.layers.{i}."
        attended = F.multi_head_attention_forward(
            x, x, x, 768, 12, None, torch.cat([state[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]), None, None,
            False, 0.0, state[p + "self_attn.out_proj.weight"], state[p + "self_attn.out_proj.bias"], training=False,
            key_padding_mask=mask if pad else None, need_weights=False, use_separate_proj_weight=True,
            q_proj_weight=state[p + "self_attn.q_proj.weight"], k_proj_weight=state[p + "self_attn.k_proj.weight"],
            v_proj_weight=state[p + "self_attn.v_proj.weight"])[0]
        x = F.layer_norm(x + attended, (768,), state[p + "self_attn_layer_norm.weight"],
                         state[p + "self_attn_layer_norm.bias"])
        hidden = F.linear(F.gelu(F.linear(x, state[p + "fc1.weight"], state[p + "fc1.bias"])), state[p + "fc2.weight"],
                          state[p + "fc2.bias"])
        x = F.layer_norm(x + hidden, (768,), state[p + "final_layer_norm.weight"], state[p + "final_layer_norm.bias"])
    x = x.transpose(0, 1)[:, :frames]
    batch = x.shape[0]
    x = torch.cat([x, state["domain_emb"].expand(batch, frames, -1), state["judge_emb"].expand(batch, frames, -1)], 2)
    lstm = torch.nn.LSTM(1024, 512, batch_first=True, bidirectional=True)
    lstm.load_state_dict({key.removeprefix("blstm."): val for key, val in state.items() if key.startswith("blstm.")})
    x = F.relu(F.linear(lstm(x)[0], state["projection.0.weight"], state["projection.0.bias"]))
    x = F.linear(x, state["projection.2.weight"], state["projection.2.bias"])
    return x.mean(dim=1).squeeze(1) * 2 + 3


@pytest.mark.parametrize("seconds", [1.0, 1.02])  # 49 frames (fairseq pads one), 50 frames (it does not)
def test_scores_match_the_reference_computation(model, seconds):
    wave = clips(0, 1, seconds=seconds)
    with torch.inference_mode():
        expected = reference_scores(model.state_dict(), wave)
    assert torch.allclose(utmos.score(model, wave), expected, atol=1e-4)


def test_score_shape_determinism_and_no_leak_across_the_batch(model):
    batch = clips(0, 1)
    scores = utmos.score(model, batch)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(scores, utmos.score(model, batch))
    alone = torch.cat([utmos.score(model, batch[:1]), utmos.score(model, batch[1:])])
    assert torch.allclose(scores, alone, atol=1e-5)
    assert scores[0] != scores[1]  # (the two clips differ, so must their scores)


def test_gain_barely_moves_the_score(model):
    # The first conv's per-channel GroupNorm cancels a gain, whatever the weights.
    wave = clips(2)
    assert utmos.score(model, 0.5 * wave).item() == pytest.approx(utmos.score(model, wave).item(), abs=1e-2)


def test_score_refuses_bad_shapes(model):
    with pytest.raises(ValueError, match="batch, samples"):
        utmos.score(model, torch.zeros(RATE))
    with pytest.raises(ValueError, match="at least 400 samples"):
        utmos.score(model, torch.zeros(1, 399))


def test_round_trip_through_a_file(model, tmp_path):
    state = model.state_dict()
    wave = clips(3, seconds=0.5)
    expected = utmos.score(model, wave)
    files = {"bare.pt": state, "wrapped.pt": {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}}
    for name, content in files.items():
        path = tmp_path / name
        torch.save(content, path)
        loaded = utmos.load_utmos(path)
        path.unlink()  # ~400 MB each
        assert not loaded.training
        assert torch.equal(utmos.score(loaded, wave), expected), name


@pytest.mark.parametrize("content", [None, b"not a torch file", {"foo": torch.zeros(3)}, {"epoch": 3},
                                     {"projection.2.bias": torch.zeros(2)}])
def test_a_bad_file_names_itself(tmp_path, content):
    path = tmp_path / "my_utmos.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(UserError, match=r"my_utmos\.pt") as error:
        utmos.load_utmos(path)
    message = str(error.value)
    assert "\n" not in message and utmos.UTMOS_URL in message


def real_weights() -> Path:
    for candidate in (os.environ.get("UTMOS_WEIGHTS"), Path(torch.hub.get_dir()) / "checkpoints" / utmos.UTMOS_WEIGHTS,
                      SHARED / "fixtures" / utmos.UTMOS_WEIGHTS):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.skip(f"no {utmos.UTMOS_WEIGHTS} ($UTMOS_WEIGHTS, the torch.hub checkpoint cache or the shared fixtures); "
                "see utmos.py")


def test_real_weights_rank_real_speech_above_damaged_speech():
    weights = real_weights()
    import soundfile as sf

    model = utmos.load_utmos(weights)
    audio, rate = sf.read(sorted(shared_path("ljspeech_sample", "wavs").glob("*.wav"))[0], dtype="float32")
    clean = utmos.resample(torch.from_numpy(audio), rate).numpy()  # 22050 -> 16000, as SpeechMOS resamples
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(len(clean)) * np.sqrt(np.mean(clean**2) / 10 ** (5 / 10))  # SNR 5 dB
    peak = np.abs(clean).max()
    versions = {"clean": clean, "noisy": clean + noise, "clipped": np.clip(clean, -0.1 * peak, 0.1 * peak),
                "half": 0.5 * clean}
    scores = {name: utmos.score(model, torch.tensor(np.asarray(wave, dtype=np.float32))[None]).item()
              for name, wave in versions.items()}
    assert scores["clean"] > 3.5, scores
    assert scores["clean"] - scores["noisy"] > 1.0, scores
    assert scores["clean"] - scores["clipped"] > 1.0, scores
    assert abs(scores["clean"] - scores["half"]) < 0.3, scores
