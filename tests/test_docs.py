"""The documentation's links: every relative link of README.md and docs/*.md points at a file that
exists and, with a #fragment, at a heading of that page (as GitHub makes its anchors), so that moving
a page or renaming a heading cannot leave a dead link behind."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose(path):
    """The page's lines outside fenced code blocks (a # there is a shell comment, not a heading)."""
    inside, lines = False, []
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            lines.append(line)
    return lines


def anchors(path):
    """GitHub's anchors of a page's headings: lower case, punctuation but - and _ dropped, spaces as -,
    a repeated one numbered."""
    seen, out = {}, set()
    for line in prose(path):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def test_the_anchor_rule_is_github_s():
    page = REPO / "docs" / "features.md"
    assert "3-context-vectors-concatenate_embdspy" in anchors(page)
    assert "transcripts-by-speech-recognition-whisper" in anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_points_at_a_file_and_heading_that_exist(page):
    dead = []
    for line in prose(page):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # https:, mailto:: not this repository's
                continue
            file_part, _, fragment = target.partition("#")
            path = (page.parent / file_part).resolve() if file_part else page
            if not path.exists():
                dead.append(f"{target}: no such file")
            elif fragment and path.suffix == ".md" and fragment not in anchors(path):
                dead.append(f"{target}: no heading #{fragment} in {path.relative_to(REPO)}")
    assert not dead, f"{page.relative_to(REPO)}: " + "; ".join(dead)


def test_the_front_page_stays_a_front_page():
    """The set-up and the demo on the first screen; the reference in docs/."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 160
    first_screen = "\n".join(lines[:60])
    assert "pip install -r requirements.txt" in first_screen and "python main.py --demo" in first_screen
