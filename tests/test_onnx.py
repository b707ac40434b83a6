"""ONNX export (vocoding.export_onnx, --export_onnx): onnxruntime matches PyTorch at any batch and length."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_TIMEOUT, REPO, TINY_CONFIG, shared_path

import inference
import vocoding
from model import Generator, load_generator, save_generator
from utils import UserError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def tiny_generator() -> Generator:
    torch.manual_seed(0)
    return Generator(TINY_CONFIG).eval()  # weight norm live, as training leaves it


@pytest.fixture(scope="module")
def tiny_onnx(tiny_generator, tmp_path_factory) -> Path:
    return vocoding.export_onnx(tiny_generator, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def random_mel(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    """Around a plausible log-mel level (silence is log(1e-5) = -11.5)."""
    return torch.randn(batch, TINY_CONFIG.num_mels, frames, generator=torch.Generator().manual_seed(seed)) - 5


def test_round_trip_dynamic_batch_and_frames(tiny_generator, tiny_onnx):
    assert tiny_onnx.is_file() and not tiny_onnx.with_name(tiny_onnx.name + ".tmp").exists()
    assert any("parametrizations" in key for key in tiny_generator.state_dict())  # the original is left unfolded
    session = vocoding.onnx_session(tiny_onnx, threads=1)
    # Batch 2 at two lengths, neither of them the exported example's (2 x 32 frames), then batch 1 unbatched.
    for batch, frames in ((2, 23), (2, 70), (1, 9)):
        mel = random_mel(batch, frames, seed=frames)
        with torch.no_grad():
            expected = tiny_generator(mel)[:, 0]
        audio = vocoding.vocode_onnx(session, mel)
        assert audio.shape == (batch, frames * 256) and audio.dtype == torch.float32
        assert (audio - expected).abs().max().item() <= 1e-4
    # The unbatched form behaves like vocoding.vocode.
    mel = random_mel(1, 40)[0]
    expected = vocoding.vocode(tiny_generator, mel)
    assert (vocoding.vocode_onnx(session, mel) - expected).abs().max().item() <= 1e-4


def test_export_of_a_folded_generator(tiny_generator, tmp_path):
    folded = Generator(TINY_CONFIG)
    folded.load_state_dict(tiny_generator.state_dict())
    folded.remove_weight_norm().eval()
    session = vocoding.onnx_session(vocoding.export_onnx(folded, tmp_path / "folded.onnx"))
    mel = random_mel(1, 30)
    with torch.no_grad():
        expected = folded(mel)[:, 0]
    assert (vocoding.vocode_onnx(session, mel) - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_cli_export(tmp_path, tiny_generator):
    checkpoint = tmp_path / "tiny_generator"
    save_generator(tiny_generator, checkpoint)
    output = tmp_path / "out" / "tiny.onnx"
    result = subprocess.run([sys.executable, "inference.py", "--checkpoint", str(checkpoint), "--export_onnx",
                             str(output)], cwd=REPO, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert str(output) in result.stdout and "max abs difference" in result.stdout
    assert float(result.stdout.rsplit(":", 1)[1]) <= 1e-4
    assert "Traceback" not in result.stderr and "torchvision" not in result.stderr
    vocoding.onnx_session(output)  # a generator model


def test_not_an_onnx_generator(tmp_path, tiny_onnx):
    not_onnx = tmp_path / "generator.onnx"
    not_onnx.write_text("this is not a protobuf")
    with pytest.raises(UserError, match=r"generator\.onnx is not a readable ONNX model"):
        vocoding.onnx_session(not_onnx)
    with pytest.raises(UserError, match=r"missing\.onnx does not exist"):
        vocoding.onnx_session(tmp_path / "missing.onnx")
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "relu.onnx")
    with pytest.raises(UserError, match=r"relu\.onnx is an ONNX model but not a HiFi-GAN generator"):
        vocoding.onnx_session(tmp_path / "relu.onnx")
    with pytest.raises(UserError, match="--export_onnx needs --checkpoint"):
        inference.main(["--export_onnx", str(tmp_path / "x.onnx")])
    session = vocoding.onnx_session(tiny_onnx)
    with pytest.raises(UserError, match="num_mels=80"):
        vocoding.vocode_onnx(session, torch.zeros(40, 10))


def test_cuda_device_uses_the_cuda_provider_or_says_what_to_install(tiny_onnx, monkeypatch):
    import onnxruntime
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(UserError, match="pip install onnxruntime-gpu"):
        vocoding.onnx_session(tiny_onnx, device="cuda")
    # With the CUDA provider present, a session on cuda:1 asks for it first, on that device, with the CPU behind.
    asked = {}

    class Session:
        def __init__(self, path, options, providers):
            asked["providers"] = providers
            self.real = real_session(path, options, providers=["CPUExecutionProvider"])

        def __getattr__(self, name):
            return getattr(self.real, name)

    real_session = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", Session)
    vocoding.onnx_session(tiny_onnx, device="cuda:1")
    assert asked["providers"] == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    vocoding.onnx_session(tiny_onnx)
    assert asked["providers"] == ["CPUExecutionProvider"]


def test_cli_export_rejects_vocoding_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inference.parse_args(["--checkpoint", "x", "--export_onnx", "x.onnx", "--input", "a.npy"])
    assert exit_info.value.code == 2 and "--export_onnx exports and exits" in capsys.readouterr().err


@pytest.mark.slow
def test_official_v2_export(tmp_path):
    """The authors' LJSpeech V2 generator: onnxruntime within 1e-4 of PyTorch on a 50-frame mel."""
    with pytest.warns(UserWarning, match="V2"):
        generator = load_generator(shared_path("fixtures", "generator_v2"))
    session = vocoding.onnx_session(vocoding.export_onnx(generator, tmp_path / "v2.onnx"))
    mel = random_mel(1, 50)
    with torch.no_grad():
        expected = generator(mel)[:, 0]
    assert (vocoding.vocode_onnx(session, mel) - expected).abs().max().item() <= 1e-4
