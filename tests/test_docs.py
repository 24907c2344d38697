"""The documentation stays true to the code: every command is documented with an example,
every relative link and anchor resolves, and the README keeps its two commands."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from egress_guard.cli import main
from egress_guard.config import load_config

ROOT = Path(__file__).parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS, ROOT / "bench" / "README.md"]
# Written last in issue #9 (after the other steps): linked from the README before it exists.


def all_commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((f"{prefix}{name}", cmd))
        if isinstance(cmd, click.Group):
            out.extend(all_commands(cmd, f"{prefix}{name} "))
    return out


@pytest.mark.parametrize(("name", "command"), all_commands(main))
def test_every_command_has_help_with_an_example_and_is_documented(name: str, command: click.Command) -> None:
    assert command.help and "Example" in command.help, f"`egress-guard {name} --help` has no example"
    assert f"egress-guard {name}" in (ROOT / "docs" / "cli.md").read_text(), (
        f"`egress-guard {name}` is not documented in docs/cli.md"
    )


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6} (.+)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links in code are not links
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.relative_to(ROOT)}: link {target!r}: {path} does not exist"
        if anchor:
            assert file.suffix == ".md", f"{page.relative_to(ROOT)}: link {target!r}: an anchor in a non-Markdown file"
            assert anchor in anchors(file), f"{page.relative_to(ROOT)}: link {target!r}: no such heading in {path}"


def test_readme_keeps_the_two_commands_near_its_top() -> None:
    readme = (ROOT / "README.md").read_text()
    for heading, command in (
        ("**Set everything up and run the proxy**", "```sh\n./dev up\n```"),
        ("**Run the whole test suite**", "```sh\n./dev test\n```"),
    ):
        assert heading in readme and command in readme, command
        assert readme.index(command) < readme.index("\n## "), f"{command!r} is not above the first section"
        assert readme.index(heading) < readme.index(command)
    assert "./dev test" in (ROOT / ".ci" / "run").read_text(), "CI runs the README's test command"
    assert {"docs/configuration.md", "docs/cli.md"} <= set(links(ROOT / "README.md")), "the README links to the docs"


def test_readme_quick_start_config_loads(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    example = readme.split("## Quick start", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "egress-guard.yaml"
    path.write_text(example)
    config = load_config(path)
    assert config.agents["researcher"].limits.budget_day == 20
    assert {s.name for s in config.services} == {"openai", "anthropic"}


def test_config_errors_point_at_sections_that_exist() -> None:
    from egress_guard.config.errors import CONFIG_DOC, CONFIG_SECTIONS, SPEND_DOC

    missing = CONFIG_SECTIONS - anchors(ROOT / CONFIG_DOC)
    assert not missing, f"config errors link to sections {CONFIG_DOC} lacks: {sorted(missing)}"
    page, _, anchor = SPEND_DOC.partition("#")
    assert anchor in anchors(ROOT / page)
