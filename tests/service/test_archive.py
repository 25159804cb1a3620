"""service.archive: the streamed tar is a valid archive of the folder, of the announced length."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from service.archive import folder_digest, iter_tar, tar_size


def test_streamed_tar_roundtrips(tmp_path: Path) -> None:
    folder = tmp_path / "art"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 1000)
    (folder / "manifest.json").write_text('{"a": 1}')
    (folder / "sub" / "empty.bin").write_bytes(b"")
    chunks = list(iter_tar(folder, "job"))
    data = b"".join(chunks)
    assert len(data) == tar_size(folder, "job") and len(data) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert sorted(tar.getnames()) == ["job/manifest.json", "job/model.safetensors", "job/sub/empty.bin"]
        assert tar.extractfile("job/model.safetensors").read() == bytes(range(256)) * 1000  # type: ignore[union-attr]


def test_folder_digest_depends_on_names_and_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for f in (a, b):
        f.mkdir()
        (f / "x").write_bytes(b"123")
    assert folder_digest(a) == folder_digest(b)
    assert folder_digest(a)[1] == 3
    (b / "x").rename(b / "y")
    assert folder_digest(a)[0] != folder_digest(b)[0]
