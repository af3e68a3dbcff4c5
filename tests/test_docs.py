"""The README and docs/ are tested: every code block that claims to run is run or composed.

- ``python`` blocks are executed, each in a fresh namespace in a temp dir, with every
  ``lightning`` Trainer cut to a couple of batches (the blocks keep their real settings).
- ``bash`` blocks: each ``lrpet-train`` command (also under ``torchrun``/``srun``) is composed
  with Hydra's compose API from ``lrpet_lightning/conf``, every sweep value expanded, rather
  than trained; ``pip install`` lines must name existing extras; ``python FILE`` lines must
  name an existing file, and ``examples/cli.py`` (LightningCLI) is parsed and fitted briefly.
- ``yaml`` blocks are LightningCLI configs and go through ``examples/cli.py`` too.
- A block that cannot run here is marked by ``<!-- skip: REASON -->`` on the line above it;
  few are allowed, each with its reason.
- ``mkdocs build --strict`` builds the site and fails on any warning (broken links, bad
  references, docstrings mkdocstrings cannot parse).

``docs/resume.md`` is left out of the block runner: its page and its tests live together
elsewhere (tests of the resume behavior); it is built by ``mkdocs build`` like every page.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser under its backport's name
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "lrpet_lightning" / "conf"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNNER_EXCLUDED = {ROOT / "docs" / "resume.md"}
MAX_SKIPPED = 3
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])
SCRIPTS = set(PYPROJECT["project"]["scripts"])
# Hydra plugins some commands select; without them the override is checked for its config
# file and left out of the composition (with the keys that configure that plugin).
PLUGINS = {
    "hydra/launcher=": ("hydra_plugins.hydra_submitit_launcher", "hydra/launcher",
                        "hydra.launcher."),
    "hparams_search=": ("hydra_plugins.hydra_optuna_sweeper", "hparams_search",
                        "hydra.sweeper."),
}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^(\s*)(```+)\s*([\w-]*)")
_SKIP = re.compile(r"<!--\s*skip:\s*(.*?)\s*-->")


def parse_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, dedented, with their skip marks."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        skip = _SKIP.search(prev)
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        blocks.append(Block(page, i + 1, lang, "\n".join(body) + "\n",
                            skip.group(1) if skip else None))
        i = j + 1
    return blocks


ALL_BLOCKS = [b for page in PAGES if page not in RUNNER_EXCLUDED for b in parse_blocks(page)]
RUNNABLE = [b for b in ALL_BLOCKS if b.lang in ("python", "bash", "yaml")]


def _blocks(lang: str) -> list[Any]:
    return [pytest.param(b, id=b.id) for b in RUNNABLE if b.lang == lang]


# ----------------------------------------------------------------------------- python
@pytest.fixture
def fast_trainer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every Trainer a block builds runs 1 epoch of 2 batches, quietly, inside tmp_path."""
    from lightning.pytorch import Trainer

    original = Trainer.__init__

    def short(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.update(max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                      limit_test_batches=1, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path))
        original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", short)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("block", _blocks("python"))
def test_python_block_runs(block: Block, fast_trainer: None) -> None:
    if block.skip:
        pytest.skip(block.skip)
    exec(compile(block.code, block.id, "exec"), {"__name__": "__docs__"})


# ------------------------------------------------------------------------------- bash
def _commands(code: str) -> list[list[str]]:
    """The block's commands as argument lists: continuations joined, comments dropped,
    ``&&`` chains split, and the block's own ``VAR=value`` lines expanded."""
    env = {"i": "0"}
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 1 and re.fullmatch(r"\w+=.*", words[0]):
            key, value = words[0].split("=", 1)
            env[key] = value
            continue
        words = [re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), "X"), w) for w in words]
        cmd: list[str] = []
        for word in [*words, "&&"]:
            if word == "&&":
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(word)
    return out


def _train_args(cmd: list[str]) -> list[str] | None:
    """The Hydra arguments of an lrpet-train command (also under torchrun/srun), or None."""
    for k, word in enumerate(cmd):
        if word == "lrpet-train":
            return cmd[k + 1:]
        if word == "-m" and k + 1 < len(cmd) and cmd[k + 1] == "lrpet_lightning.app":
            return cmd[k + 2:]
    return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def compose_all(args: list[str]) -> int:
    """Compose the overrides as lrpet-train would, one config per sweep combination."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides, k = [], 0
    while k < len(args):
        if args[k] in ("-m", "--multirun"):
            k += 1
            continue
        if args[k] in ("--cfg", "-c"):
            k += 2
            continue
        overrides.append(args[k])
        k += 1
    for prefix, (module, group, keys) in PLUGINS.items():
        chosen = [o for o in overrides if o.startswith(prefix)]
        if chosen and not _installed(module):
            for o in chosen:
                assert (CONF / group / f"{o.split('=', 1)[1]}.yaml").is_file(), o
            overrides = [o for o in overrides if o not in chosen and not o.startswith(keys)]
    parsed = OverridesParser.create().parse_overrides(overrides)
    combos = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for combo in combos:
            cfg = compose("train", overrides=combo, return_hydra_config=True)
            assert "trainer" in cfg and "callbacks" in cfg
    return len(combos)


def check_command(cmd: list[str], tmp_path: Path) -> str:
    """Check one command; returns how ('composed', 'checked', 'ran')."""
    train = _train_args(cmd)
    if train is not None:
        assert compose_all(train) >= 1
        return "composed"
    head = cmd[0]
    if head in SCRIPTS:
        return "checked"
    if head == "pip":
        for word in cmd[2:]:
            if m := re.fullmatch(r"(?:-e\s*)?\.?\[([\w,-]+)\]|\.\[([\w,-]+)\]", word.strip('"')):
                extras = (m.group(1) or m.group(2)).split(",")
                assert set(extras) <= EXTRAS, f"{word}: no such extra; extras: {sorted(EXTRAS)}"
        assert "lrpet-lightning" not in " ".join(cmd), "the package is not on PyPI"
        return "checked"
    if head in ("python", "python3"):
        if cmd[1:3] in (["-m", "pytest"], ["-m", "venv"]):
            return "checked"
        script = ROOT / cmd[1]
        assert script.is_file(), f"{cmd[1]} does not exist"
        if cmd[1] == "examples/cli.py":
            run_cli(cmd[2:], tmp_path)
            return "ran"
        return "checked"
    if head in ("mkdocs", ".", "cd", "git"):
        return "checked"
    raise AssertionError(f"a command the docs test does not know how to check: {cmd}")


@pytest.mark.parametrize("block", _blocks("bash"))
def test_bash_block_commands(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.skip:
        pytest.skip(block.skip)
    monkeypatch.chdir(tmp_path)
    kinds = [check_command(cmd, tmp_path) for cmd in _commands(block.code)]
    assert kinds, f"{block.id}: no command found"


# ----------------------------------------------------------------------- LightningCLI
def run_cli(args: list[str], tmp_path: Path) -> None:
    """Parse ``examples/cli.py``'s arguments in-process, check the LRPET callback, fit briefly."""
    spec = importlib.util.spec_from_file_location("lrpet_cli_example", ROOT / "examples/cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from lightning.pytorch.cli import LightningCLI

    from lrpet_lightning import LowRankProjectionCallback, decomposed_ranks

    args = [a for a in args if a != "fit"]  # run=False parses without a subcommand
    quick = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
             "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
             "--trainer.logger=false", "--trainer.enable_checkpointing=false",
             f"--trainer.default_root_dir={tmp_path}"]
    cli = LightningCLI(module.DigitsCNN, module.DigitsDataModule, run=False, args=args + quick)
    (lrpet,) = [c for c in cli.trainer.callbacks if isinstance(c, LowRankProjectionCallback)]
    assert lrpet.config.rank_ratio == 0.25
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert lrpet.num_projections >= 1
    if lrpet.decompose_on_fit_end:
        assert decomposed_ranks(cli.model)


@pytest.mark.parametrize("block", _blocks("yaml"))
def test_yaml_block_is_a_cli_config(block: Block, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if block.skip:
        pytest.skip(block.skip)
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "block" / "config.yaml"  # not where the CLI saves its own config.yaml
    config.parent.mkdir()
    config.write_text(block.code)
    run_cli([f"--config={config}"], tmp_path)


# ------------------------------------------------------------------------ the pages
def test_few_blocks_are_skipped_and_each_says_why() -> None:
    skipped = [b for b in RUNNABLE if b.skip is not None]
    assert len(skipped) <= MAX_SKIPPED, [b.id for b in skipped]
    assert all(len(b.skip) >= 10 for b in skipped), [(b.id, b.skip) for b in skipped]
    unknown = {b.lang for b in ALL_BLOCKS} - {"python", "bash", "yaml", "text"}
    assert not unknown, f"fences with an info string the test does not run: {unknown}"


def test_readme_opens_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[2] == "```bash"
    assert lines[3].startswith("python3 -m venv .venv && . .venv/bin/activate && pip install . "
                               "&& lrpet-train ")
    assert lines[4].startswith('python3 -m venv .venv && . .venv/bin/activate && pip install -e '
                               '".[dev]" && python -m pytest -q ')
    assert len(lines) <= 170


def test_readme_links_exist() -> None:
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_pages_name_only_files_the_repo_has() -> None:
    """Every page a page links to, and every upper-case ``NAME.md`` it mentions (run outputs
    such as ``summary.md`` are lower-case), is a file of this repository, and no link points
    outside it: the docs never send a reader to notes they cannot open."""
    for page in [*PAGES, ROOT / "mkdocs.yml"]:
        text = page.read_text()
        named = re.findall(r"\]\(([^)#\s]+\.md)", text) + re.findall(r"[\w./-]*[A-Z]\.md\b", text)
        for name in set(named):
            places = (page.parent / name, ROOT / name, ROOT / "docs" / name)
            assert any(p.resolve().is_file() and p.resolve().is_relative_to(ROOT)
                       for p in places), f"{page.relative_to(ROOT)} names {name}"
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if "://" not in target:
                inside = (page.parent / target).resolve().is_relative_to(ROOT)
                assert inside, f"{page.relative_to(ROOT)} links outside the repo: {target}"


def test_docs_extras_are_in_dev() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[]", d)[0] for d in extras["docs"]}
    assert names == {"mkdocs-material", "mkdocstrings"}
    dev = {re.split(r"[<>=\[]", d)[0] for d in extras["dev"]}
    assert names <= dev


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """The site builds with no warning: every link, anchor, nav entry and API reference."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "callback" / "index.html").is_file()


def test_the_checks_reject_what_would_not_work(tmp_path: Path) -> None:
    """The block runner itself: a wrong key, option or extra fails, a skip mark is read."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with pytest.raises(ConfigCompositionException):
        compose_all(["callbacks.lrpet.rank_ration=0.2"])
    with pytest.raises(MissingConfigException):
        compose_all(["-m", "model=resnet20,resnet99"])
    with pytest.raises(AssertionError, match="not on PyPI"):
        check_command(["pip", "install", "lrpet-lightning[optuna]"], tmp_path)
    with pytest.raises(AssertionError, match="no such extra"):
        check_command(["pip", "install", "-e", ".[gpu]"], tmp_path)
    with pytest.raises(AssertionError, match="does not know"):
        check_command(["make", "train"], tmp_path)
    page = tmp_path / "page.md"
    page.write_text("<!-- skip: needs a GPU here -->\n```python\nimport torch\n```\n\n"
                    "```bash\nN=2\nlrpet-train \\\n  seed=$N  # a comment\n```\n")
    python, bash = parse_blocks(page)
    assert (python.lang, python.skip, bash.skip) == ("python", "needs a GPU here", None)
    assert _commands(bash.code) == [["lrpet-train", "seed=2"]]
