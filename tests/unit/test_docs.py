"""The documentation stays true to the repository: links resolve, the configuration reference is
the one the code generates, and every config key the YAML comments name exists."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from training import tasks
from training.core.config import Config, Fault
from training.driver import config_reference

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIGS = [
    *sorted((REPO / "training" / "configs").glob("*.yaml")),
    REPO / "cluster" / "train.yaml",
    REPO / "kuberay" / "config" / "train.yaml",
]

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


# ---- links -----------------------------------------------------------------------------------
def links(markdown: str) -> list[str]:
    """Targets of Markdown links outside code blocks and inline code."""
    text = INLINE_CODE.sub("", FENCE.sub("", markdown))
    return LINK.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", markdown).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(doc: Path) -> list[str]:
    broken = []
    for target in links(doc.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists():
            broken.append(f"{target}: no such file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc: Path) -> None:
    assert doc.exists(), f"{doc} is missing"
    assert broken_links(doc) == [], f"broken links in {doc.relative_to(REPO)}"


def test_the_link_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading, with `code`\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](there.md) [ok](there.md#a-heading-with-code) [web](https://example.org/x)\n"
        "`[not a link](nowhere.md)`\n```\n[in code](nowhere.md)\n```\n"
        "[missing](gone.md) [bad anchor](there.md#nope) [own](#self)\n"
    )
    assert broken_links(doc) == [
        f"gone.md: no such file {tmp_path / 'gone.md'}",
        "there.md#nope: no heading #nope in there.md",
        "#self: no heading #self in doc.md",
    ]


def test_the_docs_link_every_page() -> None:
    """Each page under docs/ is reachable from the README."""
    readme = links((REPO / "README.md").read_text())
    targets = {t.partition("#")[0] for t in readme}
    unlinked = [p.name for p in (REPO / "docs").glob("*.md") if f"docs/{p.name}" not in targets]
    assert unlinked == [], "docs pages the README does not link to"


# ---- the configuration reference -------------------------------------------------------------
def test_configuration_reference_is_in_sync() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == config_reference.render(), (
        "docs/configuration.md differs from what training/driver/config_reference.py generates "
        f"from training/core/config.py; regenerate it: {config_reference.COMMAND}"
    )


def test_configuration_reference_names_every_key() -> None:
    text = config_reference.render()
    for section, field in Config.model_fields.items():
        assert f"## `{section}`" in text
        for key in field.annotation.model_fields:
            assert f"| `{key}` |" in text, f"{section}.{key} is not in the reference"


# ---- config keys named in the YAML comments --------------------------------------------------
def key_exists(dotted: str) -> bool:
    """Whether ``section.key[.key...]`` is a key of the Config (task.options: a built-in's)."""
    models: list[type[BaseModel]] = [Config]
    parts = dotted.split(".")
    for index, part in enumerate(parts):
        if parts[:index] == ["task", "options"]:
            models = [tasks.task_class(name).Options for name in tasks.BUILTIN_TASKS]
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if not fields:
            return False
        models = [m for f in fields if (m := _model_of(f.annotation)) is not None]
        if not models and index < len(parts) - 1:
            return bool(parts[: index + 1] == ["task", "options"])
    return True


def _model_of(annotation: typing.Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if found := _model_of(arg):
            return found
    return None


SECTIONS = "|".join(Config.model_fields)
DOTTED = re.compile(rf"(?<![\w./-])((?:{SECTIONS})(?:\.[a-z_][a-z0-9_]*)+)")
PLACEHOLDERS = {"section.key"}  # `--set section.key=value`: the syntax, not a key
SET = re.compile(r"--set\s+'?([A-Za-z_][\w.]*)=")
COMMENTED_KEY = re.compile(r"^(\s*)#\s?([a-z_][a-z0-9_]*):(?:\s|$)")
COMMENTED_FAULT = re.compile(r"^\s*#\s*-\s*(\{.*?\})")


def comment_keys(text: str) -> list[tuple[int, str]]:
    """(line, dotted key) for every key a comment names: `section.key` anywhere in a comment,
    and a commented-out `key: value` line under its section."""
    found = []
    parents: list[tuple[int, str]] = []  # (indent, key) of the enclosing YAML keys
    for number, line in enumerate(text.splitlines(), 1):
        code, hash_, comment = line.partition("#")
        if hash_:
            named = dict.fromkeys([*SET.findall(comment), *DOTTED.findall(comment)])
            found += [(number, key) for key in named if key not in PLACEHOLDERS]
        live = re.match(r"^(\s*)([a-z_][a-z0-9_]*):", code)
        commented = COMMENTED_KEY.match(line) if not code.strip() else None
        match = live or commented
        if match:
            indent = len(match.group(1))
            parents = [(i, k) for i, k in parents if i < indent]
            if commented:
                found.append((number, ".".join([k for _, k in parents] + [match.group(2)])))
            else:
                parents.append((indent, match.group(2)))
    return found


def commented_faults(text: str) -> list[tuple[int, str]]:
    return [
        (n, m.group(1))
        for n, line in enumerate(text.splitlines(), 1)
        if (m := COMMENTED_FAULT.match(line))
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_keys_named_in_comments_exist(path: Path) -> None:
    text = path.read_text()
    keys = comment_keys(text)
    unknown = [f"{path.name}:{n}: {key}" for n, key in keys if not key_exists(key)]
    assert unknown == [], "comments name config keys that do not exist"
    for number, fault in commented_faults(text):
        try:
            Fault.model_validate(yaml.safe_load(fault))
        except ValueError as exc:
            pytest.fail(f"{path.name}:{number}: the commented fault {fault} is invalid: {exc}")


def test_the_comment_check_can_fail() -> None:
    text = (
        "# --set model.name=transformer and --set training.epochz=3, but training.epochs is fine\n"
        "training:\n"
        "  # max_steps: 200\n"
        "  # max_stepz: 200\n"
        "  optimizer:\n"
        "    # lr: 0.1\n"
        "task:\n"
        "  options:\n"
        "    # mlp: {hidden_sizes: [8]}\n"
    )
    keys = comment_keys(text)
    assert keys == [
        (1, "model.name"),
        (1, "training.epochz"),
        (1, "training.epochs"),
        (3, "training.max_steps"),
        (4, "training.max_stepz"),
        (6, "training.optimizer.lr"),
        (9, "task.options.mlp"),
    ]
    unknown = [k for _, k in keys if not key_exists(k)]
    assert unknown == ["model.name", "training.epochz", "training.max_stepz"]
    assert commented_faults("  # - {kind: kill, rank: 1, step: 150}  # SIGKILL\n") == [
        (1, "{kind: kill, rank: 1, step: 150}")
    ]
