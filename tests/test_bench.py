"""bench.py --quick: every table column and JSON key is there, every ratio finite and positive (no timing claims)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import soundfile as sf
from conftest import HANG_TIMEOUT, REPO, synth_clip

pytestmark = pytest.mark.slow

TRAINING_KEYS = {"model", "batch", "segment", "path", "seconds_per_step", "steps_per_s", "samples_per_s",
                 "speedup_vs_reference", "reference", "peak_memory_gb", "first_step_s", "all_finite",
                 "log_mel_l1_vs_plain"}
INFERENCE_KEYS = {"model", "weights", "parameters", "sampling_rate", "batch", "audio_s", "path", "official_xrt",
                  "fast_xrt", "speedup", "log_mel_l1_vs_fp32", "compile_s"}


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_bench(tmp_path):
    output, wav = tmp_path / "bench.json", tmp_path / "speech.wav"
    sf.write(wav, synth_clip(0.3), 22050)  # a recording as the inference input, shorter than the utterance: looped
    # Passive OpenMP waiting: the same ~20 s on an idle 2-core machine, but when another PyTorch process
    # shares the cores, spinning OpenMP threads slow each other down ~100× (seen here: 146 s instead of 20).
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    result = subprocess.run([sys.executable, "bench.py", "--quick", "--output", str(output), "--wav", str(wav),
                             "--quality_steps", "2", "--quality_path", "fast bf16,fast bf16 discriminators"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(output.read_text())

    assert {"machine", "quick", "training", "inference", "peak_rss_gb", "wall_s"} <= set(results)
    assert results["quick"] is True and results["inference_input"] == str(wav)
    assert {"device", "cpu_capability", "threads", "torch", "python"} <= set(results["machine"])

    training = {row["path"]: row for row in results["training"]}
    # the official loop first: every speed-up is a ratio to it
    assert list(training) == ["official fp32", "plain fp32", "fast fp32 (fused AdamW)", "fast bf16",
                              "fast bf16 discriminators"]
    for row in training.values():
        assert TRAINING_KEYS <= set(row), TRAINING_KEYS - set(row)
        assert row["model"] == "v1" and row["all_finite"] is True
        assert row["reference"] == "official fp32"
        for key in ("seconds_per_step", "steps_per_s", "samples_per_s", "speedup_vs_reference", "peak_memory_gb"):
            assert positive(row[key]), (row["path"], key, row[key])
        assert math.isfinite(row["log_mel_l1_vs_plain"]) and row["log_mel_l1_vs_plain"] >= 0
    assert training["plain fp32"]["log_mel_l1_vs_plain"] == 0
    # fused AdamW and the official loop train the same function: after the same steps the generators agree far more
    # closely than bf16's does (a wrong fast path would land near bf16's distance or beyond)
    assert training["fast fp32 (fused AdamW)"]["log_mel_l1_vs_plain"] < training["fast bf16"]["log_mel_l1_vs_plain"]
    assert training["official fp32"]["log_mel_l1_vs_plain"] < training["fast bf16"]["log_mel_l1_vs_plain"]
    quality = results["training_quality"]
    assert quality["fast_paths"] == ["fast bf16", "fast bf16 discriminators"]
    assert quality["plain fp32"]["ratio_to_plain"] == 1.0
    # bf16 in the discriminators only: the generator's own forward stays fp32, so its first mel L1 (before any step)
    # is plain fp32's exactly; all-bf16's is not
    assert quality["fast bf16 discriminators"]["mel_l1_first"] == quality["plain fp32"]["mel_l1_first"]
    assert quality["fast bf16"]["mel_l1_first"] != quality["plain fp32"]["mel_l1_first"]
    for name in quality["fast_paths"]:
        assert math.isfinite(quality[name]["ratio_to_plain"])

    inference = results["inference"]
    cells = {(row["model"], row["batch"], row["path"]) for row in inference}
    expected = {(model, batch, path) for model in ("v1", "v2", "v3") for batch in (1, 2)
                for path in ("folded fp32", "folded bf16", "onnx fp32")}
    assert cells == expected, expected ^ cells
    for row in inference:
        assert INFERENCE_KEYS <= set(row), INFERENCE_KEYS - set(row)
        for key in ("official_xrt", "fast_xrt", "speedup", "audio_s"):
            assert positive(row[key]), (row["model"], row["batch"], row["path"], key, row[key])
        assert math.isfinite(row["log_mel_l1_vs_fp32"]) and row["log_mel_l1_vs_fp32"] >= 0
        if row["path"] != "folded bf16":  # fp32 paths reproduce the exact output (bf16 differs a little)
            assert row["log_mel_l1_vs_fp32"] < 1e-3, row

    # The printed tables carry the same columns.
    for header in ("| model | batch × samples | path | s/step | steps/s | samples/s | peak memory | vs official | "
                   "log-mel L1 vs plain | finite losses |",
                   "| model (weights, parameters, rate) | batch | path | official ×RT | this path ×RT | vs official | "
                   "log-mel L1 vs exact fp32 |",
                   "machine: "):
        assert header in result.stdout
    assert result.stdout.count("| onnx fp32 |") == 6


def test_bench_sample_rate_presets(tmp_path):
    """--presets: the other rates' generators, each with its parameter count and rate, on audio at its rate."""
    from model import build_generator

    output = tmp_path / "bench.json"
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    command = [sys.executable, "bench.py", "--quick", "--skip_training", "--no_onnx", "--rounds", "1",
               "--presets", "16khz,44khz", "--output", str(output)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(output.read_text())["inference"]
    assert {row["model"] for row in rows} == {"16khz", "44khz"}
    for row in rows:
        generator = build_generator(row["model"])
        assert row["parameters"] == sum(p.numel() for p in generator.parameters())
        assert row["sampling_rate"] == generator.config.sampling_rate
        assert positive(row["fast_xrt"]) and row["audio_s"] == pytest.approx(0.5 * row["batch"], abs=0.05)

    bad = subprocess.run([*command[:-4], "--presets", "v1,96khz"], cwd=REPO, capture_output=True, text=True,
                         timeout=HANG_TIMEOUT)
    assert bad.returncode == 2 and "unknown 96khz" in bad.stderr


def test_the_gpu_script_passes_flags_and_paths_its_scripts_accept(tmp_path):
    """bench_gpu.sh runs where device time is scarce: a renamed flag or training path must fail here, not there.
    Its `python` is replaced by a checker that parses each command with the script's own parser."""
    checker, log = tmp_path / "check.py", tmp_path / "log.txt"
    checker.write_text(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\nscript, argv = sys.argv[1], sys.argv[2:]\n"
        "if script == '-':\n    sys.exit(0)  # the inline corpus builder\n"
        "if script == 'bench.py':\n"
        "    import bench\n"
        "    for flag in ('--training_paths', '--quality_path'):\n"
        "        names = argv[argv.index(flag) + 1].split(',')\n"
        "        assert set(names) <= set(bench.GPU_TRAINING_PATHS), names\n"
        "else:\n"
        "    import importlib\n"
        "    importlib.import_module(script.removesuffix('.py')).parse_args(argv)\n"
        f"open({str(log)!r}, 'a').write(script + '\\n')\n")
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    sf.write(wavs / "a.wav", synth_clip(0.3), 22050)
    result = subprocess.run(["bash", "bench_gpu.sh", str(wavs), str(tmp_path / "generator"), str(tmp_path / "out")],
                            cwd=REPO, env={**os.environ, "PYTHON": f"{sys.executable} {checker}"},
                            capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert log.read_text().split() == ["bench.py", "train.py", "train.py", "inference.py", "inference.py"], \
        result.stdout + result.stderr
    # and without its two arguments it says how to call it
    usage = subprocess.run(["bash", "bench_gpu.sh"], cwd=REPO, capture_output=True, text=True)
    assert usage.returncode == 2 and "bash bench_gpu.sh WAV_DIR GENERATOR [OUT_DIR]" in usage.stderr
