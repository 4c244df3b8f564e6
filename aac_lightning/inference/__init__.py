"""Inference on users' own recordings: caption audio files and search a folder of audio with text.

Python (notebooks)::

    from aac_lightning import Captioner, Retriever

    captioner = Captioner.from_checkpoint("runs/scst/best.ckpt")          # several paths: ensemble
    captioner = Captioner.from_pretrained("exported/scst")                 # a folder of `aac-lightning export`
    captioner.caption("recordings/")                                       # [(file, caption), ...]
    captioner.caption_waveform(samples, sample_rate=44100)                 # an array, (T,) or (C, T)

    retriever = Retriever.from_checkpoint(["a.ckpt", "b.ckpt"])            # similarity matrices averaged
    retriever.index("recordings/")                                         # embeddings cached on disk
    retriever.search("a dog barks while cars pass", k=5)                   # [[(file, score), ...]]
    times, scores = retriever.frame_similarity("recordings/street.wav", "a dog barks")

Parts: :mod:`.audio` (files, folders, arrays, bad-audio skipping), :mod:`.captioner`,
:mod:`.retriever`, :mod:`.cache` (the embedding cache), :mod:`.frames` (frame-level similarity).
Clips are encoded as the ensembles encode them (:mod:`aac_lightning.ensembles`), so ``caption``
and ``search`` give the numbers ``caption-eval`` and ``retrieval-eval`` give. Command line:
:mod:`aac_lightning.commands.inference`.
"""

from aac_lightning.inference.audio import ON_BAD_AUDIO, AudioInput, expand_audio_paths
from aac_lightning.inference.cache import CACHE_DIR_NAME
from aac_lightning.inference.captioner import Captioner
from aac_lightning.inference.frames import frame_embeddings, frame_times
from aac_lightning.inference.retriever import Retriever

__all__ = [
    "CACHE_DIR_NAME",
    "ON_BAD_AUDIO",
    "AudioInput",
    "Captioner",
    "Retriever",
    "expand_audio_paths",
    "frame_embeddings",
    "frame_times",
]
