"""Prepare train and test manifests from a corpus: LJSpeech, LibriTTS / LibriTTS-R, VCTK, or any folder of audio.

    python prep_splits.py --path_to_corpus DIR --path_to_save DIR [--corpus auto|ljspeech|libritts|vctk|folder]

Writes `train.csv` and `test.csv` (header `file_path,normalized_transcript,speaker`, absolute paths, corpus order)
into the save folder — and `test_unseen_speakers.csv` with --test_speakers — then reports what it found: clips,
hours, speakers, sample rates, and the clips it left out (unreadable, or shorter than --min_seconds). A bad file
is reported and left out; it never stops the run half-way, and nothing is written until every clip was looked at.

Corpora (--corpus auto, the default, recognises each layout):
  ljspeech  metadata.csv (`id|transcript|normalized transcript`) and wavs/<id>.wav; one speaker, "LJ".
  libritts  LibriTTS or LibriTTS-R, the whole corpus or some subsets: <subset>/<speaker>/<chapter>/<utt>.wav with
            <utt>.normalized.txt beside each clip.
  vctk      VCTK 0.92 (wav48_silence_trimmed/<speaker>/<utt>_mic1.flac, --vctk_mic mic2 for the other microphone)
            or the older VCTK-Corpus (wav48/<speaker>/<utt>.wav); transcripts from txt/<speaker>/<utt>.txt.
  folder    every audio file soundfile reads under DIR, recursively (wav, flac, ogg, mp3, aiff, ...). The speaker of a
            clip is the first folder under DIR that holds it (files directly in DIR: one speaker, named after DIR).
            --transcripts FILE adds text: lines `<name>|<text>` (or tab-separated; LJSpeech's three fields too),
            <name> a file's path relative to DIR, with or without its extension, or its bare name.

Splits:
  --split official (LJSpeech's default): the split of the HiFi-GAN authors (jik876/hifi-gan's LJSpeech-1.1/
  training.txt and validation.txt, kept as id lists in data/ljspeech_official_split/ beside this script). test.csv
  holds the 150 validation clips, which no public HiFi-GAN checkpoint was trained on. A random 150-clip test set
  lies ~99 % inside the public checkpoints' training data, so their scores on it are optimistic.
  --split random (every other corpus's default) [--test_size N] [--test_speakers a,b | --num_test_speakers K]
  [--seed S]: speaker-aware and seeded. test.csv holds N utterances of speakers that are also in train.csv (drawn
  from every speaker in turn; a speaker's last clip always stays in training); --test_speakers (names) or
  --num_test_speakers (K drawn at random) keeps speakers out of training altogether, all their clips in
  test_unseen_speakers.csv. One speaker: a plain random split.

Clips need not be at the model's sample rate: train.py resamples each clip at another rate once and caches it
(<working_directory>/resampled/<rate>/); several channels are averaged to mono when read.

--download (LJSpeech only) first fetches LJSpeech-1.1 (2.6 GB) into the parent of DIR and unpacks it there.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import itertools
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
from tqdm import tqdm

from utils import ManifestRow, UserError, read_manifest, run_cli, write_manifest

LJSPEECH_URL = "https://data.keithito.com/data/speech/LJSpeech-1.1.tar.bz2"
DEFAULT_TEST_SIZE = 150
DEFAULT_MIN_SECONDS = 0.05  # under 50 ms a clip holds no speech to learn from (a cut, a click)
SPLITS = ("official", "random")
CORPORA = ("auto", "ljspeech", "libritts", "vctk", "folder")
# What soundfile (libsndfile 1.1+) decodes; other files in a folder (text, images) are not audio.
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64",
                    ".rf64"}
# Located from this file, not the working directory: the script may be run from anywhere.
OFFICIAL_SPLIT_DIR = Path(__file__).resolve().parent / "data" / "ljspeech_official_split"
# The "data" filter refuses absolute paths and links out of the target folder from a tampered archive;
# Pythons older than 3.10.12 / 3.11.4 lack it.
_SAFE_EXTRACT = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def download_ljspeech(path_to_ljspeech: str | os.PathLike, url: str = LJSPEECH_URL) -> None:
    """Fetch the LJSpeech archive into the parent of `path_to_ljspeech` and unpack it there.

    Does nothing when `path_to_ljspeech/metadata.csv` already exists. The archive unpacks to a folder
    named `LJSpeech-1.1`, so `path_to_ljspeech` should end in that name.
    """
    target = Path(path_to_ljspeech).resolve()
    if (target / "metadata.csv").is_file():
        print(f"{target} already holds metadata.csv; not downloading")
        return
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    archive = parent / url.rsplit("/", 1)[-1]
    source = "it" if url == LJSPEECH_URL else LJSPEECH_URL
    by_hand = (f"download {source} by hand and unpack it in {parent} (tar -xjf), "
               f"so that {target / 'metadata.csv'} exists")
    if not archive.is_file():
        # Downloaded under a temporary name and renamed when complete: an interrupted download must not
        # be mistaken for the archive on the next run.
        partial = archive.with_name(archive.name + ".partial")
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as handle:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {archive.name}") as bar:
                    while chunk := response.read(1 << 20):
                        handle.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
            partial.unlink(missing_ok=True)
            reason = getattr(error, "reason", None) or error
            raise UserError(f"cannot download {url} ({reason}); {by_hand}") from None
        os.replace(partial, archive)
    try:
        with tarfile.open(archive, "r:*") as tar:
            # Extracted while iterating, in one forward pass: getmembers() first would decompress the
            # bz2 stream twice (a backward seek in a compressed file restarts it).
            for member in tqdm(tar, desc=f"unpacking {archive.name}", unit="file"):
                tar.extract(member, parent, **_SAFE_EXTRACT)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise UserError(f"cannot unpack {archive} ({error}); delete it and run again, or {by_hand}") from None
    if not (target / "metadata.csv").is_file():
        unpacked = [str(p.parent) for p in parent.glob("*/metadata.csv")]
        hint = f"; pass --path_to_ljspeech {unpacked[0]}" if unpacked else ""
        raise UserError(f"unpacked {archive} in {parent}, but {target / 'metadata.csv'} does not exist{hint}")
    # 2.6 GB that is no longer needed once unpacked.
    archive.unlink()
    print(f"LJSpeech unpacked in {target}")




# ---------------------------------------------------------------------------------------------
# Corpora: each layout becomes a list of ManifestRows (audio path, transcript, speaker)
# ---------------------------------------------------------------------------------------------

def detect_corpus(root: Path) -> str:
    """The layout of `root`: ljspeech, vctk, libritts or (anything else) folder."""
    if (root / "metadata.csv").is_file():
        return "ljspeech"
    if (root / "txt").is_dir() and ((root / "wav48_silence_trimmed").is_dir() or (root / "wav48").is_dir()):
        return "vctk"
    # LibriTTS: <subset>/<speaker>/<chapter>/<utt>.normalized.txt; the root may be the corpus or one subset.
    if next(root.glob("*/*/*.normalized.txt"), None) or next(root.glob("*/*/*/*.normalized.txt"), None):
        return "libritts"
    return "folder"


def ljspeech_rows(root: Path) -> list[ManifestRow]:
    metadata = root / "metadata.csv"
    if not metadata.is_file():
        raise UserError(f"{metadata} does not exist; --path_to_corpus must be the unpacked LJSpeech-1.1 folder "
                        "(add --download to fetch it)")
    rows = read_manifest(metadata, check_files=False)  # a missing wav is reported with the other bad clips
    for row in rows:
        row.speaker = "LJ"
    return rows


def libritts_rows(root: Path) -> list[ManifestRow]:
    """LibriTTS / LibriTTS-R: every <utt>.wav with its <utt>.normalized.txt; the speaker is the id's first part."""
    rows = []
    for wav in sorted(root.rglob("*.wav")):
        text = wav.with_name(wav.stem + ".normalized.txt")
        if not text.is_file():
            text = wav.with_name(wav.stem + ".original.txt")
        transcript = text.read_text(encoding="utf-8").strip() if text.is_file() else None
        rows.append(ManifestRow(str(wav), transcript, 0, wav.stem.split("_")[0]))
    return rows


def vctk_rows(root: Path, mic: str = "mic1") -> list[ManifestRow]:
    """VCTK 0.92 (flac, one file per microphone) or the older VCTK-Corpus (wav48); text from txt/<speaker>/."""
    if (root / "wav48_silence_trimmed").is_dir():
        audio = sorted((root / "wav48_silence_trimmed").glob(f"*/*_{mic}.flac"))
        utterance = {path: path.stem.rsplit("_", 1)[0] for path in audio}  # p225_001_mic1 -> p225_001
    else:
        audio = sorted((root / "wav48").glob("*/*.wav"))
        utterance = {path: path.stem for path in audio}
    rows = []
    for path in audio:
        text = root / "txt" / path.parent.name / f"{utterance[path]}.txt"
        # A few VCTK speakers (p315) have no transcripts: still good vocoder data.
        transcript = text.read_text(encoding="utf-8").strip() if text.is_file() else None
        rows.append(ManifestRow(str(path), transcript, 0, path.parent.name))
    return rows


def read_transcripts(path: Path) -> dict[str, str]:
    """`name|text` or `name<TAB>text` lines (LJSpeech's `id|raw|normalized`: the last non-empty field)."""
    if not path.is_file():
        raise UserError(f"--transcripts {path} does not exist")
    transcripts = {}
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        if not line.strip():
            continue
        fields = line.split("|") if "|" in line else line.split("\t")
        texts = [field.strip() for field in fields[1:] if field.strip()]
        if texts:
            transcripts[fields[0].strip()] = texts[-1]
    return transcripts


def folder_rows(root: Path, transcripts_file: Path | None = None) -> list[ManifestRow]:
    """Every audio file under `root` (hidden folders skipped); speaker = the first folder under `root`."""
    files = sorted(path for path in root.rglob("*") if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(root).parts))
    transcripts = read_transcripts(transcripts_file) if transcripts_file is not None else {}
    rows, matched = [], set()
    for path in files:
        relative = path.relative_to(root)
        names = (relative.as_posix(), relative.with_suffix("").as_posix(), path.stem)
        name = next((name for name in names if name in transcripts), None)
        matched.add(name)
        speaker = relative.parts[0] if len(relative.parts) > 1 else root.name
        rows.append(ManifestRow(str(path), transcripts.get(name), 0, speaker))
    unmatched = sorted(set(transcripts) - matched)
    if unmatched:
        print(f"note: {len(unmatched)} line(s) of {transcripts_file} name no audio file under {root}: "
              f"{_preview(unmatched)}")
    if transcripts and len(matched - {None}) < len(rows):
        print(f"note: {len(rows) - len(matched - {None})} of {len(rows)} clips have no transcript (fine for a vocoder)")
    return rows


def corpus_rows(root: Path, corpus: str, transcripts: Path | None = None, vctk_mic: str = "mic1",
                ) -> tuple[str, list[ManifestRow]]:
    """(the corpus kind, its rows) for `root`; `corpus` "auto" detects the layout."""
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; --path_to_corpus must be the corpus's folder"
                        + (" (for LJSpeech: the unpacked LJSpeech-1.1 folder, with metadata.csv; add --download to "
                           "fetch it)" if corpus in ("auto", "ljspeech") else ""))
    kind = detect_corpus(root) if corpus == "auto" else corpus
    if transcripts is not None and kind != "folder":
        raise UserError(f"--transcripts applies to --corpus folder; {root} is {kind}, whose transcripts are read "
                        "from its own files (drop --transcripts, or pass --corpus folder)")
    readers = {"ljspeech": lambda: ljspeech_rows(root), "libritts": lambda: libritts_rows(root),
               "vctk": lambda: vctk_rows(root, vctk_mic), "folder": lambda: folder_rows(root, transcripts)}
    rows = readers[kind]()
    if not rows:
        raise UserError(f"no audio found in {root} as a {kind} corpus"
                        + ("; pass --corpus folder to take every audio file in it" if kind != "folder" else
                           f" (looked for {', '.join(sorted(AUDIO_EXTENSIONS))})"))
    # A repeated file would otherwise be able to land in both splits.
    unique = list({os.path.abspath(row.audio_path): row for row in reversed(rows)}.values())[::-1]
    if len(unique) < len(rows):
        print(f"note: {root} lists {len(rows) - len(unique)} clip(s) more than once; each is used once")
    return kind, unique


# ---------------------------------------------------------------------------------------------
# Survey: every clip looked at before anything is written
# ---------------------------------------------------------------------------------------------

class Clip(NamedTuple):
    row: ManifestRow
    seconds: float
    sampling_rate: int
    channels: int


def survey(rows: list[ManifestRow], min_seconds: float) -> tuple[list[Clip], list[tuple[ManifestRow, str]]]:
    """(usable clips, (row, reason) for each clip left out), from the files' headers (nothing is decoded)."""
    clips, bad = [], []
    for row in tqdm(rows, desc="reading audio headers", unit="clip", disable=len(rows) < 2000):
        try:
            info = sf.info(row.audio_path)
        except Exception as error:  # soundfile raises several types for missing and corrupt files
            reason = "missing" if not os.path.exists(row.audio_path) else \
                f"unreadable ({str(error).splitlines()[0][:60]})"
            bad.append((row, reason))
            continue
        seconds = info.frames / info.samplerate if info.samplerate else 0.0
        if seconds < min_seconds:
            bad.append((row, f"{seconds:.3f} s, shorter than --min_seconds {min_seconds:g}"))
        else:
            clips.append(Clip(row, seconds, info.samplerate, info.channels))
    return clips, bad


def describe(clips: list[Clip]) -> str:
    """'123 clips, 1.50 h, 4 speakers' of a set of clips."""
    speakers = len({clip.row.speaker for clip in clips})
    return (f"{len(clips)} clips, {sum(clip.seconds for clip in clips) / 3600:.2f} h, "
            f"{speakers} speaker{'s' if speakers != 1 else ''}")


def report_survey(root: Path, kind: str, clips: list[Clip], bad: list[tuple[ManifestRow, str]]) -> None:
    rates = collections.Counter(clip.sampling_rate for clip in clips)
    print(f"{kind} corpus {root}: {describe(clips)}; sample rates: "
          + ", ".join(f"{rate} Hz x {count}" for rate, count in sorted(rates.items())))
    stereo = sum(clip.channels > 1 for clip in clips)
    if stereo:
        print(f"note: {stereo} clip(s) have several channels; they are averaged to mono when read")
    if bad:
        kinds = collections.Counter(reason.split(" ")[0] if reason[0].isalpha() else "too short" for _, reason in bad)
        print(f"left out {len(bad)} clip(s) ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}):")
        for row, reason in bad[:10]:
            print(f"  {row.audio_path}{f' (line {row.line})' if row.line else ''}: {reason}")
        if len(bad) > 10:
            print(f"  ... and {len(bad) - 10} more")


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

def resolve_test_size(requested: int | None, num_clips: int) -> int:
    """The number of test clips: `requested` as given, or the default capped at a tenth of a small corpus."""
    if num_clips < 2:
        raise UserError(f"the corpus has {num_clips} usable clip(s); a train/test split needs at least 2")
    if requested is None:
        # 150 is LJSpeech's usual held-out set (~1% of 13,100 clips); on a small corpus it would take
        # every clip, so use a tenth instead (at least one).
        return min(DEFAULT_TEST_SIZE, max(1, num_clips // 10))
    if requested < 1:
        raise UserError(f"--test_size must be at least 1 (got {requested})")
    if requested >= num_clips:
        raise UserError(f"--test_size {requested} leaves no clip for training: the corpus has {num_clips} usable "
                        f"clips; pass a --test_size below {num_clips}")
    return requested


def split_rows(rows: list[ManifestRow], test_size: int, seed: int) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """(train, test) rows from a seeded permutation; each keeps the corpus order, so diffs stay readable."""
    order = np.random.default_rng(seed).permutation(len(rows))
    test_indices = set(order[:test_size].tolist())
    train = [row for index, row in enumerate(rows) if index not in test_indices]
    test = [row for index, row in enumerate(rows) if index in test_indices]
    return train, test


def held_out_speakers(speakers: list[str], names: list[str] | None, count: int, seed: int) -> set[str]:
    """The speakers kept out of training: the named ones, or `count` drawn at random (seeded)."""
    if names and count:
        raise UserError("pass either --test_speakers (names) or --num_test_speakers (a number), not both")
    if count:
        if count < 0 or count >= len(speakers):
            raise UserError(f"--num_test_speakers {count} must leave a speaker for training: the corpus has "
                            f"{len(speakers)}; pass fewer")
        order = np.random.default_rng([seed, 1]).permutation(len(speakers))
        return {speakers[i] for i in order[:count]}
    named = set(names or [])
    unknown = sorted(named - set(speakers))
    if unknown:
        raise UserError(f"--test_speakers names {', '.join(unknown)}, not speakers of this corpus (it has "
                        f"{_preview(speakers)}); check the names")
    if named and named >= set(speakers):
        raise UserError("--test_speakers names every speaker; leave some for training")
    return named


def split_by_speaker(rows: list[ManifestRow], test_size: int | None, seed: int, test_speakers: list[str] | None = None,
                     num_test_speakers: int = 0) -> tuple[list[ManifestRow], list[ManifestRow], list[ManifestRow]]:
    """(train, test of seen speakers, test of held-out speakers), each in corpus order.

    One speaker: `split_rows`. Several: the held-out speakers' (`test_speakers` by name, or `num_test_speakers`
    drawn at random) clips go to the third list; `test_size` utterances
    of the others are drawn from each speaker in turn (a seeded order of speakers and of each one's clips), never a
    speaker's last clip, so every test speaker is also a training speaker.
    """
    speakers = sorted({row.speaker or "" for row in rows})
    unseen_speakers = held_out_speakers(speakers, test_speakers, num_test_speakers, seed)
    seen = [row for row in rows if (row.speaker or "") not in unseen_speakers]
    unseen = [row for row in rows if (row.speaker or "") in unseen_speakers]
    if len(speakers) == 1:
        return (*split_rows(seen, resolve_test_size(test_size, len(seen)), seed), unseen)
    rng = np.random.default_rng(seed)
    by_speaker: dict[str, list[int]] = collections.defaultdict(list)
    for index, row in enumerate(seen):
        by_speaker[row.speaker or ""].append(index)
    # Each speaker's clips shuffled, minus one kept for training; speakers in a shuffled order; then one clip of
    # every speaker in turn.
    groups = [rng.permutation(by_speaker[name])[:-1].tolist() for name in rng.permutation(sorted(by_speaker))]
    candidates = [index for turn in itertools.zip_longest(*groups) for index in turn if index is not None]
    wanted = resolve_test_size(test_size, len(seen))
    if wanted > len(candidates):
        raise UserError(f"--test_size {wanted}: the seen speakers can give at most {len(candidates)} test clips (each "
                        "keeps one for training); pass a smaller --test_size")
    test_indices = set(candidates[:wanted])
    train = [row for index, row in enumerate(seen) if index not in test_indices]
    test = [row for index, row in enumerate(seen) if index in test_indices]
    return train, test, unseen


def check_split_flags(split: str, test_size: int | None, seed: int | None, test_speakers: list[str] | None = None,
                      num_test_speakers: int = 0) -> None:
    """Refuse flags that the chosen split would ignore, before anything is downloaded or written."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if split == "official":
        for flag, value in (("--test_size", test_size), ("--seed", seed), ("--test_speakers", test_speakers),
                            ("--num_test_speakers", num_test_speakers or None)):
            if value is not None:
                raise UserError(f"{flag} applies only to --split random (the official split's test set is fixed: "
                                f"150 clips); drop {flag}, or add --split random")


def load_official_ids(folder: str | os.PathLike = OFFICIAL_SPLIT_DIR) -> tuple[list[str], list[str]]:
    """(training ids, validation ids) of the official HiFi-GAN LJSpeech split, in the order of their files."""
    lists = []
    for name in ("training_ids.txt", "validation_ids.txt"):
        path = Path(folder) / name
        if not path.is_file():
            raise UserError(f"{path} does not exist; it comes with the repo (restore it from git), "
                            "or pass --split random")
        lists.append([line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()])
    return lists[0], lists[1]


def clip_id(row: ManifestRow) -> str:
    """LJSpeech's id of a clip: `LJ050-0269` for `.../wavs/LJ050-0269.wav`."""
    return Path(row.audio_path).stem


def split_official(rows: list[ManifestRow], training_ids: list[str], validation_ids: list[str],
                   ) -> tuple[list[ManifestRow], list[ManifestRow], list[ManifestRow]]:
    """(train, test, unlisted) rows by the official id lists, each in corpus order; unlisted: in neither list."""
    training, validation = set(training_ids), set(validation_ids)
    train, test, unlisted = [], [], []
    for row in rows:
        name = clip_id(row)
        (test if name in validation else train if name in training else unlisted).append(row)
    return train, test, unlisted


def _preview(ids: list[str], count: int = 5) -> str:
    return ", ".join(ids[:count]) + (", …" if len(ids) > count else "")


def official_split_of(rows: list[ManifestRow], metadata: Path) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """(train, test) by the official lists; reports what the corpus and the lists do not share."""
    training_ids, validation_ids = load_official_ids()
    train, test, unlisted = split_official(rows, training_ids, validation_ids)
    if not train or not test:
        empty = " and ".join(name for name, part in (("train.csv", train), ("test.csv", test)) if not part)
        raise UserError(f"{metadata} holds {len(test)} of the {len(validation_ids)} official validation ids and "
                        f"{len(train)} of the {len(training_ids)} training ids, so {empty} would be empty: "
                        "the official split needs LJSpeech-1.1; pass --split random for another corpus or a subset")
    if unlisted:
        # Neither list claims them: putting them in either split would change what the split means.
        print(f"note: {len(unlisted)} clip(s) of {metadata} are in neither official list and are left out: "
              f"{_preview([clip_id(row) for row in unlisted])}")
    present = {clip_id(row) for row in rows}
    missing_test = sum(name not in present for name in validation_ids)
    missing_train = sum(name not in present for name in training_ids)
    if missing_test or missing_train:
        print(f"note: {missing_test + missing_train} id(s) of the official split are not in {metadata} "
              f"({missing_test} validation, {missing_train} training); the splits hold the clips that are"
              + (" (scores on this test.csv are not comparable with ones on all 150 validation clips)"
                 if missing_test else ""))
    return train, test


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

class SplitManifest(NamedTuple):
    """One written manifest: its path, how many clips and speakers it lists and their total duration."""
    path: Path
    num_clips: int
    hours: float
    num_speakers: int = 1


def prep_splits(path_to_corpus: str | os.PathLike, path_to_save: str | os.PathLike, split: str | None = None,
                test_size: int | None = None, seed: int | None = None, corpus: str = "auto",
                transcripts: str | os.PathLike | None = None, test_speakers: list[str] | None = None,
                num_test_speakers: int = 0, min_seconds: float = DEFAULT_MIN_SECONDS, vctk_mic: str = "mic1",
                ) -> list[SplitManifest]:
    """Write train.csv and test.csv (and test_unseen_speakers.csv with `test_speakers`) for a corpus; return what
    was written, in that order.

    `split` None: "official" for LJSpeech, "random" for the rest. "official" uses the HiFi-GAN authors' id lists
    (test_size, seed and the test speakers must stay unset); "random" is `split_by_speaker` (seed 0 by default).
    """
    root = Path(path_to_corpus)
    if corpus not in CORPORA:
        raise UserError(f"unknown corpus {corpus!r}; choose from {', '.join(CORPORA)}")
    kind, rows = corpus_rows(root, corpus, None if transcripts is None else Path(transcripts), vctk_mic)
    split = split or ("official" if kind == "ljspeech" else "random")
    if split == "official" and kind != "ljspeech":
        raise UserError(f"--split official is LJSpeech's; {root} is a {kind} corpus: use --split random")
    check_split_flags(split, test_size, seed, test_speakers, num_test_speakers)
    clips, bad = survey(rows, min_seconds)
    report_survey(root, kind, clips, bad)
    seconds = {id(clip.row): clip.seconds for clip in clips}
    usable = [clip.row for clip in clips]
    if split == "official":
        parts = [*official_split_of(usable, root / "metadata.csv"), []]
    else:
        parts = list(split_by_speaker(usable, test_size, 0 if seed is None else seed, test_speakers,
                                      num_test_speakers))
    print(f"{split} split:")
    save = Path(path_to_save)
    save.mkdir(parents=True, exist_ok=True)
    written = []
    for name, part in zip(("train.csv", "test.csv", "test_unseen_speakers.csv"), parts):
        if name == "test_unseen_speakers.csv" and not part:
            continue
        write_manifest(save / name, part)
        written.append(SplitManifest(save / name, len(part), sum(seconds[id(row)] for row in part) / 3600,
                                     len({row.speaker for row in part})))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path_to_corpus", "--path_to_ljspeech", dest="path_to_corpus", required=True,
                        help="the corpus folder (LJSpeech-1.1, LibriTTS, VCTK, or any folder of audio)")
    parser.add_argument("--path_to_save", required=True, help="folder for train.csv and test.csv")
    parser.add_argument("--corpus", choices=CORPORA, default="auto",
                        help="the corpus layout (default: recognised from the folder)")
    parser.add_argument("--transcripts", default=None,
                        help="--corpus folder: a file of `<name>|<text>` lines (name: path relative to the folder, "
                             "with or without extension, or the file's bare name)")
    parser.add_argument("--split", choices=SPLITS, default=None,
                        help="official (LJSpeech's default): the HiFi-GAN authors' 150 validation clips as test.csv, "
                             "their 12,950 training clips as train.csv; random (the others' default): seeded and "
                             "speaker-aware (--test_size, --test_speakers, --seed)")
    parser.add_argument("--test_size", type=int, default=None,
                        help=f"--split random only: utterances of training speakers in test.csv (default "
                             f"{DEFAULT_TEST_SIZE}, or a tenth of a smaller corpus)")
    parser.add_argument("--test_speakers", default=None, type=lambda text: [n.strip() for n in text.split(",")
                                                                             if n.strip()],
                        help="--split random only: hold these speakers (comma-separated names) out of training; "
                             "their clips go to test_unseen_speakers.csv")
    parser.add_argument("--num_test_speakers", type=int, default=0,
                        help="--split random only: hold this many speakers, drawn at random, out of training")
    parser.add_argument("--seed", type=int, default=None,
                        help="--split random only: seed of the draw (default 0)")
    parser.add_argument("--min_seconds", type=float, default=DEFAULT_MIN_SECONDS,
                        help="leave out clips shorter than this (reported)")
    parser.add_argument("--vctk_mic", choices=["mic1", "mic2"], default="mic1",
                        help="VCTK 0.92: which microphone's recordings")
    parser.add_argument("--download", action="store_true",
                        help="fetch LJSpeech-1.1 into the parent of --path_to_corpus first (2.6 GB)")
    parser.add_argument("--url", default=LJSPEECH_URL, help=argparse.SUPPRESS)  # for tests: a mirror or a dead URL
    args = parser.parse_args(argv)
    if args.split is not None:  # before a 2.6 GB download, not after
        check_split_flags(args.split, args.test_size, args.seed, args.test_speakers, args.num_test_speakers)
    if args.download:
        if args.corpus not in ("auto", "ljspeech"):
            raise UserError(f"--download fetches LJSpeech; drop it for --corpus {args.corpus}")
        download_ljspeech(args.path_to_corpus, args.url)
    written = prep_splits(args.path_to_corpus, args.path_to_save, args.split, args.test_size, args.seed,
                          args.corpus, args.transcripts, args.test_speakers, args.num_test_speakers,
                          args.min_seconds, args.vctk_mic)
    for manifest in written:
        name = {"train.csv": "train", "test.csv": "test"}.get(manifest.path.name, "unseen-speaker test")
        print(f"{manifest.num_clips} {name} clips, {manifest.num_speakers} speaker(s), {manifest.hours:.2f} h "
              f"-> {manifest.path.resolve()}")


if __name__ == "__main__":
    run_cli(main)
