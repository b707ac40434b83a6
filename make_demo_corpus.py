"""Build the built-in offline demo corpus: English sentences spoken by espeak-ng, with train/test manifests.

The corpus lets every script (training, inference, evaluation, the notebook) run end to end on a machine
with no dataset and no network. espeak-ng comes from the PyPI package `espeakng-loader` (a bundled
libespeak-ng driven through ctypes); Debian's `espeak-ng` binary is the fallback.

    python make_demo_corpus.py --out_dir demo_data [--num_sentences 48] [--num_test 4] [--overwrite]

Writes `<out_dir>/wavs/demo_XXXX.wav` (22050 Hz, mono, 16-bit) and `<out_dir>/train.csv`,
`<out_dir>/test.csv` with header `file_path,normalized_transcript` (paths relative to `<out_dir>`).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from utils import ManifestRow, UserError, read_manifest, run_cli, save_audio, write_manifest

SAMPLING_RATE = 22050
INSTALL_HINT = "pip install espeakng-loader (or the system package: apt-get install espeak-ng)"

# Everyday sentences of 4-15 words, numbers spelled out: espeak would read digits fine, but the
# transcripts double as Tacotron2 targets, where the text must say exactly what the audio says.
SENTENCES = [
    "The kettle is on, so we can have tea in a minute.",
    "Please close the window before you leave the room.",
    "My sister bought three apples and a loaf of bread.",
    "The train to the city leaves at half past seven.",
    "It rained all morning, but the afternoon was bright and warm.",
    "Could you tell me where the nearest post office is?",
    "We planted twelve tomato seeds in the garden last spring.",
    "The children laughed at the dog chasing its own tail.",
    "He forgot his umbrella on the bus again.",
    "Our meeting has been moved to Thursday afternoon.",
    "She reads two chapters of her book every night.",
    "The library closes early on Sundays.",
    "I would like a cup of coffee with a little milk.",
    "The museum has over four hundred paintings on display.",
    "Turn left at the bakery and walk straight ahead.",
    "My grandfather tells the same funny story every summer.",
    "The baby finally fell asleep after a long day.",
    "They painted the kitchen a pale shade of yellow.",
    "Nine students waited quietly outside the classroom door.",
    "The soup needs a pinch of salt and some pepper.",
    "We watched the sun go down behind the hills.",
    "Remember to water the plants while I am away.",
    "The package should arrive within five working days.",
    "A small boat drifted slowly across the calm lake.",
    "He practices the piano for an hour after school.",
    "The shop on the corner sells fresh flowers.",
    "Our neighbours have a cat with bright green eyes.",
    "The concert starts at eight, so let us eat early.",
    "She found an old photograph hidden inside the drawer.",
    "The wind blew the leaves all over the driveway.",
    "Thank you for helping me carry these heavy boxes.",
    "The doctor said I should drink more water.",
    "Fifteen people signed up for the cooking class.",
    "He always keeps a spare key under the flower pot.",
    "The road was closed because of the snow.",
    "Let me know when you are ready to go.",
    "The bread smells wonderful straight out of the oven.",
    "We need to buy new batteries for the clock.",
    "Her brother works at the hospital across town.",
    "The football match ended in a draw of two goals each.",
    "I left my glasses somewhere in the living room.",
    "The birds start singing just before sunrise.",
    "Please write your name at the top of the page.",
    "They walked along the beach collecting shells.",
    "The bus was late, so we shared a taxi.",
    "A warm bath is the best way to end the week.",
    "The old bridge was built more than a hundred years ago.",
    "Can you pass me the scissors on the table?",
    "My phone battery died in the middle of the call.",
    "The farmer sold six baskets of strawberries at the market.",
    "It takes twenty minutes to walk to the station.",
    "The teacher wrote the answer on the board.",
    "We are going camping in the mountains next month.",
    "The lamp in the hallway needs a new bulb.",
    "He ordered a large pizza with mushrooms and olives.",
    "The garden gate squeaks every time it opens.",
    "Please speak a little louder, I cannot hear you.",
    "The new restaurant downtown is always busy on Fridays.",
    "Our flight was delayed by almost three hours.",
    "She knitted a blue scarf for her best friend.",
    "The clock on the wall stopped at a quarter to four.",
    "Everyone clapped when the band played the last song.",
    "I usually go for a run before breakfast.",
    "The river was too cold for swimming in April.",
]

# espeak-ng API constants (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000  # add the short sentence-final pause, so clips don't stop on the last phoneme
_PARAM_RATE = 1
_PARAM_PITCH = 3
_PARAM_RANGE = 4


def prosody(index: int) -> tuple[int, int, int]:
    """(words per minute, pitch 0-100, pitch range 0-100) for sentence `index`.

    A small deterministic spread around espeak's defaults (175 wpm, pitch 50, range 50): enough that the
    vocoder sees more than one speaking rate and pitch contour, little enough that the corpus still
    sounds like one speaker (as LJSpeech does).
    """
    rng = np.random.default_rng(index)
    return int(rng.integers(145, 191)), int(rng.integers(38, 63)), int(rng.integers(40, 71))


class _LibEspeak:
    """libespeak-ng from the espeakng-loader wheel, in synchronous mode with a callback that collects samples."""

    _Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self, library_path: str, data_path: str) -> None:
        lib = ctypes.CDLL(library_path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sampling_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
        if self.sampling_rate <= 0:
            raise UserError(f"espeak-ng failed to initialise with voice data {data_path}; reinstall: {INSTALL_HINT}")
        self._chunks: list[np.ndarray] = []
        # Held on self: ctypes does not keep the callback alive, and a collected one crashes the process.
        self._callback = self._Callback(self._collect)
        lib.espeak_SetSynthCallback(self._callback)
        if lib.espeak_SetVoiceByName(b"en-us") != 0:
            raise UserError(f"espeak-ng has no 'en-us' voice in {data_path}; reinstall: {INSTALL_HINT}")
        self._lib = lib

    def _collect(self, wav: ctypes.POINTER(ctypes.c_short), num_samples: int, events: ctypes.c_void_p) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = keep synthesising

    def synthesize(self, text: str, rate: int, pitch: int, pitch_range: int) -> tuple[np.ndarray, int]:
        self._chunks = []
        for parameter, value in ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch), (_PARAM_RANGE, pitch_range)):
            self._lib.espeak_SetParameter(parameter, value, 0)
        encoded = text.encode("utf-8") + b"\0"
        status = self._lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE,
                                        None, None)
        self._lib.espeak_Synchronize()
        if status != 0 or not self._chunks:
            raise UserError(f"espeak-ng produced no audio for {text!r} (status {status}); reinstall: {INSTALL_HINT}")
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0, self.sampling_rate


def _synthesize_with_binary(binary: str, text: str, rate: int, pitch: int, pitch_range: int) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory() as folder:
        wav_path = os.path.join(folder, "speech.wav")
        # The command line has no pitch-range option, so that part of the spread is lost on this route.
        command = [binary, "-v", "en-us", "-s", str(rate), "-p", str(pitch), "-w", wav_path, text]
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.isfile(wav_path):
            raise UserError(f"{binary} failed on {text!r}: {result.stderr.strip()}; or use {INSTALL_HINT}")
        audio, rate_out = sf.read(wav_path, dtype="float32", always_2d=True)
    return audio.mean(axis=1), int(rate_out)


@functools.lru_cache(maxsize=1)
def get_synthesizer() -> Callable[[str, int, int, int], tuple[np.ndarray, int]]:
    """The espeak-ng backend: `synthesize(text, rate, pitch, pitch_range) -> (float audio, sample rate)`.

    libespeak-ng keeps global state, so it is initialised once per process (hence the cache).
    """
    try:
        import espeakng_loader
    except ImportError:
        espeakng_loader = None
    if espeakng_loader is not None:
        return _LibEspeak(espeakng_loader.get_library_path(), espeakng_loader.get_data_path()).synthesize
    binary = shutil.which("espeak-ng")
    if binary is not None:
        return functools.partial(_synthesize_with_binary, binary)
    raise UserError(f"the demo corpus needs espeak-ng, which is not installed: {INSTALL_HINT}")


def _test_indices(num_sentences: int, num_test: int) -> set[int]:
    # Evenly spaced rather than the last few: the test clips then span the whole prosody spread.
    # The spacing num_sentences / num_test exceeds 1, so the indices are distinct.
    return {(2 * k + 1) * num_sentences // (2 * num_test) for k in range(num_test)}


def _is_complete(train_path: Path, test_path: Path, num_sentences: int, num_test: int) -> bool:
    if not (train_path.is_file() and test_path.is_file()):
        return False
    try:
        train, test = read_manifest(train_path), read_manifest(test_path)  # also checks every wav exists
    except UserError:
        return False
    return len(train) == num_sentences - num_test and len(test) == num_test


def build_demo_corpus(out_dir: str | os.PathLike, num_sentences: int = 48, num_test: int = 4,
                      overwrite: bool = False) -> tuple[Path, Path]:
    """Speak the first `num_sentences` demo sentences into `out_dir`; return (train.csv, test.csv).

    Deterministic (same clips, same split on every run). Does nothing when `out_dir` already holds a
    complete corpus of this size, unless `overwrite`.
    """
    if not 2 <= num_sentences <= len(SENTENCES):
        raise UserError(f"--num_sentences must be between 2 and {len(SENTENCES)} (got {num_sentences})")
    # Both manifests must have a row: read_manifest (and so every consumer) rejects an empty one.
    if not 1 <= num_test < num_sentences:
        raise UserError(f"--num_test must be at least 1 and less than --num_sentences={num_sentences} "
                        f"(got {num_test}), so that train.csv and test.csv each get a clip")
    out_dir = Path(out_dir)
    train_path, test_path = out_dir / "train.csv", out_dir / "test.csv"
    if not overwrite and _is_complete(train_path, test_path, num_sentences, num_test):
        return train_path, test_path

    synthesize = get_synthesizer()
    (out_dir / "wavs").mkdir(parents=True, exist_ok=True)
    for path in (train_path, test_path):
        path.unlink(missing_ok=True)
    test_indices = _test_indices(num_sentences, num_test)
    train_rows, test_rows = [], []
    for index in tqdm(range(num_sentences), desc="speaking demo sentences", unit="clip"):
        text = SENTENCES[index]
        audio, rate = synthesize(text, *prosody(index))
        if rate != SAMPLING_RATE:
            import librosa
            audio = librosa.resample(audio, orig_sr=rate, target_sr=SAMPLING_RATE)
        wav = out_dir / f"wavs/demo_{index + 1:04d}.wav"
        save_audio(wav, audio, SAMPLING_RATE)
        (test_rows if index in test_indices else train_rows).append(ManifestRow(str(wav), text, 0))
    # Paths relative to the manifests, so that the corpus folder can move; no speaker column (one voice).
    write_manifest(test_path, test_rows, relative=True, speakers=False)
    write_manifest(train_path, train_rows, relative=True, speakers=False)
    return train_path, test_path


def _seconds_of_audio(manifests: tuple[Path, Path]) -> float:
    return sum(sf.info(row.audio_path).duration for manifest in manifests for row in read_manifest(manifest))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="demo_data", help="folder for wavs/, train.csv and test.csv")
    parser.add_argument("--num_sentences", type=int, default=48, help=f"clips in all (at most {len(SENTENCES)})")
    parser.add_argument("--num_test", type=int, default=4, help="clips held out in test.csv")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even when the corpus is already complete")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if not args.overwrite and _is_complete(out_dir / "train.csv", out_dir / "test.csv", args.num_sentences,
                                           args.num_test):
        print(f"{out_dir} already holds a complete demo corpus; nothing to do (--overwrite rebuilds it)")
    manifests = build_demo_corpus(out_dir, args.num_sentences, args.num_test, args.overwrite)
    seconds = _seconds_of_audio(manifests)
    print(f"demo corpus in {out_dir.resolve()}: {args.num_sentences - args.num_test} train clips "
          f"({manifests[0]}), {args.num_test} test clips ({manifests[1]}), {seconds:.1f} s of audio")


if __name__ == "__main__":
    run_cli(main)
