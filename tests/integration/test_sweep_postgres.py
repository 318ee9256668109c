"""Two sweep workers share one study through a real PostgreSQL server: each grid point is
trained exactly once.

The server: $BATCHSCOPE_TEST_POSTGRES_URL when CI started one (`eval "$(.ci/postgres.sh
start)"`); otherwise this module starts its own with the same script when PostgreSQL's server
binaries are installed, and stops it afterwards. Skipped, saying why, only when neither works.
"""

from __future__ import annotations

import gc
import glob
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / ".ci" / "postgres.sh"
URL_ENV = "BATCHSCOPE_TEST_POSTGRES_URL"


def _server_binaries() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return found[-1] if found else shutil.which("initdb")


@pytest.fixture(scope="module")
def postgres_url():
    if os.environ.get(URL_ENV):
        yield os.environ[URL_ENV]
        return
    pytest.importorskip("psycopg2", reason="PostgreSQL tests need psycopg2 (pip install batchscope[postgres])")
    if _server_binaries() is None:
        pytest.skip(f"no PostgreSQL server: {URL_ENV} is unset and no initdb is installed "
                    f"(apt-get install postgresql, or start one with .ci/postgres.sh start)")
    started = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True)
    if started.returncode != 0:
        pytest.skip(f"could not start PostgreSQL with {SCRIPT.name}: {started.stderr.strip()[-300:]}")
    exports = dict(
        line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines()
        if line.startswith("export ")
    )
    exports = {key: value.strip("'") for key, value in exports.items()}
    try:
        yield exports[URL_ENV]
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", exports["BATCHSCOPE_PG_DIR"]], check=False)


CLI = "import typer; from batchscope.cli.sweep_cmd import command; typer.run(command)"


def _worker(url: str, study: str, out: Path) -> subprocess.Popen:
    args = [
        sys.executable, "-c", CLI, "-w", "small-cnn-cifar10", "-o", "train_size=512",
        "-o", "test_size=128", "-b", "32,128", "--lr-rule", "linear,sqrt", "--epochs", "1",
        "--evals-per-epoch", "1", "--no-pruning", "--storage", url, "--study", study,
        "--out", str(out), "--device", "cpu", "--json", "--no-report",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_workers_share_one_study_and_run_each_point_exactly_once(postgres_url, tmp_path):
    import optuna

    from batchscope.sweep import bookkeeping as books
    from batchscope.sweep.optuna_backend import close_storage, open_storage

    study = f"shared-{uuid.uuid4().hex[:8]}"
    workers = [_worker(postgres_url, study, tmp_path / f"worker{i}") for i in range(2)]
    outputs = [worker.communicate(timeout=240) for worker in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-2000:]
    password = urlparse(postgres_url).password
    if password:  # the JSON and the logs name the storage, never its password
        assert all(password not in out + err for out, err in outputs)

    storage = open_storage(postgres_url, tmp_path)
    try:
        trials = optuna.load_study(study_name=study, storage=storage).trials
    finally:
        close_storage(storage)
    trained: dict[str, int] = {}
    for trial in trials:
        if trial.user_attrs.get(books.RECORD) is not None:  # only a trained trial has a record
            trained[books.trial_key(trial)] = trained.get(books.trial_key(trial), 0) + 1
        else:
            assert books.outcome_of(trial) == books.DUPLICATE  # a claim given up, never trained
    # Neither batch is the workload's reference (64), so each rule is its own point: 4 in all.
    keys = {f"b{b}-{rule}" for b in (32, 128) for rule in ("linear", "sqrt")}
    assert trained == {key: 1 for key in keys}
    complete = [books.trial_key(t) for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(complete) == sorted(keys)


FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "sweep"  # sweep_fixtures.py


def test_a_finished_sweep_leaves_no_connection_open(postgres_url, tmp_path, monkeypatch):
    import sqlalchemy

    from batchscope.sweep import sweep
    from batchscope.sweep.optuna_backend import with_installed_driver

    monkeypatch.syspath_prepend(str(FIXTURES))
    from sweep_fixtures import tiny_workload

    # A pool-less engine, so the probe itself holds no connection between queries.
    probe = sqlalchemy.create_engine(with_installed_driver(postgres_url), poolclass=sqlalchemy.pool.NullPool)
    query = sqlalchemy.text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )

    def open_connections() -> int:
        with probe.connect() as connection:
            return int(connection.execute(query).scalar_one())

    gc.collect()  # engines other code left for the garbage collector close their pools now
    before = open_connections()
    result = sweep(tiny_workload(), [16, 32], epochs=1, storage=postgres_url,
                   study_name=f"closed-{uuid.uuid4().hex[:8]}", out_dir=tmp_path, pruning=False,
                   report=False)
    assert [t.outcome for t in result.trials] == ["complete", "complete"]
    assert open_connections() == before
    probe.dispose()
