"""The data protocol: DomainBed's splits seeded by trial_seed only, one batch per training domain per
step with renumbered domain ids, resumable batches, every split evaluated; the datasets' loaders on
generated files; the embedded synthetic dataset's spurious feature."""

from __future__ import annotations

import pytest
import torch
from data_factories import PACS_CLASSES, PACS_DOMAINS, synthetic_digits, write_mnist, write_pacs

from fishr_lightning.app import AppError
from fishr_lightning.app.data.datamodule import DomainBatchSampler, DomainBedDataModule, split_indices
from fishr_lightning.app.data.domains import load_domains
from fishr_lightning.app.data.mnist import rotated_mnist_domain
from fishr_lightning.app.data.specs import check_test_envs, dataset_spec
from fishr_lightning.app.data.synthetic import SPURIOUS_AGREEMENT, synthetic_domains


def test_splits_are_seeded_by_trial_seed_not_by_the_global_rng():
    torch.manual_seed(0)
    first = split_indices(100, 0.2, seed=7)
    torch.manual_seed(1)
    __import__("numpy").random.seed(1)
    assert split_indices(100, 0.2, seed=7) == first
    assert split_indices(100, 0.2, seed=8) != first
    in_indices, out_indices = first
    assert len(out_indices) == 20 and sorted(in_indices + out_indices) == list(range(100))


def test_splits_are_domainbeds_split_dataset():
    # DomainBed: keys = range(n); RandomState(seed).shuffle(keys); out = keys[:int(n * fraction)].
    import numpy as np

    keys = list(range(50))
    np.random.RandomState(123).shuffle(keys)
    assert split_indices(50, 0.2, 123) == (keys[10:], keys[:10])


def small_synthetic_module(test_envs=(0,), batch_size=4, steps=10, trial_seed=0):
    data = synthetic_domains(seed=0, samples_per_domain=50)
    return DomainBedDataModule(
        data, list(test_envs), 0.2, trial_seed=trial_seed, seed=0, batch_size=batch_size, steps=steps
    )


def test_a_training_batch_holds_batch_size_samples_of_each_training_domain_renumbered():
    datamodule = small_synthetic_module(test_envs=[1], batch_size=4)
    x, y, domain = next(iter(datamodule.train_dataloader()))
    assert x.shape == (8, 16) and y.shape == (8,)
    assert domain.tolist() == [0] * 4 + [1] * 4  # domains 0 and 2 of the dataset, renumbered 0..E-1
    assert datamodule.train_envs == [0, 2]


def test_training_samples_come_from_the_in_splits_of_training_domains_only():
    datamodule = small_synthetic_module(test_envs=[0])
    dataset = datamodule.train_dataset()
    assert [len(split) for split in dataset.datasets] == [40, 40]
    for split, env in zip(dataset.datasets, (1, 2)):
        assert split.indices == datamodule.splits[env][0]


def test_batches_depend_on_the_step_only_so_a_resumed_run_sees_the_same_ones():
    sampler = DomainBatchSampler([10, 20], batch_size=3, total_steps=6, seed=0)
    uninterrupted = list(sampler)
    resumed = DomainBatchSampler([10, 20], batch_size=3, total_steps=6, seed=0, first_step=lambda: 4)
    assert len(uninterrupted) == 6 and len(resumed) == 2
    assert list(resumed) == uninterrupted[4:]
    assert all(all(i < 10 for i in b[:3]) and all(10 <= i < 30 for i in b[3:]) for b in uninterrupted)


def test_processes_share_each_domains_draw_so_together_they_see_the_one_process_batch():
    one = list(DomainBatchSampler([10, 20], batch_size=4, total_steps=5, seed=3))
    ranks = [
        list(DomainBatchSampler([10, 20], batch_size=4, total_steps=5, seed=3, rank=r, world_size=2)) for r in (0, 1)
    ]
    for step, batch in enumerate(one):
        rank0, rank1 = ranks[0][step], ranks[1][step]
        assert len(rank0) == len(rank1) == 4  # 2 samples of each of the 2 domains per process
        assert rank0[:2] + rank1[:2] == batch[:4] and rank0[2:] + rank1[2:] == batch[4:]


def test_a_batch_the_processes_cannot_share_equally_is_refused():
    with pytest.raises(AppError, match=r"batch_size=5 .* 2 processes"):
        DomainBatchSampler([10, 20], batch_size=5, total_steps=5, seed=0, world_size=2)


def evaluated_samples(datamodule, step=0, rank=0, world_size=1, splits=None):
    """``{split: [(x, y), ...]}`` of one evaluation, in order, and the batches' sizes per split."""
    samples, batch_sizes = {}, {}
    for batch in datamodule.eval_loader(step, rank, world_size, splits):
        x, y, split_N = datamodule.on_after_batch_transfer(batch, 0)  # the fast pipeline's device part
        (split,) = split_N.unique().tolist()  # a batch never mixes splits
        samples.setdefault(split, []).extend(zip(x, y))
        batch_sizes.setdefault(split, []).append(len(y))
    return samples, batch_sizes


def test_every_domains_in_and_out_split_is_evaluated_and_processes_split_them_without_repeats():
    datamodule = small_synthetic_module()
    datamodule.eval_batch_size = 16
    assert datamodule.eval_names == ["env0_in", "env1_in", "env2_in", "env0_out", "env1_out", "env2_out"]
    assert [split.name for split in datamodule.eval_splits()] == datamodule.eval_names
    samples, batch_sizes = evaluated_samples(datamodule)
    assert {split: len(items) for split, items in samples.items()} == {0: 40, 1: 40, 2: 40, 3: 10, 4: 10, 5: 10}
    assert batch_sizes[0] == [16, 16, 8] and batch_sizes[3] == [10]  # each split batched on its own
    x, y = samples[0][0]
    assert x.shape == (16,) and y.dtype == torch.long
    # Each split in its own order, as DomainBed's per-split loaders read it.
    split_0 = datamodule.eval_splits()[0]
    assert all(torch.equal(x, split_0[i][0]) for i, (x, _) in enumerate(samples[0]))
    # 3 processes: every sample of every split once, none padded or repeated.
    shards = [evaluated_samples(datamodule, rank=rank, world_size=3)[0] for rank in range(3)]
    for split, items in samples.items():
        everything = torch.stack([x for x, _ in items])
        parts = torch.stack([x for rank in range(3) for x, _ in shards[rank][split]])
        assert len(parts) == len(everything)
        assert sorted(map(tuple, parts.tolist())) == sorted(map(tuple, everything.tolist()))
    # SWAD's valley loss asks for some splits only.
    assert sorted(evaluated_samples(datamodule, splits=[4, 5])[0]) == [4, 5]


def pacs_module(tmp_path, eval_augmentation, pipeline="fast"):
    data = load_domains("PACS", write_pacs(tmp_path, images_per_class=2), image_size=24, pipeline=pipeline)
    return DomainBedDataModule(
        data, [3], 0.2, trial_seed=0, seed=0, batch_size=2, steps=5, eval_augmentation=eval_augmentation
    )


def first_eval_batches(datamodule, step):
    samples, _ = evaluated_samples(datamodule, step)
    return [torch.stack([x for x, _ in samples[split][:2]]) for split in sorted(samples)]


@pytest.mark.parametrize("pipeline", ["fast", "domainbed"])
def test_training_domains_are_evaluated_through_the_training_augmentation_reproducibly(tmp_path, pipeline):
    augmented, clean = pacs_module(tmp_path / "a", True, pipeline), pacs_module(tmp_path / "b", False, pipeline)
    at_step_3, again_at_3, at_step_6 = (first_eval_batches(augmented, step) for step in (3, 3, 6))
    clean_batches = first_eval_batches(clean, 3)
    names = augmented.eval_names
    for name, aug, aug_again, later, plain in zip(names, at_step_3, again_at_3, at_step_6, clean_batches):
        if name.startswith("env3_"):  # the test domain: never augmented
            assert torch.equal(aug, plain) and torch.equal(later, plain), name
        else:  # DomainBed: the training domains' in and out splits carry the augmentation
            assert not torch.equal(aug, plain), name
            assert torch.equal(aug, aug_again), name  # the same draw when the step is the same
            assert not torch.equal(aug, later), name  # another draw at another step


@pytest.mark.parametrize("pipeline", ["fast", "domainbed"])
def test_one_evaluation_loader_with_persistent_workers_serves_every_evaluation_with_its_own_step(tmp_path, pipeline):
    """The step travels in the sampler's keys, so workers started once draw each evaluation's own
    augmentation: the same tensors as reading in the main process, evaluation after evaluation."""
    root = write_pacs(tmp_path, images_per_class=2)
    data = load_domains("PACS", root, image_size=24, pipeline=pipeline)
    in_process = DomainBedDataModule(data, [3], 0.2, trial_seed=0, seed=0, batch_size=2, steps=5)
    workers = DomainBedDataModule(
        data, [3], 0.2, trial_seed=0, seed=0, batch_size=2, steps=5, num_workers=2, persistent_workers=True
    )
    pools = []
    for step in (3, 6, 3):
        expected, _ = evaluated_samples(in_process, step)
        got, _ = evaluated_samples(workers, step)
        assert sorted(got) == sorted(expected)
        for split in expected:
            assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got[split], expected[split])), (step, split)
        pools.append(workers.eval_loader(step)._iterator)
    assert pools[0] is not None and pools[0] is pools[1] is pools[2]  # one worker pool for the run
    workers.teardown("fit")
    assert not workers._eval_loaders


def test_synthetic_spurious_feature_agrees_with_the_label_as_designed_and_reverses_in_domain_0():
    data = synthetic_domains(seed=0, samples_per_domain=4000)
    assert data.spec.environments[0] == "-90%" and len(data.domains) == 3
    for domain, agreement in zip(data.domains, SPURIOUS_AGREEMENT):
        x, y = domain.tensors
        colour = x[:, 8:10].argmax(dim=1)
        assert (colour == y).float().mean().item() == pytest.approx(agreement, abs=0.03)
    assert (
        synthetic_domains(seed=0, samples_per_domain=10)
        .domains[1]
        .tensors[0]
        .equal(synthetic_domains(seed=0, samples_per_domain=10).domains[1].tensors[0])
    )


def test_pacs_loads_from_an_image_folder_tree_with_augmentation_for_training(tmp_path):
    data = load_domains("PACS", write_pacs(tmp_path), image_size=24, pipeline="domainbed")
    assert len(data.domains) == 4 and data.class_names == sorted(PACS_CLASSES)
    image, _label = data.domains[2][0]
    assert data.eval_transform(image).shape == (3, 24, 24)
    assert data.train_transform(image).shape == (3, 24, 24)
    assert data.train_transform is not data.eval_transform
    assert "RandomResizedCrop" in repr(data.train_transform)


def test_colored_and_rotated_mnist_load_from_idx_files(tmp_path):
    write_mnist(tmp_path, n_train=60, n_test=30)
    colored = load_domains("ColoredMNIST", tmp_path)
    assert [len(d) for d in colored.domains] == [30, 30, 30]
    x, y = colored.domains[0][0]
    assert x.shape == (2, 28, 28) and y in (0, 1) and x.max() <= 1.0
    assert (x[0].sum() == 0) != (x[1].sum() == 0)  # the digit sits in exactly one colour channel
    rotated = load_domains("RotatedMNIST", tmp_path)
    assert [len(d) for d in rotated.domains] == [15] * 6 and rotated.domains[5][0][0].shape == (1, 28, 28)


def test_rotated_mnist_rotates_each_image_as_domainbed_does():
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    images, digits = synthetic_digits(8, seed=0)
    images_N28x28 = torch.from_numpy(images)
    # DomainBed's RotatedMNIST.rotate_dataset (since April 2021, and the Fishr authors' fork): PIL image,
    # bilinear rotation with zero fill, to a float tensor.
    domainbed_rotation = transforms.Compose(
        [
            transforms.ToPILImage(),
            transforms.Lambda(lambda image: TF.rotate(image, 30, interpolation=InterpolationMode.BILINEAR, fill=0)),
            transforms.ToTensor(),
        ]
    )
    expected = torch.stack([domainbed_rotation(image) for image in images_N28x28])
    domain = rotated_mnist_domain(images_N28x28, torch.from_numpy(digits), 30)
    torch.testing.assert_close(torch.stack([domain[i][0] for i in range(8)]), expected, rtol=0, atol=0)
    assert [int(domain[i][1]) for i in range(8)] == digits.tolist()
    bicubic = TF.rotate(transforms.ToPILImage()(images_N28x28[0]), 30, interpolation=InterpolationMode.BICUBIC, fill=0)
    assert not torch.equal(transforms.ToTensor()(bicubic), expected[0])  # the test tells the two filters apart


@pytest.mark.parametrize(
    "make_tree,needle",
    [
        (lambda root: None, "There is no directory"),
        (lambda root: (root / "PACS" / "photo" / "dog").mkdir(parents=True), "lacks the domain folder"),
    ],
)
def test_a_missing_or_malformed_pacs_directory_names_the_layout_and_the_download_command(tmp_path, make_tree, needle):
    make_tree(tmp_path)
    with pytest.raises(AppError) as error:
        load_domains("PACS", tmp_path)
    message = str(error.value)
    assert needle in message
    assert f"fishr-download pacs --data-dir {tmp_path}" in message
    assert all(domain in message for domain in PACS_DOMAINS) and "7 class folders" in message


def test_a_domain_with_the_wrong_classes_is_refused(tmp_path):
    write_pacs(tmp_path, images_per_class=1)
    (tmp_path / "PACS" / "sketch" / "dog").rename(tmp_path / "PACS" / "sketch" / "wolf")
    with pytest.raises(AppError, match="differ from those of"):
        load_domains("PACS", tmp_path)


def test_missing_mnist_files_name_the_expected_files(tmp_path):
    with pytest.raises(AppError) as error:
        load_domains("ColoredMNIST", tmp_path)
    assert "train-images-idx3-ubyte" in str(error.value) and "fishr-download colored_mnist" in str(error.value)


def test_test_envs_out_of_range_or_covering_every_domain_are_refused():
    spec = dataset_spec("PACS")
    assert check_test_envs([3, 0], spec) == [0, 3]
    with pytest.raises(AppError, match=r"out of range.*4 domains.*0=A"):
        check_test_envs([4], spec)
    with pytest.raises(AppError, match="leaves no training domain"):
        check_test_envs([0, 1, 2, 3], spec)
