"""Who owns an instance's objects, and the errors that say so.

Shared by everything that opens an instance's files (segments, semaphores, records, sockets):
a client refuses an object another user planted (:func:`planted`), a daemon leaves another
user's object alone (:func:`in_the_way`), and a process that may not open an object is told
who owns it and how to get access (:func:`access_denied`). Running out of file descriptors is
reported the same way everywhere (:func:`out_of_descriptors`).
"""

from __future__ import annotations

import errno
import os
import resource
import stat

from ..errors import PermissionDenied, TooManyOpenFiles


def planted(path: str | os.PathLike, what: str, problem: str) -> PermissionDenied:
    """The error for an object of an instance that a client must not trust: ``problem`` says
    why (a symlink, another user's file, another process on the socket)."""
    return PermissionDenied(
        f"refusing to use {path} ({what}): {problem}. A shmreplay daemon did not make it; "
        "someone may be posing as the daemon. Do not use this instance until whoever runs it "
        "has checked and removed the object (and restarted the daemon)"
    )


def in_the_way(path: str | os.PathLike, what: str) -> PermissionDenied:
    """The error of a daemon that finds ``path`` (``what`` it would be) owned by another user
    or not a regular file: it neither adopts nor removes it."""
    try:
        st = os.lstat(path)
        owner = (
            f"it belongs to {_user(st.st_uid)} (mode {stat.S_IMODE(st.st_mode):04o}"
            + ("" if stat.S_ISREG(st.st_mode) else ", not a regular file")
            + ")"
        )
    except OSError:
        owner = "it cannot be inspected"
    return PermissionDenied(
        f"{path} is in the way of this daemon ({what}): {owner}, not to this daemon's user "
        f"({_user(os.geteuid())}), so it was not made by a daemon of this user and is neither "
        f"adopted nor removed. Check what it is and remove it (rm {path}), or serve under "
        "another --name"
    )


def check_owner(
    path: str | os.PathLike, st: os.stat_result, uid: int, what: str, daemon: bool = False
) -> None:
    """Raise unless ``st`` (of ``path``) is a regular file of user ``uid``: for a client
    (``uid`` the daemon's user) :func:`planted`, for the daemon (``daemon=True``, ``uid`` its
    own) :func:`in_the_way`."""
    if stat.S_ISREG(st.st_mode) and st.st_uid == uid:
        return
    if daemon:
        raise in_the_way(path, what)
    problem = (
        "it is not a regular file"
        if not stat.S_ISREG(st.st_mode)
        else f"it belongs to {_user(st.st_uid)}, not to the daemon's user ({_user(uid)})"
    )
    raise planted(path, what, problem)


def _user(uid: int) -> str:
    import pwd

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def access_denied(path: str | os.PathLike, what: str) -> PermissionDenied:
    """The error for an instance object ``path`` (``what`` it is) this process may not open:
    who owns it, its mode, who we are, and how to get access."""
    me = f"{_user(os.geteuid())}, groups {sorted({os.getegid(), *os.getgroups()})}"
    try:
        st = os.stat(path)
    except OSError:  # not even visible: a directory on the way is closed to us
        return PermissionDenied(
            f"cannot open {path} ({what}) as {me}: a directory on its path is closed to this "
            'user. Run as the daemon\'s user, or set group = "<group>" in [server] of the '
            "daemon's tables.toml (and SHMREPLAY_RUNTIME_DIR to a directory that group can "
            "enter), restart the daemon and add this user to that group"
        )
    owner = f"{_user(st.st_uid)}, group {_group(st.st_gid)}, mode {stat.S_IMODE(st.st_mode):04o}"
    if st.st_mode & stat.S_IRWXG:
        how = (
            f"it is open to group {_group(st.st_gid)!r}: add this user to it "
            f"(usermod -aG {_group(st.st_gid)} <user>) and log in again"
        )
    else:
        how = (
            "the daemon keeps its tables private to its user: run as that user, or set "
            'group = "<group>" in [server] of the daemon\'s tables.toml, restart the daemon '
            "and add this user to that group"
        )
    return PermissionDenied(
        f"cannot open {path} ({what}): it belongs to {owner}; this process runs as {me}; {how}"
    )


def is_out_of_descriptors(exc: BaseException) -> bool:
    """True for the error of a call that found no free file descriptor (posix_ipc raises a
    bare OSError whose message says so, without an errno)."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in (errno.EMFILE, errno.ENFILE) or "number of files" in str(exc)


def out_of_descriptors(what: str) -> TooManyOpenFiles:
    """The error for running out of file descriptors while doing ``what``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = f"{len(os.listdir('/proc/self/fd'))} open"
    except OSError:
        used = "all in use"
    return TooManyOpenFiles(
        errno.EMFILE,
        f"{what}: this process has no file descriptor left ({used}, limit {soft}, hard limit "
        f"{hard}); close unused clients and files, or raise the limit (ulimit -n, "
        "resource.setrlimit(RLIMIT_NOFILE, ...), LimitNOFILE= in a systemd unit)",
    )
