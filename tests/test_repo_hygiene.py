"""The repository explains itself: no tracked file points at a document a clone does not contain.

A user has the files of this repository and public pages, nothing else. So no tracked text file may name
a project-internal contract document, a path outside the checkout into a sibling workspace, a tracker
number of this project's own work items, or a numbered section of a document it does not contain. The
contract users rely on is ``docs/contract.md``; history belongs in commit messages.

The patterns are assembled from pieces so that this file does not match them itself.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_DOC = "SP" + "EC"
_WORK = "iss" + "ue"
PATTERNS = {
    # the upper-case name of the internal contract document (find_spec, "special", "_NO_SPECIALIZE" pass)
    "names the internal contract document": re.compile(r"(?<![\w.])" + _DOC + r"(?:\.md)?\b"),
    "points outside the checkout": re.compile(r"\.\./" + "sha" + "red" + r"\b"),
    # "work item 7", "Items 10/5", capitalised or not, with the word spelled out
    "names a work-item number": re.compile(r"\b" + "[Ii]" + _WORK[1:] + r"s?\s*#?\d", re.ASCII),
    # a hash and a number alone (an owner/repo reference to a public tracker is fine: a word character precedes)
    "names a work-item number with #": re.compile(r"(?<![\w/.&#-])#\d+\b"),
    "names a numbered section of a document the repository lacks": re.compile(r"\b[Ss]" + r"ection \d+[a-z]?\b"),
}


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (e.g. an installed wheel): nothing to scan")
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary (images)
        files.append(path)
    return files


def find_outside_references(files) -> list[str]:
    hits = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            why = [f"{why} ({m.group(0)!r})" for why, p in PATTERNS.items() if (m := p.search(line))]
            if why:
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {'; '.join(why)}: {line.strip()[:120]}")
    return hits


def test_no_tracked_file_points_outside_the_repository():
    files = tracked_text_files()
    assert len(files) > 20, f"only {len(files)} tracked text files found under {ROOT}"
    hits = find_outside_references(files)
    assert not hits, (f"{len(hits)} line(s) point outside the repository; say what users need in the file or in "
                      "docs/contract.md instead:\n" + "\n".join(hits))


@pytest.mark.parametrize("line, flagged", [
    (_DOC + ".md sec" + "tion 3", True),
    ("see " + _DOC + " for the math", True),
    ("the contract is " + "../" + "shared/docs/x.md", True),
    ("(" + _WORK + " 7)", True),
    (_WORK.capitalize() + " 10/5: the wheel", True),
    (_WORK.capitalize() + "s 7 and 10", True),
    ("fixed in #" + "12", True),
    ("as sec" + "tion 1b states", True),
    ("importlib.util.find_spec(name)", False),
    ("spec = importlib.util.spec_from_file_location(...)", False),
    ("SPECIAL = ('<pad>',)", False),
    ("_NO_" + _DOC + " = ['T']", False),
    ("huggingface/trl#" + "4321 is the upstream report", False),
    ("https://github.com/huggingface/trl/blob/v1.16.0/trl/trainer/grpo_trainer.py#L3083", False),
    ("[bad input](bad-inputs.md#bad-inputs)", False),
    ("the SMs must also " + _WORK + " the kernels' instructions", False),
    ("color: #fff", False),
])
def test_patterns(line, flagged):
    """The patterns catch the references they are for and pass the look-alikes that occur in this code."""
    assert any(p.search(line) for p in PATTERNS.values()) == flagged
