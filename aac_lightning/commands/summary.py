"""`aac-lightning summary --config C [--config ...]`: parameter counts of a configured model, built offline."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from aac_lightning.config import build_model_offline, count_parameters, read_configs


def summary_command(args: Sequence[str]) -> None:
    """Parse the arguments, build the model offline, print `total=<N> trainable=<M>`."""
    parser = argparse.ArgumentParser(
        prog="aac-lightning summary",
        description="Build the configured model offline (random weights, no downloads, no data read) "
        "and print its parameter counts as 'total=<N> trainable=<M>'.",
    )
    parser.add_argument("--config", "-c", action="append", required=True, help="config file(s), merged in order")
    parser.add_argument("--vocab-size", type=int, default=None, help="captioners: vocabulary size to build with")
    parser.add_argument("--verbose", "-v", action="store_true", help="also print per-submodule counts")
    ns = parser.parse_args(args)
    overrides = {} if ns.vocab_size is None else {"vocab_size": ns.vocab_size}
    model = build_model_offline(read_configs(ns.config), **overrides)
    total, trainable = count_parameters(model)
    if ns.verbose:
        for name, child in model.named_children():
            t, tr = count_parameters(child)
            print(f"{name}: total={t} trainable={tr}")
            for sub_name, sub in child.named_children():
                t, tr = count_parameters(sub)
                print(f"  {name}.{sub_name}: total={t} trainable={tr}")
    print(f"total={total} trainable={trainable}")
