"""DomainBed's later datasets and the user's own (issue 28), on generated trees in their real layouts:
SVIRO's ten vehicles, Spawrious' six benchmarks (the test domain first, each breed on its backgrounds, the
O2O filler subsets, files in sorted order, no random crop), ``dataset=image_folders`` (domains and classes
in sorted order, the same classes in every domain); an app run of each kind."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from data_factories import SVIRO_CLASSES, SVIRO_VEHICLES, png_bytes, write_image_folder, write_spawrious, write_sviro
from test_app_train import records, run_app

from fishr_lightning.app import AppError
from fishr_lightning.app.data import spawrious
from fishr_lightning.app.data.datamodule import DomainBedDataModule
from fishr_lightning.app.data.domains import load_domains
from fishr_lightning.app.data.fast_images import DeviceAugmentation, FastImageTransform, UInt8Images
from fishr_lightning.app.data.image_folders import IMAGENET_MEAN, IMAGENET_STD
from fishr_lightning.app.data.images import decode_rgb
from fishr_lightning.app.data.specs import check_test_envs, dataset_spec
from fishr_lightning.app.reporting import collect
from fishr_lightning.app.training.hparams import default_hparams

# -- SVIRO ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", ["fast", "domainbed"])
def test_sviro_reads_ten_vehicles_in_domainbeds_order_from_greyscale_pngs(tmp_path, pipeline):
    data = load_domains("SVIRO", write_sviro(tmp_path, images_per_class=2), image_size=12, pipeline=pipeline)
    # DomainBed's SVIRO.ENVIRONMENTS, its sorted folder names
    assert data.spec.environments == (
        "aclass",
        "escape",
        "hilux",
        "i3",
        "lexus",
        "tesla",
        "tiguan",
        "tucson",
        "x5",
        "zoe",
    )
    assert data.spec.num_classes == 7 and data.class_names == list(SVIRO_CLASSES)
    assert [len(domain) for domain in data.domains] == [14] * 10
    domain = data.domains[SVIRO_VEHICLES.index("tucson")]
    assert [Path(path).relative_to(tmp_path / "sviro").as_posix() for path, _ in domain.samples[:3]] == [
        "tucson/class_0/tucson_0.png",
        "tucson/class_0/tucson_1.png",
        "tucson/class_1/tucson_0.png",
    ]
    assert domain.targets == [label for label in range(7) for _ in range(2)]
    item, label = domain[5]
    assert label == 2
    x = data.eval_transform(item)
    if pipeline == "fast":  # the workers' uint8 crop, then the device part
        x = data.batch_transform(UInt8Images(x.pixels[None], x.params[None]))[0]
    assert x.shape == (3, 12, 12)
    # A greyscale PNG becomes three equal channels, as DomainBed's loader converts it to RGB.
    grey = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    torch.testing.assert_close(grey[0], grey[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(grey[1], grey[2], atol=1e-5, rtol=0)
    if pipeline == "domainbed":
        assert "RandomResizedCrop" in repr(data.train_transform)
    else:
        assert data.train_transform.random_crop


def test_a_missing_sviro_vehicle_names_it_and_the_download_command(tmp_path):
    write_sviro(tmp_path)
    (tmp_path / "sviro" / "i3").rename(tmp_path / "sviro" / "i8")
    with pytest.raises(AppError) as error:
        load_domains("SVIRO", tmp_path)
    assert "lacks the domain folder(s) ['i3']" in str(error.value)
    assert f"fishr-download sviro --data-dir {tmp_path}" in str(error.value)


# -- Spawrious --------------------------------------------------------------------------------------

# The Spawrious paper's benchmarks (Lynch et al., 2023, Table 1, as DomainBed's SpawriousO2O_*/M2M_* build
# them), written out per domain group: each breed's background. O2O: SC_group_1 reads folder 0, SC_group_2
# folder 1, both add the filler background; the test domain is test group 1 (folder 0) then test group 2
# (folder 1). M2M: every group reads folder 0.
SPAWRIOUS_TABLE = {
    "SpawriousO2O_easy": {
        "train": ["bulldog=desert dachshund=jungle labrador=dirt corgi=snow"] * 2,
        "filler": "beach",
        "test": ["bulldog=dirt dachshund=snow labrador=desert corgi=jungle"] * 2,
    },
    "SpawriousO2O_medium": {
        "train": ["bulldog=mountain dachshund=beach labrador=dirt corgi=jungle"] * 2,
        "filler": "desert",
        "test": ["bulldog=jungle dachshund=dirt labrador=beach corgi=snow"] * 2,
    },
    "SpawriousO2O_hard": {
        "train": ["bulldog=jungle dachshund=mountain labrador=snow corgi=desert"] * 2,
        "filler": "beach",
        "test": ["bulldog=mountain dachshund=snow labrador=desert corgi=jungle"] * 2,
    },
    "SpawriousM2M_easy": {
        "train": [
            "bulldog=desert dachshund=mountain labrador=dirt corgi=jungle",
            "bulldog=mountain dachshund=desert labrador=jungle corgi=dirt",
        ],
        "test": [
            "bulldog=dirt dachshund=jungle labrador=mountain corgi=desert",
            "bulldog=jungle dachshund=dirt labrador=desert corgi=mountain",
        ],
    },
    "SpawriousM2M_medium": {
        "train": [
            "bulldog=beach dachshund=snow labrador=mountain corgi=desert",
            "bulldog=snow dachshund=beach labrador=desert corgi=mountain",
        ],
        "test": [
            "bulldog=desert dachshund=mountain labrador=beach corgi=snow",
            "bulldog=mountain dachshund=desert labrador=snow corgi=beach",
        ],
    },
    "SpawriousM2M_hard": {
        "train": [
            "bulldog=dirt dachshund=jungle labrador=snow corgi=beach",
            "bulldog=jungle dachshund=dirt labrador=beach corgi=snow",
        ],
        "test": [
            "bulldog=snow dachshund=beach labrador=dirt corgi=jungle",
            "bulldog=beach dachshund=snow labrador=jungle corgi=dirt",
        ],
    },
}
LABELS = {"bulldog": 0, "corgi": 1, "dachshund": 2, "labrador": 3}  # DomainBed's class_list order


def expected_folders(name: str, per_folder: int, shares=(0.97, 0.87)) -> list[list[tuple[str, int]]]:
    """Each domain's ``(folder, images taken)`` from the table, for folders of ``per_folder`` images."""
    table = SPAWRIOUS_TABLE[name]
    o2o = "filler" in table
    test = [
        (f"{group if o2o else 0}/{background}/{breed}", per_folder)
        for group, pairs in enumerate(table["test"])
        for breed, background in (pair.split("=") for pair in pairs.split())
    ]
    train = []
    for group, pairs in enumerate(table["train"]):
        own = int(shares[group] * per_folder) if o2o else per_folder
        domain = [
            (f"{group if o2o else 0}/{background}/{breed}", own)
            for breed, background in (p.split("=") for p in pairs.split())
        ]
        if o2o:
            domain += [
                (f"{group}/{table['filler']}/{breed}", per_folder - own)
                for breed in ("bulldog", "dachshund", "labrador", "corgi")
            ]
        train.append(domain)
    return [test, *train]


def expected_spawrious(name: str, per_folder: int) -> list[list[tuple[str, int]]]:
    """Each domain's ``(folder/file, label)`` for folders of ``per_folder`` files named ``0000.png``...: the
    first ``n`` files of a folder are the ``n`` smallest names."""
    return [
        [(f"{folder}/{i:04d}.png", LABELS[folder.rsplit("/", 1)[1]]) for folder, count in domain for i in range(count)]
        for domain in expected_folders(name, per_folder)
    ]


def test_spawrious_domains_read_domainbeds_folders_and_counts_of_the_full_dataset():
    """With spawrious224's 3,168 images per background and breed: the O2O groups take 3,072 + 96 and
    2,756 + 412 images per breed, every training domain holds 12,672 images, the test domain 25,344."""
    for name in SPAWRIOUS_TABLE:
        sources = spawrious.domain_sources(name)
        taken = [[(source.folder, min(source.limit or 3168, 3168)) for source in domain] for domain in sources]
        assert taken == expected_folders(name, 3168), name
        assert [sum(count for _, count in domain) for domain in taken] == [25344, 12672, 12672]
        if "O2O" in name:
            assert [source.limit for source in sources[1]] == [3072] * 4 + [96] * 4
            assert [source.limit for source in sources[2]] == [2756] * 4 + [412] * 4
        assert all(source.label == LABELS[source.folder.rsplit("/", 1)[1]] for domain in sources for source in domain)


@pytest.mark.parametrize("name", list(SPAWRIOUS_TABLE))
def test_spawrious_loads_each_benchmarks_files_in_sorted_order_test_domain_first(tmp_path_factory, monkeypatch, name):
    """On a generated spawrious224 tree of 10 files per folder (DomainBed's 3,168 scaled to 10: the O2O
    groups take 9 + 1 and 8 + 2 files per breed), each domain holds the table's files, the first ones
    of each folder in sorted order, with DomainBed's labels."""
    data_dir = tmp_path_factory.getbasetemp() / "spawrious_10"
    if not data_dir.exists():
        write_spawrious(data_dir, images_per_folder=10, size=4)
    monkeypatch.setattr(spawrious, "IMAGES_PER_FOLDER", 10)
    data = load_domains(name, data_dir, image_size=8)
    assert data.spec.environments == ("Test", "SC_group_1", "SC_group_2") and data.spec.num_classes == 4
    assert data.class_names == ["bulldog", "corgi", "dachshund", "labrador"]
    root = data_dir / "spawrious224"
    got = [
        [(Path(path).relative_to(root).as_posix(), label) for path, label in domain.samples] for domain in data.domains
    ]
    assert got == expected_spawrious(name, 10)
    assert [domain.targets for domain in data.domains] == [[label for _, label in domain] for domain in got]


def test_spawrious_trains_without_random_crop_as_domainbed_on_both_pipelines(tmp_path):
    """DomainBed's Spawrious augmentation (Resize, flip, jitter, grayscale: no random crop), written out here,
    with torch's RNG in the same state: the domainbed pipeline's tensor is equal, the fast one's close."""
    from torchvision import transforms

    path = tmp_path / "dog.png"
    path.write_bytes(png_bytes(90, 40))
    domainbed_spawrious = transforms.Compose(
        [
            transforms.Resize((24, 24)),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.3, 0.3, 0.3, 0.3),
            transforms.RandomGrayscale(),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    write_spawrious(tmp_path / "data", images_per_folder=1, size=4)
    app = {
        pipeline: load_domains("SpawriousM2M_easy", tmp_path / "data", image_size=24, pipeline=pipeline)
        for pipeline in ("domainbed", "fast")
    }
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for seed in range(3):
        torch.manual_seed(seed)
        reference = domainbed_spawrious(decode_rgb(path))
        torch.manual_seed(seed)
        assert torch.equal(app["domainbed"].train_transform(decode_rgb(path)), reference)
        torch.manual_seed(seed)
        images = app["fast"].train_transform(str(path))
        fast = DeviceAugmentation(IMAGENET_MEAN, IMAGENET_STD)(UInt8Images(images.pixels[None], images.params[None]))[0]
        assert ((fast - reference) * std).abs().mul(255).mean() <= 4.0, seed  # float colour arithmetic (issue 20)
    assert isinstance(app["fast"].train_transform, FastImageTransform) and not app["fast"].train_transform.random_crop
    # data.decode=device on a CPU-only run: the workers decode instead, still without the crop.
    on_device = load_domains("SpawriousM2M_easy", tmp_path / "data", image_size=24, decode="device")
    module = DomainBedDataModule(on_device, [0], 0.2, trial_seed=0, seed=0, batch_size=2, steps=1)
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    in_workers = module.item_transform(on_device.train_transform).transform
    assert not in_workers.decode_on_device and not in_workers.random_crop


def test_a_missing_spawrious_folder_is_named_with_the_layout_and_the_download_command(tmp_path):
    write_spawrious(tmp_path, images_per_folder=1, size=4)
    for image in (tmp_path / "spawrious224" / "1" / "beach" / "corgi").iterdir():
        image.unlink()
    (tmp_path / "spawrious224" / "1" / "beach" / "corgi").rmdir()
    load_domains("SpawriousM2M_easy", tmp_path)  # M2M reads folder 0 only
    with pytest.raises(AppError) as error:
        load_domains("SpawriousO2O_easy", tmp_path)  # its SC_group_2 fills with beach from folder 1
    message = str(error.value)
    assert f"{tmp_path / 'spawrious224'} lacks the folder 1/beach/corgi" in message
    assert "{0,1}/<background>/<breed>/<image>.png" in message
    assert f"fishr-download spawriouso2o_easy --data-dir {tmp_path}" not in message
    assert f"fishr-download spawrious_o2o_easy --data-dir {tmp_path}" in message


# -- the user's own dataset (dataset=image_folders) --------------------------------------------------


def test_image_folders_number_domains_and_classes_in_sorted_order(tmp_path):
    root = write_image_folder(tmp_path / "mine", ("sketches", "photos", "x-rays"), ("dog", "cat"), images_per_class=2)
    (root / "photos" / "cat" / "extra.png").write_bytes(png_bytes(10, 8))  # PNG and JPEG side by side
    spec = dataset_spec("ImageFolders", root)
    assert spec.environments == ("photos", "sketches", "x-rays") and spec.num_classes == 2
    assert check_test_envs([2], spec) == [2]
    for pipeline in ("fast", "domainbed"):
        data = load_domains("ImageFolders", root, image_size=16, pipeline=pipeline)
        assert data.class_names == ["cat", "dog"] and [len(domain) for domain in data.domains] == [5, 4, 4]
        assert data.domains[0].targets == [0, 0, 0, 1, 1]
        assert Path(data.domains[0].samples[2][0]).name == "extra.png"
    assert "RandomResizedCrop" in repr(data.train_transform)  # DomainBed's image-folder augmentation


def test_image_folders_refuse_a_domain_whose_classes_differ_naming_it(tmp_path):
    root = write_image_folder(tmp_path / "mine", ("a_odd", "b", "c"), ("cat", "dog"), images_per_class=1)
    (root / "a_odd" / "dog").rename(root / "a_odd" / "wolf")
    with pytest.raises(AppError) as error:
        dataset_spec("ImageFolders", root)
    message = str(error.value)
    assert f"['cat', 'dog'] in 2 of the 3 domains, but {root / 'a_odd'} lacks ['dog'] and has ['wolf'] too." in message
    assert f"dataset=image_folders reads data_dir={root} as {root}/<domain>/<class>/<image>" in message
    with pytest.raises(AppError, match=r"\(cat, dog\) hold no class folders: is data_dir one domain's folder"):
        dataset_spec("ImageFolders", root / "b")
    (tmp_path / "single" / "only" / "cat").mkdir(parents=True)
    with pytest.raises(AppError, match=r"holds 1 domain folder\(s\) \['only'\]; a run needs at least two"):
        dataset_spec("ImageFolders", tmp_path / "single")
    with pytest.raises(AppError, match="There is no directory"):
        load_domains("ImageFolders", tmp_path / "nowhere")
    with pytest.raises(AppError, match="and none was given"):
        load_domains("ImageFolders", None)


def test_the_new_datasets_take_domainbeds_image_hyperparameters():
    """DomainBed's registry has no rule of its own for SVIRO, Spawrious or a dataset of one's own: the
    image datasets' defaults (PACS's: lr 5e-5, batch 32)."""
    for name in ("SVIRO", "SpawriousO2O_hard", "ImageFolders"):
        assert default_hparams("Fishr", name) == default_hparams("Fishr", "PACS"), name


# -- the app ------------------------------------------------------------------------------------------


def own_dataset_example():
    """examples/own_dataset.py, the docs' worked example (Your own dataset)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "own_dataset.py"
    spec = importlib.util.spec_from_file_location("own_dataset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dataset_configs_give_domainbeds_steps_and_checkpoint_frequencies():
    from omegaconf import OmegaConf

    configs = Path(__import__("fishr_lightning.app.configs", fromlist=["x"]).__file__).parent / "dataset"
    expected = {"sviro": ("SVIRO", 300), "image_folders": ("ImageFolders", 100)}
    expected.update(
        {
            f"spawrious_{k.lower()}_{level}": (f"Spawrious{k}_{level}", 100)
            for k in ("O2O", "M2M")
            for level in ("easy", "medium", "hard")
        }
    )
    for stem, (name, checkpoint_freq) in expected.items():
        config = OmegaConf.load(configs / f"{stem}.yaml")
        assert (config.name, config.steps, config.checkpoint_freq) == (name, 5001, checkpoint_freq), stem


@pytest.mark.parametrize(
    ("dataset", "pipeline", "domains"),
    [
        ("sviro", "fast", SVIRO_VEHICLES),
        ("spawrious_o2o_medium", "domainbed", ("Test", "SC_group_1", "SC_group_2")),
        ("image_folders", "fast", ("filled", "noisy", "outline")),  # the docs' worked example
    ],
)
def test_an_app_run_on_each_new_kind_of_dataset(monkeypatch, tmp_path, capsys, dataset, pipeline, domains):
    data_dir = tmp_path / "data"
    if dataset == "sviro":
        write_sviro(data_dir, images_per_class=1, size=8)
    elif dataset == "image_folders":
        data_dir = own_dataset_example().write_toy_dataset(data_dir, images_per_class=2, size=8)
    else:
        write_spawrious(data_dir, images_per_folder=2, size=8)
    run_dir = tmp_path / "run"
    status = run_app(
        monkeypatch,
        run_dir,
        f"dataset={dataset}",
        "algorithm=erm",
        f"data_dir={data_dir}",
        "backbone=mlp",
        "backbone.width=8",
        "dataset.image_size=8",
        "batch_size=2",
        "steps=1",
        "loader.num_workers=0",
        f"data.pipeline={pipeline}",
        "test_envs=[0]",
    )
    assert status == 0
    record = records(run_dir)[-1]
    assert record["args"]["data_pipeline"] == pipeline
    assert all(f"env{env}_in_acc" in record for env in range(len(domains)))
    assert f"env{len(domains)}_in_acc" not in record
    out = capsys.readouterr().out
    assert f"0: {domains[0]}" in out and f"{len(domains) - 1}: {domains[-1]}" in out
    # fishr-collect's tables name the test domain: the user's dataset's from its data_dir
    assert collect.main([str(run_dir)]) == 0
    assert f"| Algorithm | {' | '.join(domains)} | Avg |" in capsys.readouterr().out


def test_a_sweep_holds_out_each_domain_of_the_users_dataset(tmp_path):
    """``python train.py -m +sweep=domainbed dataset=image_folders data_dir=PATH``: test_envs=each derives the
    test domains from PATH's domain folders (issue 30's plan, issue 28's dataset)."""
    from test_sweeps_configs import planned_jobs

    root = write_image_folder(tmp_path / "mine", ("a", "b", "c", "d", "e"), ("cat", "dog"), images_per_class=1, size=4)
    jobs = planned_jobs(
        "domainbed", "dataset=image_folders", f"data_dir={root}", "algorithm=erm", "hparams_seed=0", "trial_seed=0"
    )
    assert sorted(next(o for o in job if o.startswith("test_envs=")) for job in jobs) == [
        f"test_envs=[{env}]" for env in range(5)
    ]


def test_spawrious_samples_and_splits_do_not_depend_on_the_file_systems_order(tmp_path, monkeypatch):
    """DomainBed takes a folder's first files in os.listdir's order (the file system's); the app sorts them:
    a file system listing them in another order gives the same filler subsets and the same in/out splits."""
    write_spawrious(tmp_path, images_per_folder=10, size=4)
    monkeypatch.setattr(spawrious, "IMAGES_PER_FOLDER", 10)

    def splits() -> list[tuple[list[str], list[str]]]:
        data = load_domains("SpawriousO2O_hard", tmp_path, image_size=8)
        module = DomainBedDataModule(data, [0], 0.2, trial_seed=1, seed=0, batch_size=2, steps=1)
        paths = [[path for path, _ in domain.samples] for domain in data.domains]
        return [
            ([paths[d][i] for i in ins], [paths[d][i] for i in outs]) for d, (ins, outs) in enumerate(module.splits)
        ]

    in_order = splits()
    listdir = spawrious.os.listdir
    monkeypatch.setattr(spawrious.os, "listdir", lambda folder: sorted(listdir(folder), reverse=True))
    assert splits() == in_order
    assert [len(outs) for _, outs in in_order] == [16, 8, 8]  # int(0.2 × 80), int(0.2 × 40): DomainBed's split


def test_sviro_and_spawrious_are_fetched_from_domainbeds_sources_once_and_load(monkeypatch, tmp_path):
    """DomainBed's download.py: SVIRO's zip holds SVIRO_DOMAINBED/ (renamed sviro/), Spawrious' tarball
    spawrious224/; the six benchmarks share one download (the archives here are generated, served on 127.0.0.1)."""
    import tarfile

    from data_factories import zip_tree
    from test_app_download import ArchiveServer, route

    from fishr_lightning.app.data import download

    assert download.SVIRO.urls[0] == "https://sviro.kl.dfki.de/?wpdmdl=1731"  # DomainBed's sources
    assert download.SPAWRIOUS.urls[0].startswith("https://www.dropbox.com/s/e40j553480h3f3s/spawrious224.tar.gz")
    write_sviro(tmp_path / "source", images_per_class=1, size=4)
    write_spawrious(tmp_path / "source", images_per_folder=1, size=4)
    sviro_zip = zip_tree(tmp_path / "source" / "sviro", tmp_path / "sviro.zip", prefix="SVIRO_DOMAINBED")
    spawrious_tar = tmp_path / "spawrious224.tar.gz"
    with tarfile.open(spawrious_tar, "w:gz") as tar:
        tar.add(tmp_path / "source" / "spawrious224", arcname="spawrious224")
    server = ArchiveServer()
    try:
        route(monkeypatch, server, "SVIRO", sviro_zip.read_bytes())
        route(monkeypatch, server, "SPAWRIOUS", spawrious_tar.read_bytes())
        data_dir = tmp_path / "data"
        download.main(["sviro", "spawrious_o2o_easy", "spawrious_m2m_hard", "--data-dir", str(data_dir)])
    finally:
        server.close()
    assert [entry[0] for entry in server.log] == [download.SVIRO.name, download.SPAWRIOUS.name]  # once each
    assert sorted(path.name for path in data_dir.iterdir()) == ["spawrious224", "sviro"]
    assert [len(domain) for domain in load_domains("SVIRO", data_dir).domains] == [7] * 10
    assert [len(domain) for domain in load_domains("SpawriousM2M_hard", data_dir).domains] == [8, 4, 4]
