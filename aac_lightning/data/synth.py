"""The embedded default dataset: synthetic sound-event sequences with captions, in the Clotho layout.

Each clip is a sequence of 2 or 3 non-overlapping sound events drawn from 8 synthetic types (tonal
events carry a pitch, noisy ones a loudness) over a faint noise floor. Its 5 captions are different
wordings (templates and synonyms) of the same true content, naming the events *in order* — "a low
beep followed by a loud hiss" and "a loud hiss followed by a low beep" are different clips — so a
model needs the audio, and its time structure, to caption or retrieve correctly. Clip `i` of a seed is
the same whatever the number of clips asked for.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

# event type -> (kind, nouns); tonal events take a pitch word, noisy ones a loudness word.
EVENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "beep": ("tonal", ("beep", "bleep", "beeping sound")),
    "buzz": ("tonal", ("buzz", "buzzing noise", "hum")),
    "chirp": ("tonal", ("chirp", "sweep", "rising tone")),
    "siren": ("tonal", ("siren", "wailing siren", "warble")),
    "bell": ("tonal", ("bell", "chime", "ringing bell")),
    "knock": ("noisy", ("knocking", "tapping", "series of knocks")),
    "hiss": ("noisy", ("hiss", "hissing noise", "static")),
    "rumble": ("noisy", ("rumble", "rumbling", "low roar")),
}
ATTRIBUTES = {
    "tonal": {"high": ("high", "high pitched", "shrill"), "low": ("low", "low pitched", "deep")},
    "noisy": {"loud": ("loud", "strong", "intense"), "quiet": ("quiet", "soft", "faint")},
}
TEMPLATES_2 = (
    "{a} followed by {b}",
    "{a} and then {b}",
    "first {a}, then {b}",
    "{b} after {a}",
    "{a} comes before {b}",
    "{a} is heard, and then {b} starts",
    "{a}, then {b}",
)
TEMPLATES_3 = (
    "{a} followed by {b} and then {c}",
    "first {a}, then {b}, and finally {c}",
    "{a} then {b} then {c}",
    "{a}, {b}, and {c} one after another",
    "{a} is followed by {b}, which is followed by {c}",
    "{a} and {b} come before {c}",
    "{c} after {a} and {b}",
)
SUBSET_SHARES = (("development", 0.6), ("validation", 0.2), ("evaluation", 0.2))


@dataclass(frozen=True)
class Event:
    kind: str  # key of EVENTS
    attribute: str  # high / low / loud / quiet
    start: float  # seconds
    duration: float  # seconds


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _event_phrase(event: Event, rng: np.random.Generator) -> str:
    kind, nouns = EVENTS[event.kind]
    adjective = rng.choice(ATTRIBUTES[kind][event.attribute])
    noun = rng.choice(nouns)
    if noun.startswith("series of"):
        return f"a series of {adjective} knocks"
    return _article(f"{adjective} {noun}")


def captions_for(events: list[Event], rng: np.random.Generator, n_captions: int = 5) -> list[str]:
    """`n_captions` differently worded captions naming the events in order."""
    templates = TEMPLATES_2 if len(events) == 2 else TEMPLATES_3
    chosen = rng.choice(len(templates), size=n_captions, replace=False)
    captions = []
    for t in chosen:
        phrases = dict(zip("abc", (_event_phrase(e, rng) for e in events)))
        text = templates[t].format(**phrases)
        captions.append(text[0].upper() + text[1:] + ".")
    return captions


def _tone(freq: np.ndarray, sr: int) -> np.ndarray:
    """A sine with instantaneous frequency `freq` (Hz, per sample)."""
    return np.sin(2 * np.pi * np.cumsum(freq) / sr)


def render_event(event: Event, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Samples of one event (float64, peak about 1 for loud/tonal, lower for quiet)."""
    n = int(event.duration * sr)
    t = np.arange(n) / sr
    pitch = (1600.0 if event.attribute == "high" else 400.0) * rng.uniform(0.9, 1.1)
    gain = {"loud": 0.9, "quiet": 0.25}.get(event.attribute, 0.6)
    envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)  # 20 ms fades
    if event.kind == "beep":  # three short pulses
        gate = (t % (event.duration / 3)) < event.duration / 5
        x = _tone(np.full(n, pitch), sr) * gate
    elif event.kind == "buzz":  # harmonic-rich sawtooth-like wave
        phase = np.cumsum(np.full(n, pitch)) / sr
        x = 0.6 * (2 * (phase % 1.0) - 1)
    elif event.kind == "chirp":  # rising sweep over one octave
        x = _tone(pitch * np.exp(np.log(2) * t / event.duration), sr)
    elif event.kind == "siren":  # slow vibrato around the pitch
        x = _tone(pitch * (1 + 0.15 * np.sin(2 * np.pi * 3 * t)), sr)
    elif event.kind == "bell":  # decaying inharmonic partials
        x = sum(a * _tone(np.full(n, pitch * r), sr) for a, r in ((1, 1), (0.5, 2.76), (0.3, 5.4))) / 1.8
        x *= np.exp(-3 * t / event.duration)
    elif event.kind == "knock":  # short broadband clicks, 4-6 of them
        x = np.zeros(n)
        for k in np.linspace(0, n - int(0.05 * sr), rng.integers(4, 7)).astype(int):
            m = int(0.03 * sr)
            x[k : k + m] += rng.standard_normal(m) * np.exp(-np.arange(m) / (0.005 * sr))
        x /= max(1e-9, np.abs(x).max())
    elif event.kind == "hiss":  # high-passed white noise
        w = rng.standard_normal(n + 1)
        x = 0.5 * (w[1:] - w[:-1])
    elif event.kind == "rumble":  # low-passed (integrated) noise
        x = np.cumsum(rng.standard_normal(n))
        x -= np.convolve(x, np.ones(400) / 400, mode="same")
        x /= max(1e-9, np.abs(x).max())
    else:
        raise ValueError(f"unknown event kind {event.kind!r}")
    return gain * envelope * x


def make_clip(index: int, seed: int, sr: int) -> tuple[np.ndarray, list[Event], list[str]]:
    """Audio, events and captions of clip `index` for `seed` (independent of the other clips)."""
    rng = np.random.default_rng([seed, index])
    n_events = int(rng.integers(2, 4))
    kinds = rng.choice(list(EVENTS), size=n_events, replace=False)
    events, cursor = [], float(rng.uniform(0.1, 0.4))
    for kind in kinds:
        attribute = str(rng.choice(list(ATTRIBUTES[EVENTS[kind][0]])))
        duration = float(rng.uniform(0.7, 1.2))
        events.append(Event(str(kind), attribute, cursor, duration))
        cursor += duration + float(rng.uniform(0.1, 0.3))
    total = cursor + float(rng.uniform(0.0, 0.3))
    audio = 0.01 * rng.standard_normal(int(total * sr))
    for event in events:
        start = int(event.start * sr)
        samples = render_event(event, sr, rng)
        audio[start : start + len(samples)] += samples
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    return audio, events, captions_for(events, rng)


def _file_name(index: int) -> str:
    # Real Clotho names hold spaces, commas, brackets and non-ASCII letters; so do these.
    patterns = ("clip {i:05d}.wav", "clip_{i:05d}, take 2.wav", "clip [{i:05d}] (mix).wav", "clip_{i:05d}_café.wav")
    return patterns[index % len(patterns)].format(i=index)


def write_synthetic_clotho(
    out_dir: str | os.PathLike,
    n_clips: int = 400,
    seed: int = 0,
    sample_rate: int = 32000,
) -> dict[str, int]:
    """Write a synthetic dataset in the aac-datasets Clotho layout under `out_dir`.

    Layout: `CLOTHO_v2.1/clotho_csv_files/clotho_captions_<subset>.csv` and
    `CLOTHO_v2.1/clotho_audio_files/<subset>/*.wav` for development / validation / evaluation (60/20/20
    of `n_clips`), plus `CLOTHO_v2.1/synth_events.json` with each clip's true events.

    Returns:
        the number of clips per subset.
    """
    if n_clips < 3:
        raise ValueError(f"n_clips must be at least 3 (one per subset), got {n_clips}")
    base = Path(out_dir) / "CLOTHO_v2.1"
    counts, start = {}, 0
    for k, (subset, share) in enumerate(SUBSET_SHARES):
        count = n_clips - start if k == len(SUBSET_SHARES) - 1 else max(1, int(round(share * n_clips)))
        counts[subset] = count
        start += count
    truth: dict[str, list[dict]] = {}
    index = 0
    for subset, count in counts.items():
        audio_dir = base / "clotho_audio_files" / subset
        audio_dir.mkdir(parents=True, exist_ok=True)
        csv_dir = base / "clotho_csv_files"
        csv_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for _ in range(count):
            audio, events, captions = make_clip(index, seed, sample_rate)
            fname = _file_name(index)
            sf.write(audio_dir / fname, audio, sample_rate, subtype="PCM_16")
            rows.append([fname, *captions])
            truth[f"{subset}/{fname}"] = [e.__dict__ for e in events]
            index += 1
        with open(csv_dir / f"clotho_captions_{subset}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", *(f"caption_{i}" for i in range(1, 6))])
            writer.writerows(rows)
    meta = {"seed": seed, "sample_rate": sample_rate, "counts": counts, "events": truth}
    (base / "synth_events.json").write_text(json.dumps(meta, ensure_ascii=False, indent=0), encoding="utf-8")
    return counts
