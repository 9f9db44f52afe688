"""The documentation holds together: every relative link in README.md and docs/*.md
points at a file that exists (and, for ``#anchor`` links, at a heading of that page, by
GitHub's slug rules), the README links every page of docs/, and every ``make TARGET``
the pages mention is a target of the Makefile. Pure file reads: no server, no network."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:[^>]*\s)?(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
_MAKE = re.compile(r"(?:^|[\s(`;|&])make\s+([a-z][a-z0-9_-]*)")
_MAKEFILE_RULE = re.compile(r"^([^\s:#=$][^:=]*?)\s*::?(?!=)")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


@dataclass(frozen=True)
class Line:
    number: int
    text: str
    code: bool  # inside a fenced or indented code block


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def lines(text: str) -> Iterator[Line]:
    """Each line, told whether it is code (a fenced block, or an indented block that
    starts after a blank line, as list continuations never do)."""
    fence: str | None = None
    previous_blank, in_indented = True, False
    for number, raw in enumerate(text.splitlines(), 1):
        opening = _FENCE.match(raw)
        if fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = None
            yield Line(number, raw, True)
            continue
        if opening:
            fence = opening.group(1)
            yield Line(number, raw, True)
            continue
        if not raw.strip():  # a blank line neither starts nor ends an indented block
            previous_blank = True
            yield Line(number, raw, False)
            continue
        in_indented = raw.startswith(("    ", "\t")) and (previous_blank or in_indented)
        previous_blank = False
        yield Line(number, raw, in_indented)


def without_code_spans(text: str) -> str:
    return _CODE_SPAN.sub("", text)


def links(text: str) -> Iterator[tuple[int, str]]:
    """(line number, target) of every inline and reference link outside code."""
    for line in lines(text):
        if line.code:
            continue
        prose = without_code_spans(line.text)
        for match in _INLINE_LINK.finditer(prose):
            yield line.number, match.group(1)
        reference = _REFERENCE_LINK.match(prose)
        if reference:
            yield line.number, reference.group(1)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (links as their text, no markup),
    lower-cased, everything but letters, digits, ``_``, ``-`` and spaces dropped, each
    space a ``-``."""
    text = re.sub(r"!?\[((?:[^\]\\]|\\.)*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor of a page: its headings' slugs (a repeated one gets -1, -2, …) and
    explicit ``<a id=…>`` / ``<a name=…>``."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in lines(text):
        if line.code:
            continue
        heading = _HEADING.match(line.text)
        if heading:
            slug = github_slug(heading.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
        found.update(_HTML_ANCHOR.findall(line.text))
    return found


def broken_links(page: Path) -> list[str]:
    """What is wrong with ``page``'s relative links, one line each."""
    problems = []
    text = page.read_text(encoding="utf-8")
    for number, target in links(text):
        if not target or _SCHEME.match(target) or target.startswith("//"):
            continue
        path_part, _, fragment = target.partition("#")
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        destination = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not destination.exists():
            problems.append(f"{where}: no such file")
            continue
        if destination.suffix != ".md" or not fragment:
            continue
        if unquote(fragment) not in anchors(destination.read_text(encoding="utf-8")):
            problems.append(f"{where}: no heading #{fragment} in {destination.name}")
    return problems


def make_mentions(text: str) -> Iterator[tuple[int, str]]:
    """(line number, target) of every ``make TARGET`` in code: code blocks and code
    spans (prose never names a target without them)."""
    for line in lines(text):
        chunks = [line.text] if line.code else [m.group(2) for m in _CODE_SPAN.finditer(line.text)]
        for chunk in chunks:
            for match in _MAKE.finditer(chunk):
                yield line.number, match.group(1)


def makefile_targets(makefile: Path) -> set[str]:
    targets: set[str] = set()
    for raw in makefile.read_text(encoding="utf-8").splitlines():
        rule = _MAKEFILE_RULE.match(raw)
        if rule:
            targets.update(rule.group(1).split())
    return targets


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_make_targets_exist(page: Path):
    targets = makefile_targets(ROOT / "Makefile")
    missing = [
        f"{page.relative_to(ROOT)}:{number}: make {target}"
        for number, target in make_mentions(page.read_text(encoding="utf-8"))
        if target not in targets
    ]
    assert missing == []


def test_the_readme_links_every_docs_page():
    linked = {
        (README.parent / target.partition("#")[0]).resolve()
        for _, target in links(README.read_text(encoding="utf-8"))
        if target and not _SCHEME.match(target)
    }
    assert sorted(p.name for p in DOCS.glob("*.md") if p.resolve() not in linked) == []


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Security model", "security-model"),
        ("Dispatch: bands, quotas, fair share", "dispatch-bands-quotas-fair-share"),
        (
            "Tenant backups (`tenant-backup`, `tenant-restore`, `tenant-migrate`, `backup-prune`)",
            "tenant-backups-tenant-backup-tenant-restore-tenant-migrate-backup-prune",
        ),
        ("What `make up` gives you", "what-make-up-gives-you"),
        ("job_api", "job_api"),
        ("A — B", "a--b"),
        ("[Linked](other.md) heading", "linked-heading"),
    ],
)
def test_github_slug(heading: str, slug: str):
    assert github_slug(heading) == slug


def test_the_checks_bite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A missing file, a missing heading and an unknown target are each reported; links
    and targets in code are not links."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Other\n\n## Known part\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#known-part) [self](#page) [gone](missing.md)\n"
        "[bad anchor](other.md#unknown) [web](https://example.com/x)\n\n"
        "`[not](a-link.md)` and `make no-such-target`\n\n    make up [x](code.md)\n"
    )
    assert broken_links(page) == [
        "page.md:3: missing.md: no such file",
        "page.md:4: other.md#unknown: no heading #unknown in other.md",
    ]
    assert list(make_mentions(page.read_text())) == [(6, "no-such-target"), (8, "up")]
    makefile = tmp_path / "Makefile"
    makefile.write_text("X ?= 1\nY := 2\n.PHONY: up\nup: install\n\t@echo $(X)\ninstall:\n")
    assert makefile_targets(makefile) == {".PHONY", "up", "install"}
