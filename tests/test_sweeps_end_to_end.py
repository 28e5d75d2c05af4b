"""The tiny sweep, end to end: `python train.py -m +sweep=tiny`, `fishr-collect` on it, and a re-launch.

2 algorithms x 2 hyperparameter draws x 2 trials on the embedded synthetic dataset, a few steps each.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

from fishr_lightning.app.reporting import collect

REPOSITORY = Path(__file__).resolve().parents[1]
# Small enough for CPU tests; these overrides become part of every run directory's name.
FAST_OVERRIDES = ["steps=4", "checkpoint_freq=2", "backbone.width=32", "trainer.enable_progress_bar=false"]
RUN_NAMES = sorted(
    f"algorithm={algorithm},backbone.width=32,checkpoint_freq=2,dataset=synthetic,hparams_seed={hparams_seed},"
    f"steps=4,test_envs=[0],trial_seed={trial_seed}"
    for algorithm in ("erm", "fishr")
    for hparams_seed in (0, 1)
    for trial_seed in (0, 1)
)


def launch_tiny_sweep(sweep_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "train.py", "-m", "+sweep=tiny", f"hydra.sweep.dir={sweep_dir}", *FAST_OVERRIDES]
    completed = subprocess.run(command, check=False, cwd=REPOSITORY, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return completed


def relaunch_tiny_sweep_in_this_process(monkeypatch, capsys, sweep_dir: Path) -> str:
    """The same command line as launch_tiny_sweep, run by the app's main() in this process (what re-launching
    checks needs no new interpreter importing Lightning, about 5 s of the suite); its standard output."""
    from hydra.core.global_hydra import GlobalHydra

    from fishr_lightning.app.training.run import main

    command = ["train.py", "-m", "+sweep=tiny", f"hydra.sweep.dir={sweep_dir}", *FAST_OVERRIDES]
    monkeypatch.setattr(sys, "argv", command)
    monkeypatch.chdir(REPOSITORY)
    capsys.readouterr()
    GlobalHydra.instance().clear()
    try:
        main()
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr()
    finally:
        GlobalHydra.instance().clear()
    return capsys.readouterr().out


def oracle_cell_by_hand(sweep_dir: Path, algorithm: str) -> str:
    """Test-domain validation written out independently: per trial, the run whose last checkpoint has
    the best env0 out accuracy (ties: larger hparams_seed) gives its env0 in accuracy."""
    chosen = []
    for trial_seed in (0, 1):
        candidates = []
        for hparams_seed in (0, 1):
            name = next(
                n
                for n in RUN_NAMES
                if f"algorithm={algorithm}," in n
                and f"hparams_seed={hparams_seed}," in n
                and n.endswith(f"trial_seed={trial_seed}")
            )
            last = [json.loads(line) for line in (sweep_dir / name / "results.jsonl").read_text().splitlines()][-1]
            candidates.append((last["env0_out_acc"], hparams_seed, last["env0_in_acc"]))
        chosen.append(max(candidates)[2])
    mean = (chosen[0] + chosen[1]) / 2
    standard_error = abs(chosen[0] - chosen[1]) / 2 / math.sqrt(2)
    return f"{100 * mean:.1f} ± {100 * standard_error:.1f}"


# Lines a run of the tiny sweep may print (issue 30; 31.6 before it): Hydra's job line, the first and last lines
# naming the run directory, DomainBed's table (a header and 3 records), the progress line, the test-domain
# accuracy, the sweep's fishr-collect command, and a warning for a Fishr run whose warm-up outlasts steps=4.
LINES_PER_RUN = 11
# Said once per sweep: Hydra's "Launching 8 jobs", Lightning's device lines (2) and model summary (14 lines).
LINES_PER_SWEEP = 17


def assert_quiet_sweep_output(completed: subprocess.CompletedProcess, sweep_dir: Path) -> None:
    """Issue 30: one line per finished run plus its table; what every run would repeat, said once or never."""
    lines = (completed.stdout + completed.stderr).splitlines()
    assert len(lines) <= LINES_PER_RUN * len(RUN_NAMES) + LINES_PER_SWEEP, "\n".join(lines)
    for run_name in RUN_NAMES:  # each run's closing lines: the sweep's fishr-collect command, then its directory
        last = lines.index(f"fishr-train: run directory {sweep_dir / run_name} (finished)")
        assert lines[last - 1] == f"The sweep's tables, once all its runs have finished: fishr-collect {sweep_dir}"
    assert "+sweep=tiny, then fishr-collect sweeps/tiny" not in completed.stdout  # the single run's hint
    assert completed.stderr.count("GPU available:") == 1 and completed.stderr.count("Total params") == 1
    assert "reached." not in completed.stderr and "mem_gb" not in completed.stdout  # no CUDA: not measured
    warnings = [line for line in lines if "warning" in line.lower()]
    assert len(warnings) == 4 and all(line.startswith("warning: Fishr's warm-up, hparams.") for line in warnings)


def test_tiny_sweep_collect_and_relaunch(tmp_path, capsys, monkeypatch):
    sweep_dir = tmp_path / "sweeps" / "tiny"
    assert_quiet_sweep_output(launch_tiny_sweep(sweep_dir), sweep_dir)

    # Deterministic run directories, named by each run's overrides, every one finished.
    run_dirs = sorted(path for path in sweep_dir.iterdir() if path.is_dir())
    assert [path.name for path in run_dirs] == RUN_NAMES
    for run_dir in run_dirs:
        assert (run_dir / "done").exists()
        records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
        assert [record["step"] for record in records] == [0, 2, 3]
        assert records[0]["args"]["dataset"] == "Synthetic" and records[0]["args"]["test_envs"] == [0]
        # DomainBed's sweep.py seed, md5 of (dataset, algorithm, test_envs, hparams_seed, trial_seed), written out.
        args = records[0]["args"]
        key = str(("Synthetic", args["algorithm"], [0], args["hparams_seed"], args["trial_seed"]))
        assert args["seed"] == int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % (2**31)

    assert collect.main([str(sweep_dir), "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    print(out, file=sys.stderr)  # the table, for whoever reads the test log
    assert "Complete runs: 8 (24 records)." in out and "Incomplete" not in out
    header = "| Algorithm | -90% | +90% | +80% | Avg |"
    cell = r"\d+\.\d ± \d+\.\d"
    for heading in ("training-domain validation set", "test-domain validation set (oracle)"):
        section = out[out.index(f"## Model selection: {heading}") :]
        assert header in section
        for algorithm in ("ERM", "Fishr"):
            assert re.search(rf"\| {algorithm} \| {cell} \| X \| X \| X \|", section), section
    oracle = out[out.index("## Model selection: test-domain validation set (oracle)") :]
    for algorithm in ("ERM", "Fishr"):
        assert f"| {algorithm} | {oracle_cell_by_hand(sweep_dir, algorithm.lower())} | X | X | X |" in oracle
    assert len(list((tmp_path / "plots" / "runs").glob("*.png"))) == 8

    # Re-launch with one `done` marker removed: the 7 finished runs are skipped, the other is trained again.
    unfinished = run_dirs[5]
    (unfinished / "done").unlink()
    results_before = {run_dir: (run_dir / "results.jsonl").read_text() for run_dir in run_dirs if run_dir != unfinished}
    relaunched = relaunch_tiny_sweep_in_this_process(monkeypatch, capsys, sweep_dir)
    assert relaunched.count("holds a finished run (done); skipping it") == 7
    assert (unfinished / "done").exists()
    assert [json.loads(line)["step"] for line in (unfinished / "results.jsonl").read_text().splitlines()] == [0, 2, 3]
    assert results_before == {run_dir: (run_dir / "results.jsonl").read_text() for run_dir in results_before}


def test_the_tiny_paper_sweep_trains_the_papers_algorithms_and_prints_its_table_3(tmp_path, capsys, monkeypatch):
    """`python train.py -m +sweep=tiny_paper`, shortened (issue 26): every algorithm of the paper's table but ARM
    (images only) trains in this process, and `fishr-collect --layout paper` prints Table 3's rows in its order."""
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from fishr_lightning.app.reporting import collect
    from fishr_lightning.app.training.run import main
    from fishr_lightning.domainbed.names import PAPER_TABLE_ROWS

    sweep_dir = tmp_path / "tiny_paper"
    command = ["train.py", "-m", "+sweep=tiny_paper", "steps=2", "checkpoint_freq=1", "backbone.width=16"]
    command += ["batch_size=8", "dataset.samples_per_domain=100", "trainer.enable_progress_bar=false"]
    monkeypatch.setattr(sys, "argv", [*command, f"hydra.sweep.dir={sweep_dir}"])
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    GlobalHydra.instance().clear()
    try:
        main()
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr()
    finally:
        GlobalHydra.instance().clear()
    capsys.readouterr()
    assert len([run for run in sweep_dir.iterdir() if (run / "done").exists()]) == len(PAPER_TABLE_ROWS) - 1
    assert collect.main([str(sweep_dir), "--layout", "paper"]) == 0
    table = capsys.readouterr().out.split("## Model selection: training-domain validation set")[1]
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    rows = [line.split(" | ")[0].removeprefix("| ") for line in lines][1:]  # after the header
    assert rows[: len(PAPER_TABLE_ROWS) - 1] == [label for name, label in PAPER_TABLE_ROWS if name != "ARM"]
