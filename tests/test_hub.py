"""Loading by name, offline: torch.hub from a local source, the Hugging Face Hub from a pre-populated cache, pushing
with the Hub's client stubbed; and `pip install .` refused with a message."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_TIMEOUT, REPO, TINY_CONFIG, shared_path

import hub
import inference
from model import build_generator, load_generator
from utils import UserError


@pytest.fixture
def export(tiny_checkpoint) -> Path:  # a TINY_CONFIG generator exported as train.py exports one
    return tiny_checkpoint


def random_mel(frames: int = 20) -> torch.Tensor:
    return torch.randn(1, TINY_CONFIG.num_mels, frames, generator=torch.Generator().manual_seed(1)) - 5


def test_torch_hub_loads_an_export_ready_for_inference(export):
    generator = torch.hub.load(str(REPO), "hifigan", source="local", checkpoint=str(export))
    reference = load_generator(export)
    assert not generator.training and generator.config == reference.config
    assert not any("parametrizations" in name for name, _ in generator.named_parameters())  # weight norm folded
    with torch.no_grad():
        torch.testing.assert_close(generator(random_mel()), reference(random_mel()), rtol=1e-4, atol=1e-5)
    trainable = torch.hub.load(str(REPO), "hifigan", source="local", checkpoint=str(export), fold_weight_norm=False)
    assert any("parametrizations" in name for name, _ in trainable.named_parameters())


def test_torch_hub_loads_an_official_file_shared_fixture():
    with pytest.warns(UserWarning, match="V2"):
        generator = torch.hub.load(str(REPO), "hifigan", source="local",
                                   checkpoint=str(shared_path("fixtures", "generator_v2")))
    assert generator.config.upsample_initial_channel == 128


def hub_cache(root: Path, export: Path, repo_id: str = "owner/voc") -> Path:
    """The layout huggingface_hub leaves after a download: models--owner--name/{refs/main, snapshots/<commit>/}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in hub.EXPORT_FILES:
        (snapshot / name).write_bytes((export / name).read_bytes())
    return root


@pytest.mark.slow
def test_hub_ids_load_from_the_cache_offline_everywhere_a_checkpoint_goes(tmp_path, export):
    cache = hub_cache(tmp_path / "cache", export)
    np.save(tmp_path / "mel.npy", random_mel(12)[0].numpy())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    script = textwrap.dedent(f"""
        import torch
        from model import load_generator
        generator = torch.hub.load({str(REPO)!r}, "hifigan", source="local", checkpoint="hf://owner/voc")
        print("hub", generator.config.num_mels, generator.config.hop_size)
        load_generator("hf://owner/voc@0123456789abcdef0123456789abcdef01234567")
        print("revision ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"hub {TINY_CONFIG.num_mels} {TINY_CONFIG.hop_size}" in result.stdout and "revision ok" in result.stdout

    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "inference.py", "--checkpoint", "hf://owner/voc", "--input",
                             str(tmp_path / "mel.npy"), "--output_dir", str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "mel.wav").is_file()

    # not in the cache, offline: one line that says what would work
    result = subprocess.run([sys.executable, "inference.py", "--checkpoint", "hf://owner/missing", "--input",
                             str(tmp_path / "mel.npy"), "--output_dir", str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: hf://owner/missing: could not get it from the Hugging Face Hub")
    assert "Hub cache" in result.stderr


def test_hub_ids_are_checked():
    assert hub.parse_hub_id("hf://owner/voc@v1.0") == ("owner/voc", "v1.0")
    assert hub.parse_hub_id("hf://owner/voc") == ("owner/voc", None)
    for bad in ("hf://voc", "hf://owner/", "hf://a/b/c"):
        with pytest.raises(UserError, match="hf://owner/name"):
            hub.parse_hub_id(bad)


def test_push_uploads_the_export_with_a_model_card(tmp_path, export, monkeypatch, capsys):
    import huggingface_hub
    calls = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        calls["create"] = (repo_id, private, exist_ok)

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):  # read it before it is deleted
        calls["files"] = {path.name: path.read_bytes() for path in Path(folder_path).iterdir()}
        calls["repo"] = repo_id

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    inference.main(["--checkpoint", str(export), "--push_to_hub", "me/tiny-voc", "--private"])
    assert "https://huggingface.co/me/tiny-voc" in capsys.readouterr().out
    assert calls["create"] == ("me/tiny-voc", True, True) and calls["repo"] == "me/tiny-voc"
    assert sorted(calls["files"]) == ["README.md", "config.json", "generator.safetensors"]
    assert calls["files"]["generator.safetensors"] == (export / "generator.safetensors").read_bytes()
    card = calls["files"]["README.md"].decode()
    parameters = sum(p.numel() for p in load_generator(export).folded_copy().parameters())
    assert card.startswith("---\nlibrary_name: pytorch\n") and "- vocoder" in card
    assert f"{TINY_CONFIG.sampling_rate} Hz" in card and f"{parameters / 1e6:.2f} M" in card
    assert 'load_generator("hf://me/tiny-voc")' in card

    # an official file has no config.json to publish: one line, nothing uploaded
    calls.clear()
    official = tmp_path / "generator_tiny"
    torch.save({"generator": build_generator(TINY_CONFIG).state_dict()}, official)
    with pytest.raises(UserError, match="export folder"):
        inference.main(["--checkpoint", str(official), "--push_to_hub", "me/x"])
    assert not calls


def test_pip_install_is_refused_with_directions():
    result = subprocess.run([sys.executable, "setup.py", "bdist_wheel"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "not a pip package" in result.stderr and "torch.hub.load" in result.stderr


def test_finetuning_starts_from_a_hub_id(export, monkeypatch):
    import train
    fetched = []
    monkeypatch.setattr(hub, "download", lambda spec: fetched.append(spec) or export)
    generator = build_generator(TINY_CONFIG)
    message = train.load_pretrained("hf://owner/voc", generator, None, None)
    assert fetched == ["hf://owner/voc"] and message.startswith(f"generator from {export}")
    expected = load_generator(export).state_dict()
    for name, tensor in generator.state_dict().items():
        torch.testing.assert_close(tensor, expected[name])


def hub_load_in_project(project: Path, export: Path, then: str) -> subprocess.CompletedProcess:
    """torch.hub.load of `export` run from a project whose own modules are named utils, model and hub (its folder
    first on sys.path, as a script's is), which checks that they stay the project's; then `then`."""
    project.mkdir()
    for name in ("utils", "model", "hub"):
        (project / f"{name}.py").write_text(f"WHOSE = 'caller'\nNAME = {name!r}\n")
    repo_dirs = [str(REPO), str(REPO / "tacotron2"), str(REPO / "hifigan")]
    script = textwrap.dedent(f"""
        import os
        import sys
        import numpy as np
        import torch
        import utils  # the project's own, imported before the load
        generator = torch.hub.load({str(REPO)!r}, "hifigan", source="local", checkpoint={str(export)!r})
        import hub
        import model  # ... and after it
        assert (utils.WHOSE, model.WHOSE, hub.WHOSE) == ("caller",) * 3, (utils, model, hub)
        assert {str(REPO)!r} not in sys.path
        leaked = [name for name, module in list(sys.modules.items())  # this repo's modules, by plain names
                  if os.path.dirname(getattr(module, "__file__", None) or "") in {repo_dirs!r}]
        assert not leaked, leaked
        print("loaded", type(generator).__name__, generator.config.num_mels)
    """) + textwrap.dedent(then)
    (project / "use_vocoder.py").write_text(script)
    return subprocess.run([sys.executable, "use_vocoder.py"], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""}, timeout=HANG_TIMEOUT)


def test_torch_hub_from_a_project_with_its_own_utils_model_and_hub_modules(tmp_path, export):
    """The README's way to use a generator elsewhere, from a project whose own modules have this repo's names."""
    np.save(tmp_path / "mel.npy", random_mel().numpy())
    result = hub_load_in_project(tmp_path / "project", export, f"""
        with torch.no_grad():
            np.save("out.npy", generator(torch.from_numpy(np.load({str(tmp_path / "mel.npy")!r}))).numpy())
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded Generator {TINY_CONFIG.num_mels}" in result.stdout
    with torch.no_grad():
        reference = load_generator(export).folded_copy()(random_mel())
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "project" / "out.npy")), reference, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.slow
def test_the_readme_mel_from_another_project_is_the_generators_input(tmp_path, export):
    """The README's hub snippet from another project: the mel of a waveform at its level, with the config's mel
    settings, is this repo's mel_spectrogram(audio, **config.mel_kwargs()) (librosa compiles for ~15 s: slow)."""
    from utils import mel_spectrogram
    audio = (0.3 * np.sin(np.arange(4096) * 0.05)).astype(np.float32)
    np.save(tmp_path / "audio.npy", audio)
    result = hub_load_in_project(tmp_path / "project", export, f"""
        mel = generator.config.mel.mel(torch.from_numpy(np.load({str(tmp_path / "audio.npy")!r})))[None]
        np.save("mel.npy", mel.numpy())
        with torch.no_grad():
            print("audio", tuple(generator(mel).shape))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"audio (1, 1, {4096 // TINY_CONFIG.hop_size * TINY_CONFIG.hop_size})" in result.stdout
    expected = mel_spectrogram(torch.from_numpy(audio), **TINY_CONFIG.mel_kwargs())
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "project" / "mel.npy"))[0], expected)
