"""Split an LJSpeech folder into train and test manifests.

    python prep_splits.py --path_to_ljspeech DIR --path_to_save DIR [--test_size 150] [--seed 0] [--download]

Reads `DIR/metadata.csv` (LJSpeech's `id|transcript|normalized transcript`, audio in `DIR/wavs/<id>.wav`)
and writes `train.csv` and `test.csv` (header `file_path,normalized_transcript`, absolute paths) into
the save folder. The split is a seeded random permutation: the same seed gives the same split.
`--download` first fetches LJSpeech-1.1 (2.6 GB) into the parent of DIR and unpacks it there.
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

import numpy as np
from tqdm import tqdm

from utils import ManifestRow, UserError, read_manifest, run_cli

LJSPEECH_URL = "https://data.keithito.com/data/speech/LJSpeech-1.1.tar.bz2"
DEFAULT_TEST_SIZE = 150
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


def write_manifest(path: Path, rows: list[ManifestRow]) -> None:
    """Write a `file_path,normalized_transcript` CSV with absolute paths (temporary name, then renamed)."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_path", "normalized_transcript"])
        writer.writerows([os.path.abspath(row.audio_path), row.transcript or ""] for row in rows)
    os.replace(partial, path)


def prep_splits(path_to_ljspeech: str | os.PathLike, path_to_save: str | os.PathLike,
                test_size: int | None = None, seed: int = 0) -> tuple[Path, Path, int, int]:
    """Write train.csv and test.csv for an LJSpeech folder; return (train path, test path, #train, #test)."""
    metadata = Path(path_to_ljspeech) / "metadata.csv"
    if not metadata.is_file():
        raise UserError(f"{metadata} does not exist; --path_to_ljspeech must be the unpacked LJSpeech-1.1 folder "
                        "(add --download to fetch it)")
    rows = read_manifest(metadata)  # also stops at the first row whose wav is missing
    # A repeated id would otherwise be able to land in both splits.
    unique = list({os.path.abspath(row.audio_path): row for row in reversed(rows)}.values())[::-1]
    if len(unique) < len(rows):
        print(f"note: {metadata} lists {len(rows) - len(unique)} clip(s) more than once; each is used once")
    train, test = split_rows(unique, resolve_test_size(test_size, len(unique)), seed)
    save = Path(path_to_save)
    save.mkdir(parents=True, exist_ok=True)
    train_path, test_path = save / "train.csv", save / "test.csv"
    write_manifest(train_path, train)
    write_manifest(test_path, test)
    return train_path, test_path, len(train), len(test)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path_to_ljspeech", required=True, help="the LJSpeech-1.1 folder (holds metadata.csv)")
    parser.add_argument("--path_to_save", required=True, help="folder for train.csv and test.csv")
    parser.add_argument("--test_size", type=int, default=None,
                        help=f"clips in test.csv (default {DEFAULT_TEST_SIZE}, or a tenth of a smaller corpus)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split permutation")
    parser.add_argument("--download", action="store_true",
                        help="fetch LJSpeech-1.1 into the parent of --path_to_ljspeech first (2.6 GB)")
    parser.add_argument("--url", default=LJSPEECH_URL, help=argparse.SUPPRESS)  # for tests: a mirror or a dead URL
    args = parser.parse_args(argv)
    try:
        if args.download:
            download_ljspeech(args.path_to_ljspeech, args.url)
        train_path, test_path, num_train, num_test = prep_splits(args.path_to_ljspeech, args.path_to_save,
                                                                 args.test_size, args.seed)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"{num_train} train clips -> {train_path.resolve()}")
    print(f"{num_test} test clips -> {test_path.resolve()}")


if __name__ == "__main__":
    run_cli(main)
