"""The `aac-lightning` subcommands besides LightningCLI's: argparse and printing only, each calling the library.

`COMMANDS` maps a subcommand to its one-line help and the `module:function` that runs it; a command's
module is imported only when it runs (some pull in heavy dependencies).
"""

from __future__ import annotations

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("write the synthetic dataset in the Clotho layout", "aac_lightning.commands.synth:synth_command"),
    "summary": ("build a configured model offline and print its parameter counts", "aac_lightning.commands.summary:summary_command"),
    "pipeline": ("run a multi-stage recipe (stages/*.yaml) in a work directory; reruns resume", "aac_lightning.commands.pipeline:pipeline_command"),
    "demo": ("run the demo recipe stages/demo.yaml on synthetic data (offline, CPU)", "aac_lightning.commands.demo:demo_command"),
    "caption-eval": ("caption a Clotho subset with a captioner or an ensemble and score it", "aac_lightning.commands.evaluate:caption_eval_command"),
    "retrieval-eval": ("evaluate retrieval checkpoints or an ensemble; DCASE 6b submission CSV", "aac_lightning.commands.evaluate:retrieval_eval_command"),
    "caption": ("caption audio files or folders with a captioner or an ensemble", "aac_lightning.commands.inference:caption_command"),
    "search": ("rank the audio files of a folder for text queries (cached embeddings)", "aac_lightning.commands.inference:search_command"),
    "recipes": ("list the shipped recipes and configs, usable by name (e.g. 'pipeline sjtu_captioning')", "aac_lightning.commands.recipes:recipes_command"),
    "serve": ("browser demo (Gradio): caption uploaded audio, search a folder with text [web extra]", "aac_lightning.commands.serve:serve_command"),
    "export": ("write a checkpoint as a shareable folder (safetensors, config, vocabulary, model card)", "aac_lightning.commands.export:export_command"),
    "pack": ("store datasets' audio once at the model's sample rate in HDF5 packs (resumable)", "aac_lightning.commands.pack:pack_command"),
}
