"""The repository speaks of ptp and its users only: no working periods, calls, budgets, machine lending or
issue numbers in code, docs or tests; and every PTP_* environment variable the code reads is documented."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("src", "kernels", "bench", "docs", "tests")

# Each pattern names a kind of lab talk; tuned so that ordinary words (a token budget, scope="session",
# start_new_session, "50 calls") pass.
LAB_TALK = {
    "a working period": r"(?<![\w\"'.])sessions?(?![\w\"'])",
    "a numbered call": r"\bcalls? \d",
    "an issue number": r"\bissues? #?\d|#\d+ issue",
    "a machine budget": r"\b(?:device|gpu|time|call|session|machine) budgets?\b|\bbudget_left",
    "the lending of machines": r"\blent\b|\blending\b|\blends\b",
    "a file users do not have": r"(?<![\w/])\.ab/|\.\./shared/|\bMETHOD\.md\b",
    "a machine kind": r"\bnvidia-h[12]00(?:-x\d)?\b",
}
PATTERN = re.compile("|".join(f"(?P<p{i}>{p})" for i, p in enumerate(LAB_TALK.values())), re.IGNORECASE)


def text_files():
    """Every text file under FOLDERS (not following links: src/ptp/kernels is kernels/), this file aside."""
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):
            if (path.is_file() and not path.is_symlink() and path != Path(__file__).resolve()
                    and "__pycache__" not in path.parts and not any(p.is_symlink() for p in path.parents)):
                data = path.read_bytes()
                if b"\0" in data[:8192]:
                    continue  # binary (the plot, for one)
                try:
                    yield path, data.decode("utf-8")
                except UnicodeDecodeError:
                    continue


def lab_talk(text: str) -> list[tuple[int, str, str]]:
    """(line number, kind, the words) for each phrase of lab talk in text."""
    kinds = list(LAB_TALK)
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for m in PATTERN.finditer(line):
            kind = kinds[int(next(k for k, v in m.groupdict().items() if v is not None)[1:])]
            found.append((number, kind, m.group(0)))
    return found


def test_no_lab_talk():
    problems = [f"{path.relative_to(ROOT)}:{n}: {kind}: {words!r}"
                for path, text in text_files() for n, kind, words in lab_talk(text)]
    assert not problems, ("files should speak of ptp and its users, not of how the work was organised; "
                          "reword these:\n" + "\n".join(problems))


def test_lab_talk_is_recognised():
    assert [k for _, k, _ in lab_talk("measured in the fifth session (call 7, issue 4), budget_left 200 s")] == [
        "a working period", "a numbered call", "an issue number", "a machine budget"]
    assert lab_talk('the token budget; @pytest.fixture(scope="session"); start_new_session=True; 50 calls') == []


def test_every_environment_variable_is_documented():
    read = set()
    for path, text in text_files():
        if path.suffix in (".py", ".sh") and not path.is_relative_to(ROOT / "tests"):
            read |= set(re.findall(r"\bPTP_[A-Z0-9_]+\b", text))
    documented = set(re.findall(r"`(PTP_[A-Z0-9_]+)", (ROOT / "docs" / "flags.md").read_text()))
    assert read, "no PTP_* variable found: the search is broken"
    assert read <= documented, f"not in docs/flags.md (add them to ENVIRONMENT in src/ptp/args.py): {sorted(read - documented)}"


def test_every_module_is_in_architecture_doc():
    src = ROOT / "src" / "ptp"
    modules = {p.relative_to(src).as_posix(): p for p in src.rglob("*.py") if "kernels" not in p.relative_to(src).parts}
    modules |= {p.relative_to(ROOT).as_posix(): p for p in (ROOT / "kernels").rglob("*.py")}
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = sorted(name for name, path in modules.items() if path.read_text().strip() and f"`{name}`" not in doc)
    assert not missing, f"docs/architecture.md does not say what these modules are for: {missing}"
