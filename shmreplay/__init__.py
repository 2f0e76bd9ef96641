"""shmreplay: experience replay for reinforcement learning on one host, over POSIX shared memory.

Start a daemon with ``shmreplay serve --tables tables.toml``, then in any local process::

    import shmreplay
    client = shmreplay.attach("default")
    table = client.table("replay")
    key = table.insert({"obs": obs, "action": 3, "reward": 1.0}, priority=1.0)
    batch = table.sample(256)          # batch.data["obs"].shape == (256, *obs.shape)
    table.update_priorities(batch.info.key, new_priorities)
"""

from .client import Client, ReservedSlot, Table, attach
from .client.adders import NStepTransitionAdder
from .client.trajectory import TrajectoryWriter
from .config import (
    Config,
    FieldSpec,
    RateLimiterSpec,
    SelectorSpec,
    ServerSpec,
    TableSpec,
    load_config,
)
from .daemon.server import Server, ServerStartError
from .engine.table import Sample, SampleInfo, TableInfo
from .errors import (
    CheckpointError,
    ClientClosedError,
    ConfigError,
    DaemonAlreadyRunning,
    DaemonBusy,
    DaemonNotRunning,
    FormatVersionError,
    InsufficientSharedMemory,
    InvalidArgumentError,
    LockTimeout,
    MissingDependencyError,
    NotSupportedError,
    PermissionDenied,
    RateLimiterTimeout,
    SegmentError,
    ShmReplayError,
    SignatureError,
    TableNotFoundError,
    TooManyOpenFiles,
)

__version__ = "0.1.0"

__all__ = [
    "attach",
    "Server",
    "Client",
    "Table",
    "ReservedSlot",
    "TrajectoryWriter",
    "NStepTransitionAdder",
    "Sample",
    "SampleInfo",
    "TableInfo",
    "Config",
    "ServerSpec",
    "TableSpec",
    "FieldSpec",
    "SelectorSpec",
    "RateLimiterSpec",
    "load_config",
    "ShmReplayError",
    "ConfigError",
    "SignatureError",
    "InvalidArgumentError",
    "TableNotFoundError",
    "RateLimiterTimeout",
    "LockTimeout",
    "DaemonNotRunning",
    "DaemonBusy",
    "DaemonAlreadyRunning",
    "ClientClosedError",
    "SegmentError",
    "FormatVersionError",
    "InsufficientSharedMemory",
    "CheckpointError",
    "ServerStartError",
    "NotSupportedError",
    "MissingDependencyError",
    "PermissionDenied",
    "TooManyOpenFiles",
    "__version__",
]
