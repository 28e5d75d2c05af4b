"""Broken image files (issue 19): an unreadable file ends the run with one paragraph naming it and
its dataset folder, read in the main process or in a DataLoader worker; ``data.skip_broken_images``
leaves such files out with one warning and counts them; truncated JPEGs that PIL can complete load
as DomainBed loads them, with a warning naming them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from data_factories import write_pacs
from test_app_train import records, run_app
from torch.utils.data import DataLoader

from fishr_lightning.app.data.fast_images import FastImageTransform
from fishr_lightning.app.data.images import TRUNCATED_IMAGES_ENV, BrokenImageError, ImageReader, open_image
from fishr_lightning.app.data.published import DatasetCountWarning

PACS_RUN = [
    "dataset=pacs",
    "algorithm=erm",
    "backbone=resnet18",
    "backbone.pretrained=false",
    "dataset.image_size=32",
    "batch_size=2",
    "steps=1",
    "loader.eval_batch_size=32",
    "test_envs=[3]",
]


def cut(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_open_image_names_unreadable_files_and_completes_truncated_jpegs_as_domainbed(monkeypatch, tmp_path):
    monkeypatch.delenv(TRUNCATED_IMAGES_ENV, raising=False)
    data_dir = write_pacs(tmp_path / "data", images_per_class=1, size=64)
    folder = data_dir / "PACS"
    garbage = folder / "photo" / "dog" / "0.jpg"
    garbage.write_bytes(b"these bytes are no JPEG")
    with pytest.raises(BrokenImageError) as error:
        open_image(garbage, folder, hint="fishr-download pacs --data-dir data")
    message = str(error.value)
    assert message.startswith(f"The image {garbage} cannot be read (UnidentifiedImageError: ")
    assert f"the dataset in {folder}" in message and "(fishr-download pacs --data-dir data)" in message
    assert "data.skip_broken_images=true" in message and "\n" not in message

    header_only = cut(folder / "photo" / "horse" / "0.jpg", keep=0.07)  # cut inside the header
    with pytest.raises(BrokenImageError, match="Truncated File Read"):
        open_image(header_only, folder)

    truncated = cut(folder / "sketch" / "dog" / "0.jpg", keep=0.7)  # PIL completes the missing rows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert open_image(truncated, folder).size == (64, 64)
        assert open_image(truncated, folder).size == (64, 64)
    assert [str(w.message) for w in caught] == [
        f"Truncated image file(s), loaded as DomainBed loads them (PIL's LOAD_TRUNCATED_IMAGES: the missing part "
        f"is grey): {truncated}."
    ]


def test_a_truncated_image_read_by_several_workers_is_named_once_per_run(monkeypatch, tmp_path):
    data_dir = write_pacs(tmp_path / "data", images_per_class=1, size=64)
    truncated = cut(data_dir / "PACS" / "photo" / "dog" / "0.jpg", keep=0.7)
    monkeypatch.setenv(TRUNCATED_IMAGES_ENV, str(tmp_path / "run" / ".truncated_images"))  # as the app does
    reader = ImageReader(data_dir / "PACS")
    loader = DataLoader([str(truncated)] * 8, batch_size=1, num_workers=2, collate_fn=lambda paths: reader(paths[0]))
    assert [image.size for image in loader] == [(64, 64)] * 8  # both workers opened it, four times each
    # The worker that met it first marked it (and warned, in its own process); the other did not, nor
    # does the main process now.
    markers = list((tmp_path / "run" / ".truncated_images").iterdir())
    assert [marker.read_text() for marker in markers] == [str(truncated)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader(str(truncated))
    assert caught == []


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_ends_the_run_with_its_name_in_the_main_process_and_in_a_worker(
    monkeypatch, tmp_path, capsys, workers
):
    data_dir = write_pacs(tmp_path / "data", images_per_class=2, size=20)
    broken = data_dir / "PACS" / "cartoon" / "giraffe" / "1.jpg"
    broken.write_bytes(b"\xff\xd8 half-copied")
    status = run_app(monkeypatch, tmp_path / "run", *PACS_RUN, f"data_dir={data_dir}", f"loader.num_workers={workers}")
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    assert err.startswith(f"error: The image {broken} cannot be read (UnidentifiedImageError: ")
    assert f"the dataset in {data_dir / 'PACS'}" in err and f"fishr-download pacs --data-dir {data_dir}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_skip_broken_images_leaves_them_out_with_one_warning_and_counts_them(monkeypatch, tmp_path):
    data_dir = write_pacs(tmp_path / "data", images_per_class=2, size=20)
    broken = data_dir / "PACS" / "art_painting" / "horse" / "0.jpg"
    broken.write_bytes(b"not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = run_app(
            monkeypatch,
            tmp_path / "run",
            *PACS_RUN,
            f"data_dir={data_dir}",
            "loader.num_workers=0",
            "data.skip_broken_images=true",
        )
    assert status == 0
    skipped = [str(w.message) for w in caught if "skip_broken_images=true" in str(w.message)]
    assert skipped == [f"data.skip_broken_images=true: 1 unreadable image(s) left out of the run: {broken}."]
    # The generated tree is a subset of PACS: the run trains on it, with one warning naming each domain and
    # both numbers (issue 28).
    (counts,) = [str(w.message) for w in caught if issubclass(w.category, DatasetCountWarning)]
    assert "A (art_painting) has 13 images, published 2,048 (short by 2,035); C (cartoon) has 14 images" in counts
    assert records(tmp_path / "run")[-1]["args"]["skipped_images"] == 1


@pytest.mark.parametrize("augment", [False, True])
def test_the_fast_pipeline_reads_files_by_the_same_rules(monkeypatch, tmp_path, augment):
    # data.pipeline=fast decodes in its transform, at a reduced scale: through the dataset's reader, so
    # that a broken file is named and a truncated one completed (once, also when the draft decode retries).
    monkeypatch.delenv(TRUNCATED_IMAGES_ENV, raising=False)
    data_dir = write_pacs(tmp_path / "data", images_per_class=1, size=96)
    truncated = cut(data_dir / "PACS" / "photo" / "dog" / "0.jpg", keep=0.7)
    garbage = data_dir / "PACS" / "photo" / "horse" / "0.jpg"
    garbage.write_bytes(b"\xff\xd8 half-copied")
    transform = FastImageTransform(24, augment=augment, reader=ImageReader(data_dir / "PACS", hint="HINT"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = transform(str(truncated))
    assert images.pixels.shape == (3, 24, 24)
    assert [str(w.message) for w in caught if "Truncated" in str(w.message)] == [
        f"Truncated image file(s), loaded as DomainBed loads them (PIL's LOAD_TRUNCATED_IMAGES: the missing part "
        f"is grey): {truncated}."
    ]
    with pytest.raises(BrokenImageError) as error:
        transform(str(garbage))
    assert str(error.value).startswith(f"The image {garbage} cannot be read (UnidentifiedImageError: ")
    assert f"the dataset in {data_dir / 'PACS'}" in str(error.value) and "(HINT)" in str(error.value)
