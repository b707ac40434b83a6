"""inference.ipynb: saved clean, and run top to bottom headlessly (nbclient) on tiny checkpoints and a tiny corpus.

The parameters cell (tagged "parameters") is rewritten papermill-style; no other cell is touched.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import HANG_TIMEOUT, REPO, TINY_CONFIG, write_corpus

from model import Generator, save_generator
from tacotron2 import Tacotron2, Tacotron2Config, save_tacotron2

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402 (after the skips; comes with nbclient)
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

NOTEBOOK = REPO / "inference.ipynb"
KERNEL = "hifigan-notebook-test"
PARAMETERS = ["VOCODER_CHECKPOINT", "FINETUNED_CHECKPOINT", "TACO_WEIGHTS", "TEXT", "REFERENCE_WAV",
              "EVAL_MANIFEST", "EVAL_MAX_CLIPS", "GRIFFIN_LIM_ITERS", "OUTPUT_DIR", "DEVICE"]
TINY_TACOTRON = dict(symbols_embedding_dim=16, encoder_embedding_dim=16, decoder_rnn_dim=24, prenet_dim=8,
                     attention_rnn_dim=24, attention_dim=8, attention_location_n_filters=4,
                     attention_location_kernel_size=7, postnet_embedding_dim=12, n_mel_channels=80,
                     max_decoder_steps=12, gate_threshold=1.0)  # never stops early: 12 frames


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def parameters_cell(notebook):
    cells = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(cells) == 1 and cells[0].cell_type == "code", "exactly one code cell tagged 'parameters'"
    assert cells[0] is next(cell for cell in notebook.cells if cell.cell_type == "code"), "it is the first code cell"
    return cells[0]


def test_saved_clean_with_a_parameters_cell():
    notebook = read_notebook()
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.id} was saved with outputs"
    source = parameters_cell(notebook).source
    for name in PARAMETERS:
        assert f"\n{name} = " in f"\n{source}", f"{name} missing from the parameters cell"
    assert 'VOCODER_CHECKPOINT = "demo_output/hifigan_demo"' in source  # what `python demo.py` writes


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory) -> list[str]:
    """A kernelspec for this very interpreter, so a fresh venv needs no `ipykernel install` (and a user's
    own "python3" kernel, maybe another Python, is not picked up)."""
    folder = tmp_path_factory.mktemp("kernels")
    (folder / KERNEL).mkdir()
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python (test)", "language": "python"}
    (folder / KERNEL / "kernel.json").write_text(json.dumps(spec))
    return [str(folder)]


def execute(kernel_dirs: list[str], **parameters):
    """Run the notebook with the parameters cell rewritten; returns the executed notebook (raises on a cell error)."""
    notebook = read_notebook()
    cell = parameters_cell(notebook)
    values = {"DEVICE": "cpu", **parameters}
    lines = cell.source.splitlines()
    for i, line in enumerate(lines):  # `NAME = default  # comment` becomes `NAME = value`
        name = line.split(" = ")[0]
        if name in values:
            lines[i] = f"{name} = {values.pop(name)!r}"
    assert not values, f"not in the parameters cell: {', '.join(values)}"
    cell.source = "\n".join(lines)
    manager = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
    client = nbclient.NotebookClient(notebook, km=manager, timeout=HANG_TIMEOUT, startup_timeout=HANG_TIMEOUT,
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()
    return notebook


def outputs(notebook, key: str) -> list[str]:
    """Every output of `key` (a MIME type, or "stream"/"error" for those output types), as text."""
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == key:
                found.append(output.get("text") or output.get("evalue", ""))
            elif key in output.get("data", {}):
                found.append(output.data[key])
    return found


def cell_with(notebook, text: str):
    return next(cell for cell in notebook.cells if cell.cell_type == "code" and text in cell.source)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("notebook_checkpoints")
    torch.manual_seed(0)
    save_generator(Generator(TINY_CONFIG), folder / "hifigan")
    save_generator(Generator(TINY_CONFIG), folder / "finetuned")
    save_tacotron2(Tacotron2(Tacotron2Config(**TINY_TACOTRON)), folder / "tacotron2",
                   extra={"audio": {"sampling_rate": 22050, "hop_size": 256}})
    manifest = write_corpus(folder / "corpus", 2, name="test")
    return {"hifigan": str(folder / "hifigan"), "finetuned": str(folder / "finetuned"),
            "tacotron2": str(folder / "tacotron2"), "manifest": str(manifest),
            "wav": str(folder / "corpus" / "wavs" / "test_000.wav")}


@pytest.mark.slow
def test_text_to_speech_three_vocoders_and_table(tmp_path, kernel_dirs, checkpoints):
    notebook = execute(kernel_dirs, VOCODER_CHECKPOINT=checkpoints["hifigan"],
                       FINETUNED_CHECKPOINT=checkpoints["finetuned"], TACO_WEIGHTS=checkpoints["tacotron2"],
                       TEXT="Hello world.", REFERENCE_WAV=checkpoints["wav"], EVAL_MANIFEST=checkpoints["manifest"],
                       EVAL_MAX_CLIPS=2, GRIFFIN_LIM_ITERS=4, OUTPUT_DIR=str(tmp_path))
    assert outputs(notebook, "error") == []

    # Tacotron2's mel and alignment: one figure from the cell that runs Tacotron2.
    mel_cell = cell_with(notebook, "text_to_mel(tacotron")
    assert any("image/png" in output.get("data", {}) for output in mel_cell.outputs)
    assert not any("copy-synthesis" in text for text in outputs(notebook, "stream"))

    # Three players side by side (no recording of a typed sentence), then the mels of the outputs.
    players = "".join(outputs(notebook, "text/html"))
    assert players.count("<audio") == 3
    for name in ("Griffin-Lim", "HiFi-GAN", "HiFi-GAN+FT"):
        assert f"<b>{name}</b>" in players
    assert len(outputs(notebook, "image/png")) == 2
    assert sorted(path.name for path in tmp_path.glob("*.wav")) == ["Griffin-Lim.wav", "HiFi-GAN.wav",
                                                                   "HiFi-GAN_FT.wav"]

    [table] = outputs(notebook, "text/markdown")
    for name in ("ground truth", "Griffin-Lim", "HiFi-GAN", "HiFi-GAN+FT"):
        assert f"| {name} |" in table
    assert "2 clips" in table


@pytest.mark.slow
def test_copy_synthesis_without_tacotron2_or_finetuned(tmp_path, kernel_dirs, checkpoints):
    notebook = execute(kernel_dirs, VOCODER_CHECKPOINT=checkpoints["hifigan"], FINETUNED_CHECKPOINT=None,
                       TACO_WEIGHTS=None, REFERENCE_WAV=checkpoints["wav"], EVAL_MANIFEST=checkpoints["manifest"],
                       EVAL_MAX_CLIPS=1, GRIFFIN_LIM_ITERS=4, OUTPUT_DIR=str(tmp_path))
    assert outputs(notebook, "error") == []
    assert any("without Tacotron2 weights" in text and "copy-synthesis" in text
               for text in outputs(notebook, "stream"))
    players = "".join(outputs(notebook, "text/html"))
    assert players.count("<audio") == 3  # the recording, Griffin-Lim, HiFi-GAN
    assert "<b>Recording</b>" in players and "HiFi-GAN+FT" not in players
    [table] = outputs(notebook, "text/markdown")
    assert "| Griffin-Lim |" in table and "| HiFi-GAN |" in table and "HiFi-GAN+FT" not in table


@pytest.mark.slow
def test_missing_checkpoint_says_to_run_the_demo(tmp_path, kernel_dirs):
    with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
        execute(kernel_dirs, VOCODER_CHECKPOINT=str(tmp_path / "no_such_run"), OUTPUT_DIR=str(tmp_path))
    assert "FileNotFoundError" in str(error.value) and "python demo.py" in str(error.value)
