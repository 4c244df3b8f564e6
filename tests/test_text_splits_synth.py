"""Caption normalisation and vocabulary, the 9:1 re-split, and the synthetic dataset."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aac_lightning.data import Clotho, Vocabulary, normalize_caption, resplit
from aac_lightning.data.splits import write_split_lists
from aac_lightning.data.synth import EVENTS, Event, captions_for, make_clip, write_synthetic_clotho

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("A dog barks, then it stops.", "a dog barks then it stops"),
        ("Someone's  walking -- on 'gravel'!", "someone 's walking on gravel"),
        ("Birds don't sing; rain (heavy) falls...", "birds do n't sing rain heavy falls"),
        ("CAFÉ noise\tand\nchatter", "café noise and chatter"),
        ("\u201cQuoted\u201d words \u2019n stuff", "quoted words n stuff"),
        ("   ", ""),
    ],
)
def test_normalize_caption(raw: str, expected: str):
    assert normalize_caption(raw) == expected


def test_vocabulary_build_min_count_roundtrip(tmp_path: Path):
    captions = ["A dog barks.", "a dog, a cat", "The cat meows"]
    vocab = Vocabulary.build(captions, min_count=2)
    # counts: a 3, dog 2, cat 2 -> sorted by count then word
    assert vocab.words == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "cat", "dog"]
    assert vocab.encode("A cat barks!") == [1, 4, 5, 3, 2]
    assert vocab.decode([1, 4, 6, 2, 5, 5]) == "a dog"
    assert Vocabulary.build(list(reversed(captions)), min_count=2) == vocab  # order-free
    vocab.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json") == vocab
    assert Vocabulary.from_dict(vocab.to_dict()) == vocab
    with pytest.raises(ValueError, match="must start with the special tokens"):
        Vocabulary(["a", "b"])
    with pytest.raises(ValueError, match="min_count must be >= 1"):
        Vocabulary.build(captions, min_count=0)
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot read vocabulary file"):
        Vocabulary.load(tmp_path / "bad.json")


def test_resplit_is_per_clip_order_free_and_9_to_1():
    keys = [f"clotho/development/clip {i}.wav" for i in range(3839)] + [f"clotho/validation/v{i}.wav" for i in range(1045)]
    train, val = resplit(keys, 0.9, seed=7)
    assert len(train) == round(0.9 * len(keys)) and len(train) + len(val) == len(keys)
    assert not set(train) & set(val) and set(train) | set(val) == set(keys)
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    assert resplit(shuffled, 0.9, seed=7) == (train, val)
    assert resplit(keys, 0.9, seed=8) != (train, val)
    with pytest.raises(ValueError, match="unique clip keys"):
        resplit(keys + keys[:1])


def test_resplit_identical_in_another_process():
    code = (
        "import json;from aac_lightning.data import resplit;"
        "keys=[f'clotho/development/c{i}.wav' for i in range(500)];"
        "print(json.dumps(resplit(reversed(keys), 0.9, seed=3)))"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True)
        outputs.append(json.loads(out.stdout))
    keys = [f"clotho/development/c{i}.wav" for i in range(500)]
    here = [list(part) for part in resplit(keys, 0.9, seed=3)]
    assert outputs[0] == outputs[1] == here


def test_split_lists_written(tmp_path: Path):
    path = write_split_lists(tmp_path / "run", {"train": ["a", "b"], "val": ["c"]}, {"seed": 1})
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {"meta": {"seed": 1}, "splits": {"train": ["a", "b"], "val": ["c"]}}


def test_synth_read_back_through_clotho(synth_root: Path):
    dev, val, ev = (Clotho(synth_root, s, sample_rate=16000) for s in ("development", "validation", "evaluation"))
    assert (len(dev), len(val), len(ev)) == (18, 6, 6)
    truth = json.loads((synth_root / "CLOTHO_v2.1" / "synth_events.json").read_text(encoding="utf-8"))["events"]
    for item in (dev[0], val[1], ev[2]):
        caps = item["captions"]
        assert len(caps) == 5 and len(set(caps)) == 5  # five different wordings
        events = truth[f"{item['subset']}/{item['fname']}"]
        assert 2 <= len(events) <= 3
        end = max(e["start"] + e["duration"] for e in events)
        assert item["audio"].shape[1] / 16000 >= end  # the audio holds every event
        for caption in caps:
            # every caption names every event's attribute and a noun of its kind
            low = normalize_caption(caption)
            for e in events:
                nouns = [normalize_caption(n) for n in EVENTS[e["kind"]][1]] + ["knocks"]
                assert any(n in low for n in nouns), (caption, e)


def test_synth_captions_depend_on_order_and_are_deterministic(tmp_path: Path):
    audio_a, events_a, caps_a = make_clip(5, seed=11, sr=8000)
    audio_b, events_b, caps_b = make_clip(5, seed=11, sr=8000)
    assert caps_a == caps_b and (audio_a == audio_b).all() and events_a == events_b
    # The template "{a} followed by {b}" lists events in time order: reversing the order changes captions.
    orders = {tuple(e.kind for e in make_clip(i, seed=0, sr=8000)[1]) for i in range(200)}
    assert any(tuple(reversed(o)) in orders for o in orders if len(o) == 2)
    # the same two events in the other order, worded with the same random draws: no caption in common
    beep, hiss = Event("beep", "high", 0.0, 0.5), Event("hiss", "loud", 0.6, 0.5)
    for seed in range(5):
        forward = captions_for([beep, hiss], np.random.default_rng(seed))
        backward = captions_for([hiss, beep], np.random.default_rng(seed))
        assert not set(forward) & set(backward), (forward, backward)
        for caption in forward + backward:
            assert "high" in caption.lower() or "shrill" in caption.lower(), caption  # both events named
    write_synthetic_clotho(tmp_path / "a", n_clips=6, seed=2, sample_rate=8000)
    write_synthetic_clotho(tmp_path / "b", n_clips=6, seed=2, sample_rate=8000)
    for sub in ("development", "validation", "evaluation"):
        fa = sorted((tmp_path / "a" / "CLOTHO_v2.1" / "clotho_audio_files" / sub).iterdir())
        fb = sorted((tmp_path / "b" / "CLOTHO_v2.1" / "clotho_audio_files" / sub).iterdir())
        assert [f.read_bytes() for f in fa] == [f.read_bytes() for f in fb]


def test_synth_cli_and_help(tmp_path: Path):
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-m", "aac_lightning", "--help"], capture_output=True, text=True, cwd=REPO, env=env, check=True)
    for sub in ("fit", "validate", "test", "predict", "synth"):
        assert f"  {sub} " in out.stdout, sub
    subprocess.run(
        [sys.executable, "-m", "aac_lightning", "synth", str(tmp_path / "s"), "--clips", "5", "--seed", "4", "--sample-rate", "8000"],
        check=True, cwd=REPO, capture_output=True, env=env,
    )
    ds = Clotho(tmp_path / "s", "dev", sample_rate=8000)
    assert len(ds) == 3 and ds[0]["captions"] == make_clip(0, seed=4, sr=8000)[2]
