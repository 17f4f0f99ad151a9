"""Optuna storages for the search: opened by URL (a database, or a journal file), retried while workers that
start together race to create the tables, and remembering the trials this worker started."""
from __future__ import annotations

import random
import time

import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from fmnist.errors import ConfigError


class Remembering:
    """A storage that remembers the trials this worker started: new ones, and queued ones it took. A Ctrl-C between
    a trial's creation and its objective leaves the trial RUNNING, which Optuna does not fail; tune fails these."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started: set[int] = set()

    def _created(self, trial_id: int, template_trial) -> None:
        if template_trial is None or template_trial.state == TrialState.RUNNING:  # not queued for anyone
            self.started.add(trial_id)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        if changed and state == TrialState.RUNNING:
            self.started.add(trial_id)
        return changed


class RememberingRDBStorage(Remembering, RDBStorage):
    def _create_new_trial(self, study_id: int, template_trial=None):  # Optuna's cache calls this, not the public one
        trial = super()._create_new_trial(study_id, template_trial)
        self._created(trial._trial_id, template_trial)
        return trial


class RememberingJournalStorage(Remembering, JournalStorage):
    def create_new_trial(self, study_id: int, template_trial=None) -> int:
        trial_id = super().create_new_trial(study_id, template_trial)
        self._created(trial_id, template_trial)
        return trial_id


def open_storage(url: str, heartbeat: int, on_stale=None) -> Remembering:
    """`on_stale(study, trial)` is called for a trial whose worker stopped sending heartbeats (databases only)."""
    return retry(lambda: _open_storage(url, heartbeat, on_stale), f"tune.storage={redacted(url)}")


def _open_storage(url: str, heartbeat: int, on_stale) -> Remembering:
    if url.endswith(".log"):  # a journal file: many processes on one file system; no heartbeat there
        return RememberingJournalStorage(JournalFileBackend(url))
    try:
        return RememberingRDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                                     heartbeat_stale_trial_callback=on_stale)
    except sqlalchemy.exc.ArgumentError as e:
        raise ConfigError(f"tune.storage={url}: not a database URL or a journal file *.log ({e})") from None
    except ImportError:
        raise ConfigError(f"tune.storage={redacted(url)}: the database driver is not installed (psycopg[binary] "
                          "for postgresql://, pymysql for mysql+pymysql://)") from None


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

