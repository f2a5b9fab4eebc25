"""The composition root: one object that knows the paths and opens what a command needs."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from flm.core.paths import Paths
from flm.storage import Storage

if TYPE_CHECKING:
    from flm.services.api_keys import KeyService
    from flm.services.engines import EngineService
    from flm.services.policy import PolicyService
    from flm.services.settings import ConfigService


class Context:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.storage = Storage(paths)

    @cached_property
    def config(self) -> ConfigService:
        from flm.services.settings import ConfigService

        return ConfigService(self.storage)

    @cached_property
    def keys(self) -> KeyService:
        from flm.services.api_keys import KeyService

        return KeyService(self.storage)

    @cached_property
    def policy(self) -> PolicyService:
        from flm.services.policy import PolicyService

        return PolicyService(self.storage)

    @cached_property
    def engines(self) -> EngineService:
        from flm.services.engines import EngineService

        return EngineService(self.storage, self.config)

    def close(self) -> None:
        self.storage.close()
