import gzip
import hashlib
import shutil

import pytest
from conftest import PROJECT, write_mirror

from mnist_pipeline.download import OFFICIAL_MIRRORS, download_mnist, mirror_list, read_checksums
from mnist_pipeline.stage import PipelineError


@pytest.fixture
def mirror(tmp_path):
    """A local mirror directory with synthetic files, and the checksums they satisfy."""
    directory = tmp_path / "mirror"
    table = write_mirror(directory, n_train=30, n_test=10)
    (tmp_path / "mnist.md5").write_text(table)
    return directory, read_checksums(tmp_path / "mnist.md5")


def test_read_checksums_parses_an_md5sum_table(tmp_path):
    (tmp_path / "sums").write_text("6BBC9ACE898E44AE57DA46A324031ADB  train-images-idx3-ubyte\n\n")
    assert read_checksums(tmp_path / "sums") == {"train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb"}


def test_read_checksums_names_the_bad_line(tmp_path):
    (tmp_path / "sums").write_text("6bbc9ace898e44ae57da46a324031adb  a\nnot-a-checksum b\n")
    with pytest.raises(PipelineError, match=r"sums:2: expected '<md5> <file name>', got 'not-a-checksum b'"):
        read_checksums(tmp_path / "sums")


def test_the_project_pins_the_published_checksums():
    assert read_checksums(PROJECT / "data" / "mnist.md5") == {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }


def test_mirror_list_puts_mnist_mirror_first_and_resolves_relative_paths(tmp_path):
    assert mirror_list(None, tmp_path) == list(OFFICIAL_MIRRORS)
    assert mirror_list("http://example.org/mnist", tmp_path) == ["http://example.org/mnist/", *OFFICIAL_MIRRORS]
    local = mirror_list("../datasets/mnist", tmp_path / "project")
    assert local[0] == (tmp_path / "datasets" / "mnist").as_uri() + "/"
    assert local[1:] == list(OFFICIAL_MIRRORS)


def test_download_from_a_local_directory_decompresses_and_verifies(tmp_path, mirror):
    directory, checksums = mirror
    data = tmp_path / "data"
    download_mnist(data, checksums, mirror_list(str(directory), tmp_path))
    assert sorted(p.name for p in data.iterdir()) == sorted(checksums)
    for name, md5 in checksums.items():
        content = (data / name).read_bytes()
        assert content == gzip.decompress((directory / f"{name}.gz").read_bytes())
        assert hashlib.md5(content).hexdigest() == md5


def test_download_over_http_falls_back_to_the_next_mirror(tmp_path, mirror, http_root):
    directory, checksums = mirror
    root, url = http_root
    shutil.copytree(directory, root / "good", dirs_exist_ok=True)
    (root / "corrupt").mkdir(exist_ok=True)
    for name in checksums:  # same names, wrong content: fails verification
        (root / "corrupt" / f"{name}.gz").write_bytes(gzip.compress(b"not mnist"))
    data = tmp_path / "data"
    download_mnist(data, checksums, [f"{url}/missing/", f"{url}/corrupt/", f"{url}/good/"])
    assert sorted(p.name for p in data.iterdir()) == sorted(checksums)


def test_when_every_mirror_fails_the_error_lists_each_and_nothing_is_left(tmp_path, mirror, http_root):
    directory, checksums = mirror
    root, url = http_root
    (root / "notgzip").mkdir(exist_ok=True)
    (root / "truncated").mkdir(exist_ok=True)
    for name in checksums:
        (root / "notgzip" / f"{name}.gz").write_bytes(b"plain text, not gzip")
        (root / "truncated" / f"{name}.gz").write_bytes((directory / f"{name}.gz").read_bytes()[:-20])
    data = tmp_path / "data"
    mirrors = [f"{url}/missing/", f"{url}/notgzip/", f"{url}/truncated/", (tmp_path / "nowhere").as_uri() + "/"]
    with pytest.raises(PipelineError) as error:
        download_mnist(data, checksums, mirrors)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("could not get train-images-idx3-ubyte.gz from any mirror: ")
    assert f"{url}/missing/: HTTP 404" in message
    assert f"{url}/notgzip/: not a valid gzip file" in message
    assert f"{url}/truncated/: truncated gzip stream" in message
    assert "nowhere/: [Errno 2] No such file or directory" in message
    assert not data.exists() and not list(tmp_path.glob(".data*"))  # no dataset, no leftovers


def test_a_checksum_mismatch_is_reported_with_both_values(tmp_path, mirror):
    directory, checksums = mirror
    wrong = dict.fromkeys(checksums, "0" * 32)
    with pytest.raises(PipelineError, match=r"md5 of decompressed content is [0-9a-f]{32}, expected 0{32}"):
        download_mnist(tmp_path / "data", wrong, [directory.as_uri() + "/"])
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob(".data*"))


def test_a_failure_after_some_files_leaves_no_partial_dataset_and_keeps_the_old_one(tmp_path, mirror):
    directory, checksums = mirror
    data = tmp_path / "data" / "mnist"
    data.mkdir(parents=True)
    (data / "previous").write_text("the dataset from before")
    last = list(checksums)[-1]
    broken = {**checksums, last: "0" * 32}  # every file verifies but the last
    with pytest.raises(PipelineError, match=f"could not get {last}.gz"):
        download_mnist(data, broken, [directory.as_uri() + "/"])
    assert [p.name for p in data.iterdir()] == ["previous"]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["mnist"]
    download_mnist(data, checksums, [directory.as_uri() + "/"])
    assert sorted(p.name for p in data.iterdir()) == sorted(checksums)
