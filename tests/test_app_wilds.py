"""WILDS' Camelyon17 and FMoW as DomainBed reads them (issue 28), on trees in the ``wilds`` package's layout
(``data_factories.write_camelyon``, ``write_fmow``): DomainBed's domains in its order, each with the samples
and labels that WILDS' metadata gives it, in the metadata's order (which DomainBed's splits shuffle), the
WILDS transforms (resize before the crop) on both pipelines, the layout's errors, the download."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_factories import CAMELYON_ROWS, FMOW_ROWS, write_camelyon, write_fmow
from PIL import Image
from test_app_download import ArchiveServer
from torchvision import transforms

from fishr_lightning.app import AppError
from fishr_lightning.app.data import download
from fishr_lightning.app.data.datamodule import DomainBedDataModule
from fishr_lightning.app.data.domains import load_domains
from fishr_lightning.app.data.download import Archive
from fishr_lightning.app.data.fast_images import FastImageTransform, UInt8Images
from fishr_lightning.app.data.images import ImageReader
from fishr_lightning.app.data.wilds_metadata import count_wilds_images
from fishr_lightning.app.reporting.collect import _dataset_order, environment_labels
from fishr_lightning.app.training.hparams import default_hparams, random_hparams


def test_camelyon17_has_domainbeds_five_hospitals_with_their_patches_in_metadata_order(tmp_path):
    data = load_domains("WILDSCamelyon", write_camelyon(tmp_path), image_size=32)
    root = tmp_path / "camelyon17_v1.0"
    # WILDS' rules written out: hospital h is metadata.csv's rows with center == h, in the file's order, the
    # label its tumor column, the file named by patient (as written), node and coordinates.
    expected = [
        [
            (str(root / "patches" / f"patient_{p}_node_{n}" / f"patch_patient_{p}_node_{n}_x_{x}_y_{y}.png"), tumor)
            for p, n, x, y, tumor, _, center in CAMELYON_ROWS
            if center == hospital
        ]
        for hospital in range(5)
    ]
    assert [domain.samples for domain in data.domains] == expected
    assert [len(domain) for domain in data.domains] == [3, 2, 3, 2, 2]
    assert data.spec.environments == ("hospital_0", "hospital_1", "hospital_2", "hospital_3", "hospital_4")
    assert data.domains[0].samples[1][0].endswith("patient_010_node_4/patch_patient_010_node_4_x_2176_y_12576.png")
    assert data.spec.num_classes == 2 and data.class_names == ["no_tumor", "tumor"]
    # The metadata lists every file: a tree's completeness is the files of it that exist (fishr-download --check).
    Path(expected[2][1][0]).unlink()
    assert count_wilds_images(data.spec, tmp_path) == [3, 2, 2, 2, 2]


def test_fmow_has_domainbeds_six_regions_numbered_as_wilds_numbers_them(tmp_path):
    data = load_domains("WILDSFMoW", write_fmow(tmp_path), image_size=32, pipeline="domainbed")
    # Regions in the order they first appear in rgb_metadata.csv, sequestered rows included (row 0 names Asia):
    # Asia, Europe, Africa, Americas, Oceania, Other; the sequestered rows 0 and 6 are no sample but count
    # in the files' numbers; labels are the indices in WILDS' list of 62 categories. Rows 4 and 11 (training
    # rows of 2014 and 2013, which WILDS' time windows leave out of its splits) are samples, as in DomainBed.
    expected = [
        [(3, 0), (12, 39)],  # Asia: airport, prison
        [(1, 61), (13, 44)],  # Europe: zoo, runway
        [(2, 38), (8, 1)],  # Africa (Namibia, Nigeria): port, airport_hangar
        [(4, 12), (9, 60)],  # Americas: dam, wind_farm
        [(5, 6), (11, 56)],  # Oceania: barn, tower
        [(7, 30), (10, 23)],  # Other (no country code; a code the mapping lacks): multi-unit_residential, helipad
    ]
    images = tmp_path / "fmow_v1.1" / "images"
    assert [domain.samples for domain in data.domains] == [
        [(str(images / f"rgb_img_{row}.png"), label) for row, label in domain] for domain in expected
    ]
    assert data.spec.environments == tuple(f"region_{i}" for i in range(6)) and data.spec.num_classes == 62
    assert [FMOW_ROWS[row][1] for row, _ in expected[0]] == ["airport", "prison"]
    image, label = data.domains[3][1]
    assert image.size == (24, 24) and image.mode == "RGB" and label == 60


def seed_hash(*args) -> int:
    """DomainBed's ``misc.seed_hash``."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


@pytest.mark.parametrize(("name", "write"), [("WILDSCamelyon", write_camelyon), ("WILDSFMoW", write_fmow)])
def test_each_trial_seed_splits_the_metadatas_order_as_domainbed(tmp_path, name, write):
    data = load_domains(name, write(tmp_path), image_size=32)
    for trial_seed in (0, 1, 2):
        module = DomainBedDataModule(data, [0], 0.5, trial_seed=trial_seed, seed=0, batch_size=2, steps=1)
        for env, domain in enumerate(data.domains):
            keys = list(range(len(domain)))  # DomainBed's split_dataset on the domain's samples, in order
            np.random.RandomState(seed_hash(trial_seed, env)).shuffle(keys)
            out = keys[: int(len(domain) * 0.5)]
            assert [domain.samples[i] for i in module.splits[env][1]] == [domain.samples[i] for i in out]
            assert sorted(module.splits[env][0] + module.splits[env][1]) == list(range(len(domain)))


def test_the_fast_pipeline_resizes_before_the_crop_as_domainbeds_wilds_transforms(tmp_path):
    patch = next((write_camelyon(tmp_path, size=40) / "camelyon17_v1.0" / "patches").rglob("*.png"))
    noisy = np.random.default_rng(0).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(patch)  # textured: a crop's place shows in its pixels
    image = Image.fromarray(noisy)
    # DomainBed's WILDSDataset: Resize((224, 224)) before RandomResizedCrop (here at 32²).
    domainbed = transforms.Compose([transforms.Resize((32, 32)), transforms.RandomResizedCrop(32, scale=(0.7, 1.0))])
    fast = FastImageTransform(32, augment=True, reader=ImageReader(tmp_path), resize_first=True)
    image_folders = FastImageTransform(32, augment=True, reader=ImageReader(tmp_path))
    for seed in range(4):
        torch.manual_seed(seed)
        expected = torch.from_numpy(np.asarray(domainbed(image)).copy()).permute(2, 0, 1)
        torch.manual_seed(seed)
        assert torch.equal(fast(str(patch)).pixels, expected), seed  # the same crop box, PIL's crop and resize
        torch.manual_seed(seed)
        assert not torch.equal(image_folders(str(patch)).pixels, expected)  # the crop drawn on the 40² file


def test_both_pipelines_read_the_same_images(tmp_path):
    write_fmow(tmp_path)
    fast = load_domains("WILDSFMoW", tmp_path, image_size=32, pipeline="fast")
    domainbed = load_domains("WILDSFMoW", tmp_path, image_size=32, pipeline="domainbed")
    for env in (0, 5):
        path, label = fast.domains[env][1]
        image, same_label = domainbed.domains[env][1]
        uint8 = fast.eval_transform(path)
        x = fast.batch_transform(UInt8Images(uint8.pixels[None], uint8.params[None]))[0]
        torch.testing.assert_close(x, domainbed.eval_transform(image), rtol=0, atol=1e-5)
        assert label == same_label
    assert "Resize(size=(32, 32)" in repr(domainbed.train_transform.transforms[0])
    assert fast.train_transform.resize_first and not fast.eval_transform.resize_first


def rewrite_camelyon_metadata(root, keep) -> None:
    lines = (root / "metadata.csv").read_text().splitlines()
    (root / "metadata.csv").write_text("\n".join([lines[0], *filter(keep, lines[1:])]) + "\n")


@pytest.mark.parametrize(
    ("name", "spoil", "needle"),
    [
        ("WILDSFMoW", None, "There is no directory"),
        (
            "WILDSCamelyon",
            lambda root: rewrite_camelyon_metadata(root, keep=lambda line: not line.endswith(",3,0")),
            "metadata has images of the hospital (metadata.csv's center) value(s) [0, 1, 2, 4]; WILDSCamelyon has "
            "one domain for each of [0, 1, 2, 3, 4] (hospital_0, hospital_1, hospital_2, hospital_3, hospital_4)",
        ),
        (
            "WILDSCamelyon",
            lambda root: (root / "patches").rename(root / "patches_elsewhere"),
            "The first image of domain hospital_0, ",
        ),
        ("WILDSFMoW", lambda root: (root / "country_code_mapping.csv").unlink(), "There is no file "),
        (
            "WILDSFMoW",
            lambda root: (root / "rgb_metadata.csv").write_text("split,category\nseq,zoo\n"),
            "rgb_metadata.csv lacks the column(s) ['country_code'] (it has ['split', 'category']).",
        ),
        (
            "WILDSCamelyon",
            lambda root: (root / "metadata.csv").write_text(
                (root / "metadata.csv").read_text().replace(",3328,", ",3328.5,")
            ),
            "metadata.csv, row 1: node='4', x_coord='3328.5', y_coord='21792', tumor='1', center='0': not all of them "
            "are integers.",
        ),
    ],
    ids=["no_folder", "a_hospital_missing", "patches_elsewhere", "no_country_mapping", "a_column_missing", "a_float"],
)
def test_a_tree_out_of_the_wilds_layout_is_named_with_the_layout_and_the_download_command(
    tmp_path, name, spoil, needle
):
    folder = "camelyon17_v1.0" if name == "WILDSCamelyon" else "fmow_v1.1"
    if spoil is not None:
        (write_camelyon if name == "WILDSCamelyon" else write_fmow)(tmp_path)
        spoil(tmp_path / folder)
    with pytest.raises(AppError) as error:
        load_domains(name, tmp_path)
    message = str(error.value)
    assert needle in message
    assert f"{tmp_path / folder}/ as the `wilds` package lays it out: " in message
    assert f"fishr-download {'wilds_camelyon' if name == 'WILDSCamelyon' else 'wilds_fmow'} --data-dir {tmp_path}" in (
        message
    )


def test_camelyon17_is_fetched_from_wilds_source_into_its_folder_and_loads(monkeypatch, tmp_path):
    source = write_camelyon(tmp_path / "source") / "camelyon17_v1.0"
    archive_path = tmp_path / "archive.tar.gz"
    with tarfile.open(archive_path, "w:gz") as tar:  # WILDS' archive holds the folder's contents
        for path in sorted(source.rglob("*")):
            tar.add(path, path.relative_to(source).as_posix(), recursive=False)
    archive = download.WILDS_ARCHIVES["camelyon17_v1.0"]
    assert "0xe45e15f39fb54e9d9e919556af67aabe" in archive.urls[0]  # the wilds package's download_url
    server = ArchiveServer()  # the archive served from 127.0.0.1 instead
    server.files[archive.name] = archive_path.read_bytes()
    monkeypatch.setitem(download.WILDS_ARCHIVES, "camelyon17_v1.0", Archive(archive.name, (server.url(archive.name),)))
    try:
        download.main(["wilds_camelyon", "--data-dir", str(tmp_path / "data")])
    finally:
        server.close()
    assert [entry[0] for entry in server.log] == [archive.name]
    assert not (tmp_path / "data" / "camelyon17_v1.0" / archive.name).exists()
    assert [len(domain) for domain in load_domains("WILDSCamelyon", tmp_path / "data").domains] == [3, 2, 3, 2, 2]


@pytest.mark.parametrize("dataset", ["WILDSCamelyon", "WILDSFMoW"])
def test_the_wilds_datasets_take_domainbeds_large_image_hyperparameters(dataset):
    # hparams_registry.py: neither is in SMALL_IMAGES nor DomainNet, so both draw as PACS does.
    assert default_hparams("Fishr", dataset) == default_hparams("Fishr", "PACS")
    assert default_hparams("ERM", dataset)["lr"] == 5e-5 and default_hparams("ERM", dataset)["batch_size"] == 32
    assert random_hparams("Fishr", dataset, 7) == random_hparams("Fishr", "PACS", 7)


def test_fishr_collect_names_their_domains_and_orders_them_as_domainbeds_datasets_list():
    assert environment_labels("WILDSCamelyon", 5) == [f"hospital_{i}" for i in range(5)]
    # DomainBed's datasets.DATASETS: ..., DomainNet, SVIRO, WILDSCamelyon, WILDSFMoW, then the Spawrious ones.
    names = ["SpawriousO2O_easy", "WILDSFMoW", "PACS", "WILDSCamelyon", "DomainNet"]
    assert sorted(names, key=_dataset_order) == ["PACS", "DomainNet", "WILDSCamelyon", "WILDSFMoW", "SpawriousO2O_easy"]
