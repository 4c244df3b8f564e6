"""Side-by-side speed of CIDEr-D implementations on one SCST batch.

One SCST step scores ``clips x samples`` sampled captions (64 x 5 by default) against the 5
references of their clip, with document frequencies taken from the batch's references (the
default mode of aac-metrics' ``cider_d``). This script times:

- ``aac_metrics.functional.cider_d`` (``preprocess`` is not involved: the captions are already
  normalised),
- ``pycocoevalcap.cider.Cider`` (the COCO scorer, which computes CIDEr-D too),
- ``aac_lightning.metrics.cider.cider_d`` (default mode) and ``CiderD`` with fixed training-corpus
  document frequencies (the SCST setting),

checks that the three agree on every candidate, and prints a table of ms per call and ratios.

Captions come from ``make_clotho_like_captions``: a deterministic generator of varied English
captions of 8-20 words in the style of Clotho (a few hundred word vocabulary), because the real
Clotho captions cannot be shipped with the project.

Usage::

    python bench/bench_cider.py [--clips 64] [--samples 5] [--repeats 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

# Word lists for the generator: sound sources, actions, manners, places, background events.
_SUBJECTS = [
    "a dog", "a small dog", "several dogs", "a cat", "a bird", "many birds", "a crow", "a rooster",
    "a man", "a woman", "a child", "children", "a group of people", "a crowd", "a baby",
    "a car", "cars", "a truck", "a motorcycle", "a train", "a bus", "an airplane", "a helicopter",
    "a door", "a heavy door", "footsteps", "a person", "someone", "water", "rain", "the wind",
    "a river", "waves", "a stream", "a fire", "an engine", "a machine", "a clock", "a bell",
    "church bells", "a phone", "an alarm", "a horn", "a siren", "thunder", "a frog", "insects",
    "crickets", "a cow", "sheep", "a horse", "a duck", "geese", "a seagull", "a drill", "a saw",
    "a hammer", "a vacuum cleaner", "a fan", "a kettle", "a faucet", "a shower", "a toilet",
    "a piano", "a guitar", "a drum", "music", "an orchestra", "a radio", "a television",
]
_VERBS = [
    "barks", "chirps", "sings", "talks", "speaks", "shouts", "laughs", "cries", "screams",
    "whistles", "hums", "passes by", "drives by", "approaches", "moves away", "idles", "revs",
    "honks", "rings", "ticks", "buzzes", "creaks", "slams", "opens", "closes", "drips", "flows",
    "splashes", "crackles", "roars", "rumbles", "beeps", "clicks", "knocks", "taps", "bangs",
    "scrapes", "rustles", "blows", "pours", "runs", "walks", "plays", "starts", "stops",
    "squeaks", "croaks", "howls", "growls", "meows", "clucks", "quacks", "buzzes loudly",
]
_MANNERS = [
    "loudly", "quietly", "softly", "repeatedly", "continuously", "rhythmically", "briefly",
    "in the distance", "nearby", "in the background", "for a while", "several times",
    "over and over", "at a steady pace", "very fast", "slowly", "intermittently", "steadily",
]
_PLACES = [
    "in a park", "on a busy street", "in a forest", "near a river", "in a kitchen",
    "in a large room", "outside", "inside a building", "on a farm", "at the beach",
    "in a city", "in a quiet neighborhood", "in a train station", "at a construction site",
    "in the rain", "on a windy day", "in a small room", "in a hallway", "on gravel", "on a road",
]
_BACKGROUNDS = [
    "while birds chirp", "while people talk", "as cars pass by", "as the wind blows",
    "while water runs", "while a dog barks", "as rain falls", "while music plays",
    "and then stops", "and then starts again", "with a hum in the background",
    "while footsteps approach", "as a door closes", "with traffic noise", "and fades out",
]
_OPENERS = ["", "", "", "in the distance ", "outside ", "nearby ", "at first "]
_FILE_WORDS = ["birds", "forest", "rain", "street", "kitchen", "door", "train", "walk", "park",
               "night", "river", "city", "market", "wind", "engine", "dog", "bells", "cafe"]


def _one_caption(rng: random.Random, subject: str, verb: str) -> str:
    """One Clotho-style caption (raw format: capitalised, final period, sometimes a comma)."""
    parts = [rng.choice(_OPENERS) + subject, verb]
    if rng.random() < 0.7:
        parts.append(rng.choice(_MANNERS))
    if rng.random() < 0.6:
        parts.append(rng.choice(_PLACES))
    if rng.random() < 0.6:
        sep = ", " if rng.random() < 0.4 else " "
        parts[-1] = parts[-1] + sep.rstrip()
        parts.append(rng.choice(_BACKGROUNDS))
    words = " ".join(parts).split()
    while len(words) < 8:
        words += rng.choice(_MANNERS + _PLACES).split()
    words = words[:20]
    text = " ".join(words).rstrip(",")
    return text[0].upper() + text[1:] + "."


def make_clotho_like_captions(num_clips: int, seed: int = 0, captions_per_clip: int = 5) -> list[list[str]]:
    """Return ``num_clips`` lists of ``captions_per_clip`` raw Clotho-style captions.

    The captions of one clip share a sound source and action most of the time, like real
    annotators describing the same audio, but differ in wording and length (8-20 words).
    """
    rng = random.Random(seed)
    clips = []
    for _ in range(num_clips):
        subject, verb = rng.choice(_SUBJECTS), rng.choice(_VERBS)
        caps = []
        for _ in range(captions_per_clip):
            if rng.random() < 0.25:  # some annotators name another source or action
                caps.append(_one_caption(rng, rng.choice(_SUBJECTS), rng.choice(_VERBS)))
            else:
                caps.append(_one_caption(rng, subject, verb))
        clips.append(caps)
    return clips


def make_clotho_like_file_names(num_clips: int, seed: int = 0) -> list[str]:
    """Real-format Clotho file names: spaces, commas, apostrophes, parentheses, dots."""
    rng = random.Random(seed + 1)
    names = []
    for i in range(num_clips):
        words = rng.sample(_FILE_WORDS, 2)
        style = i % 4
        if style == 0:
            names.append(f"{words[0]} {words[1]} {i:03d}.wav")
        elif style == 1:
            names.append(f"{words[0].capitalize()}, {words[1]} (take {i}).wav")
        elif style == 2:
            names.append(f"{words[0]}_{words[1]}'s \"rec\" {i}.wav")
        else:
            names.append(f"{words[0]}.{words[1]} - 2021-{i:02d}.wav")
    return names


def normalise(caption: str) -> str:
    """Lower case, punctuation removed, single spaces (what the captioner's vocabulary sees)."""
    caption = re.sub(r"[^a-z0-9' ]+", " ", caption.lower())
    return " ".join(caption.split())


def sample_like_a_captioner(rng: random.Random, references: list[str], vocabulary: list[str]) -> str:
    """A plausible sampled caption: a reference with words dropped, swapped or replaced."""
    words = rng.choice(references).split()
    out = []
    for word in words:
        u = rng.random()
        if u < 0.1:
            continue
        out.append(rng.choice(vocabulary) if u < 0.25 else word)
    if len(out) > 3 and rng.random() < 0.3:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


def scst_batch(clips: int, samples: int, seed: int) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(candidates, references per candidate, training references) for one SCST step."""
    rng = random.Random(seed)
    train = [[normalise(c) for c in caps] for caps in make_clotho_like_captions(3000, seed=seed + 7)]
    batch_refs = [[normalise(c) for c in caps] for caps in make_clotho_like_captions(clips, seed=seed + 11)]
    vocabulary = sorted({w for caps in train for c in caps for w in c.split()})
    candidates, references = [], []
    for refs in batch_refs:
        for _ in range(samples):
            candidates.append(sample_like_a_captioner(rng, refs, vocabulary))
            references.append(refs)  # the same list object repeated, as an SCST batch has it
    return candidates, references, train


def _time_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (imports, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-fixture", type=Path, default=None,
                        help="write a JSON fixture of raw captions and file names there and exit")
    args = parser.parse_args(argv)

    if args.write_fixture is not None:
        clips = make_clotho_like_captions(100, seed=2022)
        names = make_clotho_like_file_names(100, seed=2022)
        payload = {
            "description": "Clotho-format captions (raw: capitals, punctuation) made by "
                           "bench/bench_cider.py --write-fixture; 100 clips x 5 captions.",
            "clips": [{"file_name": n, "captions": c} for n, c in zip(names, clips)],
        }
        args.write_fixture.write_text(json.dumps(payload, indent=1) + "\n")
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from aac_lightning.metrics.cider import CiderD, CiderDocumentFrequency, cider_d

    candidates, references, train = scst_batch(args.clips, args.samples, args.seed)
    words = [len(c.split()) for refs in references[:: args.samples] for c in refs]
    print(f"batch: {len(candidates)} candidates, {len(references[0])} references each, "
          f"reference length {min(words)}-{max(words)} words, "
          f"vocabulary {len({w for r in references for c in r for w in c.split()})} words")

    rows: list[tuple[str, float]] = []
    results: dict[str, np.ndarray] = {}

    try:
        from aac_metrics.functional import cider_d as aac_cider_d

        def run_aac() -> None:
            _, sents = aac_cider_d(candidates, references)
            results["aac-metrics cider_d"] = sents["cider_d"].numpy()

        rows.append(("aac-metrics cider_d", _time_ms(run_aac, args.repeats)))
    except ImportError as err:
        print(f"aac-metrics unavailable: {err}")

    try:
        from pycocoevalcap.cider.cider import Cider

        gts = {i: refs for i, refs in enumerate(references)}
        res = {i: [c] for i, c in enumerate(candidates)}

        def run_coco() -> None:
            _, scores = Cider().compute_score(gts, res)
            results["pycocoevalcap Cider"] = np.asarray(scores)

        rows.append(("pycocoevalcap Cider", _time_ms(run_coco, args.repeats)))
    except ImportError as err:
        print(f"pycocoevalcap unavailable: {err}")

    def run_ours() -> None:
        _, scores = cider_d(candidates, references)
        results["aac_lightning cider_d"] = scores.numpy()

    rows.append(("aac_lightning cider_d", _time_ms(run_ours, args.repeats)))

    start = time.perf_counter()
    train_df = CiderDocumentFrequency.from_references(train)
    df_ms = (time.perf_counter() - start) * 1000.0
    scorer = CiderD(document_frequency=train_df)
    # A different computation (document frequencies fixed from a training corpus, not recomputed from
    # the batch's references as the others do): timed for comparison, its scores are not compared.
    rows.append(("* CiderD, fixed train df (other df)", _time_ms(lambda: scorer(candidates, references), args.repeats)))

    ours = results["aac_lightning cider_d"]
    for name, scores in results.items():
        if name != "aac_lightning cider_d":
            print(f"max |ours - {name}| over {len(ours)} candidates: {np.abs(ours - scores).max():.2e}")
    for name, scores in results.items():  # the README's claim: equal per candidate to 1e-6, enforced
        gap = float(np.abs(ours - scores).max())
        if gap > 1e-6:
            raise SystemExit(f"disagreement with {name}: max per-candidate gap {gap:.2e} > 1e-6")
    print(f"training document frequencies from {len(train)} clips: {df_ms:.0f} ms (once)")
    print()
    base = rows[0][1]
    print(f"{'implementation':34s} {'ms/call':>9s} {'speed-up vs ' + rows[0][0]:>32s}")
    for name, ms in rows:
        print(f"{name:34s} {ms:9.2f} {base / ms:31.1f}x")


if __name__ == "__main__":
    main()
