"""The seccomp generator, checked by an in-test classic-BPF interpreter and the headers."""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest

from forgehand.sandbox import seccomp
from forgehand.sandbox.errors import SeccompError

X86_HEADER = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
GENERIC_HEADER = Path("/usr/include/asm-generic/unistd.h")
AUDIT_ARCH_I386 = 0x40000003


def run_filter(program: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """Execute a sock_filter program on a seccomp_data; returns the action."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    for _ in range(len(insns)):
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == 0x06:
            return int(k)
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += 1 + (jt if taken else jf)
    raise AssertionError("filter ran off its end")


def nr(name: str, arch: str = "x86_64") -> int:
    number = seccomp.syscall_number(name, arch)
    assert number is not None
    return number


X86 = seccomp.ARCHES["x86_64"].audit_arch
EPERM = 0x50000 | errno.EPERM
ENOSYS = 0x50000 | errno.ENOSYS


@pytest.fixture(scope="module")
def x86_filter() -> bytes:
    return seccomp.build_filter("x86_64")


def test_plain_denials(x86_filter: bytes) -> None:
    for name in ("ptrace", "mount", "bpf", "keyctl", "setns", "init_module", "iopl"):
        assert run_filter(x86_filter, nr(name), X86) == EPERM, name


def test_ordinary_syscalls_allowed(x86_filter: bytes) -> None:
    for number in (0, 1, 2, 57, 59, 60):  # read write open fork execve exit
        assert run_filter(x86_filter, number, X86) == seccomp.RET_ALLOW


def test_foreign_arch_killed(x86_filter: bytes) -> None:
    assert run_filter(x86_filter, 1, AUDIT_ARCH_I386) == seccomp.RET_KILL_PROCESS


def test_x32_abi_denied(x86_filter: bytes) -> None:
    assert run_filter(x86_filter, 0x40000000 | 1, X86) == ENOSYS


def test_clone_with_namespace_flags(x86_filter: bytes) -> None:
    clone = nr("clone")
    assert run_filter(x86_filter, clone, X86, (seccomp.CLONE_NEWUSER | 17,)) == EPERM
    assert run_filter(x86_filter, clone, X86, (seccomp.CLONE_NEWNET,)) == EPERM
    assert run_filter(x86_filter, clone, X86, (0x01200011,)) == seccomp.RET_ALLOW  # fork()
    assert run_filter(x86_filter, nr("clone3"), X86) == ENOSYS


def test_unshare_personality_ioctl(x86_filter: bytes) -> None:
    assert run_filter(x86_filter, nr("unshare"), X86, (seccomp.CLONE_NEWUSER,)) == EPERM
    assert run_filter(x86_filter, nr("unshare"), X86, (0x400,)) == seccomp.RET_ALLOW
    assert run_filter(x86_filter, nr("personality"), X86, (0xFFFFFFFF,)) == seccomp.RET_ALLOW
    assert run_filter(x86_filter, nr("personality"), X86, (0x0040000,)) == EPERM
    assert run_filter(x86_filter, nr("ioctl"), X86, (0, seccomp.TIOCSTI)) == EPERM
    assert run_filter(x86_filter, nr("ioctl"), X86, (0, 0x5401)) == seccomp.RET_ALLOW


def test_aarch64_filter() -> None:
    program = seccomp.build_filter("aarch64")
    arm = seccomp.ARCHES["aarch64"].audit_arch
    assert run_filter(program, nr("ptrace", "aarch64"), arm) == EPERM
    assert run_filter(program, 63, arm) == seccomp.RET_ALLOW  # read
    assert run_filter(program, 63, X86) == seccomp.RET_KILL_PROCESS


def test_unknown_arch_is_our_error() -> None:
    with pytest.raises(SeccompError, match="gvisor"):
        seccomp.build_filter("s390x")


def _header_numbers(path: Path) -> dict[str, int]:
    pattern = re.compile(r"#define __NR_(\w+)\s+(\d+)")
    return {m[1]: int(m[2]) for m in pattern.finditer(path.read_text())}


@pytest.mark.parametrize(("header", "column"), [(X86_HEADER, 0), (GENERIC_HEADER, 1)])
def test_numbers_match_kernel_headers(header: Path, column: int) -> None:
    if not header.exists():
        pytest.skip(f"{header} missing: install the `linux-libc-dev` package")
    numbers = _header_numbers(header)
    for name, pair in seccomp.SYSCALLS.items():
        assert pair[column] == numbers.get(name), name
