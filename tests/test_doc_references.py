"""Every documentation reference in the repository resolves: the file is in ``docs/``, and so is the section.

Scanned: text files under ``src/``, ``tests/``, ``benchmarks/`` and ``docs/``, plus ``README.md``. A reference
is ``docs/X.md`` optionally followed by ``§N`` or ``§N.M`` (the heading ``## N. ...`` / ``### N.M ...``
of that file), or a bare ``X.md §N`` (inside ``docs/`` also a bare ``X.md`` or a Markdown link). Outside
``docs/`` a bare name of a documentation file must carry its ``docs/`` prefix. Nothing may point outside the
repository (the parent folder's shared specification is not shipped).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("src", "tests", "benchmarks", "docs")
SCANNED_FILES = ("README.md",)
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg"}
# Names that, outside docs/, must be cited as docs/NAME.md ("results.md" is left out: the benchmark writes an
# output file of that name). baselines, data and architecture were specification files outside the repository.
DOC_NAMES = {"method", "evaluation", "design", "baselines", "data", "architecture"}
OUTSIDE = re.compile(r"\.\./" + "shared" + r"|" + "shared" + r"/docs")
DOCS_REF = re.compile(r"(?<![\w./-])docs/([\w-]+\.md)(?:\)?\s*§\s*(\d+(?:\.\d+)?))?")
BARE_SECTION = re.compile(r"(?<![\w./-])([\w-]+\.md)\)?\s*§\s*(\d+(?:\.\d+)?)")
BARE_NAME = re.compile(r"(?<![\w./-])([\w-]+)\.md\b")
MD_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def scanned_files(root: Path) -> list[Path]:
    """Text files whose references are checked (build artefacts, caches and this file's examples left out)."""
    files = [root / name for name in SCANNED_FILES if (root / name).is_file()]
    for d in SCANNED_DIRS:
        for p in sorted((root / d).rglob("*")):
            parts = set(p.relative_to(root).parts)
            if p.resolve() == Path(__file__).resolve():
                continue
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in parts:
                if not any(part.endswith(".egg-info") for part in parts):
                    files.append(p)
    return files


def section_exists(doc: Path, section: str) -> bool:
    """True if ``doc`` has a heading numbered ``section`` (``## 3. Title`` or ``### 3.2 Title``)."""
    pattern = re.compile(r"^#{1,6}\s+" + re.escape(section) + r"(?:\.|\s)", re.MULTILINE)
    return bool(pattern.search(doc.read_text(encoding="utf-8")))


def check_reference(root: Path, name: str, section: str | None) -> str | None:
    """Why ``docs/<name> §<section>`` does not resolve, or None if it does."""
    doc = root / "docs" / name
    if not doc.is_file():
        return f"docs/{name} does not exist"
    if section and not section_exists(doc, section):
        return f"docs/{name} has no section §{section}"
    return None


def problems_in(root: Path, path: Path) -> list[str]:
    """Every unresolved or outside reference in one file, as ``file:line: reason``."""
    rel = path.relative_to(root)
    in_docs = rel.parts[0] == "docs"
    found = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        where = f"{rel}:{lineno}"
        if OUTSIDE.search(line):
            found.append(f"{where}: points outside the repository: {line.strip()}")
        for m in DOCS_REF.finditer(line):
            if reason := check_reference(root, m.group(1), m.group(2)):
                found.append(f"{where}: {reason}")
        covered = {m.start(1) for m in DOCS_REF.finditer(line)}
        covered |= {m.start(1) for m in BARE_SECTION.finditer(line)}
        for m in BARE_SECTION.finditer(line):
            if not in_docs:
                found.append(f"{where}: write docs/{m.group(1)} §{m.group(2)} (the path from the root)")
            elif reason := check_reference(root, m.group(1), m.group(2)):
                found.append(f"{where}: {reason}")
        for m in BARE_NAME.finditer(line):
            if m.group(1) in DOC_NAMES and m.start() not in covered:
                if not in_docs:
                    found.append(f"{where}: write docs/{m.group(1)}.md, not {m.group(1)}.md")
                elif reason := check_reference(root, f"{m.group(1)}.md", None):
                    found.append(f"{where}: {reason}")
        if path.suffix == ".md":
            for m in MD_LINK.finditer(line):
                target = m.group(1)
                if "://" in target or target.startswith("mailto:"):
                    continue
                if not (path.parent / target).exists():
                    found.append(f"{where}: link target {target} does not exist")
    return found


def all_problems(root: Path) -> list[str]:
    return [p for f in scanned_files(root) for p in problems_in(root, f)]


def test_every_documentation_reference_resolves():
    problems = all_problems(ROOT)
    assert not problems, f"{len(problems)} broken documentation reference(s):\n" + "\n".join(problems)


def test_the_docs_the_code_cites_exist():
    for name in ("method.md", "evaluation.md", "design.md", "results.md"):
        assert (ROOT / "docs" / name).is_file(), name
    assert (ROOT / "LICENSE").is_file()


def _fake_repo(tmp_path: Path, text: str, where: str = "src/pkg/mod.py") -> Path:
    (tmp_path / "docs").mkdir(parents=True)
    (tmp_path / "docs" / "method.md").write_text("# Method\n\n## 2. Quantizers\n\n### 2.2 DLS\n\ntext\n")
    target = tmp_path / where
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return tmp_path


def test_checker_accepts_good_references(tmp_path):
    root = _fake_repo(tmp_path, '"""See docs/method.md §2.2 and docs/method.md §2, docs/method.md."""\n')
    assert all_problems(root) == []


def test_checker_rejects_each_kind_of_broken_reference(tmp_path):
    cases = {
        "docs/method.md §2.3": "no section §2.3",
        "docs/method.md §5": "no section §5",
        "docs/evaluation.md §1": "does not exist",
        "method.md §2.2": "write docs/method.md",
        "(data.md)": "write docs/data.md",
        "see ../" + "shared/docs/method.md": "outside the repository",
    }
    for i, (text, reason) in enumerate(cases.items()):
        root = _fake_repo(tmp_path / str(i), f'"""{text}"""\n')
        problems = all_problems(root)
        assert problems and reason in problems[0], (text, problems)


def test_checker_resolves_links_and_bare_names_inside_docs(tmp_path):
    root = _fake_repo(tmp_path, "[m](method.md) §2.2, method.md §2\n", where="docs/other.md")
    assert all_problems(root) == []
    (root / "docs" / "other.md").write_text("[x](missing.md), [m](method.md) §9\n")
    problems = all_problems(root)
    assert len(problems) == 2, problems
    assert any("missing.md does not exist" in p for p in problems), problems
    assert any("no section §9" in p for p in problems), problems


def test_model_cards_name_the_training_photo_licences():
    from qmambair.data.photos import PHOTOS, split_of

    licences = {p.licence for p in PHOTOS if split_of(p.name) == "train"}
    cards = sorted((ROOT / "src" / "qmambair" / "weights").glob("*.md"))
    assert cards
    for card in cards:
        rows = [line for line in card.read_text().splitlines() if line.startswith("| training photos |")]
        assert len(rows) == 1, card.name
        missing = sorted(lic for lic in licences if f"{lic} (" not in rows[0])
        assert not missing, f"{card.name} does not name {missing}"
