"""Optuna storages for the search: opened by URL (a database, or a journal file), retried while workers that
start together race to create the tables."""
from __future__ import annotations

import random
import time
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from fmnist.data import file_lock
from fmnist.errors import ConfigError


def open_storage(url: str, heartbeat: int, on_stale=None) -> optuna.storages.BaseStorage:
    """`on_stale(study, trial)` is called for a trial whose worker stopped sending heartbeats (databases only)."""
    return retry(lambda: _open_storage(url, heartbeat, on_stale), f"tune.storage={redacted(url)}")


def _open_storage(url: str, heartbeat: int, on_stale) -> optuna.storages.BaseStorage:
    if url.endswith(".log"):  # a journal file: many processes on one file system; no heartbeat there
        return JournalStorage(JournalFileBackend(url))
    try:
        database = sqlalchemy.engine.make_url(url).database if url.startswith("sqlite") else None
        kind = SQLiteStorage if database and database != ":memory:" else RDBStorage
        return kind(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                    heartbeat_stale_trial_callback=on_stale)
    except sqlalchemy.exc.ArgumentError as e:
        raise ConfigError(f"tune.storage={url}: not a database URL or a journal file *.log ({e})") from None
    except ImportError:
        raise ConfigError(f"tune.storage={redacted(url)}: the database driver is not installed (psycopg[binary] "
                          "for postgresql://, pymysql for mysql+pymysql://)") from None


class SQLiteStorage(RDBStorage):
    """Optuna's database storage with one race closed for SQLite files: starting a queued trial (the defaults, a
    stale trial's retry). Optuna reads the trial's state, then writes RUNNING, relying on a row lock that SQLite
    does not take, so two workers, or two threads of one (tune.n_jobs), could both start the same trial; the
    second to finish it then crashed telling a finished trial (UpdateFinishedTrialError). A file lock on the
    database makes the read and the write one step. PostgreSQL and MySQL lock the row themselves."""

    def __init__(self, url: str, **kwargs):
        super().__init__(url, **kwargs)
        self.database = Path(sqlalchemy.engine.make_url(url).database).resolve()  # resolved once, against the cwd

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        if state != TrialState.RUNNING:
            return super().set_trial_state_values(trial_id, state, values)
        with file_lock(self.database):  # a lock object per call: a storage may be pickled, a lock may not
            return super().set_trial_state_values(trial_id, state, values)


def redacted(url: str) -> str:
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url  # a journal file path


def retry(make, what: str, attempts: int = 6):
    """Workers that start together race to create tables and the study; the losers try again shortly after."""
    for attempt in range(attempts):
        try:
            return make()
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            if attempt == attempts - 1:
                raise ConfigError(f"{what}: {str(e).splitlines()[0]}") from None
            time.sleep(0.2 * 2 ** attempt + random.random() * 0.2)
    raise AssertionError("unreachable")
