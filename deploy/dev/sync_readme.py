"""Copy configs/gateway.example.toml into README.md's configuration reference (the ```toml block)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"(<summary>configs/gateway\.example\.toml[^\n]*\n\n```toml\n)(.*?)(```\n)", re.S)


def synced(readme: str, example: str) -> str:
    if not BLOCK.search(readme):
        raise SystemExit("README.md has no <summary>configs/gateway.example.toml ...</summary> ```toml block")
    return BLOCK.sub(lambda m: m.group(1) + example + m.group(3), readme, count=1)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    new = synced(text, (ROOT / "configs" / "gateway.example.toml").read_text(encoding="utf-8"))
    if new != text:
        readme.write_text(new, encoding="utf-8")
        print("README.md: configuration reference updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
