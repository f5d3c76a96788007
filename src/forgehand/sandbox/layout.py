"""What fills a sandbox's root, and how the runner's interpreter starts in it.

Every sandbox's ``/`` is its own: bwrap's tmpfs, or the per-sandbox directory of the OCI
backends (``rootfs.prepare_rootfs``), read-only, holding the mount points. What comes in:

- ``root: host`` (the default): the host's /usr and its merged top-level directories
  (``HOST_TOP_DIRS``), read-only, and a chosen few of the host's /etc files. The runner
  runs on the host's interpreter there, like every other program.
- ``root: dir`` (``custom_root``): each top-level entry of that directory — a directory or
  file bound read-only, a symlink made again as the same symlink — except the sandbox's
  own ``/proc``, ``/dev``, ``/sys``, ``/tmp`` and ``/run``. ``/etc`` is the root's, with
  the sandbox's generated accounts, hosts and hostname in place of its own (``etc``).
  ``/opt`` holds the root's entries but ``/opt/forgehand``, which is the runner's.

The runs of a custom root are the root's programs; the runner cannot count on the root
having a Python at all (Alpine, distroless), let alone the host's with gRPC. So it brings
its own userland (``runner_userland``): the host's /usr (and any unmerged ``/lib``…) at
``/opt/forgehand/host``, read-only, started through the host's own dynamic loader with the
host's library directories and without the root's ``ld.so.cache`` (``module_argv``):
no library of the root is ever loaded into the runner. The loader's options bind only
that process; what the runner starts is linked as the root says. No option turns off
``/etc/ld.so.preload``, which every loader reads, so the root's is left out of the
sandbox (``LOADER_ETC``): its runs do without it. The runner resolves no names (users,
hosts), so the root's ``nsswitch.conf`` loads no module into it. The same userland
exposes nothing new: a default sandbox sees the host's /usr at /usr.
"""

from __future__ import annotations

import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from forgehand.sandbox.errors import BackendUnavailable, SandboxLaunchError
from forgehand.sandbox.spec import RUNNER_USERLAND_DIR, DirRoot, SandboxSpec

HOST_TOP_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
"""The host's top-level system directories besides /usr (symlinks into it when merged)."""
OPT = RUNNER_USERLAND_DIR
"""The runner's own directory in every sandbox."""
VENV_TARGET = OPT / "venv"
SRC_TARGET = OPT / "src"
HOST_USERLAND = OPT / "host"
"""Where a custom root's sandbox gets the host's /usr (and unmerged top dirs), for the runner."""
OWN_TOP = frozenset({"proc", "dev", "sys", "tmp", "run"})
"""Top-level directories every sandbox makes for itself, whatever the root holds."""
GENERATED_ETC = frozenset({"passwd", "group", "hosts", "hostname", "resolv.conf"})
"""/etc files every sandbox gets from forgehand, never from the root or the host."""
LOADER_ETC = frozenset({"ld.so.preload"})
"""/etc files of a root left out: every dynamic loader reads them at start, the runner's
too, so the root's ``ld.so.preload`` would load the root's libraries into the runner."""
PT_INTERP = 3
_SAFE_NAME = re.compile(r"^[^:,\x00-\x1f\x7f]+$")


@dataclass(frozen=True)
class Bind:
    """A host path made visible read-only at ``target``."""

    source: Path
    target: PurePosixPath


@dataclass(frozen=True)
class Link:
    """A symlink at ``path`` pointing to ``to`` (as the root has it)."""

    path: PurePosixPath
    to: str


@dataclass(frozen=True)
class CustomRoot:
    """What a ``root: dir`` puts in the sandbox's root (see the module docstring)."""

    binds: tuple[Bind, ...]
    """Directories and files, read-only."""
    links: tuple[Link, ...]
    """Symlinks, made again in the sandbox's root."""
    etc: tuple[Bind | Link, ...]
    """The root's /etc entries but the generated ones."""


def custom_root(spec: SandboxSpec) -> CustomRoot | None:
    """The custom root of ``spec`` (None for ``root: host``), checked against the mount
    points the sandbox needs inside it. Blocking: it lists directories."""
    if not isinstance(spec.root, DirRoot):
        return None
    base = spec.root.path
    top = _entries(base, PurePosixPath("/"), skip=OWN_TOP | {"etc", "opt"})
    opt = _entries(base / "opt", PurePosixPath("/opt"), skip={OPT.name})
    etc = _entries(base / "etc", PurePosixPath("/etc"), skip=GENERATED_ETC | LOADER_ETC)
    hidden = {PurePosixPath(spec.work_dir.sandbox_path), *(m.destination for m in spec.ro_mounts)}
    root = CustomRoot(  # an entry the work dir or an extra mount covers is not bound
        binds=tuple(e for e in (*top, *opt) if isinstance(e, Bind) and e.target not in hidden),
        links=tuple(e for e in (*top, *opt) if isinstance(e, Link)),
        etc=tuple(etc),
    )
    _check_mount_points(spec, root)
    return root


def _entries(
    directory: Path, inside: PurePosixPath, skip: set[str] | frozenset[str]
) -> list[Bind | Link]:
    """``directory``'s entries, to appear in ``inside``. Left out: special files (devices,
    sockets, fifos), since a root brings programs and data; names with a character mount
    options give a meaning (``:``, ``,``) or a control character; and a root's ``etc`` or
    ``opt`` that is a symlink, not listed at all: on the host it would lead out of the root
    (an image with ``etc -> /etc`` must not bring the host's /etc in), so the sandbox gets
    only its own generated /etc files and the runner's /opt."""
    found: list[Bind | Link] = []
    if inside != PurePosixPath("/") and directory.is_symlink():
        return found
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise SandboxLaunchError(f"cannot list the root's {inside} ({directory}): {exc}") from None
    for name in names:
        if name in skip or not _SAFE_NAME.match(name):
            continue
        path = directory / name
        target = inside / name
        if path.is_symlink():
            found.append(Link(target, os.readlink(path)))
        elif path.is_dir() or path.is_file():
            found.append(Bind(path, target))
    return found


def _check_mount_points(spec: SandboxSpec, root: CustomRoot) -> None:
    """A work dir or extra mount inside a directory the root brings needs its mount point
    there already: the root is read-only, so the sandbox cannot make it."""
    assert isinstance(spec.root, DirRoot)
    bound = {b.target for b in root.binds}
    points = [spec.work_dir.sandbox_path, *(m.destination for m in spec.ro_mounts)]
    for point in (PurePosixPath(p) for p in points):
        under = [b for b in bound if point != b and point.is_relative_to(b)]
        if not under or (spec.root.path / point.relative_to("/")).exists():
            continue
        raise SandboxLaunchError(
            f"{point} lies in the root's {under[0]}, which lacks it: create {point} in "
            f"{spec.root.path} (the root is read-only in the sandbox) or choose a path "
            "outside the root's directories, such as /work"
        )


@dataclass(frozen=True)
class RunnerUserland:
    """The host's interpreter, its libraries and the runner's package, for a custom root."""

    binds: tuple[Bind, ...]
    """Host /usr (and unmerged top dirs) at ``HOST_USERLAND``, the venv and the source."""
    loader: PurePosixPath
    """The host's dynamic loader, as the sandbox sees it."""
    library_path: tuple[PurePosixPath, ...]
    """The host's library directories, as the sandbox sees them."""
    python: PurePosixPath
    """The host's interpreter, as the sandbox sees it."""
    site_packages: PurePosixPath
    """The venv's site-packages, as the sandbox sees it."""

    def python_m(self) -> list[str]:
        """What stands for ``python -m`` on this userland, whatever the root holds: the
        module's name and arguments follow."""
        path = [str(SRC_TARGET), str(self.site_packages)]
        boot = (
            f"import runpy,sys;sys.path[:0]={path!r};del sys.argv[0];"
            "runpy.run_module(sys.argv[0],run_name='__main__',alter_sys=True)"
        )
        return [
            str(self.loader),
            "--inhibit-cache",
            *("--library-path", ":".join(map(str, self.library_path))),
            str(self.python),
            *("-I", "-S", "-B", "-c", boot),
        ]


def runner_userland(venv: Path, source: Path) -> RunnerUserland:
    """The userland the runner brings into a custom root: ``venv``'s interpreter (which
    must be the host's, under /usr), the host's libraries and the ``source`` tree."""
    python = (venv / "bin" / "python").resolve()
    loader = Path(os.path.realpath(elf_interpreter(python)))
    binds = [Bind(host, _host_target(host)) for host in _host_system_dirs()]
    binds += [Bind(venv, VENV_TARGET), Bind(source, SRC_TARGET)]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return RunnerUserland(
        binds=tuple(binds),
        loader=_host_target(loader),
        library_path=tuple(_host_target(d) for d in host_library_dirs(loader)),
        python=_host_target(python),
        site_packages=VENV_TARGET / "lib" / version / "site-packages",
    )


def _host_system_dirs() -> list[Path]:
    real = [Path("/", n) for n in HOST_TOP_DIRS if Path("/", n).is_dir()]
    return [Path("/usr"), *(p for p in real if not p.is_symlink())]


def _host_target(host: Path) -> PurePosixPath:
    """Where the host path ``host`` (resolved) appears inside a custom root's sandbox."""
    pure = PurePosixPath(host)
    for system in _host_system_dirs():
        if pure.is_relative_to(system):
            return HOST_USERLAND / pure.relative_to("/")
    raise BackendUnavailable(
        f"{host} lies outside the host's /usr and system directories, so a sandbox with a "
        "custom root cannot run the runner from it: build the venv on /usr/bin/python3"
    )


def host_library_dirs(loader: Path) -> tuple[Path, ...]:
    """The host's system library directories (resolved): the dynamic loader's own (the
    multiarch directory, ``/usr/lib/x86_64-linux-gnu`` on Debian), then /usr/lib and /lib.
    Extension modules find their bundled libraries through their own RPATH."""
    dirs = [loader.parent, *(Path(os.path.realpath(p)) for p in ("/usr/lib", "/lib"))]
    return tuple(d for d in dict.fromkeys(dirs) if d.is_dir())


def elf_interpreter(binary: Path) -> str:
    """The program interpreter (``PT_INTERP``) of a 64-bit little-endian ELF binary."""
    try:
        with binary.open("rb") as file:
            header = file.read(64)
            if header[:6] != b"\x7fELF\x02\x01":
                raise BackendUnavailable(f"{binary} is not a 64-bit little-endian ELF program")
            (phoff,) = struct.unpack_from("<Q", header, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
            file.seek(phoff)
            table = file.read(phentsize * phnum)
            for index in range(phnum):
                kind, _flags, offset, _v, _p, size = struct.unpack_from(
                    "<IIQQQQ", table, index * phentsize
                )
                if kind == PT_INTERP:
                    file.seek(offset)
                    return file.read(size).rstrip(b"\0").decode()
    except OSError as exc:
        raise BackendUnavailable(f"cannot read the runner's interpreter {binary}: {exc}") from None
    raise BackendUnavailable(f"{binary} names no program interpreter (is it static?)")
