"""`make demo`'s job end to end, shortened: corpus, a real `accelerate launch` of train.py, the vocoded clip."""

import os
import subprocess
import sys

import pytest
import soundfile as sf
from conftest import HANG_TIMEOUT, REPO

pytestmark = pytest.mark.slow


def test_demo_trains_writes_the_clip_and_resumes(tmp_path):
    def demo(steps: int) -> subprocess.CompletedProcess:
        command = [sys.executable, str(REPO / "demo.py"), "--max_steps", str(steps),
                   "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")]
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=HANG_TIMEOUT,
                                env={**os.environ, "WANDB_MODE": "disabled"})
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result

    first = demo(2)
    assert "demo done" in first.stdout
    generated, rate = sf.read(tmp_path / "out" / "demo_0007_hifigan.wav")
    truth, truth_rate = sf.read(tmp_path / "out" / "demo_0007_ground_truth.wav")
    assert rate == truth_rate == 22050 and len(generated) == len(truth) // 256 * 256 > 22050
    assert (tmp_path / "out" / "hifigan_demo" / "generator.safetensors").exists()
    again = demo(3)  # `python demo.py --max_steps N` trains further from where it stopped
    assert "at step 2," in again.stdout + again.stderr and "step 3" in again.stdout + again.stderr
