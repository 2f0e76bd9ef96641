"""The public face of the package is exactly what we mean to export."""

import shmreplay


def test_all_is_pinned():
    assert sorted(shmreplay.__all__) == sorted(
        [
            "attach",
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
            "Server",
            "ServerStartError",
            "NotSupportedError",
            "MissingDependencyError",
            "PermissionDenied",
            "TooManyOpenFiles",
            "__version__",
        ]
    )
    for name in shmreplay.__all__:
        assert hasattr(shmreplay, name)


def test_errors_inherit_the_matching_builtins():
    assert issubclass(shmreplay.TableNotFoundError, KeyError)
    assert issubclass(shmreplay.RateLimiterTimeout, TimeoutError)
    assert issubclass(shmreplay.SignatureError, ValueError)
    assert issubclass(shmreplay.DaemonNotRunning, ConnectionError)
    assert issubclass(shmreplay.DaemonBusy, TimeoutError)
    assert issubclass(shmreplay.PermissionDenied, PermissionError)
    assert issubclass(shmreplay.TooManyOpenFiles, OSError)
    assert issubclass(shmreplay.MissingDependencyError, ImportError)
    for name in shmreplay.__all__:
        obj = getattr(shmreplay, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, shmreplay.ShmReplayError)
