"""Is a dataset where a config says it is? Cheap checks (folders and caption files, no audio read) for
`aac-lightning pipeline RECIPE --check` and `aac-lightning fit ... --check`.

Each check returns `(ok, detail)`: the files found, or what was looked for and how to get the data.
"""

from __future__ import annotations

import os

from aac_lightning.data.datasets import find_audiocaps_files, find_clotho_files, find_macs_files

__all__ = ["DATA_SOURCES_HELP", "data_subsets", "source_presence"]

# How to get each dataset, as the check prints it.
DATA_SOURCES_HELP = {
    "clotho": (
        "Clotho v2.1 (Zenodo record 4783391, or `aac-datasets-download --root ROOT clotho`): "
        "ROOT/CLOTHO_v2.1/clotho_csv_files/clotho_captions_<subset>.csv and ROOT/CLOTHO_v2.1/clotho_audio_files/<subset>/ "
        "(the unzipped Zenodo files directly under ROOT work too)"
    ),
    "audiocaps": (
        "AudioCaps (`aac-datasets-download --root ROOT audiocaps`, needs yt-dlp and ffmpeg): "
        "ROOT/AUDIOCAPS/csv_files_v1/<subset>.csv and ROOT/AUDIOCAPS/audio_32000Hz/<subset>/"
    ),
    "macs": "MACS (`aac-datasets-download --root ROOT macs`): ROOT/MACS/MACS.yaml and ROOT/MACS/audio/",
}


def data_subsets(source: str, splits: set[str], resplit: bool = True) -> list[str]:
    """The on-disk subsets of `source` that the splits `train` / `val` / `test` read (datamodule rules)."""
    subsets: list[str] = []
    if source == "clotho":
        if splits & {"train", "val"}:
            if resplit:
                subsets += ["development", "validation"]
            else:
                subsets += (["development"] if "train" in splits else []) + (["validation"] if "val" in splits else [])
        if "test" in splits:
            subsets.append("evaluation")
    elif source == "audiocaps":
        subsets = [s for s in ("train", "val", "test") if s in splits]
    elif source == "macs":
        subsets = ["train"] if "train" in splits else []
    return subsets


def source_presence(source: str, root: str | os.PathLike | None, subset: str, audio_format: str = "flac") -> tuple[bool, str]:
    """Whether `root` holds `subset` of `source` (`clotho`, `audiocaps`, `macs`): `(ok, found files or reason)`."""
    if root is None:
        return False, f"{source}_root is not set"
    if not os.path.isdir(os.path.expanduser(os.fspath(root))):
        return False, f"folder '{root}' does not exist"
    try:
        if source == "clotho":
            csv_path, audio_dir = find_clotho_files(os.path.expanduser(os.fspath(root)), subset)
        elif source == "audiocaps":
            csv_path, audio_dir = find_audiocaps_files(os.path.expanduser(os.fspath(root)), subset, audio_format)
        elif source == "macs":
            csv_path, audio_dir = find_macs_files(os.path.expanduser(os.fspath(root)))
        else:
            return False, f"unknown data source {source!r}"
    except (FileNotFoundError, ValueError) as err:
        return False, str(err)
    return True, f"{csv_path}, {audio_dir}/"
