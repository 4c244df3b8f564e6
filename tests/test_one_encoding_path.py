"""One way to encode clips: `caption` / `search` give the numbers `caption-eval` / `retrieval-eval` give.

Every entry point pads a batch and passes the true lengths to the frozen extractor
(`FrozenExtractor.forward`) or to `BiEncoder.encode_audio`, both of which encode each clip as if it
were alone (`aac_lightning.nn.audio_encoders.encode_clips`). The synthetic evaluation clips have
mixed lengths, so a batch holds padding; the results must not depend on it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from aac_lightning.cli import main
from aac_lightning.data import Clotho
from aac_lightning.data.audio import load_audio
from aac_lightning.data.datamodules import pad_waveforms
from aac_lightning.ensembles.captioning import evaluate_caption_ensemble, load_captioner
from aac_lightning.ensembles.retrieval import RetrievalEnsemble, evaluate_retrieval_ensemble
from aac_lightning.inference import Captioner, Retriever
from tests.test_inference import caption_ckpt, eval_paths  # noqa: F401  (fixtures)
from tests.test_scst_module import xe_ckpt  # noqa: F401  (fixture)
from tests.test_xe_module import retrieval_ckpt  # noqa: F401  (fixture)

# batched vs one clip at a time: the same convolutions on the same samples, only the batch size
# (and so the CPU kernels' summation order) differs
ATOL = 1e-5


def _mixed_lengths(paths: list[Path]) -> None:
    lengths = [sf.info(p).frames for p in paths]
    assert len(set(lengths)) > 2, lengths  # padding inside every batch of several clips


def test_batched_encoding_equals_one_clip_at_a_time(caption_ckpt: Path, retrieval_ckpt: Path, eval_paths):  # noqa: F811
    paths = eval_paths[:6]
    _mixed_lengths(paths)
    extractor = load_captioner(caption_ckpt).extractor
    model = RetrievalEnsemble.from_checkpoints([retrieval_ckpt]).models[0]
    for module, rate in ((extractor, extractor.sample_rate), (model, model.audio_encoder.sample_rate)):
        waves = [load_audio(p, rate)[0][0] for p in paths] + [load_audio(paths[0], rate)[0][0]]  # two of one length
        audio, lengths = pad_waveforms(waves)  # (B, T_max), (B,)
        with torch.no_grad():
            if module is extractor:
                batched = extractor(audio, lengths)
                for i, wave in enumerate(waves):
                    alone = extractor(wave[None], torch.tensor([wave.shape[0]]))
                    n = int(alone["frame_lengths"][0])
                    assert int(batched["frame_lengths"][i]) == n
                    torch.testing.assert_close(batched["frames"][i, :n], alone["frames"][0, :n], atol=ATOL, rtol=0)
                    assert not batched["frames"][i, n:].any()  # zero beyond the clip's frames
                    torch.testing.assert_close(batched["clip"][i], alone["clip"][0], atol=ATOL, rtol=0)
            else:
                batched = model.encode_audio(audio, lengths)  # (B, E)
                alone = torch.cat([model.encode_audio(w[None], torch.tensor([w.shape[0]])) for w in waves])
                torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0)


def test_caption_equals_caption_eval_on_the_same_clips(caption_ckpt: Path, synth_root: Path, tmp_path: Path, capsys):  # noqa: F811
    member = load_captioner(caption_ckpt)
    options = dict(beam_size=member.hparams.beam_size, max_length=member.hparams.max_decode_length)
    result = evaluate_caption_ensemble(
        [caption_ckpt], synth_root, "evaluation", device="cpu", batch_size=4, metrics=("cider_d",), **options
    )
    assert set(result["metrics"]) == {"cider_d"}
    dataset = Clotho(synth_root, "evaluation")
    paths = [r.path for r in dataset.records]
    _mixed_lengths(paths)
    assert [(f, refs) for f, _, refs in result["captions"]] == list(zip(dataset.fnames, dataset.captions))
    expected = [caption for _, caption, _ in result["captions"]]
    assert len(set(expected)) >= 3  # the captions tell the clips apart
    # the library, one clip at a time and in batches of another size
    captioner = Captioner.from_checkpoint(caption_ckpt, **options)
    assert [c for _, c in captioner.caption(paths, batch_size=1)] == expected
    assert [c for _, c in captioner.caption(paths, batch_size=3)] == expected
    # the command, on the evaluation folder
    folder = paths[0].parent
    out = tmp_path / "captions.csv"
    main(["caption", str(caption_ckpt), str(folder), "--out", str(out), "--batch-size", "5",
          "--beam-size", str(options["beam_size"]), "--max-length", str(options["max_length"])])
    capsys.readouterr()
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_file = {row["file_name"]: row["caption_predicted"] for row in rows}
    assert by_file == {Path(p).relative_to(folder).as_posix(): c for p, c in zip(paths, expected)}


def test_search_scores_equal_retrieval_eval_similarity_rows(retrieval_ckpt: Path, synth_root: Path, capsys):  # noqa: F811
    result = evaluate_retrieval_ensemble([retrieval_ckpt], synth_root, "evaluation", device="cpu", batch_size=4)
    sim, captions, fnames = result["similarity"], result["captions"], result["fnames"]  # (Q, A)
    assert sim.shape == (result["num_queries"], result["num_audio"]) == (len(captions), len(fnames))
    folder = Clotho(synth_root, "evaluation").records[0].path.parent
    _mixed_lengths([folder / f for f in fnames])
    picks = [0, len(captions) // 2, len(captions) - 1]
    queries = [captions[q] for q in picks]
    # the command (JSON, every file ranked, no cache written into the shared dataset)
    main(["search", str(retrieval_ckpt), "--audio-dir", str(folder), *queries, "--json", "--no-cache", "-k", "1000"])
    payload = json.loads(capsys.readouterr().out)
    for q, entry in zip(picks, payload["results"]):
        scores = {e["file"]: e["score"] for e in entry["ranking"]}
        assert set(scores) == set(fnames)
        np.testing.assert_allclose([scores[f] for f in fnames], sim[q].numpy(), atol=ATOL, rtol=0)
    # the library, one file per forward pass
    retriever = Retriever.from_checkpoint(retrieval_ckpt, use_cache=False, batch_size=1)
    retriever.index(folder)
    order = [retriever.names.index(f) for f in fnames]
    torch.testing.assert_close(retriever.similarity(queries)[:, order], sim[picks], atol=ATOL, rtol=0)
