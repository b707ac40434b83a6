"""The built-in demo: an offline corpus, a few minutes of HiFi-GAN training on it, and a vocoded clip.

    python demo.py [--max_steps 300] [--output_dir demo_output]

1. make_demo_corpus.py speaks four dozen sentences with espeak-ng (no network, no dataset);
2. `accelerate launch train.py` trains a small model (V2 generator, thinned discriminators);
3. the trained generator resynthesises a held-out clip from its mel, written beside the original.
Running it again resumes the training where it stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from model import load_generator
from utils import UserError, load_audio, mel_spectrogram, read_manifest, run_cli, save_audio

REPO = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="demo_data")
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--max_steps", type=int, default=300, help="about 0.6 s a step on 2 CPU cores")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    # The other entry points run as commands, as a user would run them (an entry point never imports another).
    if subprocess.run([sys.executable, str(REPO / "make_demo_corpus.py"), "--out_dir", args.data_dir]).returncode:
        raise UserError("could not build the demo corpus (the reason is printed above)")
    train_manifest, test_manifest = Path(args.data_dir) / "train.csv", Path(args.data_dir) / "test.csv"
    output_dir = Path(args.output_dir)
    run_dir = output_dir / "hifigan_demo"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        # accelerate launch gives each process one CPU thread unless told otherwise.
        "--num_cpu_threads_per_process", str(os.cpu_count() or 1),
        str(REPO / "train.py"), "--experiment_name", run_dir.name, "--working_directory", str(output_dir),
        "--path_to_train_manifest", str(train_manifest), "--path_to_val_manifest", str(test_manifest),
        "--config", "v2", "--discriminator_width_divisor", "4", "--batch_size", "4", "--num_workers", "1",
        "--learning_rate", "5e-4", "--max_steps", str(args.max_steps), "--checkpoint_steps", "100",
        "--validation_steps", "100", "--console_out_iters", "25", "--num_val_clips", "2",
        "--resume_from_checkpoint", "latest",
    ]
    print("training:", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)

    generator = load_generator(run_dir)
    config = generator.config
    clip = read_manifest(test_manifest)[0].audio_path
    audio = torch.from_numpy(load_audio(clip, config.sampling_rate, peak=None))  # copy-synthesis keeps the level
    with torch.inference_mode():
        mel = mel_spectrogram(audio, **config.mel_kwargs())
        generated = generator(mel.unsqueeze(0)).squeeze()
        error = torch.nn.functional.l1_loss(mel_spectrogram(generated, **config.mel_kwargs()), mel).item()
    stem = Path(clip).stem
    save_audio(output_dir / f"{stem}_ground_truth.wav", audio, config.sampling_rate)
    save_audio(output_dir / f"{stem}_hifigan.wav", generated, config.sampling_rate)
    print(f"\ndemo done in {time.perf_counter() - started:.0f} s. Listen to {output_dir / (stem + '_hifigan.wav')} "
          f"(vocoded from the mel of {output_dir / (stem + '_ground_truth.wav')}; log-mel L1 {error:.3f}).")
    print(f"The trained generator is in {run_dir} (generator.safetensors + config.json).")


if __name__ == "__main__":
    try:
        run_cli(main)
    except subprocess.CalledProcessError as error:  # training failed and has said why
        sys.exit(error.returncode)
