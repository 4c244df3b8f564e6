"""Exporting a trained model as a self-contained, shareable folder (`aac-lightning export CKPT OUT_DIR`).

The folder, laid out so that it can be uploaded to a model hub as it is::

    OUT_DIR/
      config.json          format + version, package version, stage kind, class path, the init arguments
                           that rebuild the model offline (handoff files cleared), sample rate, provenance
      model.safetensors    the module's state dict (every tensor, the frozen extractor's included)
      vocabulary.json      captioners: the word list, in id order
      text_encoder/        retrieval models: the text encoder's Hugging Face config.json and tokenizer files
      README.md            model card: hub front matter, use, architecture, training data, recipe, metrics

It is read back by :func:`aac_lightning.checkpoints.read_checkpoint` (json and safetensors only, nothing
unpickled), so every loader that takes a checkpoint takes the folder: `Captioner.from_pretrained`,
`Retriever.from_pretrained`, `caption`, `search`, `caption-eval`, `retrieval-eval`, the ensembles. The
model card's metrics come from the `results.json` of the pipeline run the checkpoint belongs to (found
in the checkpoint's folder or one of the two above it), or from one given with `results=`.
"""

from aac_lightning.pretrained.card import CARD_FILE, TEXT_ENCODER_DIR, model_card
from aac_lightning.pretrained.export import ExportReport, export_pretrained
from aac_lightning.pretrained.runs import RESULTS_FILE, RunResults, find_run_results

__all__ = ["CARD_FILE", "RESULTS_FILE", "TEXT_ENCODER_DIR", "ExportReport", "RunResults", "export_pretrained", "find_run_results", "model_card"]
