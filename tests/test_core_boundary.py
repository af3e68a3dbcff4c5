"""The core is plain PyTorch: importing it must not import lightning or hydra."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lrpet_lightning

CORE = Path(lrpet_lightning.__file__).parent / "core"
# Top-level packages the core must never import (directly or through the package root).
FORBIDDEN = ("lightning", "pytorch_lightning", "lightning_fabric", "hydra", "omegaconf")


def test_importing_the_core_api_imports_no_lightning_or_hydra() -> None:
    # A fresh interpreter: in this one, other tests may already have imported lightning.
    code = (
        "import sys\n"
        "import lrpet_lightning\n"
        "from lrpet_lightning import project_low_rank_, decompose_, compression_report\n"
        f"print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"imported: {result.stdout.strip()}"


def _imported_modules(path: Path) -> list[str]:
    """Every module an ``import``/``from ... import`` statement in ``path`` names, anywhere
    in the file (also inside functions, where lazy imports hide)."""
    package = ["lrpet_lightning", *path.parent.relative_to(CORE.parent).parts]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # Resolve relative imports ("from ..app import x") to absolute names.
            base = package[: len(package) - node.level + 1] if node.level else []
            names.append(".".join([*base, *([node.module] if node.module else [])]))
    return names


def test_core_sources_import_no_lightning_hydra_or_upper_layers() -> None:
    files = sorted(CORE.rglob("*.py"))
    assert len(files) >= 7  # linalg, config, walk, factorized, transforms, report, __init__
    offenders = []
    for path in files:
        for name in _imported_modules(path):
            top = name.split(".")[0]
            # Imports point downwards only: core never reaches up to callback/app.
            upward = name.startswith(("lrpet_lightning.callback", "lrpet_lightning.app"))
            if top in FORBIDDEN or upward:
                offenders.append(f"{path.relative_to(CORE.parent)}: {name}")
    assert not offenders, offenders
