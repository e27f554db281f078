"""README.md and docs/*.md name only things that exist in this tree.

Checked, in a few seconds (no model is built, nothing is trained):

1. Links. Every relative link or image `[text](path#anchor)` outside code points at a file or folder
   that exists, relative to the page; an anchor into a markdown page (or into the page itself) names
   one of its headings, slugged as GitHub does. Every docs page is linked from the README.
2. Repository paths. Every `scripts/...`, `configs/...`, `grpo/...`, `tests/...`, `rewards/...`,
   `reward_models/...` or `docs/...` in inline code or a fenced code block exists; `{a,b}` is expanded
   as the shell does, and a `*` must match at least one file.
3. Commands. Every command line of a console script that pyproject.toml defines (`grpo-train`,
   `grpo-eval`, `grpo-rm-train`, `grpo-compare`) or of its module (`python -m grpo.train`,
   `torchrun ... -m grpo.train`, `deepspeed ... --module grpo.train`, also `grpo-memory` and `python -m grpo.memory`),
   in a fenced block or in inline code, has Hydra overrides that compose into a config its entry point
   validates; for `grpo-compare`, its `run_overrides` and `rm_overrides` compose too. A transcript line
   `$ cmd` followed by `error: message` must fail with that message.
4. Modules. Every `python -m <module>` (and every console script's module) names a module that
   `importlib.util.find_spec` finds; nothing is imported beyond its parent packages.

Not checked, and why:
- Overrides holding a shell variable or a placeholder (`$GRPO_MODEL_DIR`, `experiment=...`, `<dir>`): the
  command is skipped, as their value is unknown here.
- Files an override names (`model.path=`, `task.train_file=`, `reward...path=`): they are the user's files
  or a run's outputs, and composing a config does not open them. Likewise paths under `runs/`, `data/`,
  `.venv-vllm/`, which exist only after something has run.
- Launcher and script arguments (`--num_gpus 8`, `python -m scripts.bench.step_vs_trl --device cuda`): only the
  script's path and the module are checked, not what argparse would make of the flags.
- A line the shell could not split (an unbalanced quote) is not read as a command.
- YAML and Python snippets are not loaded or run; figures and timings cannot be checked without rerunning
  the commands that produced them; URLs are not fetched.
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
REPO_PATH = re.compile(
    r"(?<![\w./$~-])(?:scripts|configs|grpo|tests|rewards|reward_models|docs)/(?:[\w.*-]|\{[^{}\s/]*\}|/)*"
)
ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"\$|\.\.\.|<[^>]*>")
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
# Options of modules that take their own flags before the Hydra overrides.
MODULE_FLAGS = {m: {"--gpus", "--gpu-memory-gb"} for m in ("grpo.memory", "grpo.model.memory")}


def console_scripts() -> dict[str, str]:
    """`[project.scripts]` of pyproject.toml: script name -> module (read as text: tomllib is 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M).group(1)
    return {name: target.split(":")[0] for name, target in re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, re.M)}


SCRIPTS = console_scripts()
TRAIN_MODULES = {"grpo.train", "grpo.cli", "grpo.memory", "grpo.model.memory"}  # all compose grpo-train's config
CHECKED_MODULES = TRAIN_MODULES | {"grpo.compare.command", "reward_models.train"}


# --- reading the pages ------------------------------------------------------------------------------


@dataclass
class Page:
    path: Path
    prose: str  # the text outside fenced blocks (those lines blank), inline code replaced by `CODE`
    code: list[tuple[int, str]]  # (line number, text) of inline code spans
    blocks: list[tuple[int, str, list[str]]]  # (first line number, language, lines) of fenced blocks
    headings: list[str]

    def line_of(self, offset: int) -> int:
        return self.prose.count("\n", 0, offset) + 1


def read_page(path: Path) -> Page:
    prose, blocks, headings = [], [], []
    block = None
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        fence = FENCE.match(line)
        if block is not None:
            if fence and fence.group(1) == block[3]:
                blocks.append(block[:3])
                block = None
            else:
                block[2].append(line)
            prose.append("")
        elif fence:
            block = (n + 1, fence.group(2).lower(), [], fence.group(1))
            prose.append("")
        else:
            prose.append(line)
            heading = HEADING.match(line)
            if heading:
                headings.append(heading.group(2))
    assert block is None, f"{path.name}: a fenced block opened at line {block[0] - 1} is never closed"
    text = "\n".join(prose)
    code = [(text.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split())) for m in INLINE_CODE.finditer(text)]
    # A span that wraps keeps its line breaks, so offsets still give line numbers.
    text = INLINE_CODE.sub(lambda m: "CODE" + "\n" * m.group(0).count("\n"), text)
    return Page(path, text, code, blocks, headings)


def github_slugs(headings: list[str]) -> set[str]:
    """Anchors GitHub gives these headings: lower case, punctuation but `-` and `_` dropped, spaces to `-`,
    `-1`, `-2` ... on repeats."""
    counts: dict[str, int] = {}
    slugs = set()
    for heading in headings:
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        slugs.add(f"{slug}-{counts[slug]}" if slug in counts else slug)
        counts[slug] = counts.get(slug, 0) + 1
    return slugs


def shell_lines(page: Page):
    """(line number, command, expected error or None) for every line of the shell blocks."""
    for first, lang, lines in page.blocks:
        if lang not in SHELL_BLOCKS:
            continue
        joined: list[tuple[int, str]] = []
        for i, line in enumerate(lines):
            if joined and joined[-1][1].endswith("\\"):
                joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
            else:
                joined.append((first + i, line))
        transcript = any(line.startswith("$ ") for _, line in joined)  # commands, then what they printed
        for i, (n, line) in enumerate(joined):
            if not transcript:
                yield n, line, None
            elif line.startswith("$ "):
                printed = joined[i + 1][1] if i + 1 < len(joined) else ""
                yield n, line[2:], printed[len("error: "):] if printed.startswith("error: ") else None


def command_lines(page: Page):
    """Shell block lines, then inline code that is a command (a console script or a `-m` module run)."""
    yield from shell_lines(page)
    for n, text in page.code:
        words = text.split()
        if words and (words[0] in SCRIPTS or "-m" in words or "--module" in words):
            yield n, text, None


def parse_command(line: str) -> tuple[str, list[str]] | None:
    """(module, arguments after it) of a console script or a `python|torchrun|deepspeed ... -m module` line."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote: not a command we can read
        return None
    while tokens and ENV_ASSIGN.match(tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] in SCRIPTS:
        return SCRIPTS[tokens[0]], tokens[1:]
    runner = Path(tokens[0]).name
    if runner.startswith("python") or runner in ("torchrun", "deepspeed"):
        for flag in ("-m", "--module"):
            if flag in tokens[:-1]:
                i = tokens.index(flag)
                return tokens[i + 1], tokens[i + 2:]
    return None


def all_commands():
    """One test case per distinct command of a module that takes a grpo config, named by its first place."""
    seen = set()
    for path in PAGES:
        for n, line, error in command_lines(read_page(path)):
            parsed = parse_command(line)
            if parsed and parsed[0] in CHECKED_MODULES and (key := (parsed[0], *parsed[1], error)) not in seen:
                seen.add(key)
                command = line.split(" #")[0].strip()
                yield pytest.param(*parsed, error, id=f"{path.relative_to(ROOT)}:{n}: {command[:80]}")


# --- composing a command's config as its entry point does -------------------------------------------


def compose_train(overrides: list[str]):
    from tests.conftest import compose

    return compose(overrides)


def compose_rm(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from reward_models.config import register_rm_configs, validate_rm

    register_rm_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return validate_rm(OmegaConf.to_object(compose(config_name="rm/config", overrides=overrides)))


def compose_compare(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from grpo.compare.command import CompareConfig, validate_compare

    ConfigStore.instance().store(name="compare_schema", node=CompareConfig)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = validate_compare(OmegaConf.to_object(compose(config_name="compare/config", overrides=overrides)))
    compose_train(cfg.run_overrides)
    compose_rm(cfg.rm_overrides)
    return cfg


COMPOSE = {"reward_models.train": compose_rm, "grpo.compare.command": compose_compare}  # others: grpo-train's config


def hydra_overrides(module: str, args: list[str]) -> list[str]:
    """The arguments Hydra sees: the module's own flags (and their values) left out."""
    flags, out, skip = MODULE_FLAGS.get(module, set()), [], False
    for arg in args:
        if skip:
            skip = False
        elif arg.split("=")[0] in flags:
            skip = "=" not in arg
        else:
            assert not arg.startswith("-"), f"{arg!r} is not a Hydra override of {module}"
            out.append(arg)
    return out


# --- the tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path):
    page = read_page(path)
    broken = []
    for link in LINK.finditer(page.prose):
        n, target = page.line_of(link.start()), link.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists() or ROOT not in (dest, *dest.parents):
            broken.append(f"line {n}: {target} (no such file in the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in github_slugs(read_page(dest).headings):
            broken.append(f"line {n}: {target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page_and_stays_short():
    page = read_page(README)
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(page.prose)}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link: {unlinked}"
    lines = len(README.read_text().splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; details belong in docs/"


def expand_braces(path: str) -> list[str]:
    """`a_{x,y}_{1,2}` -> a_x_1, a_x_2, a_y_1, a_y_2 (as bash expands it)."""
    parts = re.split(r"(\{[^{}]*,[^{}]*\})", path)
    options = [p[1:-1].split(",") if p.startswith("{") and "," in p else [p] for p in parts]
    return ["".join(choice) for choice in itertools.product(*options)]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_repo_paths_exist(path):
    page = read_page(path)
    texts = page.code + [(first + i, line) for first, _, lines in page.blocks for i, line in enumerate(lines)]
    missing = []
    for n, text in texts:
        for mention in REPO_PATH.findall(text):
            for candidate in expand_braces(mention.rstrip(".,")):
                found = glob.glob(str(ROOT / candidate)) if "*" in candidate else (ROOT / candidate).exists()
                if not found:
                    missing.append(f"line {n}: {candidate}")
    assert not missing, f"{path.relative_to(ROOT)} names paths that do not exist:\n" + "\n".join(missing)


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_m_modules_exist(path):
    page = read_page(path)
    lines = [(n, line) for n, line, _ in shell_lines(page)] + page.code
    missing = []
    for n, line in lines:
        parsed = parse_command(line)
        if parsed and not module_exists(parsed[0]):
            missing.append(f"line {n}: {parsed[0]}")
    assert not missing, f"{path.relative_to(ROOT)}: `-m` names modules that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("module, args, error", list(all_commands()))
def test_command_overrides_compose(module, args, error):
    overrides = hydra_overrides(module, args)
    if any(PLACEHOLDER.search(o) for o in overrides):
        pytest.skip("an override holds a shell variable or a placeholder")
    compose = COMPOSE.get(module, compose_train)
    if error is None:
        compose(overrides)
    else:  # the entry points print `error: <ConfigError>` and exit 2
        from grpo.errors import ConfigError

        with pytest.raises(ConfigError) as raised:
            compose(overrides)
        assert str(raised.value) == error
