"""What a run records about the code that made it."""
import subprocess

from adaptive_sparse.training.tracking import code_version


def test_code_version_names_the_commit_and_a_dirty_tree(tmp_path):
    assert code_version(tmp_path) == {"git_commit": None, "git_dirty": None}  # not a checkout
    git = lambda *args: subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert code_version(tmp_path) == {"git_commit": head, "git_dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == {"git_commit": head, "git_dirty": True}
