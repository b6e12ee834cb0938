"""The cluster backend (`--backend submitit`): submitit's local executor runs real jobs (subprocesses) on this
machine; fake `srun`/`sbatch`/`sacct` commands check what would reach SLURM."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

from experiments import sweep

pytest.importorskip("submitit")

SMOKE = ["--profile", "smoke", "--no-tuned", "--no-progress", "--no-estimate"]
CLUSTER = ["--backend", "submitit", "--cluster-executor", "local", "--device", "cpu", "--cluster-poll", "0.5"]


def _sweep_file(tmp_path: Path) -> Path:
    """Two smoke runs; the second reads its tokenizer from a folder that exists only once the test writes it."""
    path = tmp_path / "cluster_check.yaml"
    path.write_text(
        "name: cluster_check\n"
        "fractions: [0.02]\n"
        "seeds: [0]\n"
        "variants:\n"
        "  - {label: plain, method: lora}\n"
        f"  - {{label: own_tokenizer, method: lora, set: {{model.tokenizer: '{tmp_path / 'tokenizer'}'}}}}\n"
    )
    return path


def _results(folder: Path) -> dict[str, dict]:
    from doran.results import read_json, result_files, run_id_of_file

    return {run_id_of_file(p): read_json(p) for p in result_files(folder)}


def _signal_job(logs: Path, sig: int, ready, timeout: float = 240.0) -> threading.Thread:
    """A thread that sends ``sig`` to the process of the first local job under ``logs`` once ``ready(stdout)``
    holds (the job's process is the child of submitit's controller, whose pid is the job id)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for out in logs.glob("*/*_0_log.out"):
                if ready(out.read_text(errors="replace")):
                    controller = out.parent.name
                    children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
                    for pid in children:
                        os.kill(int(pid), sig)
                    return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_jobs_write_the_local_results_record_failures_and_are_not_submitted_twice(tmp_path, capsys):
    spec = str(_sweep_file(tmp_path))
    folder = tmp_path / "cluster" / "smoke" / "cluster_check"
    args = [spec, *SMOKE, "--results", str(tmp_path / "cluster"), *CLUSTER]

    # 1. two jobs at once: `plain` completes, `own_tokenizer` raises in its job (no tokenizer folder yet)
    assert sweep.main(args) == 1
    printed = capsys.readouterr().out
    assert "submitted 2 jobs to local" in printed and "1 completed" in printed and "1 errors" in printed
    [error] = folder.glob("*.error.json")
    record = json.loads(error.read_text())
    assert record["attempts"] == 1 and "tokenizer" in (record["message"] + record["traceback"]).lower()
    assert len(_results(folder)) == 1

    # 2. the cause fixed, the same command resubmits the failed run only
    from transformers import AutoTokenizer

    from doran.assets import minilm_path

    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path / "tokenizer")
    assert sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert "submitted 1 jobs to local" in printed and "1 already finished" in printed
    assert not list(folder.glob("*.error.json"))

    # 3. everything finished: nothing is submitted
    jobs_before = sorted((folder / "logs" / "submitit").iterdir())
    assert sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert "submitted" not in printed and "2 already finished" in printed
    assert sorted((folder / "logs" / "submitit").iterdir()) == jobs_before

    # one result file per point, the same as the local runner's
    assert sweep.main([spec, *SMOKE, "--results", str(tmp_path / "local")]) == 0
    cluster, local = _results(folder), _results(tmp_path / "local" / "smoke" / "cluster_check")
    assert sorted(cluster) == sorted(local) and len(cluster) == 2
    for run_id, result in cluster.items():
        assert result["status"] == "completed"
        assert {**result["config"], "out": None} == {**local[run_id]["config"], "out": None}
        assert result["metrics"]["test/acc"] == local[run_id]["metrics"]["test/acc"]
        for key, value in local[run_id]["metrics"].items():
            assert result["metrics"][key] == pytest.approx(value, rel=1e-5), key
    manifest = json.loads((folder / "sweep.json").read_text())
    assert sorted(e["run_id"] for e in manifest["entries"].values()) == sorted(cluster)

    # 4. another sweep with the same run: its (compressed) result is copied, no job is submitted
    other = tmp_path / "cluster_copy.yaml"
    other.write_text(spec_text := Path(spec).read_text().replace("cluster_check", "cluster_copy"))
    other.write_text(spec_text.split("  - {label: own_tokenizer")[0])
    assert sweep.main([str(other), *SMOKE, "--results", str(tmp_path / "cluster"), *CLUSTER]) == 0
    printed = capsys.readouterr().out
    assert "submitted" not in printed and "1 reused from other sweeps" in printed
    copied = _results(tmp_path / "cluster" / "smoke" / "cluster_copy")
    assert len(copied) == 1 and copied == {k: v for k, v in cluster.items() if k in copied}


def test_a_killed_job_is_recorded_as_an_error(tmp_path, capsys):
    spec = str(_sweep_file(tmp_path))
    folder = tmp_path / "smoke" / "cluster_check"
    killer = _signal_job(folder / "logs" / "submitit", signal.SIGKILL, lambda out: "[cluster]" in out)
    assert sweep.main([spec, *SMOKE, "--results", str(tmp_path), *CLUSTER, "--variants", "plain"]) == 1
    killer.join(1)
    [error] = folder.glob("*.error.json")
    record = json.loads(error.read_text())
    assert "ended without a result" in record["message"] and record["attempts"] == 1
    assert record["run_id"] in record["log_tail"]  # the job's own log, read from submitit's folder
    assert not _results(folder)
    assert "1 errors (retried next time)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_requeued_job_resumes_its_run_from_the_checkpoint(tmp_path):
    """SIGUSR2 (what SLURM sends before the time limit, or on preemption): submitit requeues the job, the run
    resumes from its last checkpoint and ends with the metrics of an uninterrupted run."""
    spec = str(_sweep_file(tmp_path))
    longer = ["--variants", "plain", "--set", "train.min_steps=120", "runtime.ckpt_every_n_steps=2"]
    folder = tmp_path / "cluster" / "smoke" / "cluster_check"
    signaller = _signal_job(folder / "logs" / "submitit", signal.SIGUSR2,
                            lambda out: bool(list(folder.glob("*/checkpoints/last.ckpt"))))
    assert sweep.main([spec, *SMOKE, *longer, "--results", str(tmp_path / "cluster"), *CLUSTER]) == 0
    signaller.join(1)
    [result] = _results(folder).values()
    assert result["resumed_from_step"] and result["resumed_from_step"] > 0
    [log] = (folder / "logs" / "submitit").glob("*/*_0_log.out")
    assert "stopped for a requeue" in log.read_text()
    assert sweep.main([spec, *SMOKE, *longer, "--results", str(tmp_path / "local")]) == 0
    [local] = _results(tmp_path / "local" / "smoke" / "cluster_check").values()
    assert result["metrics"]["test/acc"] == local["metrics"]["test/acc"]
    assert result["metrics"]["test/loss"] == pytest.approx(local["metrics"]["test/loss"], rel=1e-4)


# ----------------------------------------------------------------------------------------------- SLURM
def _fake_slurm(bin_dir: Path) -> Path:
    """`srun`, `sbatch` (keeps each batch file, answers job 4242, 4243, ...), `sacct` (states from the file
    `states`; without it, a cluster without accounting) and `squeue` (states from the file `queue`)."""
    bin_dir.mkdir()
    scripts = {
        "srun": "#!/bin/sh\nexit 0\n",
        "sbatch": (
            f"#!/bin/sh\nn=$(ls {bin_dir}/batch-*.sh 2>/dev/null | wc -l)\n"
            f'cp "$1" {bin_dir}/batch-$n.sh\necho "Submitted batch job $((4242 + n))"\n'
        ),
        "sacct": (
            f"#!/bin/sh\n[ -f {bin_dir}/states ] || {{ echo 'Slurm accounting storage is disabled' >&2; exit 1; }}\n"
            f"echo 'JobID|State|NodeList'\ncat {bin_dir}/states\n"
        ),
        "squeue": (  # squeue --noheader --states=all --jobs ID --format=%T
            f'#!/bin/sh\nfor a; do [ "$prev" = --jobs ] && id="$a"; prev="$a"; done\n'
            f'line=$(grep "^$id " {bin_dir}/queue) || {{ echo "Invalid job id specified" >&2; exit 1; }}\n'
            f'echo "${{line#* }}"\n'
        ),
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


def test_slurm_gets_one_array_and_a_dead_job_is_recorded_and_resubmitted(tmp_path, monkeypatch, capsys):
    fake = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    (fake / "states").write_text("4242_0|RUNNING|node1\n4242_1|PENDING|\n")
    folder = tmp_path / "smoke" / "cluster_check"
    args = [str(_sweep_file(tmp_path)), *SMOKE, "--results", str(tmp_path), "--backend", "submitit",
            "--cluster-partition", "gpu", "--cluster-time", "30", "--cluster-max-jobs", "1",
            "--cluster-set", "slurm_account=lab", "--cluster-no-wait"]

    assert sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert "submitted 2 jobs to slurm (4242_[0-1])" in printed and "not waited for" in printed
    batch = (fake / "batch-0.sh").read_text()
    for flag in ("--array=0-1%1", "--partition=gpu", "--gpus-per-node=1", "--time=30", "--account=lab",
                 "--signal=USR2@90", "--job-name=doran-cluster_check", "--ntasks-per-node=1"):
        assert f"#SBATCH {flag}\n" in batch, flag
    assert f"srun --unbuffered --output {folder}/logs/submitit/%A_%a/" in batch
    assert sys.executable in batch and "submitit.core._submit" in batch
    records = sorted((folder / "logs" / "jobs").glob("*.json"))
    assert sorted(json.loads(r.read_text())["job_id"] for r in records) == ["4242_0", "4242_1"]

    # queued and running jobs are not submitted twice
    assert sweep.main(args) == 0
    assert "2 jobs of an earlier invocation are still queued or running" in capsys.readouterr().out
    assert not (fake / "batch-1.sh").exists()

    # one was killed for its memory, the other cancelled: both recorded, with the log tail, and resubmitted
    (fake / "states").write_text("4242_0|OUT_OF_MEMORY|node1\n4242_1|CANCELLED by 0|\n")
    for record in records:
        stderr = Path(json.loads(record.read_text())["stderr"])
        stderr.parent.mkdir(parents=True, exist_ok=True)
        stderr.write_text("slurmstepd: error: Detected 1 oom_kill event\n")
    assert sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert "2 jobs of an earlier invocation failed" in printed
    assert "submitted 2 jobs to slurm (4243_[0-1])" in printed
    errors = [json.loads(p.read_text()) for p in sorted(folder.glob("*.error.json"))]
    assert len(errors) == 2 and all("oom_kill" in e["log_tail"] for e in errors)
    assert {e["message"].split("(state ")[1].split(")")[0] for e in errors} == {"OUT_OF_MEMORY", "CANCELLED"}

    # without accounting (sacct says nothing), squeue tells: a job it no longer knows has ended
    (fake / "states").unlink()
    (fake / "queue").write_text("4243_1 RUNNING\n")
    assert sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert "1 jobs of an earlier invocation are still queued or running" in printed
    assert "1 jobs of an earlier invocation failed" in printed and "submitted 1 jobs to slurm (4244)" in printed
    attempts = sorted(json.loads(p.read_text())["attempts"] for p in folder.glob("*.error.json"))
    assert attempts == [1, 2]


# ----------------------------------------------------------------------------------------------- PostgreSQL
def _postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl), or None."""
    import shutil

    found = shutil.which("pg_ctl")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)  # Debian's layout
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "pg_ctl").is_file()), None)


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL server on a Unix socket (as the `postgres` user when the tests run as root):
    ``(url with a password, socket folder)``; database `tune`, trust authentication."""
    import shutil
    import subprocess
    import tempfile

    pg_bin = _postgres_bin()
    if pg_bin is None:
        pytest.skip("PostgreSQL's server programs are not installed (apt-get install postgresql)")
    psycopg = pytest.importorskip("psycopg", reason="SQLAlchemy's PostgreSQL driver: pip install 'psycopg[binary]'")
    root = Path(tempfile.mkdtemp(prefix="doran-pg-"))  # not under pytest's folder: the server's user reads it
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a `postgres` user to run the server")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", str(15432 + os.getpid() % 1000)
    subprocess.run([*as_user, str(pg_bin / "initdb"), "-D", str(data), "-U", "doran", "--auth=trust",
                    "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*as_user, str(pg_bin / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "server.log"),
                    "-o", f"-k {root} -p {port} -c listen_addresses=''", "start"], check=True, capture_output=True)
    try:
        with psycopg.connect(dbname="postgres", user="doran", host=str(root), port=port, autocommit=True) as conn:
            conn.execute("CREATE DATABASE tune")
        yield f"postgresql://doran:not-a-secret@/tune?host={root}&port={port}", root
    finally:
        subprocess.run([*as_user, str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_tune_processes_share_one_postgresql_study(postgres, tmp_path):
    import subprocess

    import optuna
    import yaml

    url, _ = postgres
    # an empty database gets Optuna's tables once, before several machines start (docs/cluster.md)
    subprocess.run([sys.executable, "-c", "import sys, optuna; optuna.storages.RDBStorage(sys.argv[1])", url],
                   check=True, capture_output=True)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "experiments.tune", "--profile", "smoke", "--methods", "lora", "--trials", "4",
             "--storage", url, "--results", str(tmp_path / machine), "--tuned-dir", str(tmp_path / "tuned")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for machine in ("a", "b")
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = optuna.load_study(study_name="smoke-lora", storage=url)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert len(study.get_trials(states=states)) >= 4
    for machine in ("a", "b"):  # each process ran trials of the one study
        assert list((tmp_path / machine / "smoke" / "tune" / "lora").glob("lora-*.json")), outputs
    tuned = (tmp_path / "tuned" / "smoke" / "lora.yaml").read_text()
    doc = yaml.safe_load(tuned)
    assert doc["trials"]["complete"] + doc["trials"]["pruned"] >= 4 and doc["study"] == "smoke-lora"
    assert doc["storage"].startswith("postgresql://") and "not-a-secret" not in tuned and "doran@" not in tuned
