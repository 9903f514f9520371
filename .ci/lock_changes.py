"""Print what changed between two folders of lock files: `python lock_changes.py OLD_DIR NEW_DIR`."""

import re
import sys
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", re.MULTILINE)


def pins(path: Path) -> dict[str, str]:
    return dict(PIN.findall(path.read_text())) if path.is_file() else {}


def main(old_dir: str, new_dir: str) -> None:
    changed = False
    for new in sorted(Path(new_dir).glob("*.txt")):
        old, now = pins(Path(old_dir) / new.name), pins(new)
        lines = [f"  {name}: {old.get(name, '-')} -> {now.get(name, '-')}"
                 for name in sorted(set(old) | set(now)) if old.get(name) != now.get(name)]
        if lines:
            changed = True
            print(f"{new.name}:", *lines, sep="\n")
    print("" if changed else "no version changed")


if __name__ == "__main__":
    main(*sys.argv[1:3])
