"""`aac-lightning export CKPT OUT_DIR`: write a checkpoint as a shareable folder (argparse and printing only).

The work is done by :func:`aac_lightning.pretrained.export_pretrained`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def export_command(args: Sequence[str]) -> None:
    """``aac-lightning export CKPT OUT_DIR [--results FILE] [--overwrite]`` (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="aac-lightning export",
        description="Write a checkpoint (retrieval, XE or SCST) as a self-contained folder that can be uploaded "
        "to a model hub as it is: model.safetensors, config.json (rebuilds the model without handoff files or "
        "downloads), vocabulary.json (captioners), text_encoder/ (retrieval: config and tokenizer) and a model "
        "card README.md. The folder works wherever a checkpoint does (caption, search, caption-eval, "
        "retrieval-eval, Captioner/Retriever.from_pretrained). The card's metrics come from the results.json "
        "of the pipeline run the checkpoint belongs to (its folder or the two above), or from --results.",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint written by aac-lightning (.ckpt)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (must not exist or be empty)")
    parser.add_argument("--results", metavar="FILE", help="results.json (or a stage.json) with the model's test metrics")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    ns = parser.parse_args(list(args))

    from aac_lightning.pretrained import export_pretrained

    try:
        report = export_pretrained(ns.checkpoint, ns.out_dir, results=ns.results, overwrite=ns.overwrite)
    except ValueError as err:  # a checkpoint or results file that is not what it should be (HandoffError included)
        print(f"aac-lightning export: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    rate = f", {report.sample_rate} Hz" if report.sample_rate else ""
    print(f"exported {report.kind} model {report.class_path} ({report.parameters:,} parameters{rate}) to {report.out_dir}")
    for name in report.files:
        print(f"  {name}")
    print(f"model card: {report.results.note}")
    print(f"load it with Captioner/Retriever.from_pretrained('{report.out_dir}') or pass the folder to caption / search")
