"""Split an LJSpeech folder into train and test manifests.

    python prep_splits.py --path_to_ljspeech DIR --path_to_save DIR [--split official|random] [--download]

Reads `DIR/metadata.csv` (LJSpeech's `id|transcript|normalized transcript`, audio in `DIR/wavs/<id>.wav`)
and writes `train.csv` and `test.csv` (header `file_path,normalized_transcript`, absolute paths, rows in the
order of metadata.csv) into the save folder, then prints the clips and hours of each.

--split official (the default): the split of the HiFi-GAN authors (jik876/hifi-gan's LJSpeech-1.1/training.txt
and validation.txt, kept as id lists in data/ljspeech_official_split/ beside this script). test.csv holds the
150 validation clips, which no public HiFi-GAN checkpoint was trained on; train.csv the 12,950 training clips.
Clips of metadata.csv in neither list are reported and left out; ids of the lists missing from the corpus are
counted. A random 150-clip test set lies ~99 % inside the public checkpoints' training data, so their scores
on it are optimistic; on the official one they compare fairly with models trained here.

--split random [--test_size 150] [--seed 0]: a seeded random permutation, for any LJSpeech-shaped corpus
(a subset, another speaker); the same seed gives the same split.

--download first fetches LJSpeech-1.1 (2.6 GB) into the parent of DIR and unpacks it there.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import os
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
from tqdm import tqdm

from utils import ManifestRow, UserError, read_manifest, run_cli

LJSPEECH_URL = "https://data.keithito.com/data/speech/LJSpeech-1.1.tar.bz2"
DEFAULT_TEST_SIZE = 150
SPLITS = ("official", "random")
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


def resolve_test_size(requested: int | None, num_clips: int) -> int:
    """The number of test clips: `requested` as given, or the default capped at a tenth of a small corpus."""
    if num_clips < 2:
        raise UserError(f"the corpus has {num_clips} clip(s); a train/test split needs at least 2")
    if requested is None:
        # 150 is LJSpeech's usual held-out set (~1% of 13,100 clips); on a small corpus it would take
        # every clip, so use a tenth instead (at least one).
        return min(DEFAULT_TEST_SIZE, max(1, num_clips // 10))
    if requested < 1:
        raise UserError(f"--test_size must be at least 1 (got {requested})")
    if requested >= num_clips:
        raise UserError(f"--test_size {requested} leaves no clip for training: the corpus has {num_clips} clips; "
                        f"pass a --test_size below {num_clips}")
    return requested


def split_rows(rows: list[ManifestRow], test_size: int, seed: int) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """(train, test) rows from a seeded permutation; each keeps the corpus order, so diffs stay readable."""
    order = np.random.default_rng(seed).permutation(len(rows))
    test_indices = set(order[:test_size].tolist())
    train = [row for index, row in enumerate(rows) if index not in test_indices]
    test = [row for index, row in enumerate(rows) if index in test_indices]
    return train, test


class SplitManifest(NamedTuple):
    """One written manifest: its path, how many clips it lists and their total duration."""
    path: Path
    num_clips: int
    hours: float


def check_split_flags(split: str, test_size: int | None, seed: int | None) -> None:
    """Refuse flags that the chosen split would ignore, before anything is downloaded or written."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if split == "official":
        for flag, value in (("--test_size", test_size), ("--seed", seed)):
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


def total_hours(rows: list[ManifestRow]) -> float:
    """Summed duration of the clips, from their headers alone (no decoding)."""
    seconds = 0.0
    for row in rows:
        try:
            info = sf.info(row.audio_path)
        except Exception as error:  # soundfile raises several types for corrupt headers
            raise UserError(f"{row.audio_path} (line {row.line}) is not readable audio "
                            f"({str(error).splitlines()[0][:80]}); replace the file or remove its row") from None
        seconds += info.frames / info.samplerate
    return seconds / 3600


def write_manifest(path: Path, rows: list[ManifestRow]) -> None:
    """Write a `file_path,normalized_transcript` CSV with absolute paths (temporary name, then renamed)."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_path", "normalized_transcript"])
        writer.writerows([os.path.abspath(row.audio_path), row.transcript or ""] for row in rows)
    os.replace(partial, path)


def prep_splits(path_to_ljspeech: str | os.PathLike, path_to_save: str | os.PathLike, split: str = "official",
                test_size: int | None = None, seed: int | None = None) -> tuple[SplitManifest, SplitManifest]:
    """Write train.csv and test.csv for an LJSpeech folder; return what was written (train, test).

    `split` "official" uses the HiFi-GAN authors' id lists (test_size and seed must stay None); "random" a seeded
    permutation of `test_size` test clips (default 150, capped at a tenth of a small corpus), seed 0 by default.
    """
    check_split_flags(split, test_size, seed)
    metadata = Path(path_to_ljspeech) / "metadata.csv"
    if not metadata.is_file():
        raise UserError(f"{metadata} does not exist; --path_to_ljspeech must be the unpacked LJSpeech-1.1 folder "
                        "(add --download to fetch it)")
    rows = read_manifest(metadata)  # also stops at the first row whose wav is missing
    # A repeated id would otherwise be able to land in both splits.
    unique = list({os.path.abspath(row.audio_path): row for row in reversed(rows)}.values())[::-1]
    if len(unique) < len(rows):
        print(f"note: {metadata} lists {len(rows) - len(unique)} clip(s) more than once; each is used once")
    if split == "official":
        train, test = official_split_of(unique, metadata)
    else:
        train, test = split_rows(unique, resolve_test_size(test_size, len(unique)), 0 if seed is None else seed)
    # Before writing: an unreadable clip stops the run with both manifests untouched.
    hours = total_hours(train), total_hours(test)
    save = Path(path_to_save)
    save.mkdir(parents=True, exist_ok=True)
    train_path, test_path = save / "train.csv", save / "test.csv"
    write_manifest(train_path, train)
    write_manifest(test_path, test)
    return SplitManifest(train_path, len(train), hours[0]), SplitManifest(test_path, len(test), hours[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path_to_ljspeech", required=True, help="the LJSpeech-1.1 folder (holds metadata.csv)")
    parser.add_argument("--path_to_save", required=True, help="folder for train.csv and test.csv")
    parser.add_argument("--split", choices=SPLITS, default="official",
                        help="official (default): the HiFi-GAN authors' 150 validation clips as test.csv, their "
                             "12,950 training clips as train.csv; random: a seeded random split (--test_size, --seed)")
    parser.add_argument("--test_size", type=int, default=None,
                        help=f"--split random only: clips in test.csv (default {DEFAULT_TEST_SIZE}, "
                             "or a tenth of a smaller corpus)")
    parser.add_argument("--seed", type=int, default=None,
                        help="--split random only: seed of the permutation (default 0)")
    parser.add_argument("--download", action="store_true",
                        help="fetch LJSpeech-1.1 into the parent of --path_to_ljspeech first (2.6 GB)")
    parser.add_argument("--url", default=LJSPEECH_URL, help=argparse.SUPPRESS)  # for tests: a mirror or a dead URL
    args = parser.parse_args(argv)
    try:
        check_split_flags(args.split, args.test_size, args.seed)  # before a 2.6 GB download, not after
        if args.download:
            download_ljspeech(args.path_to_ljspeech, args.url)
        written = prep_splits(args.path_to_ljspeech, args.path_to_save, args.split, args.test_size, args.seed)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"{args.split} split:")
    for name, manifest in zip(("train", "test"), written):
        print(f"{manifest.num_clips} {name} clips, {manifest.hours:.2f} h -> {manifest.path.resolve()}")


if __name__ == "__main__":
    run_cli(main)
