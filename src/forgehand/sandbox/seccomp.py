"""A classic-BPF seccomp filter, generated in pure Python (no libseccomp).

``build_filter()`` returns the bytes of a ``struct sock_filter[]`` in native byte order,
the format ``bwrap --seccomp FD`` reads. The filter

1. kills the process when the syscall comes from a foreign architecture (for example
   i386 ``int 0x80`` on an x86_64 host, which would bypass every rule by number);
2. on x86_64, fails x32-ABI syscalls with ENOSYS (their numbers alias the 64-bit ones);
3. fails the syscalls in ``DEFAULT_RULES`` with EPERM (ENOSYS where libc should fall
   back, as for ``clone3``), some only for certain argument values;
4. allows everything else.

The deny list follows Docker's default profile and bubblewrap's/Flatpak's filter:
kernel, mount, module, key, time, tracing and namespace syscalls.
"""

from __future__ import annotations

import errno
import platform
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from forgehand.sandbox.errors import SeccompError

# linux/filter.h, linux/seccomp.h, linux/audit.h
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JGE_K = 0x35
_BPF_JSET_K = 0x45
_BPF_RET_K = 0x06
RET_KILL_PROCESS = 0x80000000
RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_OFFSET_NR = 0
_OFFSET_ARCH = 4
_OFFSET_ARGS = 16
_X32_SYSCALL_BIT = 0x40000000

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = (
    CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
)
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
# personality(2) values Docker allows: PER_LINUX, PER_LINUX32, UNAME26 (alone and with
# PER_LINUX32) and the 0xffffffff query.
ALLOWED_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)


@dataclass(frozen=True)
class Arch:
    """An architecture the filter supports."""

    name: str
    audit_arch: int
    index: int
    """Column of this architecture in ``SYSCALLS``."""
    has_x32: bool


ARCHES = {
    "x86_64": Arch("x86_64", 0xC000003E, 0, has_x32=True),
    "aarch64": Arch("aarch64", 0xC00000B7, 1, has_x32=False),
}
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

# name: (x86_64 number, aarch64 number); None where the architecture lacks the syscall.
# Taken from asm/unistd_64.h and asm-generic/unistd.h (tests cross-check the headers).
SYSCALLS: dict[str, tuple[int | None, int | None]] = {
    "ptrace": (101, 117),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "userfaultfd": (323, 282),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "create_module": (174, None),
    "get_kernel_syms": (177, None),
    "query_module": (178, None),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "reboot": (169, 142),
    "settimeofday": (164, 170),
    "clock_settime": (227, 112),
    "clock_adjtime": (305, 266),
    "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264),
    "quotactl": (179, 60),
    "quotactl_fd": (443, 443),
    "acct": (163, 89),
    "setns": (308, 268),
    "iopl": (172, None),
    "ioperm": (173, None),
    "modify_ldt": (154, None),
    "lookup_dcookie": (212, 18),
    "vmsplice": (278, 75),
    "syslog": (103, 116),
    "uselib": (134, None),
    "ustat": (136, None),
    "sysfs": (139, None),
    "_sysctl": (156, None),
    "nfsservctl": (180, 42),
    "vhangup": (153, 58),
    "move_pages": (279, 239),
    "migrate_pages": (256, 238),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "kcmp": (312, 272),
    "pidfd_getfd": (438, 438),
    "fanotify_init": (300, 262),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "mount_setattr": (442, 442),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "clone3": (435, 435),
    "clone": (56, 220),
    "unshare": (272, 97),
    "personality": (135, 92),
    "ioctl": (16, 29),
}


@dataclass(frozen=True)
class Deny:
    """Fail the syscall with ``err`` whatever its arguments."""

    syscall: str
    err: int = errno.EPERM


@dataclass(frozen=True)
class DenyIfBitsSet:
    """Fail the syscall when argument ``arg`` (low 32 bits) has any bit of ``mask`` set."""

    syscall: str
    arg: int
    mask: int
    err: int = errno.EPERM


@dataclass(frozen=True)
class DenyIfIn:
    """Fail the syscall when argument ``arg`` (low 32 bits) is one of ``values``."""

    syscall: str
    arg: int
    values: tuple[int, ...]
    err: int = errno.EPERM


@dataclass(frozen=True)
class DenyUnlessIn:
    """Fail the syscall unless argument ``arg`` (low 32 bits) is one of ``values``."""

    syscall: str
    arg: int
    values: tuple[int, ...]
    err: int = errno.EPERM


Rule = Deny | DenyIfBitsSet | DenyIfIn | DenyUnlessIn

_PLAIN_DENIALS = (
    "ptrace",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "kexec_load",
    "kexec_file_load",
    "userfaultfd",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "swapon",
    "swapoff",
    "reboot",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "open_by_handle_at",
    "name_to_handle_at",
    "quotactl",
    "quotactl_fd",
    "acct",
    "setns",
    "iopl",
    "ioperm",
    "modify_ldt",
    "lookup_dcookie",
    "vmsplice",
    "syslog",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "nfsservctl",
    "vhangup",
    "move_pages",
    "migrate_pages",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    "fanotify_init",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "open_tree",
    "move_mount",
    "mount_setattr",
)

DEFAULT_RULES: tuple[Rule, ...] = (
    *(Deny(name) for name in _PLAIN_DENIALS),
    # ENOSYS: callers treat these as "kernel too old" and fall back (clone3 -> clone).
    Deny("clone3", errno.ENOSYS),
    Deny("io_uring_setup", errno.ENOSYS),
    Deny("io_uring_enter", errno.ENOSYS),
    Deny("io_uring_register", errno.ENOSYS),
    DenyIfBitsSet("clone", 0, NAMESPACE_FLAGS),
    DenyIfBitsSet("unshare", 0, NAMESPACE_FLAGS),
    DenyUnlessIn("personality", 0, ALLOWED_PERSONALITIES),
    # TIOCSTI/TIOCLINUX push input into the controlling terminal outside the sandbox.
    DenyIfIn("ioctl", 1, (TIOCSTI, TIOCLINUX)),
)


def host_arch() -> str:
    """The running machine's architecture name, as used in ``ARCHES``."""
    machine = platform.machine().lower()
    return _MACHINE_ALIASES.get(machine, machine)


def build_filter(arch: str | None = None, rules: Sequence[Rule] = DEFAULT_RULES) -> bytes:
    """The seccomp filter for ``arch`` (default: this machine) as ``sock_filter`` bytes."""
    target = _arch(arch or host_arch())
    program = [*_arch_check(target), *_load(_OFFSET_NR)]
    if target.has_x32:
        program += [_jump(_BPF_JGE_K, _X32_SYSCALL_BIT, 0, 1), _ret_errno(errno.ENOSYS)]
    for rule in rules:
        program += _compile(rule, target)
    program.append(_ret(RET_ALLOW))
    return b"".join(program)


def syscall_number(name: str, arch: str | None = None) -> int | None:
    """The number of syscall ``name`` on ``arch``, or None if that architecture lacks it."""
    return SYSCALLS[name][_arch(arch or host_arch()).index]


def _arch(name: str) -> Arch:
    try:
        return ARCHES[name]
    except KeyError:
        supported = ", ".join(ARCHES)
        raise SeccompError(
            f"no seccomp filter for architecture {name!r}: run on {supported} "
            "or choose backend=gvisor"
        ) from None


def _arch_check(arch: Arch) -> list[bytes]:
    return [
        *_load(_OFFSET_ARCH),
        _jump(_BPF_JEQ_K, arch.audit_arch, 1, 0),
        _ret(RET_KILL_PROCESS),
    ]


def _compile(rule: Rule, arch: Arch) -> list[bytes]:
    number = SYSCALLS[rule.syscall][arch.index]
    if number is None:
        return []
    body = _body(rule)
    return [_jump(_BPF_JEQ_K, number, 0, len(body)), *body]


def _body(rule: Rule) -> list[bytes]:
    """Instructions run when the syscall number matched; each path ends in a return."""
    if isinstance(rule, Deny):
        return [_ret_errno(rule.err)]
    load = _load(_OFFSET_ARGS + 8 * rule.arg)
    if isinstance(rule, DenyIfBitsSet):
        return [*load, _jump(_BPF_JSET_K, rule.mask, 0, 1), _ret_errno(rule.err), _ret(RET_ALLOW)]
    if isinstance(rule, DenyIfIn):
        return [*load, *_match_any(rule.values), _ret(RET_ALLOW), _ret_errno(rule.err)]
    return [*load, *_match_any(rule.values), _ret_errno(rule.err), _ret(RET_ALLOW)]


def _match_any(values: Iterable[int]) -> list[bytes]:
    """Jumps to the second instruction after the list when A equals any value."""
    values = tuple(values)
    count = len(values)
    return [_jump(_BPF_JEQ_K, value, count - i, 0) for i, value in enumerate(values)]


def _load(offset: int) -> list[bytes]:
    # Arguments are read as their low 32 bits (little-endian on both architectures).
    return [_stmt(_BPF_LD_W_ABS, offset)]


def _ret_errno(err: int) -> bytes:
    return _ret(_RET_ERRNO | (err & 0xFFFF))


def _ret(action: int) -> bytes:
    return _stmt(_BPF_RET_K, action)


def _stmt(code: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, 0, 0, k)


def _jump(code: int, k: int, jt: int, jf: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)
