"""Move result files that are history out of the source tree into one archive, bench/results/history.tar.xz.

    python bench/archive_results.py PATH ...            # add files or folders, then delete them from the tree
    python bench/archive_results.py --keep SRC=NAME     # add SRC under the member name NAME, keep SRC
    python bench/archive_results.py --list
    python bench/archive_results.py --extract DIR       # unpack a copy, e.g. into /tmp/history

A member keeps its repository path (`bench/results/eval/tried/step5963/one.jsonl`), so a page that cites
"in bench/results/history.tar.xz: <path>" names the member. Adding a path that is already a member replaces
it. The archive is rebuilt whole each time, deterministically (members sorted by name, owner root, mode
0644, a fixed mtime, xz preset 9e): the same members give the same bytes.
"""

from __future__ import annotations

import argparse
import io
import lzma
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE = ROOT / "bench" / "results" / "history.tar.xz"
MTIME = 1_796_083_200  # 2026-12-01T00:00:00Z, for every member: git keeps no file times to reproduce


def read_members(archive: Path) -> dict[str, bytes]:
    if not archive.is_file():
        return {}
    with tarfile.open(archive, "r:xz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def write_members(archive: Path, members: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(members[name]), MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(members[name]))
    tmp = archive.with_name(archive.name + ".tmp")
    tmp.write_bytes(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    tmp.replace(archive)


def sources(spec: str) -> list[tuple[Path, str]]:
    """(file, member name) pairs for PATH (a file or every file under a folder) or SRC=NAME (one file)."""
    src, _, name = spec.partition("=")
    path = (ROOT / src).resolve() if not Path(src).is_absolute() else Path(src)
    if not path.exists():
        raise SystemExit(f"{src}: no such file or folder")
    if name:
        if not path.is_file():
            raise SystemExit(f"{src}: SRC=NAME takes one file")
        return [(path, name)]
    if ROOT not in path.parents:
        raise SystemExit(f"{src}: outside the repository (give it a member name: SRC=NAME)")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(p, p.relative_to(ROOT).as_posix()) for p in files]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/archive_results.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", metavar="PATH[=NAME]")
    p.add_argument("--keep", action="store_true", help="do not delete the added files from the tree")
    p.add_argument("--list", action="store_true", help="list the members and their sizes")
    p.add_argument("--extract", metavar="DIR", help="unpack every member under DIR")
    p.add_argument("--archive", default=str(ARCHIVE), help=f"default: {ARCHIVE.relative_to(ROOT)}")
    args = p.parse_args(argv)
    archive = Path(args.archive)

    if args.list or args.extract:
        members = read_members(archive)
        for name, data in sorted(members.items()):
            print(f"{len(data):>10,}  {name}")
        if args.extract:
            with tarfile.open(archive, "r:xz") as tar:
                tar.extractall(args.extract, filter="data")
            print(f"extracted {len(members)} files under {args.extract}", file=sys.stderr)
        return 0
    if not args.paths:
        p.error("nothing to add (give PATH ..., or --list / --extract DIR)")

    members = read_members(archive)
    added = [pair for spec in args.paths for pair in sources(spec)]
    for path, name in added:
        members[name] = path.read_bytes()
    write_members(archive, members)
    check = read_members(archive)  # read back before deleting anything
    assert all(check[name] == path.read_bytes() for path, name in added)
    if not args.keep:
        for path, _ in added:
            path.unlink()
        for d in sorted({q for path, _ in added for q in path.parents if ROOT in q.parents},
                        key=lambda q: len(q.parts), reverse=True):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    size = archive.stat().st_size
    print(f"{archive.relative_to(ROOT) if ROOT in archive.parents else archive}: {len(members)} members "
          f"({len(added)} added{'' if args.keep else ', removed from the tree'}), {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
