"""Result provenance: the commit recorded in results files, and what counts as a modified tree."""

from __future__ import annotations

import subprocess

from experiments.provenance import git_commit


def test_dirty_means_tracked_code_changed_not_results(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "cell.json").write_text("{}\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_commit(tmp_path)
    assert clean != "unknown" and not clean.endswith("-dirty")
    (tmp_path / "results" / "cell.json").write_text('{"rerun": true}\n')  # a rewritten cell
    (tmp_path / "untracked.py").write_text("y = 2\n")
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "-dirty"
