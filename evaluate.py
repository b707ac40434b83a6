"""Score vocoders on a test manifest: MOS predictors, spectral distances, PESQ, STOI, pitch, speed.

    python evaluate.py --manifest data/splits/test.csv --vocoder v1=work_dir/hifigan \\
        --vocoder official=generator_v1 --griffin_lim --output_dir eval_out

Every system vocodes the same mel of each clip: the ground-truth mel of the wav (utils.mel_spectrogram),
Tacotron2's teacher-forced mel with --taco_weights (aligned with the recording, so every metric
applies), or its free-running mel with --free_running (not aligned: only the MOS predictors apply).
Writes <output_dir>/results.md and results.csv (one row per system, plus "ground truth": the
recordings themselves scored by the MOS predictors, the ceiling), results_per_clip.csv, with several speakers in
the manifest (its `speaker` column) results_per_speaker.csv and a per-speaker table, and the synthesised wavs under
<output_dir>/<system>/.

Every row of the manifest is checked before the first clip is scored (a missing, unreadable, empty or too short file
stops the run, naming all of them; --skip_bad_files drops them instead). Each clip's scores go to
results_per_clip.csv as soon as they are computed, and a rerun into the same --output_dir continues from there: only
the clips (and systems) not yet scored are, unless the settings changed (evaluation.json records them).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import metrics
from model import Generator, HifiGanConfig
from tacotron2 import Tacotron2, load_tacotron2
from tacotron2.teacher_forcing import teacher_forced_mel, text_to_mel
from utils import (
    ManifestRow,
    UserError,
    check_audio_files,
    load_audio,
    mel_spectrogram,
    pick_device,
    read_manifest,
    run_cli,
    save_audio,
)
from vocoding import griffin_lim, load_vocoder, vocode

GROUND_TRUTH = "ground truth"
GRIFFIN_LIM = "griffin_lim"
MOS_COLUMNS = ["DNSMOS P.808", "DNSMOS overall", "UTMOS"]
REFERENCE_COLUMNS = ["log-mel L1", "MCD (dB)", "PESQ-WB", "STOI", "F0 RMSE (cents)", "V/UV error"]
# RTF as ESPnet and ParallelWaveGAN print it: compute seconds per second of audio (lower is better); × real time is
# its inverse.
SPEED_COLUMNS = ["RTF", "× real time"]
# The reference columns are marked † in the markdown (compared with the recording), and each column's note under the
# table says what it measures and which way it leans. The leans were measured on LJSpeech (README: Inference and
# evaluation): the authors' V2 against Griffin-Lim from the same mels, whose 8 kHz fmax leaves 8-11 kHz empty.
AGAINST_RECORDING = "†"
COLUMN_NOTES = {
    "DNSMOS": "DNSMOS P.808 and overall: Microsoft's listener-MOS predictors, on the audio alone at 16 kHz (blind "
              "above 8 kHz) and at its level. They hear phase artefacts: rank vocoders by these and UTMOS.",
    "UTMOS": "UTMOS: UTMOS22-strong's naturalness-MOS predictor, on the audio alone at 16 kHz (resampled as its "
             "reference resamples).",
    "log-mel L1": "log-mel L1 †: mean |log-mel difference| on the loss mel, up to half the sampling rate. Blind to "
                  "phase. Leans against a system that leaves a band empty: a band the input mel does not cover "
                  "(above its fmax) costs far more than any error inside it, so it ranks bandwidth first.",
    "MCD (dB)": "MCD †: distance of the mel-cepstral spectral envelopes, up to half the sampling rate. Blind to phase; "
                "the same lean as log-mel L1, stronger: a near-silent band dominates it, and the noise floor there "
                "(16-bit or float output) moves it by several dB.",
    "PESQ-WB": "PESQ-WB †: ITU-T P.862.2's perceptual distance of short-time power spectra at 16 kHz (0-8 kHz). "
               "Favours magnitude inversion: it hardly hears Griffin-Lim's phase artefacts and ranks it above "
               "neural vocoders that sound better.",
    "STOI": "STOI †: intelligibility, the correlation of 1/3-octave band envelopes up to ~4 kHz; near its ceiling for "
            "any usable vocoder, favours magnitude inversion slightly; not a quality measure.",
    "F0": "F0 RMSE and V/UV error †: pitch (cents, over frames voiced in both) and voicing errors against the "
          "recording's pitch track (pyin, 16 kHz). They catch octave errors, buzz and lost voicing; magnitude "
          "inversion keeps the harmonics where they were and scores slightly better.",
}
CLIP_COLUMNS = [*MOS_COLUMNS, *REFERENCE_COLUMNS]  # what each clip gets; speed is measured per system
COLUMNS = ["system", *CLIP_COLUMNS, *SPEED_COLUMNS]
DECIMALS = {"log-mel L1": 3, "STOI": 3, "V/UV error": 3, "F0 RMSE (cents)": 1, "RTF": 4, "× real time": 1}
UTMOS_MISSING = "weights not available (pass --utmos_checkpoint)"


@dataclass
class System:
    """One row of the table: a HiFi-GAN generator, or Griffin-Lim (generator None) with the mel config it inverts."""
    name: str
    config: HifiGanConfig
    generator: Generator | None = None


# ---------------------------------------------------------------------------------------------
# Flags and systems
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--manifest", required=True, help="test manifest: CSV with file_path (prep_splits.py) or LJSpeech metadata.csv")
    add("--vocoder", nargs="+", action="extend", default=[], metavar="NAME=CHECKPOINT",
        help="generators to score; without NAME= the file or folder name names the system")
    add("--taco_weights", help="Tacotron2 checkpoint: vocode its teacher-forced mels instead of ground-truth mels")
    add("--free_running", action="store_true",
        help="with --taco_weights: vocode Tacotron2's free-running mels (only MOS predictors apply)")
    add("--max_decoder_steps", type=int, help="with --free_running: Tacotron2's decoding limit (default: its config's)")
    add("--griffin_lim", action="store_true", help="add Griffin-Lim as a baseline system")
    add("--griffin_lim_iters", type=int, default=60)
    add("--max_clips", type=int, help="score only the first N clips of the manifest")
    add("--skip_bad_files", action="store_true",
        help="drop manifest rows whose audio is missing, unreadable, empty or too short (default: stop, listing them)")
    add("--utmos_checkpoint", help="the UTMOS22-strong weights, utmos22_strong_step7459_v1.pt (README: UTMOS), or "
                                   "a folder holding it (default: torch.hub.get_dir()/checkpoints/)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--output_dir", required=True)
    return parser.parse_args(argv)


def parse_vocoder_spec(spec: str) -> tuple[str, str]:
    """'NAME=CHECKPOINT' -> (NAME, CHECKPOINT); a bare path is named after its file or folder."""
    name, separator, checkpoint = spec.partition("=")
    if not separator:
        checkpoint = spec
        name = Path(spec.rstrip("/\\")).name
    if not name or not checkpoint:
        raise UserError(f"--vocoder {spec!r}: expected NAME=CHECKPOINT or a checkpoint path")
    return name, checkpoint


def build_systems(args: argparse.Namespace, device: torch.device) -> list[System]:
    systems = []
    for spec in args.vocoder:
        name, checkpoint = parse_vocoder_spec(spec)
        generator = load_vocoder(checkpoint, device=device)
        systems.append(System(name, generator.config, generator))
    if args.griffin_lim:
        # Griffin-Lim inverts the mel the vocoders get (the first one's), or the default mel alone.
        systems.append(System(GRIFFIN_LIM, systems[0].config if systems else HifiGanConfig()))
    names = [system.name for system in systems]
    if not systems:
        raise UserError("nothing to evaluate: pass --vocoder NAME=CHECKPOINT and/or --griffin_lim")
    for name in names:
        if names.count(name) > 1 or name == GROUND_TRUTH or "/" in name or "\\" in name:
            raise UserError(f"system name {name!r} is repeated, reserved or not a folder name; "
                            "name each checkpoint with NAME=CHECKPOINT")
    return systems


def checked_rows(args: argparse.Namespace, systems: list[System]) -> list[ManifestRow]:
    """The first --max_clips rows of the manifest, every one checked before any clip is scored (as train.py checks
    its manifests: utils.check_audio_files): all bad rows are reported at once, or dropped with --skip_bad_files."""
    rows = read_manifest(args.manifest, check_files=False)[:args.max_clips]
    # Long enough for one mel frame of every system, and for the metrics' 10 ms frames.
    min_seconds = max([0.01] + [system.config.hop_size / system.config.sampling_rate for system in systems])
    problems = check_audio_files(rows, min_seconds=min_seconds)
    if args.taco_weights is not None:
        problems += [(row, "no transcript, which --taco_weights needs (a normalized_transcript column, or "
                           "LJSpeech's metadata.csv)") for row in rows if not row.transcript]
    if problems:
        report = "\n  ".join(f"line {row.line}: {row.audio_path}: {reason}"
                             for row, reason in sorted(problems, key=lambda problem: problem[0].line))
        if not args.skip_bad_files:
            raise UserError(f"{len(problems)} bad rows in {args.manifest} (fix them, or pass --skip_bad_files to "
                            f"drop them):\n  {report}")
        bad = {id(row) for row, _ in problems}
        rows = [row for row in rows if id(row) not in bad]
        warnings.warn(f"--skip_bad_files: dropped {len(bad)} bad rows of {args.manifest}, kept {len(rows)}:\n  "
                      f"{report}", stacklevel=2)
        if not rows:
            raise UserError(f"no usable rows left in {args.manifest}")
    seen: dict[str, int] = {}
    for row in rows:  # each clip's wav is written as <system>/<stem>.wav
        stem = Path(row.audio_path).stem
        if stem in seen:
            raise UserError(f"{args.manifest}, lines {seen[stem]} and {row.line}: two clips named {stem}; rename one")
        seen[stem] = row.line
    return rows


# ---------------------------------------------------------------------------------------------
# Mels
# ---------------------------------------------------------------------------------------------

def load_tacotron_for(args: argparse.Namespace, systems: list[System], device: torch.device) -> Tacotron2 | None:
    """The --taco_weights Tacotron2 (None without), checked against every system's mel (checked_rows has checked
    that every row has a transcript)."""
    if args.taco_weights is None:
        if args.free_running:
            raise UserError("--free_running needs --taco_weights (the Tacotron2 whose mels are vocoded)")
        return None
    tacotron = load_tacotron2(args.taco_weights).to(device)
    for system in systems:
        differences = tacotron.mel.differences(system.config.mel)
        if differences:
            raise UserError(f"Tacotron2 {args.taco_weights} and {system.name} make different mels "
                            f"({', '.join(differences)}; the Tacotron2's first): their mels are not interchangeable")
    return tacotron


class Clip:
    """One clip's recording and mel, per sampling rate / mel convention among the systems, made once and shared.

    The recording keeps its level (a MOS predictor scores the same audio lower or higher at another level), so
    ground-truth mels are taken from it as recorded. With teacher-forced mels, it is read the Tacotron2's way: at
    its level convention, and delayed by its frame shift, so that every system is compared with the recording at
    the level and alignment its mel stands for.
    """

    def __init__(self, row: ManifestRow, tacotron: Tacotron2 | None, free_running: bool,
                 max_decoder_steps: int | None = None):
        self.row, self.tacotron, self.free_running = row, tacotron, free_running
        self.max_decoder_steps = max_decoder_steps
        self.recordings: dict[int, np.ndarray] = {}
        self.f0_tracks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.mels: dict[tuple, torch.Tensor] = {}
        teacher_forced = tacotron is not None and not free_running
        self.peak = tacotron.mel.audio_peak if teacher_forced else None
        self.shift = tacotron.mel.frame_shift if teacher_forced else 0

    def recording(self, sampling_rate: int) -> np.ndarray:
        """The recording at `sampling_rate` (at the Tacotron2's level convention with teacher-forced mels)."""
        if sampling_rate not in self.recordings:
            audio = load_audio(self.row.audio_path, sampling_rate, peak=self.peak)
            if len(audio) < sampling_rate // 100:
                raise UserError(f"line {self.row.line}: {self.row.audio_path} is {len(audio)} samples long, too "
                                "short to score; remove it from the manifest")
            self.recordings[sampling_rate] = audio
        return self.recordings[sampling_rate]

    def reference(self, sampling_rate: int) -> np.ndarray:
        """What the vocoded audio is compared with: the recording, delayed as the vocoder's frames are."""
        audio = self.recording(sampling_rate)
        return np.concatenate([np.zeros(self.shift, audio.dtype), audio]) if self.shift else audio

    def reference_f0(self, sampling_rate: int) -> tuple[np.ndarray, np.ndarray]:
        """The reference's pitch track, tracked once per clip and rate, not once per system."""
        if sampling_rate not in self.f0_tracks:
            self.f0_tracks[sampling_rate] = metrics.f0_track(self.reference(sampling_rate), sampling_rate)
        return self.f0_tracks[sampling_rate]

    def mel(self, config: HifiGanConfig) -> torch.Tensor:
        key = tuple(sorted(config.mel_kwargs().items()))
        if key not in self.mels:
            # Tacotron2's prenet dropout stays on at inference; seed so that a rerun scores the same mels.
            torch.manual_seed(self.row.line)
            if self.free_running:
                mel, _ = text_to_mel(self.tacotron, self.row.transcript, config.mel, self.max_decoder_steps)
            elif self.tacotron is not None:
                mel = teacher_forced_mel(self.tacotron, self.row.transcript, self.recording(config.sampling_rate),
                                         config.mel)
            else:
                mel = mel_spectrogram(torch.from_numpy(self.reference(config.sampling_rate)), **config.mel_kwargs())
            self.mels[key] = mel.float().cpu()
        return self.mels[key]


# ---------------------------------------------------------------------------------------------
# Synthesis and scoring
# ---------------------------------------------------------------------------------------------

def synthesise(system: System, mel: torch.Tensor, griffin_lim_iters: int) -> np.ndarray:
    with torch.inference_mode():
        if system.generator is None:
            audio = griffin_lim(mel, system.config, n_iters=griffin_lim_iters)
        else:
            audio = vocode(system.generator, mel.to(next(system.generator.parameters()).device))
        # .cpu() waits for the device, so the timing around this call is the real compute time.
        return audio.detach().float().cpu().numpy().reshape(-1)


def warm_up(systems: list[System], griffin_lim_iters: int) -> None:
    """One short synthesis per system first, so one-off costs (allocator, filter banks, kernels) stay out of RTF."""
    for system in systems:
        synthesise(system, torch.full((system.config.num_mels, 16), -5.0), min(griffin_lim_iters, 2))


def mos_scores(audio: np.ndarray, sampling_rate: int, utmos_checkpoint: str | None,
               use_utmos: bool) -> dict[str, float | None]:
    dnsmos = metrics.dnsmos(audio, sampling_rate) or {}  # {} when speechmos is not installed
    return {"DNSMOS P.808": dnsmos.get("p808"), "DNSMOS overall": dnsmos.get("ovrl"),
            "UTMOS": metrics.utmos(audio, sampling_rate, utmos_checkpoint) if use_utmos else None}


def reference_scores(clip: Clip, audio: np.ndarray, config: HifiGanConfig) -> dict[str, float | None]:
    sampling_rate = config.sampling_rate
    reference = clip.reference(sampling_rate)
    f0_rmse, vuv_error = metrics.f0_rmse_and_vuv(reference, audio, sampling_rate, clip.reference_f0(sampling_rate))
    return {"log-mel L1": metrics.log_mel_l1(reference, audio, config),
            "MCD (dB)": metrics.mel_cepstral_distortion(reference, audio, sampling_rate),
            "PESQ-WB": metrics.pesq_wb(reference, audio, sampling_rate),
            "STOI": metrics.stoi(reference, audio, sampling_rate),
            "F0 RMSE (cents)": f0_rmse, "V/UV error": vuv_error}


def average(per_clip: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Mean of each metric over the clips where it is defined (None where it never is)."""
    means = {}
    for column in [*MOS_COLUMNS, *REFERENCE_COLUMNS]:
        values = [scores[column] for scores in per_clip if scores.get(column) is not None]
        means[column] = float(np.mean(values)) if values else None
    return means


# ---------------------------------------------------------------------------------------------
# Per-clip scores, kept as they come
# ---------------------------------------------------------------------------------------------

PER_CLIP_COLUMNS = ["clip", "speaker", "system", *CLIP_COLUMNS, "audio (s)", "compute (s)"]


def fingerprint(module: torch.nn.Module, config: dict) -> str:
    """A digest of a model's weights and config: what its scores were computed with."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def settings_of(args: argparse.Namespace, systems: list[System], tacotron: Tacotron2 | None, mel_source: str,
                use_utmos: bool, device: torch.device) -> dict:
    """What the scores depend on: the mels and the metrics for every row ("run"), and each system's weights."""
    run = {"mels": mel_source, "tacotron2": None if tacotron is None else fingerprint(tacotron, {}),
           "max_decoder_steps": args.max_decoder_steps if args.free_running else None,
           "dnsmos": importlib.util.find_spec("speechmos") is not None, "utmos": use_utmos}
    system_settings = {}
    for system in systems:
        if system.generator is None:
            system_settings[system.name] = {"griffin_lim_iters": args.griffin_lim_iters,
                                            "mel": system.config.mel_kwargs()}
        else:  # the device too: the RTF of the clips scored before was measured there
            system_settings[system.name] = {"weights": fingerprint(system.generator, system.config.to_dict()),
                                            "device": str(device)}
    return {"run": run, "systems": system_settings}


def _number(text: str | None) -> float | None:
    return None if text in (None, "") else float(text)


class PerClipLog:
    """results_per_clip.csv as a log: a row per clip and system, appended (and flushed) as soon as it is scored, so a
    run that stops keeps its work; a rerun into the same folder reads the rows back and scores only what is missing.

    evaluation.json beside it holds the settings the rows were scored with: rows of a system whose weights (or
    Griffin-Lim settings) changed are dropped, and all rows when the mels or the metrics changed.
    """

    def __init__(self, output_dir: Path, settings: dict):
        self.path = output_dir / "results_per_clip.csv"
        self.scores: dict[tuple[str, str], dict] = {}
        settings_path = output_dir / "evaluation.json"
        previous = json.loads(settings_path.read_text()) if settings_path.is_file() else None
        if self.path.is_file() and previous is not None and previous.get("run") == settings["run"]:
            changed = {name for name, value in settings["systems"].items()
                       if (previous.get("systems") or {}).get(name) != value}
            kept = {GROUND_TRUTH, *settings["systems"]} - changed
            self._read(kept)
            if self.scores:
                clips = len({clip for _, clip in self.scores})
                print(f"continuing the evaluation in {output_dir}: {len(self.scores)} scores of {clips} clips "
                      f"already in {self.path.name}" + (f" (systems changed since, scored anew: "
                                                        f"{', '.join(sorted(changed))})" if changed else ""))
        elif self.path.is_file():
            warnings.warn(f"{self.path} was scored with other mels or metrics (evaluation.json: "
                          f"{(previous or {}).get('run')}, now {settings['run']}): starting over", stacklevel=2)
        tmp = settings_path.with_name(settings_path.name + ".tmp")
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
        os.replace(tmp, settings_path)
        self._rewrite(list(self.scores.values()))
        self.handle = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=PER_CLIP_COLUMNS)

    def _read(self, systems: set[str]) -> None:
        with open(self.path, newline="") as handle:
            for record in csv.DictReader(handle):
                # A row cut short by a crash mid-write has missing fields (None) or a number cut in half.
                if record.get("system") not in systems or any(record.get(c) is None for c in PER_CLIP_COLUMNS):
                    continue
                try:
                    numbers = {c: _number(record[c]) for c in [*CLIP_COLUMNS, "audio (s)", "compute (s)"]}
                except ValueError:
                    continue
                self.scores[(record["system"], record["clip"])] = {
                    "clip": record["clip"], "speaker": record["speaker"] or None, "system": record["system"],
                    **numbers}

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=PER_CLIP_COLUMNS)
            writer.writeheader()
            writer.writerows(self._cells(row) for row in rows)
        os.replace(tmp, self.path)

    @staticmethod
    def _cells(row: dict) -> dict:
        # Missing values are empty cells: what spreadsheets and pandas read as missing.
        return {c: "" if row.get(c) is None else row[c] for c in PER_CLIP_COLUMNS}

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.scores

    def __getitem__(self, key: tuple[str, str]) -> dict:
        return self.scores[key]

    def add(self, row: dict) -> None:
        self.scores[(row["system"], row["clip"])] = row
        self.writer.writerow(self._cells(row))
        self.handle.flush()

    def finish(self, order: list[tuple[str, str]]) -> None:
        """Close the log and rewrite it with the rows of this run only, system by system in manifest order."""
        self.handle.close()
        self._rewrite([self.scores[key] for key in order])


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def format_cell(column: str, value: str | float | None, use_utmos: bool) -> str:
    if column == "system":
        return str(value)
    if column == "UTMOS" and not use_utmos:
        return UTMOS_MISSING
    if value is None:
        return "n/a"
    return f"{value:.{DECIMALS.get(column, 2)}f}"


def markdown_header(columns: list[str]) -> str:
    names = [f"{c} {AGAINST_RECORDING}" if c in REFERENCE_COLUMNS else c for c in columns]
    return "| " + " | ".join(names) + " |"


def write_tables(results: list[dict], output_dir: Path, use_utmos: bool, mel_source: str, num_clips: int) -> str:
    """Write results.md and results.csv; return the markdown."""
    with open(output_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        # Missing values are empty cells: what spreadsheets and pandas read as missing.
        writer.writerows({column: "" if row.get(column) is None else row[column] for column in COLUMNS}
                         for row in results)
    lines = [markdown_header(COLUMNS), "| --- |" + " ---: |" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(format_cell(column, row.get(column), use_utmos) for column in COLUMNS) + " |"
              for row in results]
    clips = f"{num_clips} clip" + ("" if num_clips == 1 else "s")
    lines += ["", f"{clips}, {mel_source}. Higher is better for the MOS columns, PESQ-WB (1.04-4.64), "
              "STOI (0-1) and × real time (seconds of audio per second of compute); lower is better for "
              "log-mel L1, MCD, F0 RMSE (over frames voiced in both), V/UV error and RTF (seconds of compute per "
              "second of audio). n/a: not defined for that row (reference metrics of the recordings themselves, or of "
              "unaligned free-running mels).",
              "", f"{AGAINST_RECORDING} Compared with the recording. Rank vocoders by the MOS columns. Use the "
              f"{AGAINST_RECORDING} columns to compare systems of the same bandwidth and kind (neural vocoders with "
              "each other) and to catch level, alignment and pitch errors: they lean different ways across kinds.",
              ""]
    lines += [f"- {note}" for note in COLUMN_NOTES.values()]
    markdown = "\n".join(lines) + "\n"
    (output_dir / "results.md").write_text(markdown)
    return markdown


def write_per_speaker(per_clip: dict[str, list[dict]], output_dir: Path, use_utmos: bool) -> str:
    """With several speakers in the manifest: each system's means per speaker (results_per_speaker.csv, and a
    markdown table appended to results.md), so that a vocoder that fails one voice cannot hide in the mean."""
    speakers = sorted({scores.get("speaker") or "" for clips in per_clip.values() for scores in clips})
    if len(speakers) < 2:
        return ""
    columns = ["system", "speaker", "clips", *CLIP_COLUMNS]
    rows = []
    for name, clips in per_clip.items():
        for speaker in speakers:
            mine = [scores for scores in clips if (scores.get("speaker") or "") == speaker]
            rows.append({"system": name, "speaker": speaker, "clips": len(mine), **average(mine)})
    with open(output_dir / "results_per_speaker.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: "" if row.get(c) is None else row[c] for c in columns} for row in rows)
    lines = ["", f"Per speaker ({len(speakers)} speakers; means over each speaker's clips):", "",
             markdown_header(columns), "| --- | --- |" + " ---: |" * (len(columns) - 2)]
    lines += ["| " + " | ".join([row["system"], row["speaker"], str(row["clips"])] +
                                [format_cell(c, row.get(c), use_utmos) for c in columns[3:]]) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    with open(output_dir / "results.md", "a") as handle:
        handle.write(markdown)
    return markdown


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> list[dict]:
    """Run the evaluation; returns the table rows (dicts keyed by COLUMNS)."""
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.max_clips is not None and args.max_clips < 1:
        raise UserError(f"--max_clips must be at least 1, got {args.max_clips}")
    systems = build_systems(args, device)
    rows = checked_rows(args, systems)
    tacotron = load_tacotron_for(args, systems, device)
    use_utmos = metrics.find_utmos(args.utmos_checkpoint) is not None
    aligned = not args.free_running
    mel_source = ("Tacotron2 free-running mels" if args.free_running else
                  "Tacotron2 teacher-forced mels" if tacotron is not None else "ground-truth mels")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log = PerClipLog(output_dir, settings_of(args, systems, tacotron, mel_source, use_utmos, device))

    ground_truth_rate = systems[0].config.sampling_rate
    names = [GROUND_TRUTH, *(system.name for system in systems)]
    warmed_up, skipped = False, []
    for row in tqdm(rows, desc="evaluating", unit="clip"):
        stem = Path(row.audio_path).stem
        todo = [name for name in names if (name, stem) not in log]
        if not todo:
            continue
        if not warmed_up:
            warm_up(systems, args.griffin_lim_iters)
            warmed_up = True
        clip = Clip(row, tacotron, args.free_running, args.max_decoder_steps)
        to_vocode = [system for system in systems if system.name in todo]
        try:  # every input of this clip first: a file that fails to decode leaves no half-scored clip behind
            clip.recording(ground_truth_rate)
            for system in to_vocode:
                clip.mel(system.config)
                clip.recording(system.config.sampling_rate)
        except UserError as error:
            if not args.skip_bad_files:
                raise UserError(f"{args.manifest}, line {row.line}: {error}\nThe scores so far are kept in "
                                f"{log.path}: fix or remove the row (or pass --skip_bad_files) and rerun; it "
                                "continues from there") from None
            warnings.warn(f"--skip_bad_files: line {row.line} dropped: {error}", stacklevel=1)
            skipped.append(stem)
            continue
        tag = {"clip": stem, "speaker": row.speaker}
        if GROUND_TRUTH in todo:
            log.add({**tag, "system": GROUND_TRUTH, **mos_scores(clip.recording(ground_truth_rate), ground_truth_rate,
                                                                 args.utmos_checkpoint, use_utmos)})
        for system in to_vocode:
            start = time.perf_counter()
            audio = synthesise(system, clip.mel(system.config), args.griffin_lim_iters)
            compute_seconds = time.perf_counter() - start
            save_audio(output_dir / system.name / f"{stem}.wav", audio, system.config.sampling_rate)
            scores = {**tag, "system": system.name,
                      **mos_scores(audio, system.config.sampling_rate, args.utmos_checkpoint, use_utmos),
                      "audio (s)": len(audio) / system.config.sampling_rate, "compute (s)": compute_seconds}
            if aligned:
                scores.update(reference_scores(clip, audio, system.config))
            log.add(scores)

    stems = [stem for stem in (Path(row.audio_path).stem for row in rows) if stem not in skipped]
    log.finish([(name, stem) for name in names for stem in stems])
    per_clip = {name: [log[(name, stem)] for stem in stems] for name in names}
    results = [{"system": GROUND_TRUTH, **average(per_clip[GROUND_TRUTH]), "RTF": None, "× real time": None}]
    for system in systems:
        audio_seconds = sum(scores["audio (s)"] for scores in per_clip[system.name])
        compute_seconds = sum(scores["compute (s)"] for scores in per_clip[system.name])
        results.append({"system": system.name, **average(per_clip[system.name]),
                        "RTF": compute_seconds / max(audio_seconds, 1e-9),
                        "× real time": audio_seconds / max(compute_seconds, 1e-9)})
    markdown = write_tables(results, output_dir, use_utmos, mel_source, len(stems))
    markdown += write_per_speaker(per_clip, output_dir, use_utmos)
    print(markdown)
    print(f"wrote {output_dir / 'results.md'}, {output_dir / 'results.csv'} and the wavs under {output_dir}/<system>/")
    return results


if __name__ == "__main__":
    run_cli(main)
