"""inference.py: every input kind through the CLI, chunked vocoding, batching, bf16, Griffin-Lim, bad inputs."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import HANG_TIMEOUT, REPO, TINY_CONFIG, shared_path, synth_clip

import inference
import model
import utils
import vocoding
from model import Generator, HifiGanConfig
from tacotron2 import Tacotron2, Tacotron2Config, load_tacotron2, save_tacotron2
from tacotron2.teacher_forcing import text_to_mel
from utils import MelConfig, db_mel_to_log_mel, load_audio, mel_spectrogram

TINY = TINY_CONFIG
HOP = 256
TINY_TACOTRON = dict(symbols_embedding_dim=16, encoder_embedding_dim=16, decoder_rnn_dim=24, prenet_dim=8,
                     attention_rnn_dim=24, attention_dim=8, attention_location_n_filters=4,
                     attention_location_kernel_size=7, postnet_embedding_dim=12, n_mel_channels=80,
                     max_decoder_steps=12)


@pytest.fixture(scope="module")
def tiny_vocoder(tiny_checkpoint) -> Generator:
    return vocoding.load_vocoder(tiny_checkpoint)


@pytest.fixture(scope="module")
def clip_mel() -> torch.Tensor:
    """~3 s of speech-like signal -> mel [80, 258]."""
    return mel_spectrogram(torch.from_numpy(synth_clip(3.0)), **TINY.mel_kwargs())


def mel_l1(audio: torch.Tensor, reference_mel: torch.Tensor, config: HifiGanConfig = TINY) -> float:
    return (mel_spectrogram(audio, **config.mel_kwargs()) - reference_mel).abs().mean().item()


def run_cli(*args, capsys=None) -> tuple[int, str, str]:
    """inference.py's command line in-process (utils.run_cli over inference.main): (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(lambda: inference.main([str(a) for a in args]))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def wav_frames(path: Path) -> tuple[int, int]:
    info = sf.info(str(path))
    return info.frames, info.samplerate


# --------------------------------------------------------------------------------------------- every way in

def test_npy_file_and_folder(tmp_path, tiny_checkpoint, clip_mel, capsys):
    mels = tmp_path / "mels"
    mels.mkdir()
    for name, frames in (("a", 40), ("b", 75), ("c", 258)):
        np.save(mels / f"{name}.npy", clip_mel[:, :frames].numpy())
    np.save(tmp_path / "single.npy", clip_mel[None, :, :33].numpy())  # a leading batch of 1 is accepted
    code, out, _ = run_cli("--checkpoint", tiny_checkpoint, "--input", tmp_path / "single.npy", mels,
                           "--output_dir", tmp_path / "out", "--batch_size", "2", capsys=capsys)
    assert code == 0
    for name, frames in (("single", 33), ("a", 40), ("b", 75), ("c", 258)):
        assert wav_frames(tmp_path / "out" / f"{name}.wav") == (frames * HOP, 22050)
    assert "real time" in out and "cpu" in out and "float32" in out


def test_wav_and_manifest_copy_synthesis(tmp_path, tiny_checkpoint, tiny_corpus, capsys):
    train_manifest, test_manifest = tiny_corpus
    wav = train_manifest.parent / "wavs" / "train_003.wav"
    code, _, _ = run_cli("--checkpoint", tiny_checkpoint, "--input", wav, test_manifest,
                         "--output_dir", tmp_path, "--max_chunk_frames", "20", capsys=capsys)
    assert code == 0
    for source in (wav, *sorted((train_manifest.parent / "wavs").glob("test_*.wav"))):
        expected = len(load_audio(source, 22050)) // HOP * HOP
        assert wav_frames(tmp_path / f"{source.stem}.wav") == (expected, 22050)


@pytest.fixture(scope="module")
def tiny_tacotron(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tacotron")
    save_tacotron2(Tacotron2(Tacotron2Config(**TINY_TACOTRON)), folder)
    return folder


def test_text_to_speech(tmp_path, tiny_checkpoint, tiny_tacotron, capsys):
    code, _, _ = run_cli("--checkpoint", tiny_checkpoint, "--taco_weights", tiny_tacotron,
                         "--text", "Hello world.", "A second, longer sentence to speak.",
                         "--output_dir", tmp_path, capsys=capsys)
    assert code == 0
    for name in ("text_000", "text_001"):
        frames, rate = wav_frames(tmp_path / f"{name}.wav")
        assert rate == 22050 and frames % HOP == 0 and 0 < frames <= TINY_TACOTRON["max_decoder_steps"] * HOP

    lines = tmp_path / "lines.txt"
    lines.write_text("First line.\n\nSecond line.\n")
    code, _, _ = run_cli("--checkpoint", tiny_checkpoint, "--taco_weights", tiny_tacotron, "--text_file", lines,
                         "--max_decoder_steps", "5", "--output_dir", tmp_path / "file", capsys=capsys)
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "file").iterdir()) == ["text_000.wav", "text_001.wav"]


def test_text_to_mel_converts_a_db_tacotron(tmp_path, tiny_tacotron):
    torch.manual_seed(0)
    save_tacotron2(Tacotron2(Tacotron2Config(**TINY_TACOTRON)), tmp_path,
                   extra={"audio": {"mel_scale": "db", "min_db": -100.0, "max_scaled_abs": 4.0}})
    log_model, db_model = load_tacotron2(tiny_tacotron), load_tacotron2(tmp_path)
    # the mel settings travel with the checkpoint (config.json's "audio"): a model made here has the repo's defaults
    assert log_model.mel == MelConfig()
    assert db_model.mel.mel_scale == "db" and db_model.mel.audio_peak == 0.95 and not db_model.mel.center
    torch.manual_seed(1)  # the prenet's dropout stays on at inference
    as_is, alignment = text_to_mel(log_model, "Hello.", TINY.mel, max_decoder_steps=6)
    torch.manual_seed(1)
    converted, _ = text_to_mel(db_model, "Hello.", TINY.mel, max_decoder_steps=6)
    assert as_is.shape[0] == 80 and alignment.shape[0] == as_is.shape[1]
    torch.testing.assert_close(converted, db_mel_to_log_mel(as_is))


def test_official_v2_resynthesis_shared_fixture(tmp_path):
    checkpoint = shared_path("fixtures", "generator_v2")
    wav = shared_path("ljspeech_sample", "wavs", "LJ001-0008.wav")
    result = subprocess.run([sys.executable, "inference.py", "--checkpoint", str(checkpoint), "--input", str(wav),
                             "--output_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=HANG_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "V2" in result.stderr and "Traceback" not in result.stderr  # the guessed preset, said in one line
    config = HifiGanConfig.from_preset("v2")
    reference = vocoding.mel_from_wav(wav, config)
    audio, rate = sf.read(str(tmp_path / "LJ001-0008.wav"), dtype="float32")
    assert rate == 22050 and len(audio) == reference.shape[1] * HOP
    # The authors' weights give about 0.33 through the official code.
    assert mel_l1(torch.from_numpy(audio), reference, config) < 0.5


# --------------------------------------------------------------------------------------------- vocoding

def test_chunked_equals_whole_away_from_joins(tiny_vocoder, clip_mel):
    whole = vocoding.vocode(tiny_vocoder, clip_mel)
    assert whole.dtype == torch.float32 and whole.shape == (clip_mel.shape[1] * HOP,)
    assert not whole.is_inference()  # callers may scale it in place
    chunked = vocoding.vocode(tiny_vocoder, clip_mel, max_chunk_frames=64, overlap_frames=16)
    assert chunked.shape == whole.shape
    assert (chunked - whole).abs().max() < 1e-4  # 16 frames of context cover the receptive field

    def max_jump_near_joins(audio: torch.Tensor) -> float:
        return max(audio[join * HOP - 512:join * HOP + 512].diff().abs().max().item()
                   for join in range(64, clip_mel.shape[1], 64))

    whole_jump = whole.diff().abs().max().item()
    # Little context: the chunks differ from the whole a little, and the crossfade keeps the joins smooth.
    short_context = vocoding.vocode(tiny_vocoder, clip_mel, max_chunk_frames=64, overlap_frames=4)
    assert 0 < (short_context - whole).abs().max() < 0.01
    assert max_jump_near_joins(short_context) <= 1.05 * whole_jump
    # The check sees a click when there is one: no context and no crossfade.
    hard_cut = vocoding.vocode(tiny_vocoder, clip_mel, max_chunk_frames=64, overlap_frames=0)
    assert max_jump_near_joins(hard_cut) > 1.05 * whole_jump


def test_vocode_batch_matches_one_by_one(tiny_vocoder, clip_mel):
    mels = [clip_mel[:, :50], clip_mel, clip_mel[:, 7:130]]
    outputs = vocoding.vocode_batch(tiny_vocoder, mels, max_chunk_frames=200, batch_size=2)
    for mel, audio in zip(mels, outputs):
        alone = vocoding.vocode(tiny_vocoder, mel, max_chunk_frames=200)
        assert audio.shape == alone.shape == (mel.shape[1] * HOP,) and not audio.is_inference()
        assert (audio - alone).abs().max() < 1e-5  # to the last sample: the padding does not leak in


def test_a_clip_does_not_depend_on_its_batch_mates_or_the_batch_size(tiny_vocoder, clip_mel):
    context = vocoding.context_frames(TINY)
    # A long mel, one of its length, and shorter ones: longer and shorter than the re-vocoded tail, and one frame.
    mels = [clip_mel, clip_mel[:, 40:], clip_mel[:, 9:9 + clip_mel.shape[1] - 40], clip_mel[:, 3:90],
            clip_mel[:, 5:5 + 2 * context], clip_mel[:, 11:11 + context], clip_mel[:, 20:21]]
    alone = [vocoding.vocode(tiny_vocoder, mel) for mel in mels]
    for batch_size in (2, 3, len(mels)):
        for mel, batched, single in zip(mels, vocoding.vocode_batch(tiny_vocoder, mels, batch_size=batch_size),
                                        alone):
            assert batched.shape == single.shape
            assert (batched - single).abs().max() < 1e-5, (mel.shape, batch_size)


def test_context_frames_cover_the_receptive_field():
    """Cutting a mel changes its audio only within context_frames of the cut, at either end, in every preset's
    architecture (with few channels: the reach does not depend on them)."""
    torch.manual_seed(0)
    for name in ("v2", "v3", "44khz"):
        config = dataclasses.replace(model.PRESETS[name], upsample_initial_channel=32)
        generator = Generator(config).remove_weight_norm().eval()
        context, hop = vocoding.context_frames(config), config.hop_size
        mel = torch.randn(1, config.num_mels, 3 * context) - 5
        with torch.no_grad():
            whole = generator(mel)[0, 0]
            end_cut = generator(mel[..., :2 * context])[0, 0]
            start_cut = generator(mel[..., context:])[0, 0]
        assert (whole[:context * hop] - end_cut[:context * hop]).abs().max() < 1e-6, name
        assert (whole[2 * context * hop:] - start_cut[context * hop:]).abs().max() < 1e-6, name
        assert (whole[:2 * context * hop] - end_cut).abs().max() > 1e-3, name  # the check sees a leak


def test_batched_real_v2_equals_alone_on_ljspeech_shared():
    """The authors' V2 on real speech: LJ001-0008 beside the longer LJ001-0002 (padding leaked ~3e-3 into its last
    ~10 frames) as alone, to float32 rounding."""
    wavs = shared_path("ljspeech_sample", "wavs")
    generator = vocoding.load_vocoder(shared_path("fixtures", "generator_v2"), config="v2")
    short, longer = (vocoding.mel_from_wav(wavs / f"{stem}.wav", generator.config) for stem in ("LJ001-0008",
                                                                                                "LJ001-0002"))
    alone = vocoding.vocode(generator, short)
    batched = vocoding.vocode_batch(generator, [longer, short], batch_size=2)[1]
    assert (batched - alone).abs().max() < 2e-4


def test_bfloat16_on_cpu_is_close_to_float32(tiny_checkpoint, tiny_vocoder, clip_mel):
    bf16 = vocoding.load_vocoder(tiny_checkpoint, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    audio = vocoding.vocode(bf16, clip_mel)
    assert audio.dtype == torch.float32
    reference = mel_spectrogram(vocoding.vocode(tiny_vocoder, clip_mel), **TINY.mel_kwargs())
    assert mel_l1(audio, reference) < 0.1


def test_compiled_cli_writes_the_same_audio(tmp_path, tiny_checkpoint, clip_mel, capsys):
    for name, frames in (("a", 40), ("b", 75)):  # two lengths: one dynamic compile serves both
        np.save(tmp_path / f"{name}.npy", clip_mel[:, :frames].numpy())
    from torch._dynamo.utils import counters
    counters.clear()
    outputs = {}
    for flags in ((), ("--compile",)):
        out_dir = tmp_path / ("compiled" if flags else "eager")
        code, _, _ = run_cli("--checkpoint", tiny_checkpoint, "--input", tmp_path / "a.npy", tmp_path / "b.npy",
                             "--output_dir", out_dir, "--batch_size", "1", *flags, capsys=capsys)
        assert code == 0
        outputs[out_dir.name] = [sf.read(out_dir / f"{name}.wav", dtype="int16")[0] for name in "ab"]
        assert (counters["stats"]["unique_graphs"] > 0) == bool(flags)  # dynamo really compiled (only) then
    for eager, compiled in zip(outputs["eager"], outputs["compiled"]):
        assert len(eager) == len(compiled) and np.abs(eager.astype(int) - compiled).max() <= 1  # 16-bit rounding


def test_griffin_lim_baseline(tmp_path, tiny_corpus, capsys):
    wav = tiny_corpus[0].parent / "wavs" / "train_001.wav"
    code, out, _ = run_cli("--vocoder", "griffin_lim", "--input", wav, "--griffin_lim_iters", "16",
                           "--output_dir", tmp_path, capsys=capsys)
    assert code == 0 and "real time" in out
    reference = vocoding.mel_from_wav(wav, TINY)
    audio = torch.from_numpy(sf.read(str(tmp_path / "train_001.wav"), dtype="float32")[0])
    assert len(audio) == reference.shape[1] * HOP
    noise = torch.randn(len(audio), generator=torch.Generator().manual_seed(0)) * audio.std()
    assert mel_l1(audio, reference) < 0.5 * mel_l1(noise, reference)
    # copy-synthesis keeps the recording's level (peak 0.5 here): not peak-normalised to 0.95 on the way
    recorded = torch.from_numpy(sf.read(str(wav), dtype="float32")[0])
    assert abs(recorded.abs().max().item() - 0.5) < 0.01
    assert 0.75 < audio.std().item() / recorded[:len(audio)].std().item() < 1.3


# --------------------------------------------------------------------------------------------- bad inputs

@pytest.fixture
def bad_inputs(tmp_path) -> Path:
    np.save(tmp_path / "forty_bands.npy", np.zeros((40, 10), dtype=np.float32))
    np.save(tmp_path / "transposed.npy", np.zeros((10, 80), dtype=np.float32))
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "empty.wav").write_bytes(b"")
    torch.save({"mpd": {}, "msd": {}}, tmp_path / "do_00000100")
    return tmp_path


@pytest.mark.parametrize("args, expected", [
    (["--input", "{d}/forty_bands.npy"], ["forty_bands.npy", "[40, 10]", "80 mel bands"]),
    (["--input", "{d}/transposed.npy"], ["transposed.npy", "[10, 80]", "transposed"]),
    (["--input", "{d}/empty.npy"], ["empty.npy", "empty"]),
    (["--input", "{d}/empty.wav"], ["empty.wav", "empty"]),
    (["--input", "{d}/missing.npy"], ["missing.npy", "does not exist"]),
    (["--text", "Hello."], ["--taco_weights"]),
    (["--input", "{d}/forty_bands.npy", "--dtype", "float16", "--device", "cpu"], ["float16", "CUDA"]),
])
def test_bad_inputs_give_one_line(args, expected, bad_inputs, tiny_checkpoint, capsys):
    args = [a.format(d=bad_inputs) for a in args]
    code, _, err = run_cli("--checkpoint", tiny_checkpoint, *args, "--output_dir", bad_inputs / "out", capsys=capsys)
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(fragment in err for fragment in expected), err


def test_not_a_generator_exits_1_without_traceback(bad_inputs, clip_mel):
    np.save(bad_inputs / "ok.npy", clip_mel[:, :10].numpy())
    result = subprocess.run([sys.executable, "inference.py", "--checkpoint", str(bad_inputs / "do_00000100"),
                             "--input", str(bad_inputs / "ok.npy"), "--output_dir", str(bad_inputs / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "discriminator" in result.stderr and "do_00000100" in result.stderr


def test_graphed_generator_runs_a_few_fixed_shapes_and_each_clip_as_alone(tiny_vocoder, clip_mel):
    """inference.py's CUDA-graph path: every batch a fixed number of rows and a length rounded up to 16 frames here,
    so that a few graphs serve any mix of lengths, and each clip still comes out as if vocoded alone (the padded
    tails vocoded again). On the CPU the same shapes run eagerly: what is checked is the shapes and the numbers."""
    context = vocoding.context_frames(TINY)
    lengths = [1, context, 2 * context, 37, 50, 64, 79, 101, 130, clip_mel.shape[1] - 3]
    mels = [clip_mel[:, 3:3 + n] for n in lengths] + [torch.cat([clip_mel, clip_mel], dim=1)]  # the last: chunked
    assert [mel.shape[1] for mel in mels[:-1]] == lengths
    max_chunk_frames = clip_mel.shape[1] + 10
    shapes = []
    hook = tiny_vocoder.register_forward_pre_hook(lambda module, inputs: shapes.append(tuple(inputs[0].shape)))
    try:
        graphed = vocoding.GraphedGenerator(tiny_vocoder, batch_size=3, frames_multiple=16)
        outputs = vocoding.vocode_batch(graphed, mels, max_chunk_frames=max_chunk_frames)
    finally:
        hook.remove()
    for mel, audio in zip(mels, outputs):
        alone = vocoding.vocode(tiny_vocoder, mel, max_chunk_frames=max_chunk_frames)
        assert audio.shape == alone.shape
        assert (audio - alone).abs().max() < 1e-5, mel.shape  # padding and silent rows do not leak in
    batched = {frames for rows, _, frames in shapes if rows == 3}
    ordered = sorted(lengths)
    whole_batches = {16 * math.ceil(max(ordered[i:i + 3]) / 16) for i in range(0, len(ordered), 3)}
    # Whole batches: their longest rounded up to 16 frames; tails: 2 x context frames, or a whole mel shorter than
    # that (those few run eagerly on the GPU). Without the rounding there would be a shape per batch.
    assert whole_batches <= batched, (whole_batches, batched)
    assert batched <= whole_batches | {2 * context} | {n for n in lengths if n < 2 * context}, batched
    assert all(shape[0] == 1 for shape in shapes if shape[0] != 3)  # only the chunked mel runs alone
    assert len([shape for shape in shapes if shape[0] == 1]) >= 2  # ... in chunks


def test_cuda_graph_call_runs_a_new_shape_eagerly_captures_it_the_second_time_then_replays(monkeypatch):
    """The policy, with torch.cuda's graph API faked (no GPU here): what runs eagerly, what is captured, what replays,
    and that a failed capture falls back to eager calls with a warning."""
    import contextlib
    events = []

    class FakeGraph:
        def replay(self):
            events.append("replay")

    @contextlib.contextmanager
    def fake_capture(graph, pool=None, capture_error_mode=None):
        events.append("capture")
        yield
    class FakeStream:
        def wait_stream(self, other):
            pass
    fake = {"Stream": FakeStream, "stream": lambda stream: contextlib.nullcontext(), "current_stream": FakeStream,
            "CUDAGraph": FakeGraph, "graph": fake_capture, "graph_pool_handle": lambda: object()}
    for name, value in fake.items():
        monkeypatch.setattr(torch.cuda, name, value)

    def function(x):
        events.append(f"run {tuple(x.shape)}")
        return x * 2
    call = vocoding.cuda_graph_call(function)
    a, b = torch.ones(1, 3), torch.ones(2, 3)
    assert torch.equal(call(a), a * 2) and events == ["run (1, 3)"]  # first sight: eager
    events.clear()
    assert torch.equal(call(a), a * 2) and events == ["capture", "run (1, 3)", "replay"]  # second: captured
    events.clear()
    call(a), call(b)
    assert events == ["replay", "run (2, 3)"]  # then replayed; another shape starts over
    events.clear()

    @contextlib.contextmanager
    def failing_capture(graph, pool=None, capture_error_mode=None):
        raise RuntimeError("operation not permitted when stream is capturing")
        yield
    monkeypatch.setattr(torch.cuda, "graph", failing_capture)
    with pytest.warns(UserWarning, match="CUDA graph capture failed, running eagerly instead"):
        assert torch.equal(call(b), b * 2)
    events.clear()
    c = torch.ones(3, 3)
    call(c), call(c), call(c), call(a)
    assert events == ["run (3, 3)"] * 3 + ["replay"]  # eager from then on; the graphs made before still replay
