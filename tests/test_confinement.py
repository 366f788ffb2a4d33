"""`interp.files` reads what it checked: each file is opened once, the checks are made on the opened file, and,
confined to a root (the dashboard's store), a file is reached from the root without following any symlink and must
have one name (no hard link to a file outside)."""

import os
import subprocess
import sys

import pytest

from interp.files import MB, UnreadableFileError, check_regular, confined, read_bytes, read_text


@pytest.fixture
def tree(tmp_path):
    """(root, outside): root/run/inputs/p.txt holds "inside"; outside/inputs/p.txt and outside/secret.txt hold
    secrets."""
    root, outside = tmp_path / "store", tmp_path / "outside"
    (root / "run" / "inputs").mkdir(parents=True)
    (outside / "inputs").mkdir(parents=True)
    (root / "run" / "inputs" / "p.txt").write_text("inside")
    (outside / "inputs" / "p.txt").write_text("SECRET folder")
    (outside / "secret.txt").write_text("SECRET")
    return root, outside


def test_regular_files_only_up_to_the_limit(tree):
    root, outside = tree
    os.mkfifo(root / "fifo")
    for where in (None, root):
        with confined(where) if where else open(os.devnull):
            assert read_text(root / "run" / "inputs" / "p.txt", MB) == "inside"
            assert check_regular(root / "run" / "inputs" / "p.txt", MB) == 6
            for path in (root / "fifo", root / "run"):  # a FIFO is refused at once, never waited on
                with pytest.raises(UnreadableFileError, match="not a regular file"):
                    read_bytes(path, MB)
            with pytest.raises(UnreadableFileError, match="larger than"):
                read_bytes(root / "run" / "inputs" / "p.txt", 5)
            with pytest.raises(FileNotFoundError):
                check_regular(root / "nothing", MB)
    assert read_bytes(outside / "secret.txt", MB) == b"SECRET"  # not confined: any regular file


def test_symlinks_and_hard_links_out_of_the_root_are_refused(tree):
    root, outside = tree
    (root / "link.txt").symlink_to(outside / "secret.txt")
    (root / "inside-link.txt").symlink_to(root / "run" / "inputs" / "p.txt")
    os.link(outside / "secret.txt", root / "run" / "inputs" / "hard.txt")
    (root / "loop").symlink_to(root / "loop")
    with confined(root):
        with pytest.raises(UnreadableFileError, match="2 names"):
            read_text(root / "run" / "inputs" / "hard.txt", MB)
        assert read_text(root / "inside-link.txt", MB) == "inside"  # followed first, then checked
        for path in (outside / "secret.txt", root / "link.txt", root / "run" / ".." / ".." / "outside" / "secret.txt",
                     root / "loop"):
            with pytest.raises(UnreadableFileError, match="outside the store"):
                read_text(path, MB)
    assert read_text(root / "run" / "inputs" / "hard.txt", MB) == "SECRET"  # the user's own files may have several


def test_a_folder_swapped_for_a_symlink_as_the_file_is_opened_is_refused(tree, monkeypatch):
    """The swap lands between the path's resolution and its opening (what a loop of swaps hits by chance): the file
    is not read through the symlink."""
    root, outside = tree
    inputs, resolve = root / "run" / "inputs", os.path.realpath

    def resolve_then_swap(path, *args, **kwargs):
        resolved = resolve(path, *args, **kwargs)
        if str(path).endswith("p.txt") and not inputs.is_symlink():
            inputs.rename(root / "run" / "aside")
            inputs.symlink_to(outside / "inputs")
        return resolved

    monkeypatch.setattr(os.path, "realpath", resolve_then_swap)
    with confined(root), pytest.raises(UnreadableFileError, match="outside the store"):
        read_text(inputs / "p.txt", MB)


FLIP = """import os, sys, time
target, secret, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.time() + seconds
while time.time() < end:
    os.symlink(secret, target + ".tmp")
    os.replace(target + ".tmp", target)  # now a symlink to the secret
    with open(target + ".tmp", "w") as f:
        f.write("inside")
    os.replace(target + ".tmp", target)  # now the run's own file again
"""


def test_a_symlink_flipped_in_a_loop_never_leaks(tree):
    """Another process swaps a run's file and a symlink to a secret as fast as it can while it is read: every read
    gives the run's own text or is refused, never the secret."""
    root, outside = tree
    target = root / "run" / "inputs" / "p.txt"
    flipper = subprocess.Popen([sys.executable, "-c", FLIP, str(target), str(outside / "secret.txt"), "3"])
    seen: dict[str, int] = {}
    try:
        with confined(root):
            while flipper.poll() is None:
                try:
                    text = read_text(target, MB)
                except OSError:  # refused, or the path changed under the resolution itself
                    text = "refused"
                seen[text] = seen.get(text, 0) + 1
    finally:
        flipper.kill()
        flipper.wait()
    assert "SECRET" not in seen and seen.get("inside", 0) > 0, seen
