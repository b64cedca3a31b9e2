"""configs/gateway.example.toml is the reference: it validates and names every key the gateway knows."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gateway.config import GatewayConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "gateway.example.toml"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for arg in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _keys(model: type[BaseModel]) -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        out.add(name)
        sub = _model_of(field.annotation)
        if sub is not None:
            out |= _keys(sub)
    return out


def test_example_validates() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.influx.batch_size == 5000


def test_example_names_every_key() -> None:
    text = EXAMPLE.read_text()
    named = set(re.findall(r"^[#\s]*([a-z_]+)\s*=", text, flags=re.M))
    named |= set(re.findall(r"[{,]\s*([a-z_]+)\s*=", text))
    sections = {s.split(".")[-1] for s in re.findall(r"^#?\s*\[+([a-z_.\"0-9]+)", text, flags=re.M)}
    missing = _keys(GatewayConfig) - named - sections - {"machines"}
    assert not missing, f"configs/gateway.example.toml does not document: {sorted(missing)}"


def test_example_defaults_match_the_models() -> None:
    """Active (uncommented) values in the example equal the models' defaults."""
    data = tomllib.loads(EXAMPLE.read_text())
    defaults = GatewayConfig.model_validate({}).model_dump(mode="python")

    def walk(d: dict[str, Any], ref: dict[str, Any], path: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and isinstance(ref.get(k), dict):
                walk(v, ref[k], f"{path}{k}.")
            elif k in ref and k not in ("dir", "path"):
                r = ref[k]
                if isinstance(r, tuple):
                    r = list(r)
                if isinstance(r, list) and r and isinstance(r[0], BaseModel):
                    r = [x.model_dump() for x in r]
                if isinstance(v, str) and isinstance(r, int):  # "1GiB"-style sizes
                    continue
                if isinstance(r, list) and r and isinstance(r[0], dict) and isinstance(v[0], str):
                    r = [x.get("topic") for x in r]
                assert v == r or str(v) == str(r), f"{path}{k}: example {v!r} != default {r!r}"

    walk(data, defaults, "")


def test_agent_example_loads() -> None:
    from devices.agent import load_config as load_agent

    cfg = load_agent(ROOT / "configs" / "pi-agent.toml")
    assert cfg.device.machine == "pi01"


def test_readme_shows_the_example_config_verbatim() -> None:
    from tests.scripts import load_script

    sync = load_script("deploy/dev/sync_readme.py", "sync_readme")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = (ROOT / "configs" / "gateway.example.toml").read_text(encoding="utf-8")
    assert sync.synced(readme, example) == readme, (
        "README.md's configuration reference differs from configs/gateway.example.toml: "
        "run python deploy/dev/sync_readme.py"
    )
    assert example in readme
