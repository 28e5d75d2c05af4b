"""``fishr-download``: DomainBed's sources (here: generated archives served by a local HTTP server on
127.0.0.1, never the internet), fetched with resume and retries, laid out as the training app reads them,
and counted against the published numbers of images (issue 28)."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import warnings
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from data_factories import PACS_CLASSES, PACS_DOMAINS, write_image_folder, write_mnist, write_pacs, zip_tree

from fishr_lightning.app.data import download, published
from fishr_lightning.app.data.domains import load_domains
from fishr_lightning.app.data.download import Archive, Fetcher
from fishr_lightning.app.data.published import DatasetCountWarning, PublishedImages

# -- a local server: Range requests, and faults on demand ------------------------------------------


class ArchiveServer:
    """Serves ``files`` (path -> bytes) on 127.0.0.1 with Range support. Faults per path: ``fail[path]``
    answers 503 that many times; ``drop[path]`` closes the connection after that many bytes of the body
    (once per entry of the list). ``log`` holds ``(path, first byte asked, bytes sent, status)``."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.fail: dict[str, int] = {}
        self.drop: dict[str, list[int]] = {}
        self.log: list[tuple[str, int, int, int]] = []
        self.ignore_range = False  # a server that always sends the whole file
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.answer(self)

            def log_message(self, *args) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http.server_port}/{path}"

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        # Each answer is logged before its first byte is sent: the client's next request cannot overtake it.
        path = handler.path.lstrip("/")
        data = self.files.get(path)
        asked = handler.headers["Range"]
        first = int(asked.removeprefix("bytes=").rstrip("-")) if asked and not self.ignore_range else 0
        headers: dict[str, str] = {}
        body = b""
        if data is None:
            status = 404
        elif self.fail.get(path, 0) > 0:
            self.fail[path] -= 1
            status = 503
        elif first and first >= len(data):
            status, headers = 416, {"Content-Range": f"bytes */{len(data)}"}
        else:
            status = 206 if first else 200
            if first:
                headers["Content-Range"] = f"bytes {first}-{len(data) - 1}/{len(data)}"
            body = data[first:]
        headers["Content-Length"] = str(len(body))
        if self.drop.get(path) and status in (200, 206):
            body = body[: self.drop[path].pop(0)]  # fewer bytes than the Content-Length announces
            handler.close_connection = True
        self.log.append((path, first if data is not None and status != 503 else 0, len(body), status))
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server():
    archive_server = ArchiveServer()
    yield archive_server
    archive_server.close()


def route(monkeypatch, server: ArchiveServer, attribute: str, *contents: bytes) -> None:
    """Point ``download.<attribute>`` (an Archive, or a tuple of them) at the local server."""
    old = getattr(download, attribute)
    olds = old if isinstance(old, tuple) else (old,)
    news = []
    for archive, content in zip(olds, contents, strict=True):
        server.files[archive.name] = content
        news.append(Archive(archive.name, (server.url(archive.name),)))
    monkeypatch.setattr(download, attribute, tuple(news) if isinstance(old, tuple) else news[0])
    for name, group in download.ARCHIVES.items():
        replaced = tuple(dict(zip(olds, news)).get(archive, archive) for archive in group)
        monkeypatch.setitem(download.ARCHIVES, name, replaced)


def error_of(err: str) -> str:
    """The ``error: ...`` line, after the progress bars, also on stderr."""
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


def publish(monkeypatch, dataset: str, images: dict[str, int]) -> None:
    """The published counts of ``dataset`` for this test: those of the generated tree."""
    monkeypatch.setitem(published.PUBLISHED_IMAGES, dataset, PublishedImages(images, "the test's tree"))


def small_pacs_zip(tmp_path: Path) -> bytes:
    """PACS.zip as DomainBed's source ships it (``kfold/<domain>/<class>/``), one image per class."""
    tree = write_image_folder(tmp_path / "source", PACS_DOMAINS, PACS_CLASSES, images_per_class=1, size=8)
    return zip_tree(tree, tmp_path / "PACS.zip", prefix="kfold").read_bytes()


PACS_SEVEN = {"A": 7, "C": 7, "P": 7, "S": 7}  # small_pacs_zip's tree: 7 classes, one image each


# -- downloads ------------------------------------------------------------------------------------


def test_an_interrupted_download_is_resumed_with_a_range_request_by_the_next_run(monkeypatch, server, tmp_path, capsys):
    archive = small_pacs_zip(tmp_path)
    route(monkeypatch, server, "PACS", archive)
    publish(monkeypatch, "PACS", PACS_SEVEN)
    half = len(archive) // 2
    server.drop["PACS.zip"] = [half]  # the connection breaks halfway through the first transfer
    data_dir = tmp_path / "data"
    with pytest.raises(SystemExit) as exit_:
        download.main(["pacs", "--data-dir", str(data_dir), "--retries", "0"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    partial = data_dir / "PACS.zip.part"
    assert partial.read_bytes() == archive[:half]  # kept beside the target
    assert f"the connection closed after {half:,} of {len(archive):,} bytes" in err
    assert f"the {half:,} bytes received are kept in {partial}" in err and "resumes where it stopped" in err

    download.main(["pacs", "--data-dir", str(data_dir)])
    out = capsys.readouterr().out
    # The second run asked for the rest only: no byte was fetched twice.
    assert server.log == [("PACS.zip", 0, half, 200), ("PACS.zip", half, len(archive) - half, 206)]
    rest = len(archive) - half
    assert f"pacs: PACS.zip from {server.url('PACS.zip')} ({rest:,} bytes received, resumed at {half:,} bytes)" in out
    assert "  A (art_painting)" in out and "7 / 7  ok" in out
    assert not partial.exists() and not (data_dir / "PACS.zip").exists()
    assert [len(domain) for domain in load_domains("PACS", data_dir).domains] == [7, 7, 7, 7]


def test_failed_attempts_are_retried_with_backoff_resumed_and_then_the_mirror(server, tmp_path):
    content = bytes(range(256)) * 40
    server.files["file.bin"] = content
    server.fail["file.bin"] = 2  # busy twice
    server.drop["file.bin"] = [1000]  # then a transfer that breaks after 1,000 bytes
    waits: list[float] = []
    fetcher = Fetcher(retries=3, backoff_s=0.001, sleep=waits.append)
    # The first URL is dead (404: not worth repeating), the second a mirror of the same file.
    archive = Archive("file.bin", (server.url("gone.bin"), server.url("file.bin")))
    path, downloaded = fetcher.get(archive, tmp_path / "file.bin")
    assert path.read_bytes() == content and downloaded
    assert waits == [0.001, 0.002, 0.004]  # exponential backoff between the attempts at the mirror
    assert server.log == [
        ("gone.bin", 0, 0, 404),
        ("file.bin", 0, 0, 503),
        ("file.bin", 0, 0, 503),
        ("file.bin", 0, 1000, 200),
        ("file.bin", 1000, len(content) - 1000, 206),
    ]
    (transfer,) = fetcher.transfers
    assert (transfer.origin, transfer.fetched, transfer.resumed_at, transfer.retries) == (
        server.url("file.bin"),
        len(content),
        [1000],
        3,
    )
    # A second fetch of a file already complete in its .part file is answered 416: nothing is fetched again.
    (tmp_path / "again.bin.part").write_bytes(content)
    assert Fetcher().get(archive, tmp_path / "again.bin")[0].read_bytes() == content
    assert server.log[-1] == ("file.bin", len(content), 0, 416)
    # A server that ignores the range request sends the whole file, which replaces the partial one.
    server.ignore_range = True
    (tmp_path / "whole.bin.part").write_bytes(b"stale bytes")
    assert Fetcher().get(archive, tmp_path / "whole.bin")[0].read_bytes() == content
    assert server.log[-1] == ("file.bin", 0, len(content), 200)


def test_an_unreachable_source_exits_non_zero_with_what_to_do(monkeypatch, tmp_path, capsys):
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{closed.server_port}/VLCS.tar.gz"
    closed.server_close()  # nothing listens there: connection refused
    monkeypatch.setattr(download, "VLCS", Archive("VLCS.tar.gz", (url,)))
    monkeypatch.setattr(download, "BACKOFF_S", 0.001)
    with pytest.raises(SystemExit) as exit_:
        download.main(["vlcs", "--data-dir", str(tmp_path), "--retries", "1"])
    assert exit_.value.code == 1
    err = error_of(capsys.readouterr().err)
    assert err.startswith("error: VLCS.tar.gz could not be downloaded (") and "Connection refused" in err
    assert "run the command again" in err and "--from-archive FILE" in err and "Traceback" not in err


def test_a_truncated_archive_is_removed_and_named_and_a_local_copy_is_read_and_kept(
    monkeypatch, server, tmp_path, capsys
):
    archive = small_pacs_zip(tmp_path)
    route(monkeypatch, server, "PACS", archive[: len(archive) // 2])  # a server that serves half a zip
    publish(monkeypatch, "PACS", PACS_SEVEN)
    data_dir = tmp_path / "data"
    with pytest.raises(SystemExit):
        download.main(["pacs", "--data-dir", str(data_dir)])
    err = error_of(capsys.readouterr().err)
    assert err.startswith("error: The downloaded PACS.zip is damaged (BadZipFile: ")
    assert "it was removed. Run the command again to download it afresh" in err
    assert not (data_dir / "PACS.zip").exists() and not (data_dir / "PACS.zip.part").exists()
    server.files["PACS.zip"] = b"<!DOCTYPE html><html>Quota exceeded</html>"  # what Google Drive sends then
    with pytest.raises(SystemExit):
        download.main(["pacs", "--data-dir", str(data_dir)])
    assert "(ValueError: the server sent a web page, not the archive; Google Drive does when its quota is spent)" in (
        error_of(capsys.readouterr().err)
    )

    # --from-archive: the user's own copy, under any name when the dataset needs a single archive; no network.
    server.files.clear()
    local = tmp_path / "my copy of pacs.zip"
    local.write_bytes(archive)
    download.main(["pacs", "--data-dir", str(data_dir), "--from-archive", str(local)])
    out = capsys.readouterr().out
    assert f"pacs: PACS.zip from the local file {local}" in out and len(server.log) == 2
    assert local.read_bytes() == archive  # read, never removed
    assert [len(domain) for domain in load_domains("PACS", data_dir).domains] == [7, 7, 7, 7]
    # A second run finds the tree complete and fetches nothing.
    download.main(["pacs", "--data-dir", str(data_dir)])
    assert f"pacs: {data_dir / 'PACS'} already has the published counts; nothing to download" in (
        capsys.readouterr().out
    )

    local.write_bytes(archive[:-100])  # a damaged local copy is named, and kept
    with pytest.raises(SystemExit):
        download.main(["pacs", "--data-dir", str(tmp_path / "other"), "--from-archive", str(local)])
    assert error_of(capsys.readouterr().err).startswith(f"error: The archive {local} is damaged (BadZipFile: ")
    assert local.exists()


def test_mnist_is_fetched_once_for_both_mnist_datasets_and_counted(monkeypatch, server, tmp_path, capsys):
    source = write_mnist(tmp_path / "source", n_train=30, n_test=12, gzipped=True) / "MNIST" / "raw"
    route(monkeypatch, server, "MNIST", *[(source / f"{name}.gz").read_bytes() for name in download.MNIST_FILES])
    publish(monkeypatch, "ColoredMNIST", {"+90%": 14, "+80%": 14, "-90%": 14})
    data_dir = tmp_path / "data"
    download.main(["colored_mnist", "rotated_mnist", "--data-dir", str(data_dir)])
    assert [entry[0] for entry in server.log] == [f"{name}.gz" for name in download.MNIST_FILES]  # once
    out = capsys.readouterr().out
    for name in download.MNIST_FILES:
        assert f"colored_mnist: {name}.gz from {server.url(name + '.gz')} (" in out
    assert [len(d) for d in load_domains("ColoredMNIST", data_dir).domains] == [14, 14, 14]
    # A cut images file counts the images it still holds (its idx header says 30).
    images = data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[: 16 + 20 * 28 * 28 + 100])
    assert published.count_mnist_images(images.parent) == {"train-images-idx3-ubyte": 20, "t10k-images-idx3-ubyte": 12}


def test_terra_incognita_is_sorted_into_locations_and_classes(monkeypatch, server, tmp_path):
    # file: (location, category)
    images = {
        "a.jpg": (38, 1),
        "b.jpg": (100, 2),
        "c.jpg": (99, 1),
        "d.jpg": (46, 3),
        "e.jpg": (43, 1),
        "f.jpg": (46, 2),
    }
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
    labels_archive = io.BytesIO()
    with zipfile.ZipFile(labels_archive, "w") as zf:
        zf.writestr(download.TERRA_LABELS_FILE, json.dumps(labels))
    route(monkeypatch, server, "TERRA_IMAGES", images_archive.read_bytes())
    route(monkeypatch, server, "TERRA_LABELS", labels_archive.getvalue())
    publish(monkeypatch, "TerraIncognita", {"L100": 1, "L38": 1, "L43": 1, "L46": 1})
    download.main(["terra_incognita", "--data-dir", str(tmp_path / "data")])
    root = tmp_path / "data" / "terra_incognita"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg")) == [
        "location_100/empty/b.jpg",  # location 99 is not one of the four; "car" is not one of the ten classes
        "location_38/bobcat/a.jpg",
        "location_43/bobcat/e.jpg",
        "location_46/empty/f.jpg",
    ]
    assert not (root / "eccv_18_all_images_sm").exists() and not (root / download.TERRA_LABELS_FILE).exists()


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


# -- counts ---------------------------------------------------------------------------------------


def test_check_counts_an_existing_tree_and_names_the_short_and_the_missing_domain(monkeypatch, tmp_path, capsys):
    data_dir = write_pacs(tmp_path, images_per_class=1, size=8)
    publish(monkeypatch, "PACS", PACS_SEVEN)
    download.main(["--check", "pacs", "--data-dir", str(data_dir)])  # complete: exit status 0
    assert "  P (photo)" in capsys.readouterr().out

    (data_dir / "PACS" / "photo" / "dog" / "0.jpg").unlink()
    (data_dir / "PACS" / "sketch").rename(tmp_path / "sketch elsewhere")
    with pytest.raises(SystemExit) as exit_:
        download.main(["--check", "pacs", "--data-dir", str(data_dir)])
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert captured.err == (
        "error: PACS: P (photo) has 6 images, published 7 (short by 1); S (sketch) is missing (published: 7 "
        f"images). Download with `fishr-download pacs --data-dir {data_dir}`; the app trains on a tree as it is, "
        "with a warning.\n"
    )
    assert "DIFFERS" in captured.out and "MISSING" in captured.out
    assert not (data_dir / "PACS.zip.part").exists()  # nothing was downloaded


def test_the_app_trains_on_a_subset_with_one_warning_naming_the_domain_and_both_numbers(tmp_path):
    data_dir = write_pacs(tmp_path, images_per_class=1, size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_domains("PACS", data_dir, image_size=8)
    assert [len(domain) for domain in data.domains] == [7, 7, 7, 7]
    (warning,) = [w for w in caught if issubclass(w.category, DatasetCountWarning)]
    assert str(warning.message).startswith(
        f"The PACS tree in {data_dir / 'PACS'} differs from the published counts (Li et al., ICCV 2017 (PACS: 9,991 "
        "images)): A (art_painting) has 7 images, published 2,048 (short by 2,041); C (cartoon) has 7 images, "
        "published 2,344 (short by 2,337); P (photo) has 7 images, published 1,670 (short by 1,663); S (sketch) has "
        "7 images, published 3,929 (short by 3,922). Training on it as it is"
    )
    # --check counts what ImageFolder reads (the same image extensions as torchvision's), without torch.
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert published.IMAGE_EXTENSIONS == IMG_EXTENSIONS
    (data_dir / "PACS" / "photo" / "dog" / "notes.txt").write_text("not an image")
    (data_dir / "PACS" / "photo" / "dog" / "nested").mkdir()
    (data_dir / "PACS" / "photo" / "dog" / "nested" / "1.PNG").write_bytes(b"")
    (data_dir / "PACS" / "photo" / "stray.jpg").write_bytes(b"")  # beside the class folders: not read
    from fishr_lightning.app.data.specs import IMAGE_FOLDER_DATASETS

    on_disk = published.count_on_disk(IMAGE_FOLDER_DATASETS["PACS"], data_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetCountWarning)
        read = [len(domain) for domain in load_domains("PACS", data_dir, image_size=8).domains]
    assert on_disk == read == [7, 7, 8, 7]


def test_the_published_table_names_every_domain_and_sums_to_the_papers_totals():
    from fishr_lightning.app.data.specs import dataset_spec

    totals = {
        "ColoredMNIST": 70_000,
        "RotatedMNIST": 70_000,
        "VLCS": 10_729,
        "PACS": 9_991,
        "OfficeHome": 15_588,
        "TerraIncognita": 24_788,  # DomainBed's paper; the labels of 2021 give 24,330
        "DomainNet": 586_575,
    }
    assert {name: sum(row.images.values()) for name, row in published.PUBLISHED_IMAGES.items()} == totals
    for name, row in published.PUBLISHED_IMAGES.items():
        for images in row.versions().values():
            assert tuple(images) == dataset_spec(name).environments, name
    (terra_2021,) = published.PUBLISHED_IMAGES["TerraIncognita"].releases.values()
    assert sum(terra_2021.values()) == 24_330
    # DomainBed deals MNIST as images[i::3] and images[i::6].
    assert list(published.PUBLISHED_IMAGES["ColoredMNIST"].images.values()) == [23_334, 23_333, 23_333]
    assert list(published.PUBLISHED_IMAGES["RotatedMNIST"].images.values()) == [11_667] * 4 + [11_666] * 2
