"""`aac-lightning serve`: every request's checks, the answers against the library's own `caption` /
`search` / `frame_similarity` on the same clips, the HTTP API of the running page (bad input answered
in the page while the server keeps serving; no file outside the searched folder ever served; many
requests at once all answered)."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from aac_lightning.data.datasets import Clotho
from aac_lightning.inference import Captioner, Retriever
from aac_lightning.serve import DemoBackend, ServeError, ServeLimits, split_by_kind
from tests.ddp import free_port
from tests.test_scst_module import xe_ckpt  # noqa: F401  (fixture)
from tests.test_xe_module import retrieval_ckpt  # noqa: F401  (fixture)

gradio = pytest.importorskip("gradio", reason="the web extra (gradio) is not installed")


@pytest.fixture(scope="module")
def clips(synth_root: Path) -> list[Path]:
    return [r.path for r in Clotho(synth_root, "evaluation").records][:6]


@pytest.fixture(scope="module")
def library(clips: list[Path], tmp_path_factory) -> Path:
    """The served folder: six clips (two in a subfolder), a text file, and a secret next to it."""
    root = tmp_path_factory.mktemp("serve")
    folder = root / "library"
    for k, clip in enumerate(clips):
        target = folder / ("nested" if k % 3 == 2 else "") / clip.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, target)
    (folder / "notes.txt").write_text("not audio")
    shutil.copy(clips[0], root / "secret.wav")  # outside the folder: never served
    (folder / "link_out.wav").symlink_to(root / "secret.wav")  # a link out of the folder: not served either
    return folder


@pytest.fixture(scope="module")
def backend(xe_ckpt: Path, retrieval_ckpt: Path, library: Path, tmp_path_factory) -> DemoBackend:  # noqa: F811
    return DemoBackend.from_models([xe_ckpt, retrieval_ckpt], audio_dir=library, limits=ServeLimits(max_upload_mb=2.0, max_seconds=30.0), top_k=4)


def test_models_split_by_kind(xe_ckpt: Path, retrieval_ckpt: Path):  # noqa: F811
    assert split_by_kind([retrieval_ckpt, xe_ckpt]) == ([str(xe_ckpt)], [str(retrieval_ckpt)])


def test_caption_and_frame_similarity_equal_the_library_on_the_same_clip(backend: DemoBackend, xe_ckpt: Path, retrieval_ckpt: Path, clips):  # noqa: F811
    expected = dict(Captioner.from_checkpoint(xe_ckpt).caption(clips[:2]))
    retriever = Retriever.from_checkpoint(retrieval_ckpt)
    for clip in clips[:2]:
        result = backend.caption(clip, "a high beep")
        assert result.caption == expected[str(clip)]
        times, scores = retriever.frame_similarity(clip, "a high beep")
        np.testing.assert_allclose(result.similarity[0], times)
        np.testing.assert_allclose(result.similarity[1], scores, rtol=1e-5, atol=1e-6)
    assert backend.caption(clips[0]).similarity is None  # no phrase, no curve


def test_search_ranks_as_the_retriever_and_serves_only_indexed_files_of_the_folder(backend: DemoBackend, retrieval_ckpt: Path, library: Path):  # noqa: F811
    hits = backend.search("a high beep then a low siren")
    retriever = Retriever.from_checkpoint(retrieval_ckpt, use_cache=False)
    retriever.index(library, on_bad_audio="skip")
    (expected,) = retriever.search("a high beep then a low siren", k=10)
    inside = [(Path(p).resolve(), s) for p, s in expected if Path(p).resolve().is_relative_to(library.resolve())]
    assert [(h.path, pytest.approx(h.score, abs=1e-5)) for h in hits] == inside[:4]
    assert [h.rank for h in hits] == [1, 2, 3, 4]
    assert all(h.path.is_relative_to(library.resolve()) for h in hits)
    assert backend.searchable == 6  # the six clips; not the text file, not the link out of the folder
    assert backend.served_file(hits[0].name) == hits[0].path
    for name in ("../secret.wav", "link_out.wav", "notes.txt", str(library.parent / "secret.wav")):
        with pytest.raises(KeyError):
            backend.served_file(name)


def _wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    sf.write(path, samples, rate, subtype="PCM_16")
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("none", "No audio"),
        ("text", "not an audio file"),
        ("empty", "not an audio file"),
        ("no_samples", "no audio samples"),
        ("silent", "is silent"),
        ("ten_minutes", "600 s long; clips are limited to 30 s"),
        ("too_big", "uploads are limited to 2 MB"),
    ],
)
def test_bad_uploads_get_a_sentence_naming_the_file(backend: DemoBackend, tmp_path: Path, case: str, message: str):
    paths = {
        "none": None,
        "text": tmp_path / "notes.wav",
        "empty": tmp_path / "empty.wav",
        "no_samples": tmp_path / "no_samples.wav",
        "silent": tmp_path / "silent.wav",
        "ten_minutes": tmp_path / "ten_minutes.wav",
        "too_big": tmp_path / "too_big.wav",
    }
    path = paths[case]
    if case == "text":
        path.write_text("this is not audio")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "no_samples":
        _wav(path, np.zeros(0, dtype=np.int16))
    elif case == "silent":
        _wav(path, np.zeros(16000, dtype=np.int16))
    elif case == "ten_minutes":
        _wav(path, np.full(600 * 100, 1000, dtype=np.int16), rate=100)  # 10 minutes at 100 Hz: 120 kB
    elif case == "too_big":
        _wav(path, (np.random.default_rng(0).standard_normal(16000 * 70) * 3000).astype(np.int16))  # 2.2 MB
    with pytest.raises(ServeError, match=message) as caught:
        backend.caption(path)
    if path is not None:
        assert path.name in str(caught.value) and str(path.parent) not in str(caught.value)


def test_bad_queries(backend: DemoBackend):
    for query in ("", "   ", None):
        with pytest.raises(ServeError, match="Type a query"):
            backend.search(query)
    with pytest.raises(ServeError, match="at most 500"):
        backend.search("dog " * 200)


def test_search_needs_a_retrieval_model_and_a_folder(xe_ckpt: Path, library: Path):  # noqa: F811
    captions_only = DemoBackend.from_models([xe_ckpt])
    with pytest.raises(ServeError, match="Search is off"):
        captions_only.search("a dog")
    assert "needs a retrieval checkpoint" in captions_only.caption(sorted(library.glob("*.wav"))[0], "beep").notes[0]
    with pytest.raises(ValueError, match="retrieval checkpoint"):
        DemoBackend.from_models([xe_ckpt], audio_dir=library)


# -- the running page, over HTTP ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(backend: DemoBackend, tmp_path_factory):
    """The page launched in this process on a free loopback port; its URL."""
    from aac_lightning.serve.app import launch

    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio_uploads"))
    app = launch(backend, host="127.0.0.1", port=free_port(), concurrency=2, block=False)
    yield app.local_url.rstrip("/")
    app.close()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_http_caption_search_and_bad_input_while_the_server_keeps_serving(server: str, backend: DemoBackend, clips, tmp_path: Path):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    caption, _, message = client.predict(handle_file(str(clips[0])), "", api_name="/caption")
    assert caption == backend.caption(clips[0]).caption and "Error" not in message
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    caption, image, message = client.predict(handle_file(str(bad)), "", api_name="/caption")
    assert caption == "" and image is None and "**Error:**" in message and "bad.wav" in message
    caption, _, message = client.predict(handle_file(str(clips[1])), "", api_name="/caption")  # still serving
    assert caption == backend.caption(clips[1]).caption
    table, message, *players = client.predict("", api_name="/search")
    assert "Type a query" in message
    table, message, *players = client.predict("a high beep", api_name="/search")
    assert [row[1] for row in table["data"]] == [hit.name for hit in backend.search("a high beep")]
    assert message.startswith("4 of 6 clips")


def test_no_file_outside_the_folder_is_served(server: str, library: Path, backend: DemoBackend):
    def file_url(path: str) -> str:
        return f"{server}/gradio_api/file={urllib.parse.quote(path)}"

    inside = backend.search("a high beep")[0].path
    assert _status(file_url(str(inside))) == 200
    for path in (
        str(library.parent / "secret.wav"),
        f"{library}/../secret.wav",
        str(library / "link_out.wav"),
        "/etc/passwd",
        str(Path(__file__).resolve()),
        str(Path.cwd() / "pyproject.toml"),
    ):
        assert _status(file_url(path)) in (403, 404), path


def test_an_upload_over_the_limit_is_refused_by_the_server(server: str, tmp_path: Path):
    big = tmp_path / "big.wav"
    _wav(big, (np.random.default_rng(0).standard_normal(16000 * 70) * 3000).astype(np.int16))  # 2.2 MB > 2 MB
    boundary = "aacboundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.wav\"\r\n"
        "Content-Type: audio/wav\r\n\r\n"
    ).encode() + big.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{server}/gradio_api/upload", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert _status(request) == 413


def test_sixteen_concurrent_captions_all_answer(server: str, backend: DemoBackend, clips):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    expected = {str(c): backend.caption(c).caption for c in clips}
    order = [clips[k % len(clips)] for k in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        jobs = [pool.submit(client.predict, handle_file(str(c)), "", api_name="/caption") for c in order]
        answers = [job.result(timeout=300)[0] for job in jobs]
    assert answers == [expected[str(c)] for c in order]


def test_serve_takes_exported_folders(xe_ckpt: Path, retrieval_ckpt: Path, library: Path, backend: DemoBackend, clips, tmp_path: Path):  # noqa: F811
    from aac_lightning.pretrained import export_pretrained

    folders = [tmp_path / "captioner", tmp_path / "retrieval"]
    export_pretrained(xe_ckpt, folders[0])
    export_pretrained(retrieval_ckpt, folders[1])
    exported = DemoBackend.from_models(folders, audio_dir=library, top_k=4)
    assert exported.caption(clips[0]).caption == backend.caption(clips[0]).caption
    assert [(h.name, pytest.approx(h.score, abs=1e-5)) for h in exported.search("a high beep")] == [(h.name, h.score) for h in backend.search("a high beep")]
