"""DomainBed's algorithm names and the orders its tables and the Fishr paper print them in; no torch
(``fishr-collect`` orders its rows with them and imports no torch)."""

from __future__ import annotations

# DomainBed's ``algorithms.ALGORITHMS``, in its order: its collect_results.py prints rows in this order.
DOMAINBED_ALGORITHMS = (
    "ERM", "ERMPlusPlus", "Fish", "IRM", "GroupDRO", "Mixup", "MLDG", "CORAL", "MMD", "DANN", "CDANN", "MTL",
    "SagNet", "ARM", "VREx", "RSC", "SD", "ANDMask", "SANDMask", "IGA", "SelfReg", "Fishr", "TRM", "IB_ERM",
    "IB_IRM", "CAD", "CondCAD", "Transfer", "CausIRL_CORAL", "CausIRL_MMD", "EQRM", "RDM", "ADRMX", "URM",
)  # fmt: skip

# The rows of the Fishr paper's Tables 3-4 (Rame, Dancette & Cord, ICML 2022; DomainBed's README order of
# the time), each DomainBed's name and the paper's label.
PAPER_TABLE_ROWS = (
    ("ERM", "ERM"), ("IRM", "IRM"), ("GroupDRO", "GroupDRO"), ("Mixup", "Mixup"), ("MLDG", "MLDG"),
    ("CORAL", "CORAL"), ("MMD", "MMD"), ("DANN", "DANN"), ("CDANN", "CDANN"), ("MTL", "MTL"),
    ("SagNet", "SagNet"), ("ARM", "ARM"), ("VREx", "VREx"), ("RSC", "RSC"), ("ANDMask", "AND-mask"),
    ("SANDMask", "SAND-mask"), ("IGA", "IGA"), ("SelfReg", "SelfReg"), ("Fish", "Fish"), ("Fishr", "Fishr"),
)  # fmt: skip

# The paper's datasets, in its columns' order (DomainBed's names).
PAPER_DATASETS = ("ColoredMNIST", "RotatedMNIST", "VLCS", "PACS", "OfficeHome", "TerraIncognita", "DomainNet")
