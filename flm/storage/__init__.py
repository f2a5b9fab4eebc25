"""SQLite storage: the two databases and their repositories."""

from __future__ import annotations

from flm.core.paths import Paths, ensure_private_dir
from flm.storage.db import Database


class Storage:
    """The two databases of one FLM home, opened lazily (a command touching only settings never
    opens ``security.db``)."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self._config: Database | None = None
        self._security: Database | None = None

    @property
    def config(self) -> Database:
        if self._config is None:
            ensure_private_dir(self.paths.home)
            self._config = Database(self.paths.config_db, "config").open()
        return self._config

    @property
    def security(self) -> Database:
        if self._security is None:
            ensure_private_dir(self.paths.home)
            self._security = Database(self.paths.security_db, "security").open()
        return self._security

    def opened(self) -> list[Database]:
        return [db for db in (self._config, self._security) if db is not None]

    def close(self) -> None:
        for db in self.opened():
            db.close()
        self._config = None
        self._security = None
