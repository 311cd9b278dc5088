"""Export a medkd bundle as a self-contained MONAI model-zoo bundle (``python -m medkd export-bundle``).

A bundle of this repository imports the shared ``medkd`` package, which the model zoo cannot see: its CI only
has ``models/<bundle>/`` and the pip pins of ``configs/metadata.json``. :func:`export_bundle` therefore writes a
copy of the bundle that carries the part of ``medkd`` it needs as a *vendored* package with a name unique to the
bundle (``<bundle>_medkd``; never ``scripts``, which every zoo bundle uses), and rewrites every reference to it:
``_target_`` strings, ``$import`` lines and expressions in the configs, and the package's own absolute imports.

What gets vendored is the import closure of the configs' references, module by module: the modules the configs
name (``medkd.losses.X`` -> ``medkd.losses``), their parent packages, and every ``medkd`` module any of them
imports (at module level or inside a function), found by parsing the source with :mod:`ast`. The closure is
exact for ``medkd`` because it never imports its own modules dynamically; if a vendored module ever calls
``importlib.import_module`` / ``__import__`` / ``pydoc.locate``, the whole package is vendored instead.

The export also writes the student weights (``models/model.pt``, checked strictly against ``network_def``),
metadata pinned to the installed releases, a model card rendered from ``docs/model_card_template.md``, the
zoo-formatted configs, ``LICENSE`` and ``large_files.yml`` (files over 25 MB are moved out of the bundle and
listed with their SHA-256). See ``docs/export.md``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import posixpath
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml
from monai.bundle import ConfigParser

import medkd
from medkd.io import file_sha256, load_state_dict_file

__all__ = [
    "ExportReport",
    "ZOO_LARGE_FILE_MB",
    "config_references",
    "export_bundle",
    "package_pins",
    "release_version",
    "render_model_card",
    "required_modules",
    "rewrite_config",
    "rewrite_python_imports",
    "vendored_package_name",
    "zoo_json",
]

SOURCE = "medkd"
SOURCE_DIR = Path(medkd.__file__).resolve().parent
TEMPLATE = Path(__file__).resolve().parents[2] / "docs" / "model_card_template.md"
ZOO_LARGE_FILE_MB = 25.0  # model-zoo CONTRIBUTING: no single file over 25 MB in the repository
# Keys of metadata.json with their own pins (the zoo CI installs monai / torch / numpy from them).
CORE_DISTRIBUTIONS = {"monai": "monai_version", "torch": "pytorch_version", "numpy": "numpy_version"}

# A dotted ``medkd.x.y`` name (not part of a longer word, path or file name) and ``$import medkd`` / ``$from medkd``.
_DOTTED = re.compile(r"(?<![\w./-])medkd(?=\.[A-Za-z_])((?:\.[A-Za-z_]\w*)*)")
_IMPORT_LINE = re.compile(r"(\$\s*(?:import|from)\s+)medkd(?![\w-])")
_LEFTOVER = re.compile(r"(?<![\w./-])medkd(?![\w-])")
# The repository's data folder as the bundles reach it (bundles/<name>/../../data/...) and its exported place.
_REPO_DATA = "@bundle_root + '/../../data/"
_BUNDLE_DATA = "@bundle_root + '/data/"
_FILE_MACRO = re.compile(r"^%[^#:]*\.(json|ya?ml)")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_RELEASE = re.compile(r"^\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?$")
_BUILD_VARIANT = re.compile(r"^(cpu|cu\d+|rocm[\d.]+|xpu)$")  # PyTorch's wheel variants of one release
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_DYNAMIC_IMPORTS = {"import_module", "__import__", "locate"}


@dataclass
class ExportReport:
    """What :func:`export_bundle` wrote: the bundle folder, the vendored package and what it holds, the package
    pins, the configs and recipes exported (and the recipes left out, with why), and the files moved out of the
    bundle because of their size (path inside the bundle -> where they are now)."""

    path: Path
    package: str
    modules: list[str]
    whole_package: bool
    pins: dict[str, str]
    configs: list[str]
    recipes: list[str]
    skipped_recipes: dict[str, str] = field(default_factory=dict)
    large_files: dict[str, Path] = field(default_factory=dict)


def zoo_json(obj: Any) -> str:
    """The model zoo's JSON layout (pre-commit ``pretty-format-json --indent=4 --no-sort-keys``; the rules of
    ``tools/format_json.py``): 4-space indent, key order kept, non-ASCII kept, one trailing newline."""
    return json.dumps(obj, indent=4, ensure_ascii=False) + "\n"


def vendored_package_name(bundle_name: str) -> str:
    """The import name of the vendored ``medkd`` copy of a bundle: ``<bundle_name>_medkd``.

    Unique per bundle, so two exported bundles on one ``sys.path`` (zoo CI, MONAI Label) never shadow each other,
    unlike the usual ``scripts`` package.

    Raises:
        ValueError: when the name is not a valid Python identifier.
    """
    name = f"{bundle_name}_{SOURCE}"
    if not name.isidentifier() or not bundle_name:
        raise ValueError(f"bundle name {bundle_name!r} does not give a valid Python package name ({name!r})")
    return name


def _strings(obj: Any) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _map_strings(obj: Any, fn) -> Any:
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_strings(v, fn) for v in obj]
    return obj


def config_references(config: Any) -> set[str]:
    """Every ``medkd`` name a parsed bundle config refers to: dotted names in ``_target_`` strings and expressions
    (``medkd.data.load_datalist``) and ``$import medkd`` lines (``medkd``)."""
    refs = set()
    for s in _strings(config):
        refs |= {SOURCE + m.group(1) for m in _DOTTED.finditer(s)}
        if _IMPORT_LINE.search(s):
            refs.add(SOURCE)
    return refs


def _module_file(name: str, source: Path) -> Path | None:
    """The file of module ``name`` (``medkd`` or ``medkd.a.b``) in the package folder ``source``, or None."""
    parts = name.split(".")
    if parts[0] != SOURCE:
        return None
    base = source.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _longest_module(dotted: str, source: Path) -> str:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if _module_file(".".join(parts[:n]), source) is not None:
            return ".".join(parts[:n])
    raise ValueError(f"{dotted!r} names no module of the {SOURCE} package at {source}")


def _with_parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:n]) for n in range(1, len(parts) + 1)}


def _imported_modules(name: str, path: Path, source: Path) -> tuple[set[str], bool]:
    """``medkd`` modules imported anywhere in one module, and whether it imports anything dynamically."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found, dynamic = set(), False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == SOURCE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != SOURCE:
                continue
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names if _module_file(f"{module}.{a.name}", source)}
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            dynamic |= called in _DYNAMIC_IMPORTS
    return found, dynamic


def _all_modules(source: Path) -> set[str]:
    out = set()
    for path in source.rglob("*.py"):
        rel = path.relative_to(source).with_suffix("").parts
        out.add(".".join((SOURCE, *rel[:-1])) if rel[-1] == "__init__" else ".".join((SOURCE, *rel)))
    return out


def required_modules(references: Iterable[str], source: str | os.PathLike | None = None) -> tuple[set[str], bool]:
    """The ``medkd`` modules that ``references`` need: the import closure described in the module docstring.

    Args:
        references: dotted names, e.g. from :func:`config_references` (``medkd.losses.PredictionMapDistillation``).
        source: the ``medkd`` package folder (default: the installed one).

    Returns:
        (module names, whole_package): ``whole_package`` is True when a module of the closure imports dynamically;
        the names are then every module of the package.

    Raises:
        ValueError: when the package has no ``__init__.py`` or a module imports a ``medkd`` module that does not exist.
    """
    source = Path(source) if source is not None else SOURCE_DIR
    todo = set()
    for ref in references:
        todo |= _with_parents(_longest_module(ref, source))
    done: set[str] = set()
    while todo:
        name = todo.pop()
        done.add(name)
        path = _module_file(name, source)
        if path is None:
            raise ValueError(f"module {name} is imported but missing from {source}")
        imported, dynamic = _imported_modules(name, path, source)
        if dynamic:
            return _all_modules(source), True
        for module in imported:
            if _module_file(module, source) is None:
                raise ValueError(f"{path} imports {module}, which is not a module of {source}")
            todo |= _with_parents(module) - done
    return done, False


def rewrite_python_imports(text: str, package: str, filename: str = "<module>") -> str:
    """Point every absolute ``medkd`` import of a module's source at ``package``.

    ``from medkd.x import y`` becomes ``from <package>.x import y`` and ``import medkd.x`` becomes
    ``import <package>.x``; relative imports, docstrings and messages are left as they are.

    Raises:
        RuntimeError: when an import of ``medkd`` is left after the rewrite (a form this function does not handle).
    """
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(lineno: int, col: int) -> int:  # ast columns count UTF-8 bytes
        return starts[lineno - 1] + len(lines[lineno - 1].encode()[:col].decode())

    edits = []
    for node in ast.walk(ast.parse(text, filename=filename)):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == SOURCE:
            pattern = r"(\bfrom\s+)medkd(?!\w)"
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == SOURCE for a in node.names):
            pattern = r"((?:\bimport|,)\s*)medkd(?=[.\s,]|$)"
        else:
            continue
        edits.append((offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset), pattern))
    for start, end, pattern in sorted(edits, reverse=True):  # back to front: earlier offsets stay valid
        text = text[:start] + re.sub(pattern, lambda m: m.group(1) + package, text[start:end]) + text[end:]
    for node in ast.walk(ast.parse(text, filename=filename)):
        if isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        if any(n.split(".")[0] == SOURCE for n in names):
            raise RuntimeError(f"{filename}:{node.lineno}: import of {SOURCE} left after rewriting it to {package}")
    return text


def _rewrite_string(value: str, package: str) -> str:
    value = _DOTTED.sub(lambda m: package + m.group(1), value)
    value = _IMPORT_LINE.sub(lambda m: m.group(1) + package, value)
    return value.replace(_REPO_DATA, _BUNDLE_DATA)


def rewrite_config(config: Any, package: str) -> Any:
    """A bundle config with every ``medkd`` reference pointed at the vendored ``package`` and the repository's
    data folder (``@bundle_root + '/../../data/X'``) at the bundle's own (``@bundle_root + '/data/X'``).

    Raises:
        ValueError: when a ``_target_`` or an expression still names ``medkd`` after the rewrite.
    """
    out = _map_strings(config, lambda s: _rewrite_string(s, package))
    left = [s for s in _strings(out) if s.startswith(("$", SOURCE)) and _LEFTOVER.search(s)]
    if left:
        raise ValueError(f"config strings still refer to {SOURCE} after rewriting to {package}: {left}")
    return out


def _not_self_contained(config: Any, repo_root: Path) -> str | None:
    """Why a rewritten config reaches outside its bundle (None when it does not)."""
    for s in _strings(config):
        if _FILE_MACRO.match(s):
            return f"macro {s!r} reads another file"
        if "../" in s or "..\\" in s:
            return f"{s!r} reaches outside the bundle"
        if str(repo_root) in s or (s.startswith("/") and len(s) > 1):
            return f"{s!r} is an absolute path"
    return None


def release_version(name: str, version: str | None = None) -> str:
    """The released version of an installed distribution, as the zoo CI can ``pip install name==version``.

    PyTorch's wheel variants (``2.13.0+cpu``, ``+cu128``, ``+rocm6.4``, ``+xpu``) pin their release
    (``2.13.0``); pre-releases (``1.6.0rc1``) are releases too.

    Args:
        name: distribution name (``monai``, ``pytorch-ignite``).
        version: the version to check (default: the installed one).

    Raises:
        ValueError: for a development or local version (``1.6.0.dev2510``, ``1.5.0+12.gabc1234``, an editable
            checkout) or one that is not a PEP 440 release; the message names the package and the version.
        importlib.metadata.PackageNotFoundError: when ``name`` is not installed.
    """
    version = importlib.metadata.version(name) if version is None else str(version)
    public, _, local = version.partition("+")
    if local and not _BUILD_VARIANT.match(local):
        raise ValueError(f"{name} {version} is a local build (+{local}), not a released version: install a release "
                         f"from PyPI (pip install {name}==<release>) before exporting")
    if not _RELEASE.match(public):
        raise ValueError(f"{name} {version} is a development or non-release version: install a release from PyPI "
                         f"(pip install {name}==<release>) before exporting")
    return public


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _top_level_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def _config_imports(configs: Iterable[Any]) -> set[str]:
    """Top-level modules the configs import: ``$import x`` / ``$from x import`` lines and dotted ``_target_``s."""
    found = set()
    for config in configs:
        for s in _strings(config):
            found |= {m.group(1) for m in re.finditer(r"\$\s*(?:import|from)\s+([A-Za-z_]\w*)", s)}

        def targets(obj):
            if isinstance(obj, dict):
                t = obj.get("_target_")
                if isinstance(t, str) and "." in t and not t.startswith("$"):
                    found.add(t.split(".")[0])
                for v in obj.values():
                    targets(v)
            elif isinstance(obj, list):
                for v in obj:
                    targets(v)

        targets(config)
    return found


def package_pins(modules: Iterable[str], listed: Iterable[str] = ()) -> dict[str, str]:
    """Exact release pins (``name -> version``) of the distributions providing ``modules`` plus those ``listed``.

    Standard-library modules and ``monai`` / ``torch`` / ``numpy`` (pinned by their own metadata keys) are left
    out; versions are the installed releases (:func:`release_version`).

    Raises:
        ValueError: when a module is not provided by any installed distribution, or a version is not a release.
    """
    provided = importlib.metadata.packages_distributions()
    names: dict[str, str] = {}
    for name in listed:
        names.setdefault(_canonical(name), name)
    for module in sorted(set(modules)):
        if module in sys.stdlib_module_names or module == "__future__":
            continue
        if module not in provided:
            raise ValueError(f"module {module!r} is imported by the exported code but no installed distribution provides it")
        for dist in provided[module]:
            names.setdefault(_canonical(dist), importlib.metadata.metadata(dist)["Name"])
    pins = {}
    for canonical, name in names.items():
        if canonical in CORE_DISTRIBUTIONS:
            continue
        try:
            pins[name] = release_version(name)
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(f"the bundle needs {name!r}, which is not installed; install it to pin its version") from None
    return pins


def render_model_card(template: str, values: dict[str, str]) -> str:
    """Fill the ``{{ key }}`` placeholders of ``template`` with ``values``.

    Raises:
        KeyError: naming the placeholders that ``values`` lacks.
    """
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if missing:
        raise KeyError(f"model card template placeholders without a value: {missing}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def _bundle_docs(text: str, bundle: str, package: str, modules: set[str]) -> str:
    """The bundle's own README for inclusion in the model card: title dropped, headings one level down, dotted
    ``medkd`` names of vendored modules renamed, links into the rest of the repository turned into plain text."""
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    out, fenced = [], False
    for line in lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and line.startswith("#") else line)
    body = "\n".join(out).strip("\n")

    def rename(m: re.Match) -> str:
        try:
            vendored = _longest_module(SOURCE + m.group(1), SOURCE_DIR) in modules
        except ValueError:  # not a module path: leave the text alone
            vendored = False
        return (package if vendored else SOURCE) + m.group(1)

    def unlink(m: re.Match) -> str:
        path = posixpath.normpath(posixpath.join("bundles", bundle, "docs", m.group(2)))
        text = m.group(1)
        return f"`{path}` of the medkd repository" if text.strip("`") == path else \
            f"{text} (`{path}` of the medkd repository)"

    body = _DOTTED.sub(rename, body)
    return re.sub(r"\[([^\]]+)\]\((\.\./[^)]+)\)", unlink, body)


def _checked_weights(path: Path, bundle: Path, config: str, net_id: str, what: str) -> dict:
    """The state dict in ``path``, loaded strictly into ``net_id`` of the source bundle's ``config``."""
    state = load_state_dict_file(path)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / config))
    parser["bundle_root"] = str(bundle)
    if net_id not in parser.config:
        raise ValueError(f"{bundle.name}/configs/{config} has no '{net_id}' to check the {what} {path} against")
    net = parser.get_parsed_content(net_id)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{what} {path} does not match {net_id} ({type(net).__name__}) of {bundle.name}: {e}") from e
    return {k: v.detach().clone().cpu() for k, v in net.state_dict().items()}


def _network_format(fmt: dict) -> str:
    shape = " x ".join(str(s) for s in fmt.get("spatial_shape", []))
    channels = fmt.get("channel_def", {})
    names = ", ".join(f"{k}: {v}" for k, v in channels.items())
    return f"{fmt.get('num_channels')} channel(s) ({names}), spatial shape {shape}, {fmt.get('dtype')}, " \
           f"{fmt.get('format', fmt.get('type'))}"


def _replace_dir(staged: Path, target: Path) -> None:
    """Move ``staged`` to ``target``, replacing an existing ``target`` (renames only; the old copy is removed last)."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(staged, target)
    if old is not None:
        shutil.rmtree(old)


def _collect_configs(src: Path, package: str) -> tuple[dict[str, Any], list[str], dict[str, Any], dict[str, str]]:
    """The rewritten configs of ``src/configs`` (name -> config), the files copied as they are (``logging.conf``),
    the self-contained rewritten recipes (``recipes/<name>`` -> config) and the others (name -> why)."""
    repo_root = src.parents[1]
    configs: dict[str, Any] = {}
    verbatim: list[str] = []
    for path in sorted((src / "configs").iterdir()):
        if path.name == "metadata.json" or path.is_dir():
            continue
        if path.name == "logging.conf":
            verbatim.append(path.name)
            continue
        if path.suffix != ".json":
            raise ValueError(f"{src.name}/configs/{path.name}: only JSON configs (and logging.conf) can be exported")
        configs[path.name] = rewrite_config(json.loads(path.read_text()), package)
        reason = _not_self_contained(configs[path.name], repo_root)
        if reason:
            raise ValueError(f"{src.name}/configs/{path.name} is not self-contained: {reason}")
    recipes: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for path in sorted((src / "configs" / "recipes").glob("*.json")):
        rewritten = rewrite_config(json.loads(path.read_text()), package)
        reason = _not_self_contained(rewritten, repo_root)
        if reason:
            skipped[path.name] = reason
        else:
            recipes[f"recipes/{path.name}"] = rewritten
    return configs, verbatim, recipes, skipped


def _export_metadata(meta: dict, version: str, changelog: str | None, pins: dict[str, str], note: str) -> dict:
    """The bundle's metadata with the export's version (and a changelog entry for it) and release pins."""
    meta = dict(meta)
    meta["version"] = version
    if version not in meta.get("changelog", {}):
        meta["changelog"] = {version: changelog or note, **meta.get("changelog", {})}
    for dist, key in CORE_DISTRIBUTIONS.items():
        meta[key] = release_version(dist)
    meta["required_packages_version"] = dict(pins)
    meta["optional_packages_version"] = dict(pins)
    return meta


def _write_vendored(files: dict[str, Path], package: str, target: Path) -> None:
    """Copy the ``medkd`` modules ``files`` (name -> source file) under ``target/package`` with renamed imports."""
    for name, path in files.items():
        rel = path.relative_to(SOURCE_DIR)
        dest = target / package / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        text = rewrite_python_imports(path.read_text(), package, filename=f"{SOURCE}/{rel}")
        if name == SOURCE:
            text += f'\n__vendored_from__ = "{SOURCE} {medkd.__version__}"\n'
        dest.write_text(text)


def _move_large_files(bundle_dir: Path, limit_mb: float, url: str | None, dest: Path) -> list[dict]:
    """Move the files of ``bundle_dir`` over ``limit_mb`` to ``dest`` (same relative paths) and return their
    ``large_files.yml`` entries (path, url, SHA-256)."""
    entries = []
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
        if path.stat().st_size <= limit_mb * 1024 * 1024:
            continue
        rel = path.relative_to(bundle_dir).as_posix()
        entries.append({"path": rel, "url": f"{url.rstrip('/')}/{rel}" if url else "", "hash_val": file_sha256(path),
                        "hash_type": "sha256"})
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, dest / rel)
    return entries


def export_bundle(bundle: str | os.PathLike, out: str | os.PathLike, version: str | None = None,
                  ckpt: str | os.PathLike | None = None, teacher: str | os.PathLike | None = None,
                  overwrite: bool = False, large_files_url: str | None = None,
                  large_files_dir: str | os.PathLike | None = None, large_file_mb: float = ZOO_LARGE_FILE_MB,
                  changelog: str | None = None, template: str | os.PathLike | None = None) -> ExportReport:
    """Write ``bundle`` to ``out`` as a self-contained MONAI model-zoo bundle.

    The result runs with only the packages pinned in its ``configs/metadata.json`` and
    ``PYTHONPATH=<out>`` (see ``docs/export.md``). It is built in a temporary folder next to ``out`` and moved into
    place at the end: a failed export leaves nothing behind, and an existing ``out`` is refused or, with
    ``overwrite``, replaced by renames.

    Args:
        bundle: a bundle folder of this repository (``bundles/emkd_segmentation``).
        out: the folder to write; its name should be the bundle's name (the zoo and MONAI Label key on it).
        version: ``version`` of the exported metadata, ``X.Y.Z`` (default: the bundle's); a changelog entry is
            added when the bundle's changelog lacks it.
        ckpt: the trained student (default ``<bundle>/models/model.pt``): a state dict, or a dict holding one under
            ``"model"``; saved as the bare state dict after a strict load into ``network_def``.
        teacher: a teacher checkpoint to ship as ``models/teacher.pt`` (default ``<bundle>/models/teacher.pt`` when
            it exists and ``train.json`` has a ``teacher_def``), checked strictly against ``teacher_def``.
        overwrite: replace an existing ``out`` (and large-files folder) instead of refusing.
        large_files_url: base URL the large files will be uploaded to (``<url>/<path in bundle>`` goes into
            ``large_files.yml``); empty URLs are written otherwise, to be filled in before publishing.
        large_files_dir: where files over ``large_file_mb`` go (default ``<out>_large_files`` beside ``out``).
        large_file_mb: size limit of files kept inside the bundle (the zoo's 25 MB).
        changelog: the changelog text of a new version (default: says it is a medkd export).
        template: the model card template (default ``docs/model_card_template.md`` of the repository).

    Returns:
        an :class:`ExportReport`.

    Raises:
        FileNotFoundError: missing bundle folder, student or teacher checkpoint, LICENSE or template.
        FileExistsError: ``out`` (or, when files are large, the large-files folder) exists and ``overwrite`` is False.
        ValueError: bad version, a checkpoint that does not fit its network, a development/local package version,
            a config that reaches outside the bundle, ``out`` overlapping the source bundle.
    """
    src = Path(bundle).resolve()
    out = Path(out).absolute()
    if not (src / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"{bundle} is not a bundle folder (no configs/metadata.json)")
    if out.resolve() == src or src in out.resolve().parents or out.resolve() in src.parents:
        raise ValueError(f"--out {out} overlaps the source bundle {src}; export to another folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it (the old folder is removed only after "
                              f"the new export is complete)")
    large_dir = Path(large_files_dir).absolute() if large_files_dir else out.parent / f"{out.name}_large_files"
    template_path = Path(template) if template else TEMPLATE
    if not template_path.is_file():
        raise FileNotFoundError(f"model card template not found: {template_path}")
    if not (src / "LICENSE").is_file():
        raise FileNotFoundError(f"{src.name} has no LICENSE file; the model zoo requires one")
    meta = json.loads((src / "configs" / "metadata.json").read_text())
    version = str(meta["version"] if version is None else version)
    if not _VERSION.match(version):
        raise ValueError(f"--version {version!r} is not of the form X.Y.Z (e.g. 0.1.0)")
    student = Path(ckpt) if ckpt is not None else src / "models" / "model.pt"
    if not student.is_file():
        raise FileNotFoundError(f"no trained student to export: {student} does not exist; train the bundle first "
                                f"(python -m monai.bundle run --config_file {src.name}/configs/train.json ...) or "
                                f"pass --ckpt PATH")
    package = vendored_package_name(src.name)
    configs, verbatim, recipes, skipped = _collect_configs(src, package)
    if teacher is None and "teacher_def" in configs.get("train.json", {}) and (src / "models" / "teacher.pt").is_file():
        teacher = src / "models" / "teacher.pt"
    if teacher is not None and not Path(teacher).is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {teacher}")

    # the vendored modules: the import closure of what the configs name
    originals = [json.loads((src / "configs" / name).read_text()) for name in [*configs, *recipes]]
    modules, whole = required_modules(set().union(*(config_references(c) for c in originals)) or {SOURCE})
    files = {name: _module_file(name, SOURCE_DIR) for name in sorted(modules)}

    # weights, checked against the networks the configs build
    student_state = _checked_weights(student, src, "inference.json", "network_def", "student checkpoint")
    teacher_state = None if teacher is None else \
        _checked_weights(Path(teacher), src, "train.json", "teacher_def", "teacher checkpoint")

    # the packages the code and the configs import, pinned to the installed releases
    imported = set().union(*(_top_level_imports(p) for p in files.values()), _config_imports([*configs.values(),
                                                                                              *recipes.values()]))
    listed = [*meta.get("required_packages_version", {}), *meta.get("optional_packages_version", {})]
    pins = package_pins(imported - {SOURCE, package}, listed)
    meta = _export_metadata(meta, version, changelog, pins, note=f"model-zoo export of the medkd bundle {src.name} "
                            f"(medkd {medkd.__version__}, code vendored as {package})")

    token = uuid.uuid4().hex[:8]
    bundle_dir = out.parent / f".{out.name}.export-{token}"
    large_stage = large_dir.parent / f".{large_dir.name}.export-{token}"
    try:
        for sub in ("configs", "models", "docs"):
            (bundle_dir / sub).mkdir(parents=True)
        for name, config in {**configs, **recipes, "metadata.json": meta}.items():
            (bundle_dir / "configs" / name).parent.mkdir(parents=True, exist_ok=True)
            (bundle_dir / "configs" / name).write_text(zoo_json(config))
        for name in verbatim:
            shutil.copy2(src / "configs" / name, bundle_dir / "configs" / name)
        shutil.copy2(src / "LICENSE", bundle_dir / "LICENSE")
        for path in (src / "docs").glob("*"):
            if path.is_file() and path.name != "README.md":
                shutil.copy2(path, bundle_dir / "docs" / path.name)
        torch.save(student_state, bundle_dir / "models" / "model.pt")
        if teacher_state is not None:
            torch.save(teacher_state, bundle_dir / "models" / "teacher.pt")
        _write_vendored(files, package, bundle_dir)

        # files over the zoo's limit leave the bundle; large_files.yml says where to fetch them and their hash
        large = _move_large_files(bundle_dir, large_file_mb, large_files_url, large_stage)
        if large and large_dir.exists() and not overwrite:
            raise FileExistsError(f"{large_dir} exists; pass --overwrite to replace it")
        (bundle_dir / "large_files.yml").write_text(yaml.safe_dump({"large_files": large}, sort_keys=False))
        values = _card_values(src, meta, package, modules, whole, pins, configs, recipes, skipped, large,
                              teacher_state is not None, large_dir)
        (bundle_dir / "docs" / "README.md").write_text(render_model_card(template_path.read_text(), values))

        if out.exists() and not overwrite:  # appeared while exporting
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        _replace_dir(bundle_dir, out)
        if large:
            _replace_dir(large_stage, large_dir)
    finally:
        shutil.rmtree(bundle_dir, ignore_errors=True)
        shutil.rmtree(large_stage, ignore_errors=True)
    return ExportReport(path=out, package=package, modules=sorted(modules), whole_package=whole, pins=pins,
                        configs=sorted([*configs, *verbatim]), recipes=sorted(recipes), skipped_recipes=skipped,
                        large_files={e["path"]: large_dir / e["path"] for e in large})


def _card_values(src: Path, meta: dict, package: str, modules: set[str], whole: bool, pins: dict[str, str],
                 configs: dict, recipes: dict, skipped: dict[str, str], large: list[dict], has_teacher: bool,
                 large_dir: Path) -> dict[str, str]:
    """The values of the model card template's placeholders."""
    fmt = meta.get("network_data_format", {})
    image = next(iter(fmt.get("inputs", {}).values()), {})
    pred = next(iter(fmt.get("outputs", {}).values()), {})
    train = configs.get("train.json", {})
    dataset_dir = train.get("dataset_dir", "")
    sub = sorted({".".join(m.split(".")[:2]) for m in modules} - {SOURCE})
    requirements = " ".join([f"monai=={meta['monai_version']}", f"torch=={meta['pytorch_version']}",
                             f"numpy=={meta['numpy_version']}", *(f"{k}=={v}" for k, v in pins.items())])
    stages = [n for n in configs if n not in ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json")]
    metrics = meta.get("eval_metrics", {})
    refs = meta.get("references", [])
    return {
        "name": meta.get("name", src.name),
        "bundle": src.name,
        "version": meta["version"],
        "changelog": "\n".join(f"- {k}: {v}" for k, v in meta.get("changelog", {}).items()),
        "description": meta.get("description", ""),
        "task": meta.get("task", ""),
        "authors": meta.get("authors", ""),
        "copyright": meta.get("copyright", ""),
        "medkd_version": medkd.__version__,
        "package": package,
        "vendored": ("the whole `medkd` package (a module imports code dynamically, so the needed part could not "
                     "be determined)" if whole else
                     "the modules the configs need (the import closure of their references): "
                     + ", ".join(f"`{s.replace(SOURCE, package, 1)}`" for s in sub)),
        "requirements": requirements,
        "monai_version": meta["monai_version"],
        "pytorch_version": meta["pytorch_version"],
        "numpy_version": meta["numpy_version"],
        "input": _network_format(image),
        "output": _network_format(pred),
        "labels": meta.get("label_classes", ""),
        "data_source": meta.get("data_source", ""),
        "dataset_dir": f"`{dataset_dir}`",
        "eval_metrics": ", ".join(f"{k} {v}" for k, v in metrics.items()) or "none reported",
        "intended_use": meta.get("intended_use", ""),
        "references": "\n".join(f"- {r}" for r in refs) or "-",
        "stage_configs": ", ".join(f"`configs/{s}`" for s in stages) or "none",
        "recipes": ", ".join(f"`configs/{r}`" for r in sorted(recipes)) or "none",
        "skipped_recipes": "; ".join(f"`{k}` ({v})" for k, v in skipped.items()) or "none",
        "teacher": ("`models/teacher.pt` (the teacher `train.json` distils from by default)" if has_teacher else
                    "no teacher (train a teacher first or pass `--teacher_ckpt PATH` to `train.json`)"
                    if "teacher_ckpt" in train else "no teacher (this bundle does not distil from one)"),
        "large_files": ("\n".join(f"- `{e['path']}` (sha256 `{e['hash_val']}`): upload it from "
                                  f"`{large_dir.name}/{e['path']}` to {e['url'] or 'a URL of yours and write the URL into `large_files.yml`'}"
                                  for e in large) or "none: every file is below the 25 MB limit and ships in the folder"),
        "bundle_readme": _bundle_docs((src / "docs" / "README.md").read_text(), src.name, package, modules)
        if (src / "docs" / "README.md").is_file() else "",
    }
