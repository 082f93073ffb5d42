"""benchmarks.provenance: a benchmark driver refuses a checkout with uncommitted changes unless
--allow-dirty, and names the commit it ran at (in a throwaway git repository, no mocks)."""
import subprocess

import pytest

from benchmarks import provenance


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@example.invalid")
    git(tmp_path, "config", "user.name", "t")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "RESULTS.md").write_text("old\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "one")
    return tmp_path


def test_a_clean_checkout_gives_its_commit(repo):
    assert provenance.commit(False, root=repo) == git(repo, "rev-parse", "HEAD")


def test_uncommitted_changes_are_refused_unless_allowed(repo):
    head = git(repo, "rev-parse", "HEAD")
    (repo / "code.py").write_text("x = 2\n")
    (repo / "new.py").write_text("")
    with pytest.raises(SystemExit, match="uncommitted changes") as e:
        provenance.commit(False, root=repo)
    assert "code.py" in str(e.value) and "new.py" in str(e.value) and "--allow-dirty" in str(e.value)
    assert provenance.commit(True, root=repo) == f"{head}-dirty"


def test_changes_under_the_drivers_own_output_do_not_count(repo):
    (repo / "out" / "RESULTS.md").write_text("a resumed study rewrote me\n")
    (repo / "out" / "runs.jsonl.gz").write_bytes(b"")
    head = git(repo, "rev-parse", "HEAD")
    assert provenance.commit(False, outputs=[repo / "out"], root=repo) == head
    with pytest.raises(SystemExit):
        provenance.commit(False, outputs=[repo / "elsewhere"], root=repo)
    git(repo, "mv", "code.py", "out/code.py")  # a rename counts on both sides: code.py left the checkout's code
    with pytest.raises(SystemExit, match=r"code\.py"):
        provenance.commit(False, outputs=[repo / "out"], root=repo)
