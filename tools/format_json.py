"""Rewrite (or check) every bundle JSON file in the model-zoo format: 4-space indent, key order kept.

    python tools/format_json.py          # rewrite in place
    python tools/format_json.py --check  # exit 1 listing files that are not formatted
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire

ROOT = Path(__file__).resolve().parents[1]


def formatted(path: Path) -> str:
    return json.dumps(json.loads(path.read_text()), indent=4, ensure_ascii=False) + "\n"


def bundle_json_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / "bundles").rglob("*.json") if "models" not in p.parts and "eval" not in p.parts)


def main(check: bool = False) -> None:
    bad = [p for p in bundle_json_files() if p.read_text() != formatted(p)]
    if check:
        for p in bad:
            print(f"not formatted: {p.relative_to(ROOT)}")
        sys.exit(1 if bad else 0)
    for p in bad:
        p.write_text(formatted(p))
        print(f"formatted {p.relative_to(ROOT)}")


if __name__ == "__main__":
    fire.Fire(main)
