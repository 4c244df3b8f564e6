"""Inference API and commands: Captioner / Retriever against independent paths, real file formats, the cache, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import aac_lightning.inference.audio as inference_audio
from aac_lightning.cli import main
from aac_lightning.data import Clotho
from aac_lightning.data.audio import AudioError, load_audio, resample
from aac_lightning.inference import CACHE_DIR_NAME, Captioner, Retriever
from aac_lightning.checkpoints import HandoffError, read_checkpoint
from aac_lightning.ensembles.captioning import CaptionEnsemble, load_captioner
from aac_lightning.ensembles.retrieval import RetrievalEnsemble
from tests.test_scst_module import xe_ckpt  # noqa: F401  (fixture)
from tests.test_xe_module import retrieval_ckpt  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def eval_paths(synth_root: Path) -> list[Path]:
    return [r.path for r in Clotho(synth_root, "evaluation").records]


@pytest.fixture(scope="module")
def caption_ckpt(xe_ckpt: Path, eval_paths, tmp_path_factory) -> Path:  # noqa: F811
    """The tiny XE captioner made to listen: its GRU input whitened against the test clips' features
    and its decoder's memory projection amplified. Trained for a few steps, it says nearly the same
    thing for every clip, which would hide a caption given to the wrong file."""
    module = load_captioner(xe_ckpt)
    frames = []
    with torch.no_grad():
        for path in eval_paths:
            audio, _ = load_audio(path, module.extractor.sample_rate)  # (1, T)
            frames.append(module.extractor(audio, torch.tensor([audio.shape[1]]))["frames"][0])  # (T', D)
    frames = torch.cat(frames)  # (N, D)
    mean, std = frames.mean(0), frames.std(0).clamp(min=1e-6)
    ckpt = read_checkpoint(xe_ckpt)
    state = ckpt["state_dict"]
    for suffix in ("", "_reverse"):  # W x + b  ->  W (x - mean) / std + b
        weight = state[f"model.encoder.gru.weight_ih_l0{suffix}"] / std  # (3H, D)
        state[f"model.encoder.gru.weight_ih_l0{suffix}"] = weight
        state[f"model.encoder.gru.bias_ih_l0{suffix}"] = state[f"model.encoder.gru.bias_ih_l0{suffix}"] - weight @ mean
    state["model.decoder.memory_projection.weight"] = 30 * state["model.decoder.memory_projection.weight"]
    path = tmp_path_factory.mktemp("listening") / "listening.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def captioner(caption_ckpt: Path) -> Captioner:
    member = load_captioner(caption_ckpt)
    return Captioner.from_checkpoint(caption_ckpt, beam_size=member.hparams.beam_size, max_length=member.hparams.max_decode_length)


@pytest.fixture(scope="module")
def other_retrieval_ckpt(retrieval_ckpt: Path, tmp_path_factory) -> Path:  # noqa: F811
    """The same architecture with other audio-projection weights: other embeddings, other cache key."""
    ckpt = read_checkpoint(retrieval_ckpt)
    generator = torch.Generator().manual_seed(1)
    weight = ckpt["state_dict"]["model.audio_projection.weight"]
    ckpt["state_dict"]["model.audio_projection.weight"] = weight + torch.randn(weight.shape, generator=generator)
    path = tmp_path_factory.mktemp("other") / "other.ckpt"
    torch.save(ckpt, path)
    return path


def _module_captions(module, paths: list[Path]) -> list[str]:
    """Captions from the module's own extractor and `decode` (its beam search), one clip at a time."""
    captions = []
    with torch.no_grad():
        for path in paths:
            audio, _ = load_audio(path, module.extractor.sample_rate)  # (1, T)
            out = module.extractor(audio, torch.tensor([audio.shape[1]]))
            captions += module.decode(out["frames"], out["frame_lengths"])
    return captions


# ------------------------------------------------------------------------------------- captioning


def test_caption_equals_the_module_beam_search_and_an_ensemble_of_two_copies(caption_ckpt: Path, captioner: Captioner, eval_paths):
    module = load_captioner(caption_ckpt)
    expected = _module_captions(module, eval_paths)
    assert len(set(expected)) >= 3  # the captions tell the clips apart, so a mix-up would show
    assert captioner.caption(eval_paths, batch_size=1) == [(str(p), c) for p, c in zip(eval_paths, expected)]
    reference = CaptionEnsemble.from_checkpoints(
        [str(caption_ckpt)], beam_size=module.hparams.beam_size, max_length=module.hparams.max_decode_length
    )
    assert reference.caption_files(eval_paths, batch_size=1) == expected
    # clips of different lengths decoded together: each caption is still the clip's own
    assert len({sf.info(p).frames for p in eval_paths[:4]}) > 1
    assert [c for _, c in captioner.caption(eval_paths, batch_size=4)] == expected
    two = Captioner.from_checkpoint(
        [caption_ckpt, caption_ckpt], beam_size=module.hparams.beam_size, max_length=module.hparams.max_decode_length
    )
    assert [c for _, c in two.caption(eval_paths, batch_size=4)] == expected


def _write_recordings(source: Path, folder: Path) -> list[Path]:
    """The same clip in four real-world encodings, two of them in a sub-folder."""
    data, rate = sf.read(source, dtype="float32")  # (T,)
    stereo = np.stack([data, 0.5 * data], axis=1)  # (T, 2), channels differ
    specs = [
        ("a 8k pcm16.wav", 8000, data, "PCM_16"),
        ("sub/b 44k1 pcm24 stereo.wav", 44100, stereo, "PCM_24"),
        ("sub/c 48k float.wav", 48000, data, "FLOAT"),
        ("d 22k05.flac", 22050, data, "PCM_16"),
    ]
    paths = []
    for name, target, samples, subtype in specs:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, resample(samples, rate, target), target, subtype=subtype)
        paths.append(path)
    return paths


def test_real_recordings_in_any_format_rate_and_channel_count(captioner: Captioner, eval_paths, tmp_path: Path):
    folder = tmp_path / "recs"
    paths = _write_recordings(eval_paths[0], folder)
    (folder / "notes.txt").write_text("not audio", encoding="utf-8")  # ignored by the folder expansion
    info = [sf.info(p) for p in paths]
    assert [(i.samplerate, i.channels, i.subtype) for i in info] == [
        (8000, 1, "PCM_16"), (44100, 2, "PCM_24"), (48000, 1, "FLOAT"), (22050, 1, "PCM_16")
    ]
    results = captioner.caption(folder)  # recursive, sorted by path
    in_order = ("a 8k pcm16.wav", "d 22k05.flac", "sub/b 44k1 pcm24 stereo.wav", "sub/c 48k float.wav")
    assert [r[0] for r in results] == [str(folder / n) for n in in_order]
    by_file = dict(results)
    for path in paths:
        samples, rate = sf.read(path, dtype="float32", always_2d=True)  # (T, C)
        assert captioner.caption_waveform(samples.T, rate) == by_file[str(path)], path.name
        assert captioner.caption([path]) == [(str(path), by_file[str(path)])]
    # integer PCM arrays are scaled like the file reader scales them; mono may be 1-D; tensors work
    pcm, rate = sf.read(paths[0], dtype="int16")  # (T,)
    assert captioner.caption_waveform(pcm, rate) == by_file[str(paths[0])]
    assert captioner.caption_waveform(torch.from_numpy(pcm.astype(np.float32) / 32768), rate) == by_file[str(paths[0])]
    with pytest.raises(ValueError, match=r"more channels than samples: pass \(channels, time\)"):
        captioner.caption_waveform(np.zeros((16000, 2), dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="non-finite"):
        captioner.caption_waveform(np.full(16000, np.nan, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="sample_rate must be a positive int"):
        captioner.caption_waveform(np.zeros(16000, dtype=np.float32), 0)


def test_caption_command_prints_lines_and_writes_the_submission_csv(
    caption_ckpt: Path, captioner: Captioner, eval_paths, tmp_path: Path, capsys
):
    folder = tmp_path / "audio"
    folder.mkdir()
    for path in eval_paths[:2]:  # synthetic names hold commas, brackets, non-ASCII letters
        shutil.copy(path, folder / path.name)
    single = tmp_path / 'one, "quoted".wav'
    shutil.copy(eval_paths[2], single)
    out = tmp_path / "sub" / "submission.csv"
    beam = str(captioner.ensemble.beam_size)
    max_length = str(captioner.ensemble.max_length)
    main(["caption", str(caption_ckpt), str(folder), str(single), "--out", str(out), "--beam-size", beam, "--max-length", max_length])
    lines = capsys.readouterr().out.splitlines()
    expected_names = sorted(p.name for p in eval_paths[:2]) + [str(single)]
    module = captioner.ensemble.captioners[0]
    expected_captions = _module_captions(module, [folder / n for n in expected_names[:2]] + [single])
    assert lines == [f"{n}\t{c}" for n, c in zip(expected_names, expected_captions)]
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows == [["file_name", "caption_predicted"]] + [[n, c] for n, c in zip(expected_names, expected_captions)]


def test_caption_bad_input_gives_clear_errors_or_counted_skips(
    caption_ckpt: Path, retrieval_ckpt: Path, captioner: Captioner, eval_paths, tmp_path: Path, capsys, caplog  # noqa: F811
):
    not_a_ckpt = tmp_path / "notes.ckpt"
    not_a_ckpt.write_text("hello", encoding="utf-8")
    with pytest.raises(HandoffError, match="notes.ckpt"):
        Captioner.from_checkpoint(not_a_ckpt)
    with pytest.raises(HandoffError, match="stage kind 'contrastive', not a captioner"):
        Captioner.from_checkpoint(retrieval_ckpt)
    with pytest.raises(SystemExit, match="stage kind 'contrastive', not a captioner"):
        main(["caption", str(retrieval_ckpt), str(eval_paths[0])])
    missing = tmp_path / "nowhere.wav"
    with pytest.raises(FileNotFoundError, match="nowhere.wav"):
        captioner.caption([eval_paths[0], missing])
    with pytest.raises(SystemExit, match="audio path not found: .*nowhere.wav"):
        main(["caption", str(caption_ckpt), str(missing)])

    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(eval_paths[0], folder / "good 1.wav")
    shutil.copy(eval_paths[1], folder / "good 2.wav")
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    (folder / "empty.flac").write_bytes(b"")
    with pytest.raises(AudioError, match="broken.wav"):
        captioner.caption(folder)
    with pytest.raises(SystemExit, match="broken.wav"):
        main(["caption", str(caption_ckpt), str(folder)])
    capsys.readouterr()
    results = captioner.caption(folder, on_bad_audio="skip")
    assert [Path(p).name for p, _ in results] == ["good 1.wav", "good 2.wav"]
    assert sorted(Path(p).name for p, _ in captioner.last_skipped) == ["broken.wav", "empty.flac"]
    caplog.clear()
    main(["caption", str(caption_ckpt), str(folder), "--on-bad-audio", "skip"])
    captured = capsys.readouterr()
    assert [line.split("\t")[0] for line in captured.out.splitlines()] == ["good 1.wav", "good 2.wav"]
    assert "skipped 2 of 4 audio files" in captured.err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "broken.wav" in warnings[0] and "empty.flac" in warnings[1]  # each named with its reason


# -------------------------------------------------------------------------------------- retrieval


@pytest.fixture
def audio_dir(eval_paths, tmp_path: Path) -> Path:
    folder = tmp_path / "library"
    for k, path in enumerate(eval_paths):
        target = folder / ("nested" if k % 2 else "") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return folder


QUERIES = ["a high beep then a low siren", "loud knocking", "a bird chirps"]


@pytest.fixture(scope="module")
def loaded(retrieval_ckpt: Path, other_retrieval_ckpt: Path) -> dict[str, Retriever]:  # noqa: F811
    """Each checkpoint loaded once; tests make Retrievers with their own settings around the models."""
    return {"base": Retriever.from_checkpoint(retrieval_ckpt), "other": Retriever.from_checkpoint(other_retrieval_ckpt)}


def _retriever(*members: Retriever, **kwargs) -> Retriever:
    """A new Retriever (nothing indexed) over the loaded members' models."""
    models = [m for r in members for m in r.ensemble.models]
    keys = [k for r in members for k in r.model_keys]
    return Retriever(RetrievalEnsemble(models, device="cpu"), keys, **kwargs)


def test_search_ranks_like_the_retrieval_ensemble(retrieval_ckpt: Path, loaded, audio_dir: Path, tmp_path: Path):  # noqa: F811
    retriever = _retriever(loaded["base"], cache_dir=tmp_path / "cache")
    retriever.index(audio_dir)
    files = sorted(audio_dir.rglob("*.wav"))
    assert retriever.files == [str(p) for p in files]
    assert retriever.names == [p.relative_to(audio_dir).as_posix() for p in files]
    ensemble = RetrievalEnsemble.from_checkpoints([retrieval_ckpt])
    sim = ensemble.similarity(ensemble.encode_texts(QUERIES), ensemble.encode_audio_files(files, batch_size=1))  # (Q, A)
    results = retriever.search(QUERIES, k=3)
    assert len(results) == len(QUERIES)
    for row, ranked in zip(sim, results):
        order = torch.argsort(row, descending=True)[:3].tolist()
        assert [path for path, _ in ranked] == [str(files[i]) for i in order]
        scores = [score for _, score in ranked]
        assert scores == sorted(scores, reverse=True)
        assert np.allclose(scores, row[order].numpy(), atol=1e-5)
    assert [len(r) for r in retriever.search("loud knocking", k=100)] == [len(files)]  # k beyond the folder
    assert torch.allclose(retriever.similarity(QUERIES), sim, atol=1e-5)
    assert torch.allclose(retriever.similarity(QUERIES, files=[files[2], files[0]]), sim[:, [2, 0]], atol=1e-5)
    # an ensemble averages its members' similarity matrices
    other = _retriever(loaded["other"], use_cache=False)
    other.index(audio_dir)
    both = _retriever(loaded["base"], loaded["other"], use_cache=False)
    both.index(audio_dir)
    mean = (retriever.similarity(QUERIES) + other.similarity(QUERIES)) / 2
    assert not torch.allclose(retriever.similarity(QUERIES), other.similarity(QUERIES), atol=1e-3)
    assert torch.allclose(both.similarity(QUERIES), mean, atol=1e-5)
    with pytest.raises(ValueError, match="k must be a positive int"):
        retriever.search("x", k=0)


def test_the_embedding_cache_is_reused_and_invalidated(retrieval_ckpt: Path, loaded, audio_dir: Path, eval_paths, monkeypatch):  # noqa: F811
    decoded: list[str] = []
    real_load_audio = inference_audio.load_audio

    def counting_load_audio(path, *args, **kwargs):
        decoded.append(Path(path).name)
        return real_load_audio(path, *args, **kwargs)

    monkeypatch.setattr(inference_audio, "load_audio", counting_load_audio)

    def index(name: str) -> Retriever:
        decoded.clear()
        retriever = _retriever(loaded[name])  # a new Retriever: only the disk cache carries over
        retriever.index(audio_dir)
        return retriever

    first = index("base")
    assert len(decoded) == len(eval_paths)
    cache_files = list((audio_dir / CACHE_DIR_NAME).glob("*.pt"))
    assert len(cache_files) == 1  # the default cache lives in the indexed folder
    second = index("base")
    assert decoded == []  # a new Retriever on the same checkpoint reads every embedding from the cache
    assert torch.equal(second.similarity(QUERIES), first.similarity(QUERIES))

    # a file rewritten with other content is re-encoded, and only that one
    changed = audio_dir / second.names[0]
    samples, rate = sf.read(eval_paths[-1], dtype="float32")
    sf.write(changed, samples[: len(samples) // 2], rate)
    third = index("base")
    assert decoded == [changed.name]
    fresh = RetrievalEnsemble.from_checkpoints([retrieval_ckpt]).encode_audio_files([changed], batch_size=1)[0][0]
    # (the tiny model's embeddings differ little between clips, but the old one is far off the fresh one)
    assert (third._embeddings[0][0] - fresh).abs().max() < 1e-6
    assert (first._embeddings[0][0] - fresh).abs().max() > 1e-4

    # an added file is encoded, a removed one dropped from the index and from the cache file
    shutil.copy(eval_paths[0], audio_dir / "added.wav")
    removed = audio_dir / second.names[-1]
    removed.unlink()
    fourth = index("base")
    assert decoded == ["added.wav"]
    assert "added.wav" in fourth.names and removed.relative_to(audio_dir).as_posix() not in fourth.names
    stored = torch.load(cache_files[0], weights_only=True)
    assert sorted(stored["names"]) == sorted(fourth.names)

    # another checkpoint never reads the first one's embeddings, and leaves them in place
    other = index("other")
    assert len(decoded) == len(fourth.names)
    assert len(list((audio_dir / CACHE_DIR_NAME).glob("*.pt"))) == 2
    assert not torch.allclose(other.similarity(QUERIES), fourth.similarity(QUERIES), atol=1e-3)
    index("base")
    assert decoded == []


def test_a_cache_folder_shared_by_two_audio_folders_keeps_them_apart(loaded, audio_dir: Path, tmp_path: Path, monkeypatch):
    cache = tmp_path / "shared cache"
    first = _retriever(loaded["base"], cache_dir=cache)
    first.index(audio_dir)
    # a second folder whose file has the same relative name, size and modification time, other samples
    twin = tmp_path / "twin"
    name = first.names[0]
    original = audio_dir / name
    samples, rate = sf.read(original, dtype="float32")
    (twin / name).parent.mkdir(parents=True)
    sf.write(twin / name, np.random.default_rng(0).uniform(-0.5, 0.5, samples.shape).astype(np.float32), rate)
    stat = original.stat()
    os.utime(twin / name, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (twin / name).stat().st_size == stat.st_size
    decoded = []
    real_load_audio = inference_audio.load_audio
    monkeypatch.setattr(inference_audio, "load_audio", lambda path, *a, **k: decoded.append(path) or real_load_audio(path, *a, **k))
    second = _retriever(loaded["base"], cache_dir=cache)
    second.index(twin)
    assert decoded == [twin / name]  # not taken from the first folder's entry
    assert (second._embeddings[0][0] - first._embeddings[0][0]).abs().max() > 1e-4
    decoded.clear()
    _retriever(loaded["base"], cache_dir=cache).index(audio_dir)
    assert decoded == []  # the first folder's entries survived the second folder's indexing


def test_no_cache_writes_nothing(loaded, audio_dir: Path):
    _retriever(loaded["base"], use_cache=False).index(audio_dir)
    assert not (audio_dir / CACHE_DIR_NAME).exists()


def test_search_command_text_and_json(retrieval_ckpt: Path, loaded, audio_dir: Path, tmp_path: Path, capsys):  # noqa: F811
    retriever = _retriever(loaded["base"], use_cache=False)
    retriever.index(audio_dir)
    expected = retriever.search(QUERIES[:2], k=2)
    relative = dict(zip(retriever.files, retriever.names))
    main(["search", str(retrieval_ckpt), "--audio-dir", str(audio_dir), *QUERIES[:2], "-k", "2", "--cache-dir", str(tmp_path / "c")])
    lines = capsys.readouterr().out.splitlines()
    want = []
    for n, (query, ranked) in enumerate(zip(QUERIES[:2], expected)):
        want += ([""] if n else []) + [f"# {query}"]
        want += [f"{r}\t{score:.4f}\t{relative[path]}" for r, (path, score) in enumerate(ranked, 1)]
    assert lines == want
    assert list((tmp_path / "c").glob("*.pt"))  # --cache-dir is where the cache goes
    main(["search", str(retrieval_ckpt), "--audio-dir", str(audio_dir), QUERIES[0], "--json", "--no-cache"])
    payload = json.loads(capsys.readouterr().out)
    ranking = payload["results"][0]["ranking"]
    assert payload["results"][0]["query"] == QUERIES[0] and len(ranking) == len(retriever.files)
    full = retriever.search(QUERIES[0], k=100)[0]
    assert [(e["rank"], e["file"]) for e in ranking] == [(r, relative[p]) for r, (p, _) in enumerate(full, 1)]
    assert np.allclose([e["score"] for e in ranking], [s for _, s in full], atol=1e-6)
    with pytest.raises(SystemExit):
        main(["search", str(retrieval_ckpt), "--audio-dir", str(tmp_path / "nowhere"), "a dog"])


def test_search_bad_input(retrieval_ckpt: Path, caption_ckpt: Path, audio_dir: Path, capsys):  # noqa: F811
    with pytest.raises(SystemExit, match="stage kind 'xe'; a retrieval ensemble needs retrieval"):
        main(["search", str(caption_ckpt), "--audio-dir", str(audio_dir), "a dog"])
    (audio_dir / "nested" / "broken.flac").write_bytes(b"fLaC-not-really" * 20)
    with pytest.raises(SystemExit, match="broken.flac"):
        main(["search", str(retrieval_ckpt), "--audio-dir", str(audio_dir), "a dog", "--no-cache"])
    main(["search", str(retrieval_ckpt), "--audio-dir", str(audio_dir), "a dog", "-k", "100", "--on-bad-audio", "skip"])
    captured = capsys.readouterr()
    listed = [line.split("\t")[2] for line in captured.out.splitlines()[1:]]
    assert "nested/broken.flac" not in listed and len(listed) == len(list(audio_dir.rglob("*.wav")))
    assert "skipped 1 of" in captured.err


def test_frame_similarity_is_local_and_follows_its_definition(loaded, tmp_path: Path):
    retriever = _retriever(loaded["base"], use_cache=False)
    model = retriever.ensemble.models[0]
    encoder = model.audio_encoder
    rate, hop = encoder.sample_rate, encoder.hop_size
    rng = np.random.default_rng(0)
    # A: 8 s of a pulsed tone; B: 8 s of noise. Each lasts a whole number of 32-frame output steps.
    n = 25 * 32 * hop
    t = np.arange(n) / rate
    a = (0.4 * np.sin(2 * np.pi * 700 * t) * (np.sin(2 * np.pi * 1.5 * t) > 0)).astype(np.float32)
    b = (0.2 * rng.standard_normal(n)).astype(np.float32)
    sf.write(tmp_path / "a.wav", a, rate, subtype="FLOAT")
    sf.write(tmp_path / "ab.wav", np.concatenate([a, b]), rate, subtype="FLOAT")
    query = "a high beep"
    times_a, scores_a = retriever.frame_similarity(tmp_path / "a.wav", query)
    times_ab, scores_ab = retriever.frame_similarity(tmp_path / "ab.wav", query)
    # one score per output frame (the centred STFT's L // hop + 1 frames pooled 32 to 1), centres
    # increasing by 32 hops, inside the clip
    assert len(scores_a) == len(times_a) == (n // hop + 1) // 32 == 25
    assert len(scores_ab) == len(times_ab) == (2 * n // hop + 1) // 32 == 50
    assert np.allclose(np.diff(times_ab), 32 * hop / rate) and 0 < times_ab[0] < 32 * hop / rate
    assert times_ab[-1] <= 2 * n / rate and np.all(np.abs(scores_ab) <= 1 + 1e-6)
    # locality: frames whose receptive field lies inside A score the same whether B follows or not,
    # which a score that mixed in the whole clip would not do (the CNN sees ~3 s around a frame)
    assert np.allclose(scores_ab[:12], scores_a[:12], atol=1e-4)
    assert np.ptp(scores_ab) > 1e-3  # and the scores do change along the clip (tone, then noise)
    # the definition: cosine of the text embedding with the encoder's frame_embeddings through the audio projection
    with torch.no_grad():
        out = encoder(torch.from_numpy(a)[None], torch.tensor([n]))
        frames = out["frames"][0, : int(out["frame_lengths"][0])]  # (T', D)
        projected = F.normalize(model.audio_projection(encoder.frame_embeddings(frames)), dim=-1)  # (T', E)
        text = F.normalize(model.text_projection(model.text_encoder([query])), dim=-1)[0]  # (E,)
    assert np.allclose(scores_a, (projected @ text).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="query must be a non-empty string"):
        retriever.frame_similarity(tmp_path / "a.wav", " ")


def test_package_exports_the_inference_classes_lazily():
    import subprocess
    import sys

    import aac_lightning

    assert aac_lightning.Captioner is Captioner and aac_lightning.Retriever is Retriever
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        aac_lightning.Nothing  # noqa: B018
    # a fresh interpreter: importing the package loads neither the inference module nor torch
    code = "import sys, aac_lightning; print('aac_lightning.inference' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_retriever_from_two_checkpoints_and_search_command_average_the_members(
    retrieval_ckpt: Path, other_retrieval_ckpt: Path, loaded, audio_dir: Path, tmp_path: Path, capsys  # noqa: F811
):
    """`Retriever.from_checkpoint([a, b])` and `search a b`: the members' similarity matrices averaged."""
    files = sorted(audio_dir.rglob("*.wav"))
    alone = []
    for member in ("base", "other"):
        retriever = _retriever(loaded[member], use_cache=False)
        retriever.index(audio_dir)
        alone.append(retriever.similarity(QUERIES))  # (Q, A)
    mean = (alone[0] + alone[1]) / 2
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)
    both = Retriever.from_checkpoint([retrieval_ckpt, other_retrieval_ckpt], cache_dir=tmp_path / "cache")
    both.index(audio_dir)
    assert torch.allclose(both.similarity(QUERIES), mean, atol=1e-5)
    results = both.search(QUERIES, k=len(files))
    for row, ranked in zip(mean, results):
        order = torch.argsort(row, descending=True).tolist()
        assert [path for path, _ in ranked] == [str(files[i]) for i in order]
        assert np.allclose([score for _, score in ranked], row[order].numpy(), atol=1e-5)
    # the console command with both checkpoints prints the same ranking
    main(["search", str(retrieval_ckpt), str(other_retrieval_ckpt), "--audio-dir", str(audio_dir), QUERIES[0], "--json", "--no-cache"])
    ranking = json.loads(capsys.readouterr().out)["results"][0]["ranking"]
    relative = dict(zip(both.files, both.names))
    assert [e["file"] for e in ranking] == [relative[p] for p, _ in results[0]]
    assert np.allclose([e["score"] for e in ranking], [s for _, s in results[0]], atol=1e-5)
