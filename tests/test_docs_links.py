"""Every relative link in README.md, CONTRIBUTING.md and docs/ points at a file (and heading) that exists."""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted([REPO / "README.md", *REPO.glob("CONTRIBUTING.md"), *(REPO / "docs").rglob("*.md")])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def github_slug(heading):
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page):
    body = FENCE.sub("", page.read_text())
    return {github_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", body, re.M)}


def links(page):
    body = FENCE.sub("", page.read_text())
    for match in LINK.finditer(body):
        target = match.group(1) or match.group(2)
        if not re.match(r"^[a-z]+:", target):  # http:, https:, mailto: are not checked offline
            yield target


def test_slug_rule_matches_githubs_examples():
    assert github_slug("MNIST, CIFAR-10, CIFAR-100: recipes") == "mnist-cifar-10-cifar-100-recipes"
    assert github_slug("The `iterconv eval --json` document") == "the-iterconv-eval---json-document"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not broken, broken


def test_no_references_to_files_outside_the_repository():
    # The specs the project was built from are not shipped; the docs are what users read.
    stale = re.compile(r"interfaces\.md|method\.md section|\.\./shared/")
    found = []
    for path in [*PAGES, *REPO.glob("iterconv_keras/**/*.py"), *REPO.glob("cli/*.py"), *REPO.glob("tests/*.py")]:
        if path.name == "test_docs_links.py":
            continue
        found += [f"{path.relative_to(REPO)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                  if stale.search(line)]
    assert not found, found
