"""The reference environment's set-up recovers from what an interrupted earlier one left."""

from __future__ import annotations

from reference_packages import _remove_leftover


def test_a_dangling_symlink_is_removed_not_followed(tmp_path):
    env_dir = tmp_path / "reference-env"
    env_dir.symlink_to(tmp_path / "gone")
    _remove_leftover(env_dir)
    assert not env_dir.is_symlink() and not env_dir.exists()


def test_a_symlink_to_a_live_directory_leaves_its_target_alone(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("kept")
    env_dir = tmp_path / "reference-env"
    env_dir.symlink_to(target)
    _remove_leftover(env_dir)
    assert not env_dir.exists() and (target / "keep.txt").read_text() == "kept"


def test_a_half_made_environment_and_a_stray_file_are_cleared(tmp_path):
    half_made = tmp_path / "half"
    (half_made / "bin").mkdir(parents=True)
    (half_made / "pyvenv.cfg").write_text("home = /nowhere\n")
    stray = tmp_path / "stray"
    stray.write_text("not an environment")
    for leftover in (half_made, stray):
        _remove_leftover(leftover)
        assert not leftover.exists()
    _remove_leftover(tmp_path / "never-made")  # nothing there: nothing to do
