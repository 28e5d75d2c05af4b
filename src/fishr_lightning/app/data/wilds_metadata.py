"""The samples of DomainBed's WILDS datasets (``WILDSCamelyon``, ``WILDSFMoW``; issue 28), read from the
metadata files of the ``wilds`` package's layout (``camelyon17_v1.0/``, ``fmow_v1.1/`` under ``data_dir``)
without the package, and without torch (``fishr-download --check`` counts files with ``count_wilds_images``).

DomainBed builds ``wilds``' ``Camelyon17Dataset`` / ``FMoWDataset`` and makes one domain per value of a
metadata field (``WILDSEnvironment``): the dataset's indices whose field equals the value, in the dataset's
order, the values sorted. Of ``wilds`` that uses only each sample's file, label and field, which this
module reads from the same CSV files by the same rules (``wilds`` 2.0's ``camelyon17_dataset.py`` and
``fmow_dataset.py``):

- Camelyon17: ``metadata.csv``, one row per patch, in the file's order; the domain is ``center`` (the
  hospital, 0-4), the label ``tumor``, the file
  ``patches/patient_<patient>_node_<node>/patch_patient_<patient>_node_<node>_x_<x_coord>_y_<y_coord>.png``
  (``patient`` kept as written: ``004``).
- FMoW: ``rgb_metadata.csv`` without its sequestered rows (``split == seq``), in the file's order; the label
  is the category's index in ``wilds``' list of 62, the file ``images/rgb_img_<row>.png`` (``<row>``: the
  row's place in the whole file, the sequestered rows counted); the region is ``country_code_mapping.csv``'s
  for the row's ``country_code`` (``Other`` when it has none), numbered in the order the regions first
  appear in ``rgb_metadata.csv`` (``wilds``' ``unique()``, sequestered rows included).

WILDS' own train/validation/test splits are not used, as in DomainBed: every sample of a domain is split
into in and out by ``trial_seed`` as for every other dataset (FMoW's rows that WILDS' time windows leave out
of its five splits included: DomainBed's ``WILDSEnvironment`` reads every row of ``metadata_array``).

Reading the CSVs directly keeps the app free of ``wilds``' dependencies (pandas, ogb, scikit-learn, scipy,
outdated, which checks PyPI for a newer version at import) for what is three columns of a CSV file.
``tests/test_app_wilds.py`` checks the rules on files in these layouts (on which DomainBed's own classes,
through ``wilds`` 2.0, read the same samples and tensors).
"""

from __future__ import annotations

import csv
import os
from operator import itemgetter
from pathlib import Path

from fishr_lightning.app.data.specs import DatasetSpec, data_error

CAMELYON_CLASSES = ["no_tumor", "tumor"]  # WILDS: y = 1 when the patch's central 32×32 region holds tumour tissue
# wilds' fmow_dataset.categories: a category's index there is its label.
FMOW_CATEGORIES = [
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture", "archaeological_site", "barn",
    "border_checkpoint", "burial_site", "car_dealership", "construction_site", "crop_field", "dam",
    "debris_or_rubble", "educational_institution", "electric_substation", "factory_or_powerplant", "fire_station",
    "flooded_road", "fountain", "gas_station", "golf_course", "ground_transportation_station", "helipad",
    "hospital", "impoverished_settlement", "interchange", "lake_or_pond", "lighthouse", "military_facility",
    "multi-unit_residential", "nuclear_powerplant", "office_building", "oil_or_gas_facility", "park",
    "parking_lot_or_garage", "place_of_worship", "police_station", "port", "prison", "race_track",
    "railway_bridge", "recreational_facility", "road_bridge", "runway", "shipyard", "shopping_mall",
    "single-unit_residential", "smokestack", "solar_farm", "space_facility", "stadium", "storage_tank",
    "surface_mine", "swimming_pool", "toll_booth", "tower", "tunnel_opening", "waste_disposal",
    "water_treatment_facility", "wind_farm", "zoo",
]  # fmt: skip
FMOW_OTHER_REGION = "Other"  # wilds' region of a country code that country_code_mapping.csv lacks

Samples = list[tuple[str, int]]


def read_rows(path: Path, columns: tuple[str, ...], spec: DatasetSpec, data_dir: Path) -> list[tuple[str, ...]]:
    """The values of ``columns`` (two or more) in each row of the CSV file ``path``, in the file's order."""
    if not path.is_file():
        raise data_error(spec, data_dir, f"There is no file {path}.")
    with path.open(newline="") as file:
        reader = csv.reader(file)
        header = next(reader, [])
        missing = [column for column in columns if column not in header]
        if missing:
            raise data_error(spec, data_dir, f"{path} lacks the column(s) {missing} (it has {header}).")
        pick = itemgetter(*(header.index(column) for column in columns))
        return [pick(row) for row in reader if row]


def not_integers(path: Path, columns: tuple[str, ...], values: list[str], row: int) -> str:
    found = ", ".join(f"{column}={value!r}" for column, value in zip(columns, values))
    return f"{path}, row {row}: {found}: not all of them are integers."


def camelyon_domains(root: Path, spec: DatasetSpec, data_dir: Path) -> dict[int, Samples]:
    """``{hospital: [(path, label), ...]}`` from ``root/metadata.csv``, each in the file's order."""
    metadata = root / "metadata.csv"
    columns = ("patient", "node", "x_coord", "y_coord", "tumor", "center")
    patches = f"{root}{os.sep}patches{os.sep}"  # string paths: 455,954 Path joins cost seconds at every start
    domains: dict[int, Samples] = {}
    for row, (patient, *numbers) in enumerate(read_rows(metadata, columns, spec, data_dir), start=1):
        try:
            node, x, y, tumor, center = map(int, numbers)
        except ValueError:
            raise data_error(spec, data_dir, not_integers(metadata, columns[1:], numbers, row)) from None
        folder = f"patient_{patient}_node_{node}"
        domains.setdefault(center, []).append((f"{patches}{folder}{os.sep}patch_{folder}_x_{x}_y_{y}.png", tumor))
    return domains


def fmow_domains(root: Path, spec: DatasetSpec, data_dir: Path) -> dict[int, Samples]:
    """``{region: [(path, label), ...]}`` from ``root/rgb_metadata.csv``, each in the file's order, regions
    numbered as ``wilds`` numbers them."""
    mapping_file = root / "country_code_mapping.csv"
    region_of = {
        code: region for code, region in read_rows(mapping_file, ("alpha-3", "region"), spec, data_dir) if code
    }
    metadata = root / "rgb_metadata.csv"
    label_of = {category: label for label, category in enumerate(FMOW_CATEGORIES)}
    images = f"{root}{os.sep}images{os.sep}"
    region_index: dict[str, int] = {}  # in order of first appearance, sequestered rows included
    domains: dict[int, Samples] = {}
    for row, (split, category, country) in enumerate(
        read_rows(metadata, ("split", "category", "country_code"), spec, data_dir)
    ):
        region = region_index.setdefault(region_of.get(country, FMOW_OTHER_REGION), len(region_index))
        if split == "seq":  # sequestered: wilds leaves them out of the dataset
            continue
        if category not in label_of:
            raise data_error(
                spec, data_dir, f"{metadata}, row {row + 1}: category={category!r} is none of FMoW's 62 categories."
            )
        domains.setdefault(region, []).append((f"{images}rgb_img_{row}.png", label_of[category]))
    return domains


def wilds_domains(spec: DatasetSpec, data_dir: Path) -> list[Samples]:
    """Each domain's samples, in DomainBed's order: the metadata values sorted, all of them present."""
    root = data_dir / spec.folder
    if not root.is_dir():
        raise data_error(spec, data_dir, f"There is no directory {root}.")
    read = camelyon_domains if spec.name == "WILDSCamelyon" else fmow_domains
    by_value = read(root, spec, data_dir)
    field = "hospital (metadata.csv's center)" if spec.name == "WILDSCamelyon" else "region"
    expected = list(range(len(spec.environments)))
    if sorted(by_value) != expected:
        raise data_error(
            spec,
            data_dir,
            f"Its metadata has images of the {field} value(s) {sorted(by_value)}; {spec.name} has one domain for "
            f"each of {expected} ({', '.join(spec.environments)}), each with images.",
        )
    domains = [by_value[value] for value in expected]
    # One file per domain, cheaply: a tree laid out otherwise is a layout error, not one broken file per sample.
    for name, samples in zip(spec.environments, domains):
        if not Path(samples[0][0]).is_file():
            raise data_error(spec, data_dir, f"The first image of domain {name}, {samples[0][0]}, is missing.")
    return domains


def count_wilds_images(spec: DatasetSpec, data_dir: Path) -> list[int]:
    """The number of each domain's files that exist (its metadata lists them all): a tree's completeness,
    which the metadata's counts alone do not show (``fishr-download --check``)."""
    return [sum(os.path.isfile(path) for path, _ in samples) for samples in wilds_domains(spec, data_dir)]
