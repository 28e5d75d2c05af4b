"""``fishr-download``: DomainBed's sources, fetched (here: generated archives served by a fake
fetch, there is no network) and laid out as the training app reads them."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from data_factories import PACS_CLASSES, PACS_DOMAINS, write_image_folder, write_mnist, zip_tree

from fishr_lightning.app.data import download
from fishr_lightning.app.data.domains import load_domains


def serve(monkeypatch, archives: dict[str, Path]) -> list[str]:
    """Replace the network: ``fetch(url, destination)`` copies ``archives[url]``; returns the URLs asked."""
    asked: list[str] = []

    def fake_fetch(url: str, destination: Path) -> Path:
        asked.append(url)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(archives[url], destination)
        return destination

    monkeypatch.setattr(download, "fetch", fake_fetch)
    return asked


def test_pacs_is_fetched_from_domainbeds_source_and_loads(monkeypatch, tmp_path):
    tree = write_image_folder(tmp_path / "source", PACS_DOMAINS, PACS_CLASSES, images_per_class=1, size=8)
    asked = serve(monkeypatch, {download.PACS_URL: zip_tree(tree, tmp_path / "PACS.zip", prefix="kfold")})
    data_dir = tmp_path / "data"
    download.main(["pacs", "--data-dir", str(data_dir)])
    assert asked == [download.PACS_URL] and "1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd" in download.PACS_URL
    assert not (data_dir / "PACS.zip").exists()
    assert len(load_domains("PACS", data_dir).domains) == 4


def test_mnist_is_fetched_once_for_both_mnist_datasets_and_loads(monkeypatch, tmp_path):
    source = write_mnist(tmp_path / "source", n_train=30, n_test=12, gzipped=True) / "MNIST" / "raw"
    asked = serve(
        monkeypatch, {download.MNIST_URL + f"{name}.gz": source / f"{name}.gz" for name in download.MNIST_FILES}
    )
    data_dir = tmp_path / "data"
    download.main(["colored_mnist", "rotated_mnist", "--data-dir", str(data_dir)])
    assert len(asked) == 4
    assert [len(d) for d in load_domains("ColoredMNIST", data_dir).domains] == [14, 14, 14]


def test_terra_incognita_is_sorted_into_locations_and_classes(monkeypatch, tmp_path):
    images = {"a.jpg": (38, 1), "b.jpg": (100, 2), "c.jpg": (99, 1), "d.jpg": (46, 3)}  # file: (location, category)
    source = tmp_path / "source" / "eccv_18_all_images_sm"
    source.mkdir(parents=True)
    for name in images:
        (source / name).write_bytes(b"jpeg bytes")
    images_archive = tmp_path / "images.tar.gz"
    with tarfile.open(images_archive, "w:gz") as tar:
        tar.add(source, arcname="eccv_18_all_images_sm")
    labels = {
        "categories": [{"id": 1, "name": "bobcat"}, {"id": 2, "name": "empty"}, {"id": 3, "name": "car"}],
        "images": [{"id": n[0], "file_name": n, "location": loc} for n, (loc, _) in images.items()],
        "annotations": [{"image_id": n[0], "category_id": cat} for n, (_, cat) in images.items()],
    }
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    (labels_dir / download.TERRA_LABELS_FILE).write_text(json.dumps(labels))
    labels_archive = tmp_path / "labels.zip"
    import zipfile

    with zipfile.ZipFile(labels_archive, "w") as zf:
        zf.write(labels_dir / download.TERRA_LABELS_FILE, download.TERRA_LABELS_FILE)
    serve(monkeypatch, {download.TERRA_IMAGES_URL: images_archive, download.TERRA_LABELS_URL: labels_archive})
    download.main(["terra_incognita", "--data-dir", str(tmp_path / "data")])
    root = tmp_path / "data" / "terra_incognita"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg")) == [
        "location_100/empty/b.jpg",  # location 99 is not one of the four; "car" is not one of the ten classes
        "location_38/bobcat/a.jpg",
    ]
    assert not (root / "eccv_18_all_images_sm").exists() and not (root / download.TERRA_LABELS_FILE).exists()


def test_a_failed_download_exits_non_zero_with_what_to_do(monkeypatch, tmp_path, capsys):
    def offline(url, destination):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(download, "fetch", offline)
    with pytest.raises(SystemExit) as exit_:
        download.main(["vlcs", "--data-dir", str(tmp_path)])
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert "Downloading vlcs failed" in err and "run the command again" in err


def test_an_unknown_dataset_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        download.main(["imagenet", "--data-dir", "x"])
    err = capsys.readouterr().err
    assert "pacs" in err and "domain_net" in err


def test_archives_cannot_write_outside_the_data_directory(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    (tmp_path / "data").mkdir()
    with pytest.raises(tarfile.TarError):
        download.extract(archive, tmp_path / "data")
    assert not (tmp_path / "escaped.txt").exists()
