"""Every results/... path that README.md, docs/ and the results index cite exists in the repository, and the
README keeps the two commands (make demo, make test) and stays a short guide."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "results" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a results path: results/ then path characters; trailing punctuation of the sentence is not part of it
PATH = re.compile(r"(?<![\w./-])(?:\.\./)?(results/[\w./*{},-]*[\w/*}])")


def cited_paths(text: str) -> list[str]:
    return [m.group(1) for m in PATH.finditer(text)]


def expand(path: str) -> list[str]:
    """results/x/{a,b}.json -> both files; a glob (results/x/*) stays a glob."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in expand(path[: m.start()] + alt + path[m.end():])]


def test_cited_results_paths_exist():
    missing = []
    for doc in DOCS:
        for cited in cited_paths(doc.read_text()):
            for path in expand(cited):
                found = list(ROOT.glob(path)) if "*" in path else [ROOT / path] if (ROOT / path).exists() else []
                if not found:
                    missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


def test_the_path_finder_sees_what_it_should():
    text = "see results/demo/hf/report.md, (results/engines/bench.json) and ../results/README.md."
    assert cited_paths(text) == ["results/demo/hf/report.md", "results/engines/bench.json", "results/README.md"]
    assert expand("results/a/{x,y}.json") == ["results/a/x.json", "results/a/y.json"]


def test_readme_is_a_short_guide_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert "make demo" in text and "make test" in text
    assert not re.search(r"\bsession \d+", text, re.IGNORECASE)   # no lab-notebook history
    for link in re.findall(r"\]\((docs/[^)]+)\)", text):
        assert (ROOT / link).exists(), link
