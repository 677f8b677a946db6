"""The home directory's state is its owner's only, whatever the umask and whatever an earlier
version left behind."""

from __future__ import annotations

import stat
from pathlib import Path

from backpropagate_api.private_files import (
    create_private_file,
    private_directory,
    private_home,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_home_an_earlier_version_left_open_is_closed_to_other_users(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)

    private_home(home)

    assert mode(home) == 0o700


def test_every_directory_made_on_the_way_to_a_private_one_is_private(tmp_path: Path) -> None:
    private_directory(tmp_path / "a" / "b" / "c")

    assert [mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3


def test_a_private_file_keeps_what_it_holds_and_an_existing_directorys_mode(
    tmp_path: Path,
) -> None:
    tmp_path.chmod(0o755)  # not ours to change: only what it makes is private
    log = create_private_file(tmp_path / "logs" / "embedded.log")
    log.write_text("a line\n")

    create_private_file(log)

    assert (mode(tmp_path), mode(log.parent), mode(log)) == (0o755, 0o700, 0o600)
    assert log.read_text() == "a line\n"
